"""Argument checks shared by every entry point: one clear error before any work starts.

This is the one checking path; analyses call it rather than growing their own copies:

- :func:`check_inputs`, :func:`check_positive_int`, :func:`draw_seed`: arguments;
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

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from gradsense.core.functional import describe_training, training_stochastic_layers
from gradsense.core.losses import ignore_index, label_kind, model_output, scored_output

__all__ = [
    "check_eval_mode",
    "check_inputs",
    "check_labels",
    "check_loss_batch",
    "check_positive_int",
    "check_scalar_loss",
    "draw_seed",
    "explain_model_errors",
    "first_forward",
]


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
    if model is None or not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        return None
    kinds = {(p.dtype, p.device) for p in model.parameters() if p.is_floating_point()}
    if len(kinds) != 1:
        return None
    ((dtype, device),) = kinds
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
    return value


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
