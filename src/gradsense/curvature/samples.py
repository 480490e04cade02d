"""Hutchinson trace samples over a dataset, written in resumable shards.

:func:`trace_samples` draws ``samples`` Rademacher probes ``v`` and records ``v^T H v`` (whole and per parameter
group) for each, where ``H`` is the curvature of the mean loss over all of ``data``. The trace is the samples'
mean, its standard error their standard deviation over ``sqrt(samples)`` (Hutchinson 1989); per-layer traces
``Tr(H_l)`` follow from the same products (HAWQ-V2, Dong et al. 2020). Unlike the adaptive
:func:`~gradsense.curvature.hessian_trace`, the budget is fixed, so the run can be cut into shards of probes:
with ``out=`` each shard is written as soon as it is computed (:class:`~gradsense.results.shards.ShardStore`),
and ``resume=True`` continues a killed run with bitwise the samples, trace and standard error of an
uninterrupted one (shard ``i``'s probes come from its own seed, :func:`~gradsense.core.ranges.shard_seed`).

Under ``torch.distributed`` each Hessian-vector product already splits the data over the ranks and reduces, so
every rank computes every shard (``collective``) and rank 0 writes.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gradsense.core.checks import check_positive_int
from gradsense.core.distributed import DataLike
from gradsense.core.functional import ParamSpec, model_fingerprint
from gradsense.core.ranges import check_ordered, data_probe, shard_seed
from gradsense.curvature.engine import Kind, PerSpec, RowProducts, draw_seed, operator, parameter_groups
from gradsense.results.curvature import TraceResult
from gradsense.results.shards import ShardStore, previous_run

__all__ = ["trace_samples"]


def rademacher(n: int, dim: int, seed: int, dtype: torch.dtype) -> Tensor:
    """``(n, dim)`` independent +-1 entries from a CPU generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (n, dim), generator=g) * 2 - 1).to(dtype)


def trace_samples(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: DataLike,
    *,
    samples: int = 64,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    seed: int | None = 0,
    per: PerSpec = None,
    params: ParamSpec = None,
    kind: Kind = "hessian",
    rtol: float = 0.05,
    shard_size: int | None = None,
    batch_size: int = 256,
    probe_batch: int | None = None,
    cache_graph: bool | None = None,
    show_progress: bool | None = None,
    name: str | None = None,
) -> TraceResult:
    """The Hutchinson estimate of the trace of the loss Hessian from a fixed number of probes, in resumable shards.

    ``Tr(H) ~ mean_j v_j^T H v_j`` with ``v_j`` Rademacher, unbiased with variance ``2 (||H||_F^2 - sum H_ii^2)``
    per sample; ``per=`` adds ``v_j,l^T (H v_j)_l`` for each group ``l`` (``Tr(H_ll)``).

    Args:
        model: The module (never modified). BatchNorm/Dropout must be in eval mode.
        loss_fn: ``(output, labels) -> scalar``, the mean loss of a batch.
        data: ``(inputs, labels)``, a Dataset or a DataLoader without shuffling (the Hessian of the mean loss over
            all of it).
        samples: Number of probes.
        out: Folder for the shards (``None``: in memory).
        resume: Continue (or reuse) the run in ``out``.
        seed: Seed of the probes (``None``: drawn and recorded); shard ``i`` uses ``shard_seed(seed, i)``.
        per: Per-group traces: ``"layer"``, ``"block"``, ``"parameter"`` or ``{name: ParamSpec}``.
        params: Which parameters (see :data:`~gradsense.core.functional.ParamSpec`).
        kind: ``"hessian"``, ``"ggn"`` or ``"fisher"``.
        rtol: ``converged`` reports whether ``stderr <= rtol * |trace|`` (a warning when not).
        shard_size: Probes per shard (default 8; resuming: the run's own).
        batch_size: Batch size for tensors and Datasets.
        probe_batch: Probes per vmap call (default from the memory budget; resuming: the run's own).
        cache_graph: Products through a kept gradient graph (see :class:`~gradsense.curvature.engine.RowProducts`;
            resuming: the run's own, so that every shard is computed the same way).
        show_progress: Progress bar with ETA (default: on a TTY).
        name: Model name for the result.

    Returns:
        A :class:`~gradsense.results.curvature.TraceResult` (method ``"hutchinson"``) with ``samples``,
        ``running``, and with ``per`` the groups' traces and standard errors, all computed from the shards.

    Raises:
        TypeError, ValueError: Bad arguments, data or model (as :func:`~gradsense.curvature.hessian_trace`), a
            folder holding another run; all before any product.

    References:
        Hutchinson 1989, *A stochastic estimator of the trace of the influence matrix for Laplacian smoothing
        splines*; Dong et al. 2020, *HAWQ-V2: Hessian Aware trace-Weighted Quantization*.

    Example:
        >>> import gradsense as gs
        >>> model, digits = gs.zoo.load("digits-cnn"), gs.zoo.dataset("digits", split="test")
        >>> tr = gs.curvature.trace_samples(model, gs.losses.cross_entropy, digits[:64], samples=16,
        ...                                 out="runs/trace", resume=True)  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    check_positive_int(samples, "samples")
    if not (isinstance(rtol, (int, float)) and rtol > 0):
        raise ValueError(f"rtol must be a positive number, got {rtol!r}.")
    if resume and out is None:
        raise ValueError("resume=True needs out= (the folder of the run to continue).")
    seed = draw_seed(seed)
    n = check_ordered(data, "data")
    op = operator(model, loss_fn, data, params=params, kind=kind, batch_size=batch_size)
    groups = parameter_groups(model, op.params, per)
    old = previous_run(out, resume)
    cfg_old = (old or {}).get("config", {})
    if shard_size is None:
        shard_size = int(old["shard_rows"]) if old is not None else 8
    shard_size = check_positive_int(shard_size, "shard_size")
    if probe_batch is None and cfg_old.get("probe_batch") is not None:
        probe_batch = int(cfg_old["probe_batch"])
    if cache_graph is None and cfg_old.get("cache_graph") is not None:
        cache_graph = bool(cfg_old["cache_graph"])
    products = RowProducts(op, probe_batch=probe_batch, cache_graph=cache_graph)
    index = [i.to(op.device) for i in groups.index]
    config = {"what": "Hutchinson trace samples", "model": model_fingerprint(model)["sha256"], "kind": kind,
              "params": list(op.params), "groups": groups.names, "n": n, "data": data_probe(data, n), "seed": seed,
              "batch_size": batch_size, "probe_batch": products.probe_batch, "cache_graph": products.cached,
              "loss_fn": getattr(loss_fn, "__qualname__", type(loss_fn).__name__), "dtype": str(op.dtype)}

    def compute(i: int, rows: slice) -> dict[str, Tensor]:
        v = rademacher(rows.stop - rows.start, op.numel, shard_seed(seed, i), op.dtype).to(op.device)
        hv = products(v)
        prod = (v.to(torch.float64) * hv.to(torch.float64)).cpu()
        tensors = {"samples": prod.sum(1)}
        if index:
            tensors["group_samples"] = torch.stack([prod[:, g.cpu()].sum(1) for g in index], dim=1)
        return tensors

    desc = f"trace samples ({samples} probes)"
    try:
        if out is not None:
            store = ShardStore(out, total=samples, shard_rows=shard_size, config=config, resume=resume,
                               what="run of trace samples")
            store.run(compute, desc=desc, show_progress=show_progress, collective=True)
            tensors = store.read_all()
            if not store.complete:
                store.finish({"wall_time_s": time.perf_counter() - t0})
        else:
            from gradsense.core.batching import progress

            spans = [slice(s, min(s + shard_size, samples)) for s in range(0, samples, shard_size)]
            parts = [compute(i, sl) for i, sl in enumerate(progress(spans, total=len(spans), desc=desc,
                                                                     enabled=show_progress))]
            tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    finally:
        products.release()
    s = tensors["samples"]
    value = s.mean()
    stderr = s.std() / math.sqrt(samples) if samples > 1 else torch.tensor(float("inf"), dtype=torch.float64)
    converged = bool(stderr <= rtol * value.abs())
    if not converged:
        warnings.warn(f"trace_samples: the standard error {float(stderr):.3g} is above rtol * |trace| = "
                      f"{rtol * float(value.abs()):.3g} with {samples} probes; take more samples.",
                      RuntimeWarning, stacklevel=2)
    result: dict[str, Tensor] = {"trace": value, "stderr": stderr, "samples": s,
                                 "running": torch.cumsum(s, 0) / torch.arange(1, samples + 1, dtype=torch.float64)}
    if index:
        gs_ = tensors["group_samples"]
        result.update(group_samples=gs_, group_trace=gs_.mean(0),
                      group_stderr=gs_.std(0) / math.sqrt(samples) if samples > 1 else torch.full(
                          (len(index),), float("inf"), dtype=torch.float64),
                      group_numel=torch.tensor(groups.numel, dtype=torch.long))
    return TraceResult.build(
        result, method="hutchinson",
        settings={"samples": samples, "kind": kind, "rtol": rtol, "batch_size": batch_size, "shard_size": shard_size,
                  "per": per if isinstance(per, (str, type(None))) else "custom"},
        model=model_fingerprint(model, name), seed=seed, wall_time_s=time.perf_counter() - t0,
        n_hvp=samples, converged=converged, rank=0, hvp="cached-graph" if products.cached else "forward-over-reverse",
        n_examples=op.total, numel=op.numel, param_names=list(op.params), groups=groups.names,
        group_members=groups.members, store=None if out is None else str(out))
