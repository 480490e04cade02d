"""Per-example gradient features: computed once in chunks under a memory budget, projected without storing the
projection, streamed to a sharded run folder that resumes, and reused across queries.

Two engines compute the per-example gradients:

- ``vmap`` (any parameters): ``torch.func.vmap(grad(loss))`` over chunks of examples
  (:func:`gradsense.core.grad.per_example_grads`), then flattened or projected tile by tile
  (:class:`gradsense.core.projection.RandomProjection`);
- ``layers`` (Linear, Conv2d, Embedding): one batched forward/backward records each layer's inputs and output
  gradients (:func:`gradsense.core.layergrads.layer_io`); with ``projection="kronecker"`` the projected gradient
  ``P_out G P_in^T`` is formed from them directly (LoGra), never the gradient itself.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import vmap

from gradsense.core.batching import (
    chunk_size_for,
    chunks,
    default_budget,
    estimate_example_bytes,
    parse_memory,
    progress,
)
from gradsense.core.checks import (
    check_module_batch,
    check_positive_int,
    check_scalar_loss,
    draw_seed,
    explain_model_errors,
    known_labels,
)
from gradsense.core.functional import (
    ParamSpec,
    check_model,
    describe_training,
    functional,
    model_fingerprint,
    select_parameters,
    training_stochastic_layers,
)
from gradsense.core.grad import per_example_grads
from gradsense.core.layergrads import Layer, LayerIO, check_mean_loss, find_layers, layer_io, shared_layers
from gradsense.core.projection import KroneckerProjection, RandomProjection, split_dim
from gradsense.core.ranges import check_ordered, data_probe, take
from gradsense.influence.checkpoints import Checkpoint, model_at, resolve_checkpoints
from gradsense.results.influence import GradientFeatures
from gradsense.results.shards import ShardStore, previous_run

__all__ = ["FeatureMap", "FeaturePlan", "StreamedFeatures", "features", "margin_loss"]

Projection = Literal["dense", "kronecker"]
TargetKind = Literal["loss", "margin"]
LossFn = Callable[[Any, Any], Tensor]

#: Rows per shard of a run folder when not given (rounded to a whole number of chunks).
SHARD_ROWS = 1024


def _logits(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output.logits


def margin_loss(output: Any, labels: Tensor) -> Tensor:
    """Minus the mean TRAK margin ``log p_y - log(1 - p_y) = z_y - logsumexp_{c != y} z_c`` of logits ``z``.

    Its gradient is minus the margin gradient (the sign cancels in TRAK's scores).
    """
    z = _logits(output)
    if z.ndim != 2 or labels.ndim != 1:
        raise ValueError(f"target='margin' needs (N, C) logits and (N,) class labels, got outputs {tuple(z.shape)} "
                         f"and labels {tuple(labels.shape)}.")
    picked = z.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    mine = torch.arange(z.shape[1], device=z.device).unsqueeze(0) == labels.long().unsqueeze(1)
    others = z.masked_fill(mine, float("-inf"))
    return -(picked - torch.logsumexp(others, dim=1)).mean()


# -------------------------------------------------------------------------------------------- feature map
class FeatureMap:
    """How a per-example gradient becomes a feature vector: flattened, dense-projected or Kronecker-projected.

    Built from the model and the settings (or from a :class:`GradientFeatures`' meta), so that training features
    and transformed query gradients land in the same space.

    Args:
        model: The model (for parameter and layer names and shapes).
        params: Which parameters.
        proj_dim: Projection dimension, or ``None`` (no projection).
        projection: ``"dense"`` or ``"kronecker"``.
        seed: Projection seed.
        distribution: ``"rademacher"`` or ``"gaussian"``.
        layers_only: Restrict to Linear/Conv2d/Embedding layers (EK-FAC; implied by ``"kronecker"``).
        cache: Memory for keeping generated projection tiles.
        exclude: Layers to leave out (see :func:`gradsense.core.layergrads.shared_layers`).
    """

    def __init__(self, model: nn.Module, params: ParamSpec, proj_dim: int | None, projection: Projection, seed: int,
                 distribution: str = "rademacher", *, layers_only: bool = False, cache: int = 0,
                 exclude: Sequence[str] = ()) -> None:
        self.projection = projection if proj_dim is not None else None
        self.layers: dict[str, Layer] = {}
        if projection == "kronecker" or layers_only:
            self.layers = find_layers(model, params, strict=params is not None, exclude=exclude)
            self.names = [p for layer in self.layers.values() for p in layer.params]
        else:
            self.names = list(select_parameters(model, params))
        named = dict(model.named_parameters())
        self.shapes = {n: tuple(named[n].shape) for n in self.names}
        self.numel = sum(math.prod(s) for s in self.shapes.values())
        self.seed, self.distribution = int(seed), distribution
        self.proj: RandomProjection | KroneckerProjection | None = None
        if proj_dim is not None and projection == "kronecker":
            shapes = {k: v.shape for k, v in self.layers.items()}
            self.proj = KroneckerProjection(shapes, split_dim(proj_dim, shapes), seed=seed,
                                            distribution=distribution)  # type: ignore[arg-type]
        elif proj_dim is not None:
            self.proj = RandomProjection({n: math.prod(s) for n, s in self.shapes.items()}, proj_dim, seed=seed,
                                         distribution=distribution, cache=cache)  # type: ignore[arg-type]

    @property
    def dim(self) -> int:
        """Feature dimension."""
        return self.numel if self.proj is None else self.proj.dim

    def describe(self) -> dict[str, Any] | None:
        """The projection's definition (``None`` unprojected)."""
        return None if self.proj is None else self.proj.describe()

    def from_params(self, grads: Mapping[str, Tensor]) -> Tensor:
        """``{param: (n, *shape)}`` -> ``(n, dim)`` features."""
        if isinstance(self.proj, KroneckerProjection):
            return self.from_layers({k: layer.from_params(grads) for k, layer in self.layers.items()})
        if isinstance(self.proj, RandomProjection):
            return self.proj.project({n: grads[n] for n in self.names})
        n = next(iter(grads.values())).shape[0]
        return torch.cat([grads[k].reshape(n, -1) for k in self.names], dim=1)

    def from_layers(self, mats: Mapping[str, Tensor]) -> Tensor:
        """``{layer: (n, out, in)}`` gradient matrices -> ``(n, dim)`` features."""
        if isinstance(self.proj, KroneckerProjection):
            return torch.cat([self.proj.project_matrix(k, mats[k]) for k in self.layers], dim=1)
        grads: dict[str, Tensor] = {}
        for k, layer in self.layers.items():
            grads.update(layer.to_params(mats[k]))
        return self.from_params(grads)

    def from_io(self, io: LayerIO) -> Tensor:
        """Features straight from recorded layer inputs/output gradients (no per-example gradient when Kronecker)."""
        if not isinstance(self.proj, KroneckerProjection):
            return self.from_layers({k: io.matrix(layer) for k, layer in self.layers.items()})
        parts = []
        for k, layer in self.layers.items():
            a, d = io.inputs[k], io.grads[k]
            if layer.kind == "embedding":
                p_out, p_in = self.proj.factors(k, dtype=d.dtype, device=d.device)
                pa = p_in.T[a.clamp_min(0)] * (a >= 0).unsqueeze(-1).to(d.dtype)
                parts.append(torch.einsum("nta,ntb->nab", d @ p_out.T, pa).reshape(d.shape[0], -1))
            else:
                parts.append(self.proj.project_outer(k, d, a))
        return torch.cat(parts, dim=1)

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """``(n, numel)`` flat gradients in :attr:`names` order -> ``{param: (n, *shape)}``."""
        out, pos = {}, 0
        for name in self.names:
            size = math.prod(self.shapes[name])
            out[name] = v[:, pos:pos + size].reshape(v.shape[0], *self.shapes[name])
            pos += size
        return out

    @classmethod
    def for_features(cls, model: nn.Module, feats: GradientFeatures, *, cache: int = 0) -> FeatureMap:
        """The map that produced ``feats`` (to put query vectors in the same space)."""
        m = feats.meta
        proj = m.get("projection") or {}
        fmap = cls(model, list(m["params"]), proj.get("dim") if proj else None,
                   proj.get("kind", "dense") if proj else "dense", int(proj.get("seed", 0)) if proj else 0,
                   proj.get("distribution", "rademacher") if proj else "rademacher",
                   layers_only=bool(m.get("layers_only")), cache=cache)
        if fmap.names != list(m["params"]) or fmap.dim != feats.dim:
            raise ValueError("these features were computed for other parameters or another projection than this "
                             "model offers; recompute them with this model.")
        return fmap


# -------------------------------------------------------------------------------------------- per chunk
def example_losses(model: nn.Module, loss_fn: LossFn, x: Any, y: Any) -> Tensor:
    """``(n,)`` loss of each example (a vmapped batch-of-one forward; a loop where vmap fails)."""
    def one(xi: Any, yi: Any) -> Tensor:
        return loss_fn(model(xi.unsqueeze(0)), yi.unsqueeze(0)).reshape(())

    with torch.no_grad():
        try:
            return vmap(one)(x, y).detach()
        except (RuntimeError, NotImplementedError, ValueError):
            return torch.stack([one(x[i], y[i]) for i in range(x.shape[0])]).detach()


def label_probability(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``(n,)`` softmax probability of each example's label."""
    fm = functional(model)
    with torch.no_grad():
        z = _logits(fm(fm.params, x))
    return torch.softmax(z.double(), dim=1).gather(1, y.long().unsqueeze(1)).squeeze(1).to(z.dtype)


def chunk_features(model: nn.Module, loss_fn: LossFn, x: Any, y: Any, fmap: FeatureMap, engine: str,
                   chunk: int) -> Tensor:
    """``(n, dim)`` features of the rows ``x, y``, ``chunk`` examples at a time."""
    parts = []
    fm = functional(model) if engine == "layers" else None
    for sl in chunks(y.shape[0], chunk):
        xs, ys = _index(x, sl), y[sl]
        if engine == "layers":
            io = layer_io(fm, loss_fn, xs, ys, fmap.layers)  # type: ignore[arg-type]
            parts.append(fmap.from_io(io))
        else:
            g = per_example_grads(model, loss_fn, xs, ys, params=fmap.names, chunk_size=sl.stop - sl.start)
            parts.append(fmap.from_params(g))
    return torch.cat(parts)


def _index(x: Any, sl: slice) -> Any:
    if isinstance(x, Tensor):
        return x[sl]
    if isinstance(x, dict):
        return {k: _index(v, sl) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_index(v, sl) for v in x)
    raise TypeError(f"cannot slice inputs of type {type(x).__name__}.")


# -------------------------------------------------------------------------------------------- checks
def check_labelled(model: nn.Module, loss_fn: Any, data: Any, what: str) -> tuple[int, Any, Tensor]:
    """Check model, loss and data before any work; return ``(n, first inputs, first labels)``.

    Raises:
        TypeError, ValueError: A non-module model, a non-callable loss, data without labels or in no fixed order,
            a train-mode BatchNorm/Dropout, a model that fails on the data, a loss that is not a scalar.
    """
    check_model(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (output, labels) -> scalar, got {type(loss_fn).__name__}.")
    n = check_ordered(data, what)
    x, y = take(data, 0, min(2, n))
    if y is None:
        raise ValueError(f"{what} has no labels: pass (inputs, labels), or a Dataset/DataLoader of (x, y) pairs.")
    layers = training_stochastic_layers(model)
    if layers:
        raise ValueError(f"{describe_training(layers)}: per-example gradients would depend on the batch and on "
                         "randomness. Call model.eval() first.")
    if not any(p.numel() for p in model.parameters()):
        raise ValueError(f"{type(model).__name__} has no parameters, so it has no per-example gradients to compare. "
                         "Pass the trained model whose training examples you want to score.")
    if isinstance(x, Tensor):  # the shared first-batch check: shapes, dtypes, labels of all the data in range
        # up to 256 rows (the probe runs two; a failure is named with these rows' shape, the data's own when smaller)
        x1, y1 = take(data, 0, min(256, n)) if n > x.shape[0] else (x, y)
        known = known_labels(data)
        check_module_batch(model, loss_fn, x1, y1, what=what, more_labels=[known] if known is not None else [])
    else:
        with torch.no_grad(), explain_model_errors(y, what, model):
            value = loss_fn(model(x), y)
        check_scalar_loss(value)
    return n, x, y


def _state_hash(ckpt: Checkpoint, model: nn.Module) -> str:
    if ckpt.state is None:
        return str(model_fingerprint(model)["sha256"])
    h = hashlib.sha256()
    for k in sorted(ckpt.state):
        t = ckpt.state[k].detach().to("cpu").contiguous().reshape(-1)
        h.update(k.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# -------------------------------------------------------------------------------------------- the API
def features(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    proj_dim: int | None = None,
    projection: Projection = "dense",
    params: ParamSpec = None,
    seed: int | None = 0,
    distribution: str = "rademacher",
    target: TargetKind = "loss",
    checkpoints: Sequence[Any] | None = None,
    lrs: Sequence[float] | float | None = None,
    layers_only: bool = False,
    out: str | Path | None = None,
    resume: bool = False,
    max_memory: int | str | None = None,
    chunk_size: int | None = None,
    shard_size: int | None = None,
    show_progress: bool | None = None,
    name: str | None = None,
) -> GradientFeatures:
    """Per-example loss gradients of a dataset, optionally projected, computed in chunks and reusable.

    Each row is ``g_i = d loss(f(x_i), y_i) / d theta`` over the selected parameters, or its projection ``P g_i``
    with ``P = R / sqrt(k)`` seeded and generated tile by tile (``projection="dense"``: Johnson-Lindenstrauss,
    any parameters) or per layer as ``P_out G_i P_in^T`` (``"kronecker"``: LoGra, Choe et al. 2024; Linear, Conv2d
    and Embedding layers; the gradient is never formed). Inner products are preserved in expectation,
    ``E[<P g_i, P g_j>] = <g_i, g_j>``, with relative error ``O(1/sqrt(k))``.

    With ``out=`` the rows stream to a sharded run folder (:class:`~gradsense.results.shards.ShardStore`): a run
    killed at any point continues with ``resume=True`` and gives bitwise the rows of an uninterrupted run (the
    chunk size is stored and reused, so a resumed run ignores a new ``max_memory``).

    Args:
        model: The model (never modified; BatchNorm/Dropout must be in eval mode).
        loss_fn: ``(output, labels) -> scalar``, the mean loss of a batch.
        data: ``(inputs, labels)``, a Dataset or a DataLoader without shuffling.
        proj_dim: Projection dimension ``k``, or ``None`` for the full gradient (one column per parameter).
        projection: ``"dense"`` or ``"kronecker"``.
        params: Which parameters (see :data:`~gradsense.core.functional.ParamSpec`); ``"kronecker"`` takes the
            Linear/Conv2d/Embedding layers among them.
        seed: Projection seed (``None``: drawn and recorded).
        distribution: ``"rademacher"`` (+-1) or ``"gaussian"`` projection entries.
        target: ``"loss"`` (loss gradients) or ``"margin"`` (gradients of ``log p_y - log(1 - p_y)``, for TRAK;
            classification logits only).
        checkpoints: State dicts or files (see :func:`~gradsense.influence.checkpoints.resolve_checkpoints`): one
            feature block per checkpoint (TracIn, ensembles). Default: the model as it is.
        lrs: Learning rate of each checkpoint (TracIn weights), stored with the features.
        layers_only: Restrict to Linear/Conv2d/Embedding layers (what EK-FAC preconditions).
        out: Run folder for the shards (``None``: in memory).
        resume: Continue (or reuse) the run already in ``out``.
        max_memory: Memory budget (bytes or e.g. ``"4GB"``) for chunks and cached projection tiles.
        chunk_size: Examples per gradient computation (default: from the budget).
        shard_size: Examples per shard (default about 1024, a whole number of chunks).
        show_progress: Progress bar with ETA (default: on a TTY).
        name: Model name for the result.

    Returns:
        :class:`~gradsense.results.influence.GradientFeatures` (backed by the shards when ``out`` is given).

    Raises:
        TypeError, ValueError: Bad arguments or data, all before any work or file is written.

    Example:
        >>> import gradsense as gs
        >>> model, digits = gs.zoo.load("digits-cnn"), gs.zoo.dataset("digits", split="train")
        >>> f = gs.influence.features(model, gs.losses.cross_entropy, digits[:64], proj_dim=256)
        >>> f.features().shape
        torch.Size([64, 256])
    """
    t0 = time.perf_counter()
    plan = FeaturePlan(model, loss_fn, data, proj_dim=proj_dim, projection=projection, params=params, seed=seed,
                       distribution=distribution, target=target, checkpoints=checkpoints, lrs=lrs,
                       layers_only=layers_only, max_memory=max_memory, chunk_size=chunk_size, shard_size=shard_size,
                       resumed=_resumed_sizes(out, resume), name=name)
    if out is not None:
        store = ShardStore(out, total=plan.n, shard_rows=plan.shard_size, config=plan.config, resume=resume,
                           what="gradient features")
        store.run(lambda _i, rows: plan.compute(rows), desc="gradient features", show_progress=show_progress)
        if not store.complete:
            proto = plan.result({})
            store.finish({"result": {**proto.meta, "wall_time_s": time.perf_counter() - t0}})
        return GradientFeatures.load(out)
    parts: dict[str, list[Tensor]] = {}
    spans = list(chunks(plan.n, plan.shard_size))
    for rows in progress(spans, total=len(spans), desc="gradient features", enabled=show_progress):
        for k, v in plan.compute(rows).items():
            parts.setdefault(k, []).append(v)
    return plan.result({k: torch.cat(v) for k, v in parts.items()}, wall_time_s=time.perf_counter() - t0)


class FeaturePlan:
    """The checked settings of a features run and how to compute the rows of any range of examples.

    Everything is checked here, before any work or file: :func:`features` stores the rows (in memory or in
    shards), :class:`StreamedFeatures` computes them when read. The arguments are those of :func:`features`;
    ``resumed`` is the ``(chunk_size, shard_size)`` of a run being resumed.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Any, *, proj_dim: int | None, projection: Projection,
                 params: ParamSpec, seed: int | None, distribution: str, target: TargetKind,
                 checkpoints: Sequence[Any] | None, lrs: Sequence[float] | float | None, layers_only: bool,
                 max_memory: int | str | None, chunk_size: int | None, shard_size: int | None,
                 resumed: tuple[int, int] | None = None, name: str | None = None) -> None:
        if projection not in ("dense", "kronecker"):
            raise ValueError(f"projection must be 'dense' or 'kronecker', got {projection!r}.")
        if target not in ("loss", "margin"):
            raise ValueError(f"target must be 'loss' or 'margin', got {target!r}.")
        if proj_dim is not None:
            check_positive_int(proj_dim, "proj_dim")
        elif projection == "kronecker":
            raise ValueError("projection='kronecker' needs proj_dim (the total projected dimension).")
        self.seed = draw_seed(seed)
        self.n, x0, y0 = check_labelled(model, loss_fn, data, "data")
        self.model, self.loss_fn, self.data, self.target, self.name = model, loss_fn, data, target, name
        self.loss_used: LossFn = margin_loss if target == "margin" else loss_fn
        if target == "margin":
            with torch.no_grad():
                margin_loss(model(x0), y0)
        self.ckpts = resolve_checkpoints(model, checkpoints, lrs)
        self.engine = "layers" if (projection == "kronecker" and proj_dim is not None) or layers_only else "vmap"
        p0 = next(iter(model.parameters()))
        budget = parse_memory(max_memory) if max_memory is not None else default_budget(p0.device)
        cache = 0
        if proj_dim is not None and projection == "dense":
            numel = sum(p.numel() for p in select_parameters(model, params).values())
            cache = min(proj_dim * numel * 4, budget // 2)
        self.engine_layers = self.engine == "layers"
        exclude: list[str] = []
        if self.engine_layers and params is None:  # leave out layers shared by all examples (position embeddings)
            exclude = shared_layers(functional(model), find_layers(model), x0)
        self.fmap = FeatureMap(model, params, proj_dim, projection, self.seed, distribution, layers_only=layers_only,
                               cache=cache, exclude=exclude)
        self.excluded = exclude
        if self.engine == "layers" and isinstance(x0, Tensor):
            check_mean_loss(functional(model), self.loss_used, x0, y0)
        if chunk_size is None and resumed is not None:
            chunk_size = resumed[0]
        if chunk_size is None:
            example = x0[:1] if isinstance(x0, Tensor) else x0
            per = estimate_example_bytes(model, example) if isinstance(example, Tensor) else 64 * 1024**2
            if isinstance(self.fmap.proj, KroneckerProjection):
                per *= 2  # recorded layer inputs and output gradients; no per-example gradient is formed
            else:
                per += 2 * self.fmap.numel * p0.element_size()  # per-example gradients (and their flat copy)
            per += 4 * self.fmap.dim * p0.element_size()
            chunk_size = chunk_size_for(per, max_memory=max(budget - cache, 1), total=self.n)
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")
        if shard_size is None:
            shard_size = resumed[1] if resumed is not None else self.chunk_size * max(1, SHARD_ROWS // self.chunk_size)
        self.shard_size = check_positive_int(shard_size, "shard_size")
        self.models = [model_at(model, c) for c in self.ckpts]
        self.settings = {"proj_dim": proj_dim, "projection": projection if proj_dim else None, "target": target,
                         "params": None if params is None else str(params), "distribution": distribution,
                         "max_memory": max_memory, "chunk_size": self.chunk_size, "shard_size": self.shard_size,
                         "checkpoints": len(self.ckpts)}
        self.config = {"what": "gradient features", "model": _state_hash(Checkpoint("model", None, None), model),
                       "params": self.fmap.names, "projection": self.fmap.describe(), "target": target,
                       "loss_fn": getattr(loss_fn, "__qualname__", type(loss_fn).__name__),
                       "checkpoints": [_state_hash(c, model) for c in self.ckpts], "n": self.n,
                       "data": data_probe(data, self.n), "chunk_size": self.chunk_size, "layers_only": layers_only,
                       "dtype": str(p0.dtype)}
        self.meta = {"n": self.n, "dim": self.fmap.dim, "params": self.fmap.names, "numel": self.fmap.numel,
                     "projection": self.fmap.describe(), "target": target, "checkpoints": [c.label for c in self.ckpts],
                     "lrs": None if all(c.lr is None for c in self.ckpts) else [c.lr for c in self.ckpts],
                     "layers_only": bool(layers_only or self.engine == "layers"), "engine": self.engine,
                     "excluded_layers": exclude}

    def compute(self, rows: slice, checkpoints: Sequence[int] | None = None) -> dict[str, Tensor]:
        """The rows ``rows`` of every output tensor (``features/c``, ``loss/c``, ``prob/c``, ``labels``)."""
        x, y = take(self.data, rows.start, rows.stop)
        outs: dict[str, Tensor] = {}
        for c, m in enumerate(self.models):
            if checkpoints is not None and c not in checkpoints:
                continue
            outs[f"features/{c}"] = chunk_features(m, self.loss_used, x, y, self.fmap, self.engine, self.chunk_size)
            outs[f"loss/{c}"] = example_losses(m, self.loss_fn, x, y)
            if self.target == "margin":
                outs[f"prob/{c}"] = label_probability(m, x, y)
        outs["labels"] = y.detach().clone()  # type: ignore[union-attr]
        return outs

    def result(self, tensors: dict[str, Tensor], wall_time_s: float | None = None) -> GradientFeatures:
        """A :class:`GradientFeatures` holding ``tensors`` with this run's metadata."""
        return GradientFeatures.build(tensors, method="features", settings=self.settings,
                                      model=model_fingerprint(self.model, self.name), seed=self.seed,
                                      wall_time_s=wall_time_s, **self.meta)


class StreamedFeatures:
    """Gradient features computed block by block whenever they are read, never stored.

    What :func:`gradsense.influence.scores` uses when the training set is given as data and scored once: memory
    stays at one block of training gradients (kronfluence's way) instead of ``n x dim``. It has the parts of
    :class:`GradientFeatures` scoring reads: ``n``, ``dim``, ``meta``, ``n_checkpoints``, ``lrs``, ``target``,
    :meth:`blocks`.

    Args:
        plan: The checked run.
        show_progress: Progress bar on each pass.
    """

    sharded = False

    def __init__(self, plan: FeaturePlan, show_progress: bool | None = None) -> None:
        self.plan = plan
        self.tensors: dict[str, Tensor] = {}
        self.meta = {**plan.result({}).meta}
        self.show_progress = show_progress

    @property
    def n(self) -> int:
        return self.plan.n

    @property
    def dim(self) -> int:
        return self.plan.fmap.dim

    @property
    def n_checkpoints(self) -> int:
        return len(self.plan.ckpts)

    @property
    def lrs(self) -> list[float] | None:
        return self.meta.get("lrs")

    @property
    def target(self) -> str:
        return self.plan.target

    def blocks(self, checkpoint: int = 0, *, keys: Sequence[str] = ("features",),
               rows: int | None = None) -> Iterator[tuple[slice, dict[str, Tensor]]]:
        """``(rows, {key: block})`` over the examples, computed now, one chunk (from the memory budget) at a time."""
        spans = list(chunks(self.n, min(rows or self.plan.chunk_size, self.plan.chunk_size)))
        for sl in progress(spans, total=len(spans), desc="training gradients", enabled=self.show_progress):
            t = self.plan.compute(sl, checkpoints=[checkpoint])
            yield sl, {k: t[f"{k}/{checkpoint}"] for k in keys}

    def _get(self, key: str) -> Tensor:
        if key != "labels":
            raise KeyError(key)
        return take(self.plan.data, 0, self.n)[1]  # type: ignore[return-value]


def _resumed_sizes(out: str | Path | None, resume: bool) -> tuple[int, int] | None:
    old = previous_run(out, resume)
    try:
        return None if old is None else (int(old["config"]["chunk_size"]), int(old["shard_rows"]))
    except (KeyError, TypeError, ValueError):
        return None
