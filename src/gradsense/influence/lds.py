"""The linear datamodeling score (LDS; Park et al. 2023, "TRAK"): do summed scores predict retrained losses?

Draw ``M`` random subsets ``S_j`` of the training set (each a fraction ``alpha`` of it), train a model on each with
the user's training function (averaging ``seeds`` runs), and record every query's loss. A method's prediction for
subset ``S_j`` is ``-sum_{z in S_j} score(q, z)`` (scores are positive for proponents, which *lower* the loss), and

    LDS = mean over queries of Spearman_j( prediction(q, S_j), loss(q; model trained on S_j) ),

with its standard error over queries. The retraining is the expensive part: :func:`retrain` runs it once,
resumably (each subset is a shard of a :class:`~gradsense.results.shards.ShardStore`), and :func:`lds` scores any
number of methods against the same ground truth.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradsense.core.batching import progress
from gradsense.core.checks import check_positive_int
from gradsense.core.ranges import check_ordered, data_probe, take
from gradsense.influence.features import example_losses
from gradsense.results.influence import InfluenceResult, LDSResult, RetrainingResult
from gradsense.results.shards import ShardStore

__all__ = ["lds", "retrain", "spearman_columns", "subset_masks"]

TrainFn = Callable[[Tensor, int], nn.Module]


def subset_masks(n: int, subsets: int, fraction: float, seed: int) -> Tensor:
    """``(subsets, n)`` bool masks, each with ``round(fraction n)`` examples, drawn from ``(seed, j)``."""
    size = max(1, min(n, round(fraction * n)))
    out = torch.zeros(subsets, n, dtype=torch.bool)
    for j in range(subsets):
        g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + j)
        out[j, torch.randperm(n, generator=g)[:size]] = True
    return out


def spearman_columns(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation of each column of ``a`` with the same column of ``b`` (``(M, q)`` -> ``(q,)``).

    Ranks with ties averaged; a constant column gives NaN.
    """
    from scipy.stats import rankdata

    ra = torch.from_numpy(rankdata(a.double().numpy(), axis=0))
    rb = torch.from_numpy(rankdata(b.double().numpy(), axis=0))
    ra = ra - ra.mean(0)
    rb = rb - rb.mean(0)
    den = ra.norm(dim=0) * rb.norm(dim=0)
    return torch.where(den > 0, (ra * rb).sum(0) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def retrain(
    train_fn: TrainFn,
    n_train: int,
    query: Any,
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    subsets: int = 100,
    fraction: float = 0.5,
    seeds: int = 1,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    show_progress: bool | None = None,
) -> RetrainingResult:
    """Train on ``subsets`` random subsets of the training set and record each query's loss (LDS ground truth).

    Args:
        train_fn: ``train_fn(indices, seed) -> model``: trains a fresh model on the training examples ``indices``
            (a sorted int64 tensor) with the given seed and returns it in eval mode.
        n_train: Size of the training set.
        query: Query data ``(inputs, labels)`` (Dataset, DataLoader).
        loss_fn: ``(output, labels) -> scalar`` mean loss used to measure the query losses.
        subsets: Number of subsets ``M`` (Park et al. use 100+).
        fraction: Share of the training set in each subset (``alpha``; 0.5 in the paper).
        seeds: Training runs per subset (their query losses are averaged).
        seed: Seed of the subsets and of the training seeds.
        out: Run folder: each subset is a shard written as soon as it is trained, so a killed run resumes.
        resume: Continue the run in ``out``.
        show_progress: Progress bar with ETA.

    Returns:
        :class:`~gradsense.results.influence.RetrainingResult` (``masks`` ``(M, n)``, ``losses`` ``(M, n_query)``).

    Raises:
        TypeError, ValueError: Bad arguments (before any training).
    """
    t0 = time.perf_counter()
    if not callable(train_fn):
        raise TypeError("train_fn must be callable: train_fn(indices, seed) -> trained model.")
    check_positive_int(n_train, "n_train")
    check_positive_int(subsets, "subsets")
    check_positive_int(seeds, "seeds")
    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}.")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable (output, labels) -> scalar.")
    n_q = check_ordered(query, "query")
    xq, yq = take(query, 0, n_q)
    if yq is None:
        raise ValueError("query has no labels.")
    masks = subset_masks(n_train, subsets, float(fraction), seed)

    def compute(j: int, _rows: slice) -> dict[str, Tensor]:
        idx = torch.nonzero(masks[j]).flatten()
        total = torch.zeros(n_q, dtype=torch.float64)
        for s in range(seeds):
            model = train_fn(idx, seed * 7919 + j * 31 + s)
            if not isinstance(model, nn.Module):
                raise TypeError(f"train_fn must return the trained nn.Module, got {type(model).__name__}.")
            total += example_losses(model.eval(), loss_fn, xq, yq).double()
        return {"losses": (total / seeds)[None], "masks": masks[j][None]}

    config = {"what": "retraining", "n_train": n_train, "subsets": subsets, "fraction": float(fraction),
              "seeds": seeds, "seed": seed, "query": data_probe(query, n_q), "n_query": n_q,
              "train_fn": getattr(train_fn, "__qualname__", type(train_fn).__name__)}
    if out is not None:
        store = ShardStore(out, total=subsets, shard_rows=1, config=config, resume=resume, what="retraining")
        store.run(compute, desc="retraining on subsets", show_progress=show_progress)
        tensors = store.read_all()
        if not store.complete:
            store.finish({})
    else:
        rows = [compute(j, slice(j, j + 1)) for j in progress(range(subsets), total=subsets,
                                                                desc="retraining on subsets", enabled=show_progress)]
        tensors = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    return RetrainingResult.build(tensors, method="retraining", settings=config, seed=seed,
                                  wall_time_s=time.perf_counter() - t0, fraction=float(fraction), seeds=seeds)


def lds(
    scores: InfluenceResult | Tensor,
    truth: RetrainingResult | None = None,
    *,
    train_fn: TrainFn | None = None,
    query: Any = None,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    subsets: int = 100,
    fraction: float = 0.5,
    seeds: int = 1,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    show_progress: bool | None = None,
) -> LDSResult:
    """Linear datamodeling score of ``scores`` (``(n_query, n_train)``, positive = proponent).

    Give the ground truth from :func:`retrain` as ``truth`` (to score several methods against the same retrained
    models), or ``train_fn``, ``query`` and ``loss_fn`` to run the retraining here (see :func:`retrain` for
    ``subsets``, ``fraction``, ``seeds``, ``seed``, ``out``, ``resume``).

    Returns:
        :class:`~gradsense.results.influence.LDSResult`: ``.value`` (mean Spearman over queries), ``.stderr``
        (its standard error over queries), ``tensors["per_query"]``.

    Raises:
        ValueError: Shapes that do not match the ground truth, or neither ``truth`` nor a training function.
    """
    s = scores.scores if isinstance(scores, InfluenceResult) else scores
    if not isinstance(s, Tensor) or s.ndim != 2:
        raise ValueError("scores must be an InfluenceResult or an (n_query, n_train) tensor.")
    method = scores.method if isinstance(scores, InfluenceResult) else "scores"
    if truth is None:
        if train_fn is None or query is None or loss_fn is None:
            raise ValueError("lds needs truth= (from retrain) or train_fn=, query= and loss_fn= to retrain.")
        truth = retrain(train_fn, s.shape[1], query, loss_fn, subsets=subsets, fraction=fraction,
                        seeds=seeds, seed=seed, out=out, resume=resume, show_progress=show_progress)
    masks, losses = truth.masks, truth.losses
    if masks.shape[1] != s.shape[1] or losses.shape[1] != s.shape[0]:
        raise ValueError(f"scores are {tuple(s.shape)} (queries x train) but the ground truth has {masks.shape[1]} "
                         f"training examples and {losses.shape[1]} queries.")
    predicted = -(masks.double() @ s.double().T)
    per = spearman_columns(predicted, losses.double())
    ok = per[~torch.isnan(per)]
    if ok.numel() == 0:
        raise ValueError("every query's Spearman correlation is undefined (constant predictions or losses).")
    value = float(ok.mean())
    stderr = float(ok.std(unbiased=True) / math.sqrt(ok.numel())) if ok.numel() > 1 else float("nan")
    return LDSResult.build({"per_query": per, "predicted": predicted}, method=method,
                           settings={"subsets": int(masks.shape[0]), "fraction": truth.meta.get("fraction")},
                           lds=value, stderr=stderr, subsets=int(masks.shape[0]),
                           undefined_queries=int(torch.isnan(per).sum()))

