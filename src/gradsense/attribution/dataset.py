"""Attribution over a whole dataset: streamed in shards, resumable, with per-class and per-feature aggregates.

:func:`attribute_dataset` runs any registered method (:func:`~gradsense.attribution.attribute`) over every
example of a dataset, one shard of examples at a time, with a progress bar and an ETA. With ``out=`` each
shard's maps are written as safetensors to a :class:`~gradsense.results.shards.ShardStore` folder as soon as
they are computed (atomically, then listed with their SHA-256 in the manifest), so a run killed at any point -
``kill -9`` included - continues with ``resume=True`` and ends bitwise equal to an uninterrupted run:

- a shard's maps depend on its examples and its own seed only (:func:`~gradsense.core.ranges.shard_seed`:
  SmoothGrad's noise, random baselines and Expected Gradients' draws are the same whenever, and by whichever
  process, the shard is computed), never on a running state;
- the aggregates (mean ``|attribution|`` per class, per input element, per class and element) are sums over the
  shards in order, in float64 (:class:`~gradsense.results.attribution.DatasetAttribution`);
- a folder written with other settings (method, options, target, model weights, data, shard size, seed) is
  refused with one error naming what differs.

Under ``torch.distributed`` the shards are dealt to the ranks in turn and rank 0 writes them all
(:meth:`~gradsense.results.shards.ShardStore.run`); the result equals the one-process result bitwise.

Global feature importance as the mean absolute attribution over a dataset follows Lundberg & Lee 2017
(mean ``|SHAP|``) and the per-class averages of Simonyan et al. 2014.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradsense.attribution.base import Attribution, accepted_options, get_method
from gradsense.core.batching import chunk_size_for, estimate_example_bytes
from gradsense.core.checks import check_inputs, check_positive_int, draw_seed, first_forward
from gradsense.core.distributed import world
from gradsense.core.functional import check_model, model_fingerprint
from gradsense.core.ranges import check_ordered, data_probe, shard_seed, take
from gradsense.core.targets import CallableTarget, Loss, Target, _ClassTarget, _output_tensor, as_target
from gradsense.results.attribution import DatasetAttribution
from gradsense.results.shards import ShardStore, previous_run

__all__ = ["attribute_dataset"]

#: Bytes of maps per shard when ``shard_size`` is not given (at most :data:`MAX_SHARD_ROWS` examples).
SHARD_BYTES = 32 * 1024**2
MAX_SHARD_ROWS = 1024
_STRING_TARGETS = ("label", "predicted", "loss")


def _describe(value: Any) -> Any:
    """A JSON description of an option or target that changes when its value does (tensors by hash)."""
    if isinstance(value, Tensor):
        t = value.detach().to("cpu").contiguous()
        digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()
        return {"tensor": digest[:16], "shape": list(t.shape), "dtype": str(t.dtype)}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, _ClassTarget):
        return {"target": type(value).__name__, "classes": _describe(value.classes)}
    if isinstance(value, Target):
        state = {k: _describe(v) for k, v in sorted(vars(value).items()) if not k.startswith("_")}
        return {"target": type(value).__name__, **state}
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    return f"{type(value).__module__}.{type(value).__qualname__}"


class _Targets:
    """The dataset-wide ``target=`` turned into each shard's target, and the class each example is grouped under."""

    def __init__(self, target: Any, n: int, has_labels: bool, loss_fn: Callable[..., Tensor] | None) -> None:
        self.kind: str
        self.classes: Tensor | None = None
        if isinstance(target, str):
            if target not in _STRING_TARGETS:
                raise ValueError(f"target={target!r} is not understood; use 'label', 'predicted', 'loss', an int class, "
                                 "one int per example, a gs.targets object or a callable (output, batch) -> (n,).")
            if target in ("label", "loss") and not has_labels:
                raise ValueError(f"target={target!r} needs labelled data ((inputs, labels), or a Dataset of (x, y)); "
                                 "this data has no labels. Use target='predicted' or a class index.")
            if target == "loss" and not callable(loss_fn):
                raise ValueError("target='loss' needs loss_fn=(output, labels) -> loss, e.g. gs.losses.cross_entropy.")
            self.kind = target
        elif isinstance(target, Loss):
            raise ValueError("a gs.targets.Loss holds one batch's labels; over a dataset use target='loss' with "
                             "loss_fn=... (each shard then takes its own labels).")
        elif isinstance(target, bool):
            raise TypeError("target must be an int class index, not a bool.")
        elif isinstance(target, int) or (isinstance(target, _ClassTarget) and target.classes.ndim == 0):
            self.kind, self.classes = "class", torch.as_tensor(
                target if isinstance(target, int) else target.classes, dtype=torch.int64)
        elif isinstance(target, (Tensor, list, tuple)) or isinstance(target, _ClassTarget):
            t = torch.as_tensor(target.classes if isinstance(target, _ClassTarget) else target)
            if t.is_floating_point() or t.dtype == torch.bool:
                raise TypeError(f"target: class indices must be integers, got dtype {t.dtype}.")
            if t.ndim != 1 or t.shape[0] != n:
                raise ValueError(f"target: expected one class index per example ({n}), got shape {tuple(t.shape)}.")
            self.kind, self.classes = "classes", t.to(torch.int64)
        elif isinstance(target, Target) or callable(target):
            self.kind = "object"
        else:
            raise TypeError(f"target of type {type(target).__name__} is not supported; use 'label', 'predicted', "
                            "'loss', an int, ints, a gs.targets object or a callable.")
        self.target, self.loss_fn = target, loss_fn
        self.group_by = {"label": "label", "predicted": "predicted class", "loss": "label", "class": "explained class",
                         "classes": "explained class", "object": "label"}[self.kind]

    def describe(self) -> Any:
        if self.kind in ("label", "predicted", "loss"):
            return self.kind if self.kind != "loss" else {"loss": _describe(self.loss_fn)}
        if self.kind in ("class", "classes"):
            return {"classes": _describe(self.classes)}
        return _describe(self.target)

    def for_rows(self, rows: slice, labels: Tensor | None, predict: Callable[[], Tensor]) -> tuple[Any, Tensor]:
        """``(target for gs.attribute, class of each example or -1)`` for the examples ``rows``."""
        n = rows.stop - rows.start
        none = torch.full((n,), -1, dtype=torch.int64)
        if self.kind == "label":
            return labels, _as_classes(labels, n)
        if self.kind == "predicted":
            with torch.no_grad():
                out = _output_tensor(predict())
            if out.ndim != 2:
                raise ValueError(f"target='predicted' needs a (batch, classes) output, got shape {tuple(out.shape)}.")
            pred = out.argmax(dim=1).cpu()
            return pred, pred.clone()
        if self.kind == "loss":
            return Loss(self.loss_fn, labels), _as_classes(labels, n)  # type: ignore[arg-type]
        if self.kind == "class":
            return int(self.classes), torch.full((n,), int(self.classes), dtype=torch.int64)  # type: ignore[arg-type]
        if self.kind == "classes":
            c = self.classes[rows]  # type: ignore[index]
            return c, c.clone()
        return self.target, (_as_classes(labels, n) if labels is not None else none)


def _as_classes(labels: Tensor | None, n: int) -> Tensor:
    if labels is None or labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        return torch.full((n,), -1, dtype=torch.int64)
    return labels.detach().to("cpu", torch.int64).clone()


def _takes_seed(cls: type[Attribution]) -> bool:
    """Whether the method draws random numbers (takes ``seed=``)."""
    return "seed" in accepted_options(cls)


def attribute_dataset(
    model: nn.Module,
    data: Any,
    *,
    method: str = "saliency",
    target: Any = "label",
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    shard_size: int | None = None,
    seed: int | None = 0,
    loss_fn: Callable[..., Tensor] | None = None,
    keep_inputs: bool = False,
    feature_names: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    show_progress: bool | None = None,
    name: str | None = None,
    **options: Any,
) -> DatasetAttribution:
    """Attribution maps of every example of a dataset, streamed in shards, resumable, with aggregates.

    Each shard of ``shard_size`` examples is attributed with ``gs.attribute(model, x, target=..., method=method,
    **options)`` - methods that draw random numbers get the shard's own seed ``shard_seed(seed, index)``, so a
    shard is the same whenever it is computed - and, with ``out=``, written to the folder before the next one
    starts. ``resume=True`` continues a run already there: completed shards are skipped (after their hash is
    checked; a corrupted or cut-short shard is recomputed), files the manifest does not list are never read.

    Args:
        model: The module to explain (never modified; call ``model.eval()`` yourself).
        data: ``(inputs, labels)``, a tensor of inputs, a Dataset or a DataLoader without shuffling (its order
            fixes which examples each shard holds).
        method: A registered method (``gradsense.attribution.METHODS``).
        target: ``"label"`` (each example's label, the default), ``"predicted"`` (the class the model predicts for
            it), ``"loss"`` (the loss of ``loss_fn`` with its label), an int class, one int per example, or a
            ``gs.targets`` object / callable ``(output, batch) -> (n,)`` applied to every shard.
        out: Folder for the shards and the manifest (``None``: in memory).
        resume: Continue (or reuse) the run already in ``out``; ``False`` with a run there is an error.
        shard_size: Examples per shard (default: about 32 MB of maps, at most 1024 examples; when resuming, the
            run's own).
        seed: Seed of every random draw (``None``: drawn and recorded).
        loss_fn: ``(output, labels) -> loss`` for ``target="loss"``.
        keep_inputs: Also store the inputs in the shards.
        feature_names: Names of the input features (tabular data), for tables and plots.
        class_names: Names of the classes, for tables and plots.
        show_progress: Progress bar with ETA (default: on a TTY).
        name: Model name for the result.
        **options: The method's settings (as for :func:`~gradsense.attribution.attribute`), e.g. ``steps=32``,
            ``n_samples=20``, ``chunk_size``/``max_memory`` (rows per forward/backward; the chunk size is fixed from
            the budget at the start and kept for a resume, so that every shard is computed alike).

    Returns:
        A :class:`~gradsense.results.attribution.DatasetAttribution`: maps read lazily from the shards
        (``.maps(i)``, ``.blocks()``), and ``.mean_abs_per_class()``, ``.mean_abs_per_feature()``,
        ``.mean_abs_per_class_feature()`` computed from them.

    Raises:
        ValueError: Empty data, a shuffling DataLoader, an unknown method or option, a target the data cannot give
            (``"label"`` without labels), inputs the model cannot take, a folder that holds another run (or a run
            and ``resume=False``), ``out=None`` under ``torch.distributed``. All before any shard is computed.
        TypeError: Bad argument types.

    Example:
        >>> import gradsense as gs
        >>> model, digits = gs.zoo.load("digits-cnn"), gs.zoo.dataset("digits", split="test")
        >>> res = gs.attribute_dataset(model, digits, method="saliency", out="runs/saliency", resume=True)
        ... # doctest: +SKIP
        >>> res.mean_abs_per_class().shape  # doctest: +SKIP
        torch.Size([10])
    """
    t0 = time.perf_counter()
    check_model(model)
    cls = get_method(method)
    unknown = sorted(set(options) - accepted_options(cls))
    if unknown:
        raise ValueError(f"method {method!r} does not take option(s) {unknown}; it takes "
                         f"{sorted(accepted_options(cls) - {'seed'})} (the seed is attribute_dataset's seed=).")
    if "seed" in options:
        raise ValueError("give the seed as attribute_dataset(seed=...): each shard draws from its own seed derived "
                         "from it.")
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}.")
    if resume and out is None:
        raise ValueError("resume=True needs out= (the folder of the run to continue).")
    if out is None and world()[1] > 1:
        raise ValueError("under torch.distributed give out= (a folder every rank can read): the ranks compute "
                         "different shards and rank 0 writes them there.")
    seed = draw_seed(seed)
    n = check_ordered(data, "data")
    x0, y0 = take(data, 0, min(2, n))
    check_inputs(x0, name="data inputs")
    targets = _Targets(target, n, y0 is not None, loss_fn)
    # the first forward and the target's form, on two examples, before any folder or shard
    probe = first_forward(lambda x: model(x), x0, what="attribute_dataset", model=model, probe=None)
    first, _ = targets.for_rows(slice(0, x0.shape[0]), y0, lambda: probe)
    as_target(first, x0.shape[0], predict=lambda: probe).validate(_output_tensor(probe), x0.shape[0])
    n_classes = _n_classes(probe, targets, y0, n, data)

    map_bytes = max(1, x0[0].numel() * x0.element_size())
    old = previous_run(out, resume)
    if shard_size is None:
        shard_size = int(old["shard_rows"]) if old is not None else max(1, min(MAX_SHARD_ROWS, SHARD_BYTES // map_bytes))
    shard_size = check_positive_int(shard_size, "shard_size")
    random = _takes_seed(cls)
    if options.get("chunk_size") is None:  # fixed once and kept in the config: the free memory of a later resume
        inherited = (old or {}).get("config", {}).get("option chunk_size")  # must not change it
        if inherited is not None:
            options["chunk_size"] = int(inherited)
        else:
            per_row = estimate_example_bytes(model, x0[:1])
            options["chunk_size"] = chunk_size_for(per_row, max_memory=options.get("max_memory"), device=x0.device)
    settings = {k: _describe(v) for k, v in sorted(options.items()) if k not in ("show_progress",)}
    config = {"what": "attribution maps", "method": cls.name, **{f"option {k}": v for k, v in settings.items()},
              "target": targets.describe(),
              "model": model_fingerprint(model)["sha256"], "n": n, "data": data_probe(data, n),
              "input_shape": list(x0.shape[1:]), "dtype": str(x0.dtype), "seed": seed if random else None,
              "keep_inputs": bool(keep_inputs)}

    def compute(index: int, rows: slice) -> dict[str, Tensor]:
        x, y = take(data, rows.start, rows.stop)
        cache: dict[str, Tensor] = {}

        def predict() -> Tensor:
            if "out" not in cache:
                with torch.no_grad():
                    cache["out"] = _output_tensor(model(x))
            return cache["out"]

        tgt, classes = targets.for_rows(rows, y, predict)
        opts = dict(options, show_progress=False) if "show_progress" in accepted_options(cls) else dict(options)
        if random:
            opts["seed"] = shard_seed(seed, index)
        res = cls(model, **opts).attribute(x, tgt)
        tensors = {"attributions": res.attributions, "scores": res.scores.reshape(-1), "classes": classes}
        if res.delta is not None:
            tensors["delta"] = res.delta.reshape(-1)
        if keep_inputs:
            tensors["inputs"] = x.detach()
        return tensors

    keys = ["attributions", "classes", "scores"] + (["inputs"] if keep_inputs else [])
    meta = {"n": n, "shard_rows": shard_size, "input_shape": list(x0.shape[1:]), "n_classes": n_classes,
            "target": _target_text(targets), "group_by": targets.group_by,
            "feature_names": None if feature_names is None else [str(f) for f in feature_names],
            "class_names": None if class_names is None else [str(c) for c in class_names]}
    desc = f"{cls.name} over {n} examples"
    if out is not None:
        store = ShardStore(out, total=n, shard_rows=shard_size, config=config, resume=resume,
                           what="run of attribution maps")
        resumed = len(store.done)
        if not store.complete:
            store.run(compute, desc=desc, show_progress=show_progress)
            probe_keys = sorted(store.read(0).keys())
            result = DatasetAttribution.build(
                {}, method=cls.name, settings=settings, model=model_fingerprint(model, name),
                seed=seed if random else None, wall_time_s=time.perf_counter() - t0,
                **meta, keys=probe_keys, resumed_shards=resumed)
            store.finish({"result": result.meta})
        return DatasetAttribution.load(Path(out))
    parts: dict[str, list[Tensor]] = {}
    spans = [slice(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
    from gradsense.core.batching import progress

    for i, rows in enumerate(progress(spans, total=len(spans), desc=desc, enabled=show_progress)):
        for k, v in compute(i, rows).items():
            parts.setdefault(k, []).append(v.detach())
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    keys = sorted(tensors)
    return DatasetAttribution.build(tensors, method=cls.name, settings=settings, model=model_fingerprint(model, name),
                                    seed=seed if random else None, wall_time_s=time.perf_counter() - t0, **meta,
                                    keys=keys)


def _target_text(targets: _Targets) -> str:
    if targets.kind in ("label", "predicted"):
        return f"the {targets.kind} class of each example" if targets.kind == "predicted" else "each example's label"
    if targets.kind == "loss":
        return f"the loss {getattr(targets.loss_fn, '__qualname__', 'loss_fn')} with each example's label"
    if targets.kind == "class":
        return f"class {int(targets.classes)}"  # type: ignore[arg-type]
    if targets.kind == "classes":
        return "one given class per example"
    t = targets.target
    return t.describe() if isinstance(t, Target) else CallableTarget(t).describe()


def _n_classes(probe: Any, targets: _Targets, y0: Tensor | None, n: int, data: Any) -> int:
    """Number of classes to aggregate over: the model's output width for class outputs, else from the labels."""
    out = _output_tensor(probe)
    width = int(out.shape[1]) if out.ndim == 2 else 0
    if targets.kind in ("class", "classes"):
        top = int(targets.classes.max()) + 1  # type: ignore[union-attr]
        return max(width, top)
    if targets.kind == "predicted":
        return width
    if y0 is None or y0.ndim != 1 or y0.is_floating_point():
        return 0
    if width:
        return width
    labels = take(data, 0, n)[1]
    return int(labels.max()) + 1 if labels is not None and labels.numel() else 0  # type: ignore[union-attr]
