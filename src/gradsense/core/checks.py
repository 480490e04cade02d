"""Argument checks shared by every entry point: one clear error before any work starts.

This is the one checking path; analyses call it rather than growing their own copies:

- :func:`check_inputs`, :func:`check_positive_int`, :func:`check_memory`, :func:`check_names`, :func:`draw_seed`:
  arguments; :func:`suggest` and :func:`check_choice` for names (``did you mean 'integrated_gradients'?``);
- :func:`check_eval_mode`: BatchNorm/Dropout in train mode anywhere in the model (not only the root);
- :func:`first_forward` (and :func:`explain_model_errors` around a forward the caller runs itself): the first
  forward, on a two-row probe, with dtype/device mismatches named on both sides and shape errors named with the
  caller's own shapes (a probe failure reruns the caller's batch once, so torch's message never names the probe);
- :func:`check_loss_batch`: the first batch of a loss-based analysis - the forward above, labels present when
  the loss needs them, labels of every batch in range of the output width (:func:`check_labels`, for the losses
  whose labels :func:`gradsense.core.losses.label_kind` knows), the loss computable and a scalar.

Empty data and DataLoaders that yield no batch are refused by :func:`gradsense.core.distributed.iterate`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradsense.core.functional import describe_training, preserve_model, training_stochastic_layers
from gradsense.core.losses import ignore_index, label_kind, model_output, scored_output

__all__ = [
    "check_choice",
    "check_eval_mode",
    "check_inputs",
    "check_labels",
    "check_labels_fit",
    "check_loss_batch",
    "check_memory",
    "check_module_batch",
    "check_names",
    "check_out_dir",
    "check_positive_int",
    "check_scalar_loss",
    "draw_seed",
    "explain_model_errors",
    "first_forward",
    "known_labels",
    "suggest",
]


def suggest(value: Any, choices: Iterable[Any]) -> str:
    """`` Did you mean 'x'?`` for the choice closest to a misspelt ``value`` (empty when none is close).

    Appended to every "unknown name" message, so ``method='integrated_gradient'`` says which name was meant.
    """
    if not isinstance(value, str):
        return ""
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(value, names, n=1, cutoff=0.6)
    if not close:  # a different case or separator ('Integrated-Gradients') or a prefix ('integrated')
        norm = {c.lower().replace("-", "_").replace(" ", "_"): c for c in names}
        key = value.lower().replace("-", "_").replace(" ", "_")
        close = [norm[key]] if key in norm else [c for c in names if key and c.lower().startswith(key)][:1]
    return f" Did you mean {close[0]!r}?" if close else ""


def check_choice(value: Any, choices: Sequence[Any], name: str) -> Any:
    """Return ``value`` if it is one of ``choices``; otherwise one ``ValueError`` naming them (and the closest).

    Raises:
        ValueError: ``value`` is not a choice (also for unhashable or non-string values).
    """
    try:
        ok = value in choices
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.{suggest(value, choices)}")
    return value


def check_memory(max_memory: Any) -> int | None:
    """Parse ``max_memory`` (bytes, or a size such as ``"8GB"``) before any work; ``None`` passes through.

    Raises:
        ValueError: A size that is not understood or not positive (``"bad"``, ``-5``, ``"0GB"``).
    """
    if max_memory is None:
        return None
    from gradsense.core.batching import (
        parse_memory,  # batching imports torch only; imported here to stay light
    )

    return parse_memory(max_memory)


def check_out_dir(path: Any, name: str = "out") -> Path:
    """Check a folder argument (``out=``, ``log_dir=``) before any work: a path that is not an existing file.

    Raises:
        TypeError: Not a str or path.
        ValueError: The path exists and is a file (or something else that is not a folder), or lies inside a file.
    """
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a folder path (str or pathlib.Path), got {type(path).__name__}.")
    folder = Path(path)
    for p in (folder, *folder.parents):
        if p.exists() and not p.is_dir():
            where = "is" if p == folder else f"lies inside {p}, which is"
            raise ValueError(f"{name}={str(path)!r} {where} a file, not a folder: give a folder path (it is created "
                             "if needed), e.g. the file's name without its extension.")
    return folder


def check_names(names: Any, count: int, name: str, what: str) -> list[str] | None:
    """Check a list of labels for plots (``titles``, ``feature_names``): ``count`` strings, or ``None``.

    Args:
        names: What the caller passed.
        count: How many are needed.
        name: The argument, for the message.
        what: What each name names, e.g. ``"examples"`` or ``"features"``.

    Raises:
        TypeError: Not a list/tuple of strings (a single string is refused: it would be read letter by letter).
        ValueError: A different number of names than ``count``.
    """
    if names is None:
        return None
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(f"{name} must be a list of {count} strings (one per {what[:-1]}), got {type(names).__name__}.")
    if len(names) != count:
        raise ValueError(f"{name} has {len(names)} names, but there are {count} {what}; give one per {what[:-1]}.")
    return [str(n) for n in names]


def check_inputs(inputs: Any, *, name: str = "inputs", min_ndim: int = 2, needs_grad: bool = True) -> Tensor:
    """Check that ``inputs`` is a finite floating-point tensor with a batch dimension.

    Args:
        inputs: What the caller passed.
        name: Argument name used in messages.
        min_ndim: Minimum rank (batch dimension included).
        needs_grad: Whether gradients w.r.t. the inputs are needed (then integer dtypes are refused).

    Returns:
        The tensor.

    Raises:
        TypeError: Not a tensor, or an integer/bool tensor where gradients are needed.
        ValueError: Wrong rank, empty batch, NaN or Inf values.
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor with a batch dimension first, got {type(inputs).__name__}."
        )
    if inputs.ndim < min_ndim:
        raise ValueError(
            f"{name} must have a batch dimension first: expected at least {min_ndim} dimensions, got shape "
            f"{tuple(inputs.shape)}. For one example use x.unsqueeze(0)."
        )
    if inputs.shape[0] == 0:
        raise ValueError(f"{name} is empty (batch size 0).")
    if needs_grad and not (inputs.is_floating_point() or inputs.is_complex()):
        raise TypeError(
            f"{name} has dtype {inputs.dtype}, but gradients need floating-point inputs. Convert with "
            ".float(), or for token ids attribute at the embedding layer (gradsense.attribution tokens)."
        )
    if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        n_bad = int((~torch.isfinite(inputs)).sum())
        raise ValueError(f"{name} contains {n_bad} NaN/Inf values; clean or impute them first.")
    return inputs


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise ``ValueError``/``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return value


def _mismatch(model: nn.Module | None, inputs: Tensor) -> str | None:
    """Why floating-point ``inputs`` do not fit the model's parameters (dtype or device), or ``None``."""
    if model is None or not isinstance(inputs, Tensor):
        return None
    kinds = {(p.dtype, p.device) for p in model.parameters() if p.is_floating_point()}
    if len(kinds) != 1:
        return None
    ((dtype, device),) = kinds
    if not inputs.is_floating_point():
        if inputs.is_complex() or any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules()):
            return None  # token ids into an embedding: the failure is something else
        return (
            f"inputs are {inputs.dtype} (integers) but the model's parameters are {dtype}; convert them with "
            f"inputs.to({dtype}) (token ids need a model that starts with an nn.Embedding)."
        )
    if inputs.dtype != dtype:
        return (
            f"inputs are {inputs.dtype} but the model's parameters are {dtype}; convert them with "
            f"inputs.to({dtype}) (or analyse a copy of the model converted with .to({inputs.dtype}))."
        )
    if inputs.device != device:
        return f"inputs are on {inputs.device} but the model's parameters are on {device}; move them with inputs.to('{device}')."
    return None


#: What a model's forward may raise for inputs it cannot take (torch raises RuntimeError; Hugging Face models and
#: hand-written forwards raise ValueError, TypeError, IndexError or fail an assert).
MODEL_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, ValueError, TypeError, IndexError, AssertionError)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _model_error(
    err: BaseException,
    inputs: Tensor,
    what: str,
    model: nn.Module | None,
    rerun: Callable[[], Any] | None,
    probe_rows: int | None,
) -> BaseException:
    """The one clear error for a failed forward on ``inputs`` (or on its first ``probe_rows`` rows)."""
    mismatch = _mismatch(model, inputs)
    if mismatch is not None:
        out: BaseException = TypeError(f"{what}: {mismatch}")
        out.__cause__ = err
        return out
    shape = tuple(inputs.shape)
    if rerun is not None and probe_rows is not None and probe_rows < shape[0]:
        # torch names the shape it was given: that of the probe rows, which the caller never saw. Run the
        # caller's own batch once (only on this error path) so that the message names the caller's shapes.
        try:
            with torch.no_grad():
                rerun()
        except torch.OutOfMemoryError:
            pass
        except Exception as full:
            err = full
        else:
            out = ValueError(
                f"{what}: the model failed on the first {probe_rows} rows of inputs of shape {shape} but runs on all "
                f"{shape[0]}: its forward depends on the batch size ({_first_line(err)})."
            )
            out.__cause__ = err
            return out
    out = ValueError(
        f"{what}: the model failed on inputs of shape {shape} ({inputs.dtype}): {_first_line(err)}. "
        "Check that the inputs have the shape and dtype the model expects."
    )
    out.__cause__ = err
    return out


@contextmanager
def explain_model_errors(
    inputs: Tensor,
    what: str,
    model: nn.Module | None = None,
    *,
    rerun: Callable[[], Any] | None = None,
    probe_rows: int | None = None,
) -> Iterator[None]:
    """Turn a ``RuntimeError`` of the model's first forward into one clear error that names the inputs.

    Use it around the first forward an analysis runs (to check the target or the loss), so that inputs of
    the wrong shape give "the model failed on inputs of shape (16, 64)" and float64 inputs to a float32
    model give "inputs are torch.float64 but the model's parameters are torch.float32", rather than a
    traceback from inside a convolution. Nothing is checked before the forward: a model may cast its
    inputs itself. Out-of-memory errors pass through unchanged. Prefer :func:`first_forward`, which also
    catches the ``ValueError``/``TypeError`` that hand-written and Hugging Face forwards raise.

    Args:
        inputs: The caller's inputs (whose shape the message names).
        what: The analysis, for the message.
        model: The module, to say when the inputs' dtype or device differs from its parameters'.
        rerun: When the block ran only the first ``probe_rows`` rows: the forward on all of ``inputs``, run
            once when the probe fails, so that torch's message names the caller's shapes (not the probe's).
        probe_rows: How many rows the block's forward ran.

    Raises:
        TypeError: The forward failed and the inputs' dtype or device differs from the parameters'.
        ValueError: The forward failed otherwise (the original error is chained).
    """
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:
        exc = _model_error(err, inputs, what, model, rerun, probe_rows)
        raise exc from exc.__cause__


def first_forward(
    forward: Callable[[Tensor], Any],
    inputs: Tensor,
    *,
    what: str,
    model: nn.Module | None = None,
    probe: int | None = 2,
) -> Any:
    """Run the model's first forward, on the first ``probe`` rows of ``inputs``, under ``no_grad``.

    The one place where a forward that cannot take the inputs becomes one clear error before any work:
    dtype/device mismatches name both sides; anything else names the caller's input shape (torch's own
    message is taken from a rerun on all of ``inputs`` when the probe rows fail, so it never names an
    internal probe batch).

    Args:
        forward: ``rows -> output``.
        inputs: The caller's batch.
        what: The analysis, for the message.
        model: The module, to compare the inputs' dtype and device with its parameters'.
        probe: Rows to run (``None``: all of them).

    Returns:
        The output on the probe rows.

    Raises:
        TypeError: Inputs whose dtype or device differs from the parameters'.
        ValueError: Any other failure of the forward (chained to the model's error).
    """
    rows = inputs if probe is None or inputs.shape[0] <= probe else inputs[:probe]
    try:
        with torch.no_grad():
            return forward(rows)
    except torch.OutOfMemoryError:
        raise
    except MODEL_ERRORS as err:
        exc = _model_error(err, inputs, what, model, lambda: forward(inputs), rows.shape[0])
        raise exc from exc.__cause__


def check_eval_mode(model: nn.Module, what: str, *, hint: str = "") -> None:
    """Refuse a model with a BatchNorm or Dropout module in train mode, anywhere in it (not only the root).

    The one train-mode check of every analysis that needs a deterministic, per-example function.

    Args:
        model: The module.
        what: The analysis, for the message.
        hint: Appended to the advice, e.g. ``" (or pass allow_train_mode=True)"``.

    Raises:
        ValueError: Naming the train-mode layers, e.g. ``"BatchNorm/Dropout in train mode (bn1, drop)"``.
    """
    layers = training_stochastic_layers(model)
    if layers:
        raise ValueError(
            f"{what}: {describe_training(layers)}, so the result would depend on the batch and on random masks. "
            f"Call model.eval() first{hint}."
        )


def _loss_name(loss_fn: Any) -> str:
    return str(getattr(loss_fn, "__name__", None) or type(loss_fn).__name__)


def check_labels(loss_fn: Any, output: Any, labels: Any, *, what: str) -> None:
    """Check labels against what the loss needs and the model's output width, before any work.

    Only for losses whose labels are known (:func:`gradsense.core.losses.label_kind`): class losses
    (cross-entropy, NLL) need integer class indices in ``0..C-1`` (or the loss's ``ignore_index``, -100 by
    default) of shape ``(N,)`` for ``(N, C)`` outputs, or class probabilities shaped like the output;
    value losses (MSE) need one value per output. Other losses are not checked here.

    Args:
        loss_fn: The loss.
        output: The model's output on (some rows of) the batch.
        labels: The batch's labels (``None``: none).
        what: The analysis, for the message.

    Raises:
        ValueError: Labels missing, out of range, of the wrong shape or dtype (the message names the output
            width and the bad values).
        TypeError: An output from which the loss cannot read a tensor (see :func:`gradsense.core.losses.model_output`).
    """
    kind = label_kind(loss_fn)
    if kind is None:
        return
    name = _loss_name(loss_fn)
    if labels is None:
        raise ValueError(
            f"{what}: {name} needs labels, but the data has none (data= gave inputs only). Give data as "
            "(inputs, labels), a Dataset of (x, y) pairs or a DataLoader that yields them."
        )
    if not isinstance(labels, Tensor):
        raise TypeError(f"{what}: labels must be a tensor, got {type(labels).__name__}.")
    out = scored_output(loss_fn, output, what=name)
    n = labels.shape[0] if labels.ndim else 0
    if kind == "value":
        per_out, per_label = out[0].numel() if out.ndim else 1, labels[0].numel() if labels.ndim else 1
        if labels.ndim == 0 or per_out != per_label:
            raise ValueError(
                f"{what}: {name} compares each output with a label of the same size: the model gives "
                f"{per_out} value(s) per example, the labels have shape {tuple(labels.shape)}"
                f"{' (class indices? use a classification loss)' if not labels.is_floating_point() else ''}."
            )
        return
    if out.ndim < 2:
        raise ValueError(
            f"{what}: {name} needs (batch, classes) scores, but the model's output has shape {tuple(out.shape)}. "
            "For one output per example use a regression loss (gs.losses.mse) or binary cross-entropy."
        )
    width = out.shape[1]
    if labels.is_floating_point():
        if tuple(labels.shape[1:]) == tuple(out.shape[1:]):
            return  # class probabilities
        raise ValueError(
            f"{what}: {name} needs integer class indices of shape (N{''.join(f', {d}' for d in out.shape[2:])}) or "
            f"class probabilities of shape (N, {', '.join(map(str, out.shape[1:]))}); got {labels.dtype} labels of "
            f"shape {tuple(labels.shape)}. Convert class labels with labels.long()."
        )
    if labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{what}: {name} needs integer class indices, got {labels.dtype} labels.")
    if tuple(labels.shape[1:]) != tuple(out.shape[2:]) or labels.ndim == 0:
        raise ValueError(
            f"{what}: {name} needs one class index per example, labels of shape "
            f"(N{''.join(f', {d}' for d in out.shape[2:])}) for outputs of shape (N, {', '.join(map(str, out.shape[1:]))}); "
            f"got labels of shape {tuple(labels.shape)}."
        )
    ignored = ignore_index(loss_fn)
    bad = ((labels < 0) | (labels >= width)) & (labels != ignored if ignored is not None else True)
    if n and bool(bad.any()):
        values = labels[bad].unique().tolist()
        more = f" (and {len(values) - 8} more)" if len(values) > 8 else ""
        hint = (f" A label of {max(values)} means at least {max(values) + 1} classes: is this the model for these labels?"
                if max(values) >= width else "")
        raise ValueError(
            f"{what}: labels out of range for a model with {width} outputs: found {values[:8]}{more}; valid class "
            f"indices are 0..{width - 1}{f' (or {ignored} to ignore an example)' if ignored is not None else ''}.{hint}"
        )


def check_loss_batch(
    forward: Callable[[Tensor], Any],
    loss_fn: Any,
    inputs: Tensor,
    labels: Any,
    *,
    what: str,
    model: nn.Module | None = None,
    probe: int | None = 2,
    more_labels: Iterable[Any] = (),
) -> Tensor:
    """The check every loss-based analysis runs on its first batch, before any work.

    One forward of the first ``probe`` rows (:func:`first_forward`), then: labels present when the loss
    needs them, labels in range of the output width (this batch's and ``more_labels``, the other batches'
    labels when the analysis holds them: :func:`check_labels`), the loss computable on them (its own error,
    named, if not) and a floating-point scalar (:func:`check_scalar_loss`).

    Args:
        forward: ``rows -> model output``.
        loss_fn: ``(output, labels) -> scalar``.
        inputs: The first batch's inputs.
        labels: Its labels (``None``: the data has none).
        what: The analysis, for messages.
        model: The module (for dtype/device messages).
        probe: Rows to run (``None``: the whole batch, e.g. for train-mode BatchNorm).
        more_labels: Labels of further batches to check against the same output width.

    Returns:
        The loss on the probe rows.

    Raises:
        ValueError, TypeError: With what was expected, what was given and what to do.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (output, labels) -> scalar, got {type(loss_fn).__name__}.")
    out = first_forward(forward, inputs, what=what, model=model, probe=probe)
    check_labels(loss_fn, out, labels, what=what)
    for y in more_labels:
        check_labels(loss_fn, out, y, what=what)
    rows = out_rows(inputs, probe)
    y = labels[:rows] if isinstance(labels, Tensor) and labels.ndim and rows < labels.shape[0] else labels
    try:
        with torch.no_grad():
            value = loss_fn(out, y)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:
        if isinstance(err, TypeError) and "cannot tell which output" in str(err):
            raise  # model_output's own message already says how to choose
        got = "no labels (data= gave inputs only)" if y is None else (
            f"labels of shape {tuple(y.shape)} ({y.dtype})" if isinstance(y, Tensor) else f"labels of type {type(y).__name__}")
        shape = model_output_shape(out)
        raise ValueError(
            f"{what}: loss_fn {_loss_name(loss_fn)} failed on the model's output{shape} and {got}: {_first_line(err)}."
            + (" Give data as (inputs, labels)." if y is None else "")
        ) from err
    check_scalar_loss(value)
    if not bool(torch.isfinite(value.detach())):  # the first batch only: later batches are the analysis' own
        raise ValueError(
            f"{what}: the loss is {float(value)} on the first examples, so every derivative of it would be NaN. Check "
            "the model's parameters and outputs for NaN/Inf (e.g. a diverged checkpoint) and that loss_fn is finite."
        )
    return value


def known_labels(data: Any) -> Tensor | None:
    """Every label of ``data`` as one tensor, when the data holds them as one (else ``None``).

    ``(inputs, labels)`` pairs, ``TensorDataset``s (and ``Subset``s of them) and DataLoaders over those: their labels
    are checked against the output width before any work (:func:`check_labels`), so a label out of range in the
    last batch is one clear error up front, not an ``IndexError`` from inside the loss half-way through.
    """
    from torch.utils.data import DataLoader, Subset, TensorDataset

    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return data[1]
    if isinstance(data, Subset) and isinstance(data.dataset, TensorDataset) and len(data.dataset.tensors) >= 2:
        return data.dataset.tensors[1][torch.as_tensor(list(data.indices), dtype=torch.long)]
    if isinstance(data, TensorDataset) and len(data.tensors) >= 2:
        return data.tensors[1]
    return None


def check_module_batch(
    model: nn.Module, loss_fn: Any, inputs: Any, labels: Any, *, what: str, more_labels: Iterable[Any] = ()
) -> None:
    """:func:`check_loss_batch` on the caller's module itself, leaving it and the global RNG as they were.

    For analyses that call ``model(x)`` rather than a functional copy (influence, privacy): the probe forward runs
    in the model's own train/eval mode, so a train-mode BatchNorm's running statistics are put back afterwards
    (:func:`gradsense.core.functional.preserve_model`) and a train-mode Dropout's draw does not move the caller's
    random stream.

    Raises:
        ValueError, TypeError: As :func:`check_loss_batch`.
    """
    if not isinstance(inputs, Tensor):
        return  # dict/tuple inputs of a model of one's own: its forward is the judge
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    with preserve_model(model), torch.random.fork_rng(devices=devices):
        check_loss_batch(model, loss_fn, inputs, labels, what=what, model=model, more_labels=more_labels)


def check_labels_fit(model: nn.Module, loss_fn: Any, labels: Any, input_shape: Sequence[int], *, what: str) -> None:
    """Check labels given without inputs (e.g. to an attack) against the model's output width.

    One forward of two all-zero inputs of ``input_shape`` on the caller's module, which is left as it was
    (:func:`check_module_batch`); then :func:`check_labels`. Nothing is checked when the forward itself fails on
    zeros (the analysis will say why) or for losses whose labels are unknown.

    Raises:
        ValueError: Labels out of range of the output width, or of the wrong dtype or shape.
    """
    if not isinstance(labels, Tensor) or label_kind(loss_fn) is None:
        return
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    zeros = torch.zeros((2, *input_shape), dtype=p.dtype if p is not None else None,
                        device=p.device if p is not None else None)
    devices = [zeros.device] if zeros.device.type == "cuda" else []
    with preserve_model(model), torch.random.fork_rng(devices=devices), torch.no_grad():
        try:
            out = model(zeros)
        except MODEL_ERRORS:
            return
    check_labels(loss_fn, out, labels, what=what)


def out_rows(inputs: Tensor, probe: int | None) -> int:
    """Rows :func:`first_forward` runs for ``probe``."""
    return inputs.shape[0] if probe is None else min(probe, inputs.shape[0])


def model_output_shape(output: Any) -> str:
    """`` of shape (2, 10)`` for a tensor output (or its ``logits``), else `` (a tuple)``, for messages."""
    try:
        return f" of shape {tuple(model_output(output).shape)}"
    except TypeError:
        return f" (a {type(output).__name__})"


def check_scalar_loss(value: Any) -> None:
    """Check that a loss function returned a floating-point 0-d tensor (the batch mean).

    Raises:
        ValueError: Anything else, with what to do.
    """
    if not isinstance(value, Tensor) or value.ndim != 0:
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"loss_fn must return a scalar (a 0-d tensor, the batch mean), got {got}. "
            "Use reduction='mean' or call .mean() on a per-example loss."
        )
    if not value.is_floating_point():
        raise ValueError(f"loss_fn must return a floating-point scalar, got dtype {value.dtype}.")


def draw_seed(seed: int | None, *, shared: bool = False) -> int:
    """The seed to use: ``seed`` itself, or one drawn from torch's global RNG when ``None``.

    Drawing from the global RNG keeps ``torch.manual_seed`` reproducibility, and the drawn seed is recorded
    in the result so that the run can be repeated exactly.

    Args:
        seed: An int, or ``None`` to draw one.
        shared: The caller runs on every rank of a torch.distributed group at once (an analysis that reduces
            over the ranks' shards of the data): a drawn seed is then rank 0's on every rank, so all ranks draw
            the same probes, start vectors and directions. Every rank must make the call at the same point.

    Raises:
        TypeError: If ``seed`` is not an int or None.
    """
    if seed is None:
        from gradsense.core.distributed import broadcast_seed

        drawn = int(torch.randint(0, 2**62, (1,)).item())
        return broadcast_seed(drawn) if shared else drawn
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}.")
    return seed
