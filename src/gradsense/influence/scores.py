"""Influence scores of training examples on queries, self-influence, and gradient-based data selection.

Every method scores a (query, training example) pair as ``<T(g_q), g_z>`` for some transform ``T`` of the query's
gradient (identity, normalisation, an inverse curvature, an inverse feature kernel), so training gradients are
computed once (:func:`gradsense.influence.features`), possibly projected and streamed from disk, and every query
is a cheap product with them. **Positive = proponent**: training on the example lowers the query's loss.
See :data:`gradsense.results.influence.CONVENTIONS` for each method's scale.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradsense.core.batching import chunks
from gradsense.core.checks import check_positive_int, draw_seed, suggest
from gradsense.core.functional import ParamSpec, functional, model_fingerprint
from gradsense.core.layergrads import layer_io
from gradsense.core.ranges import take
from gradsense.influence.checkpoints import model_at, resolve_checkpoints
from gradsense.influence.features import (
    FeatureMap,
    FeaturePlan,
    Projection,
    StreamedFeatures,
    check_labelled,
    chunk_features,
    example_losses,
    features,
    margin_loss,
)
from gradsense.influence.inverse import DampedCurvature, SolveReport, solve
from gradsense.influence.kfac import fit_factors, precondition, resolve_damping
from gradsense.results.base import Result
from gradsense.results.influence import (
    CONVENTIONS,
    CurvatureFactors,
    GradientFeatures,
    InfluenceResult,
    SelectionResult,
    SelfInfluenceResult,
)

__all__ = ["METHODS", "scores", "select", "self_influence"]

METHODS = ("grad_dot", "grad_cos", "tracin", "influence", "ekfac", "trak")
Method = Literal["grad_dot", "grad_cos", "tracin", "influence", "ekfac", "trak"]


def _inputs_of(data: Any) -> Tensor | None:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return data[0]
    x = getattr(data, "inputs", None)
    return x if isinstance(x, Tensor) else None


def _check_method(method: str) -> None:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {list(METHODS)}.{suggest(method, METHODS)}")


class _Setup:
    """The checked settings of one scoring run, and the training features."""

    def __init__(self, model: nn.Module, loss_fn: Any, train: Any, *, method: str, checkpoints: Any, lrs: Any,
                 params: ParamSpec, proj_dim: int | None, projection: Projection, seed: int, damping: float | None,
                 curvature: str, solver: str, factors: Any, fisher: str, curvature_data: Any,
                 tol: float | None, maxiter: int | None,
                 max_memory: Any, chunk_size: int | None, show_progress: bool | None, name: str | None) -> None:
        _check_method(method)
        if curvature not in ("hessian", "ggn", "fisher"):
            raise ValueError(f"curvature must be 'hessian', 'ggn' or 'fisher', got {curvature!r}.")
        if solver not in ("auto", "cg", "lissa", "exact"):
            raise ValueError(f"solver must be 'auto', 'cg', 'lissa' or 'exact', got {solver!r}.")
        if damping is not None and (not isinstance(damping, (int, float)) or isinstance(damping, bool)
                                    or not math.isfinite(damping) or damping < 0):
            raise ValueError(f"damping must be a non-negative number or None, got {damping!r}.")
        self.model, self.loss_fn, self.method = model, loss_fn, method
        self.target = "margin" if method == "trak" else "loss"
        self.layers_only = method == "ekfac"
        self.damping, self.curvature, self.solver = damping, curvature, solver
        if maxiter is not None:
            check_positive_int(maxiter, "maxiter")
        if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"tol must be a positive number, got {tol!r}.")
        self.tol, self.maxiter = tol, maxiter
        self.max_memory, self.chunk_size, self.show_progress = max_memory, chunk_size, show_progress
        self.name = name
        if isinstance(train, GradientFeatures):
            self.feats = train
            if train.target != self.target:
                raise ValueError(f"method={method!r} needs features of the {self.target} gradient, these are of the "
                                 f"{train.target} (compute them with target={self.target!r}).")
            if self.layers_only and not train.meta.get("layers_only"):
                raise ValueError("method='ekfac' needs features of the Linear/Conv2d/Embedding layers only: compute "
                                 "them with features(..., layers_only=True).")
            n_ckpt = train.n_checkpoints
            if checkpoints is None and n_ckpt > 1:
                raise ValueError(f"these features are over {n_ckpt} checkpoints: pass the same checkpoints= so the "
                                 "query gradients are taken at the same weights.")
            if checkpoints is not None and len(checkpoints) != n_ckpt:
                raise ValueError(f"{len(checkpoints)} checkpoints given, the features have {n_ckpt}.")
            self.ckpts = resolve_checkpoints(model, checkpoints, lrs if lrs is not None else train.lrs)
            self.train_data = curvature_data
        else:
            self.ckpts = resolve_checkpoints(model, checkpoints, lrs)
            check_labelled(model, loss_fn, train, "train")
            self.train_data = train if curvature_data is None else curvature_data
            self.feats = None
        if method in ("influence", "ekfac") and self.train_data is None and factors is None:
            raise ValueError(f"method={method!r} needs the training data for its curvature: pass train as data, or "
                             "curvature_data= with GradientFeatures.")
        self.factors = factors
        if isinstance(factors, (str, bytes)) or hasattr(factors, "__fspath__"):
            loaded = Result.load(factors)  # type: ignore[arg-type]
            if not isinstance(loaded, CurvatureFactors):
                raise ValueError(f"{factors} holds a {type(loaded).__name__}, not CurvatureFactors.")
            self.factors = loaded
        if self.factors is not None and not isinstance(self.factors, CurvatureFactors):
            raise TypeError(f"factors must be CurvatureFactors or a folder, got {type(factors).__name__}.")
        if self.factors is not None and len(self.ckpts) > 1:
            raise ValueError("one set of fitted factors cannot serve several checkpoints; omit factors= to fit them "
                             "at each checkpoint.")
        self.fisher, self.seed = fisher, seed
        if self.feats is None:
            plan = FeaturePlan(model, loss_fn, train, proj_dim=proj_dim, projection=projection, params=params,
                               seed=seed, distribution="rademacher", target=self.target,  # type: ignore[arg-type]
                               checkpoints=checkpoints, lrs=lrs, layers_only=self.layers_only, max_memory=max_memory,
                               chunk_size=chunk_size, shard_size=None, name=name)
            if method == "trak":  # the kernel needs every training feature first: computed once and kept
                self.feats = features(model, loss_fn, train, proj_dim=proj_dim, projection=projection,
                                      params=params, seed=seed, target="margin", checkpoints=checkpoints, lrs=lrs,
                                      max_memory=max_memory, chunk_size=plan.chunk_size, show_progress=show_progress,
                                      name=name)
            else:  # scored once: training gradients streamed block by block, never all in memory
                self.feats = StreamedFeatures(plan, show_progress=show_progress)  # type: ignore[assignment]
        self.models = [model_at(model, c) for c in self.ckpts]
        self.fmap = FeatureMap.for_features(model, self.feats)
        self.engine = "layers" if self.feats.meta.get("engine") == "layers" else "vmap"
        self.reports: list[SolveReport] = []
        self.fitted: list[CurvatureFactors] = []
        self.kernels: list[Tensor] = []
        self.damping_used: list[Any] = []
        self._ops: dict[int, DampedCurvature] = {}

    # ------------------------------------------------------------------------------ per-checkpoint pieces
    def weights(self) -> list[float]:
        c = len(self.ckpts)
        if self.method == "tracin":
            return [1.0 if k.lr is None else float(k.lr) for k in self.ckpts]
        return [1.0 / c] * c

    def chunk(self) -> int:
        return self.chunk_size or int(self.feats.meta.get("settings", {}).get("chunk_size") or 32)

    def kernel_inverse(self, c: int) -> Tensor:
        """TRAK: ``(Phi^T Phi + lambda I)^-1`` over the training features at checkpoint ``c``."""
        while len(self.kernels) <= c:
            k = self.feats.dim
            if k > 20000:
                raise ValueError(f"trak forms a {k} x {k} kernel; project to at most 20000 dimensions (proj_dim=).")
            gram = torch.zeros(k, k, dtype=torch.float64)
            for _, b in self.feats.blocks(len(self.kernels)):
                f = b["features"].double()
                gram += f.T @ f
            lam = self.damping if self.damping is not None else 1e-6 * float(torch.trace(gram)) / k
            self.damping_used.append(lam)
            self.kernels.append(torch.linalg.inv(gram + lam * torch.eye(k, dtype=torch.float64)))
        return self.kernels[c]

    def ekfac_factors(self, c: int) -> CurvatureFactors:
        if self.factors is not None:
            return self.factors
        while len(self.fitted) <= c:
            i = len(self.fitted)
            self.fitted.append(fit_factors(self.models[i], self.loss_fn, self.train_data,
                                           params=self.fmap.names, fisher=self.fisher, seed=self.seed,  # type: ignore[arg-type]
                                           max_memory=self.max_memory, show_progress=self.show_progress))
        return self.fitted[c]

    def query_vectors(self, c: int, x: Any, y: Tensor) -> Tensor:
        """``T(g_q)`` for the query rows at checkpoint ``c``, in the training features' space ``(m, dim)``."""
        model = self.models[c]
        m = self.method
        if m in ("grad_dot", "grad_cos", "tracin"):
            return chunk_features(model, self.loss_fn, x, y, self.fmap, self.engine, self.chunk())
        if m == "trak":
            phi = chunk_features(model, margin_loss, x, y, self.fmap, self.engine, self.chunk())
            return (phi.double() @ self.kernel_inverse(c)).to(phi.dtype)
        if m == "ekfac":
            factors = self.ekfac_factors(c)
            fm = functional(model)
            io = layer_io(fm, self.loss_fn, x, y, self.fmap.layers)
            mats = {k: io.matrix(layer) for k, layer in self.fmap.layers.items()}
            pre = precondition(factors, mats, self.damping)
            if len(self.damping_used) <= c:
                self.damping_used.append(resolve_damping(factors, self.damping))
            return self.fmap.from_layers(pre)
        # influence: full query gradients, damped inverse curvature, then into the features' space
        from gradsense.core.grad import per_example_grads

        g = per_example_grads(model, self.loss_fn, x, y, params=self.fmap.names)
        flat = torch.cat([g[k].reshape(y.shape[0], -1) for k in self.fmap.names], dim=1)
        op = self._ops.get(c)
        if op is None:
            op = DampedCurvature(model, self.loss_fn, self.train_data, params=self.fmap.names, kind=self.curvature,
                                 damping=0.0, max_memory=self.max_memory)
            op.damping = self.damping if self.damping is not None else self._auto_damping(op)
            self.damping_used.append(op.damping)
            self._ops[c] = op
        sol, report = solve(op, flat, solver=self.solver, tol=self.tol, maxiter=self.maxiter,  # type: ignore[arg-type]
                            seed=self.seed)
        self.reports.append(report)
        return self.fmap.from_params(self.fmap.unflatten(sol))

    def _auto_damping(self, op: DampedCurvature) -> float:
        """0.1 x the mean eigenvalue of C (trace / D by Hutchinson with 8 Rademacher probes, seeded)."""
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        probes = (torch.randint(0, 2, (8, op.numel), generator=g) * 2 - 1).to(op.op.dtype)
        tr = float((probes * op(probes.to(op.op.device)).cpu()).sum(1).mean())
        return max(0.1 * tr / op.numel, 1e-8)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"convention": CONVENTIONS[self.method]}
        if self.reports:
            out["solver"] = [r.to_dict() for r in self.reports]
            out["solver_summary"] = "; ".join(dict.fromkeys(r.describe() for r in self.reports[:3] if r.products))
            out["converged"] = all(r.converged for r in self.reports)
        if self.method in ("influence", "ekfac", "trak"):
            out["damping"] = self.damping_used[0] if len(self.damping_used) == 1 else self.damping_used
        if self.method == "influence":
            out["curvature"] = f"{self.curvature} of the mean training loss (curvature.operator)"
        if self.method == "ekfac":
            out["curvature"] = f"EK-FAC ({self.fisher} Fisher), damping " + (
                "0.1 x mean eigenvalue per layer" if self.damping is None else f"{self.damping:g}")
        proj = self.feats.meta.get("projection")
        out["projection_summary"] = ("none (exact gradients)" if not proj else
                                     f"{proj['kind']} to {proj['dim']} dims, seed {proj['seed']}")
        if len(self.ckpts) > 1 or self.ckpts[0].state is not None:
            w = self.weights()
            out["checkpoint_summary"] = f"{len(self.ckpts)} checkpoints, weights {[round(v, 6) for v in w]}"
        out["checkpoints"] = [c.label for c in self.ckpts]
        out["lrs"] = [c.lr for c in self.ckpts]
        return out


def _scores_matrix(setup: _Setup, query: Any, n_q: int) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(n_q, n_train)`` scores, query labels and query losses: every query's vector first, then one pass over the
    training features (read from memory or disk, or computed block by block)."""
    feats = setup.feats
    out = torch.zeros(n_q, feats.n, dtype=torch.float64)
    labels: list[Tensor] = []
    losses = torch.zeros(n_q, dtype=torch.float64)
    qchunk = max(1, min(n_q, 256))
    cos = setup.method == "grad_cos"
    for c, w in enumerate(setup.weights()):
        parts = []
        for sl in chunks(n_q, qchunk):
            x, y = take(query, sl.start, sl.stop)
            if y is None:
                raise ValueError("query has no labels: influence is about the query's loss; pass (inputs, labels).")
            parts.append(setup.query_vectors(c, x, y).double())
            if c == 0:
                labels.append(y)
            losses[sl] += example_losses(setup.models[c], setup.loss_fn, x, y).double() * (1 / len(setup.ckpts))
        q = torch.cat(parts)
        if cos:
            q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)
        keys = ("features", "prob") if setup.method == "trak" else ("features",)
        for rows, b in feats.blocks(c, keys=keys):
            t = b["features"].double()
            if cos:
                t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-30)
            if setup.method == "trak":
                t = t * (1 - b["prob"].double())[:, None]
            out[:, rows] += w * (q @ t.T)
    return out, torch.cat(labels) if labels else None, losses


def scores(
    model: nn.Module,
    loss_fn: Any,
    train: Any,
    query: Any,
    *,
    method: Method = "grad_cos",
    checkpoints: Sequence[Any] | None = None,
    lrs: Sequence[float] | float | None = None,
    params: ParamSpec = None,
    proj_dim: int | None = None,
    projection: Projection = "dense",
    seed: int | None = 0,
    damping: float | None = None,
    curvature: Literal["hessian", "ggn", "fisher"] = "ggn",
    solver: Literal["auto", "cg", "lissa", "exact"] = "auto",
    tol: float | None = None,
    maxiter: int | None = None,
    factors: Any = None,
    fisher: Literal["empirical", "sampled"] = "empirical",
    curvature_data: Any = None,
    max_memory: int | str | None = None,
    chunk_size: int | None = None,
    show_progress: bool | None = None,
    name: str | None = None,
) -> InfluenceResult:
    """Influence of every training example on every query, ``scores[q, z]``; **positive = proponent**.

    Methods (``score(q, z)``; ``g`` = per-example loss gradient, projected when ``proj_dim`` is given):

    - ``"grad_dot"``: ``g_q . g_z`` - one SGD step of learning rate ``eta`` on ``z`` lowers the query loss by
      ``eta * score`` to first order.
    - ``"grad_cos"``: ``cos(g_q, g_z)`` in ``[-1, 1]``.
    - ``"tracin"``: ``sum_c lr_c g_q(theta_c) . g_z(theta_c)`` over ``checkpoints`` with learning rates ``lrs``
      (TracInCP, Pruthi et al. 2020; ``lr`` 1 where none is given).
    - ``"influence"``: ``g_q^T (C + lambda I)^-1 g_z`` with ``C`` the Hessian/GGN/empirical Fisher of the mean
      training loss (``curvature=``), by CG, LiSSA or an exact solve; equal to ``-I_up,loss`` of Koh & Liang
      (2017): removing ``z`` from the ``n`` training examples raises the query loss by about ``score / n``.
      ``damping=None`` uses 0.1 x the mean eigenvalue of ``C`` (Hutchinson estimate); the solver's convergence is
      in ``meta["solver"]``.
    - ``"ekfac"``: the same with EK-FAC (Grosse et al. 2023) of the Linear/Conv2d/Embedding layers; factors are
      fitted on the training data unless ``factors=`` (a :class:`CurvatureFactors` or its folder) is given;
      ``damping=None`` is 0.1 x each layer's mean eigenvalue (kronfluence's heuristic).
    - ``"trak"``: ``phi_q^T (Phi^T Phi + lambda I)^-1 phi_z (1 - p_z)`` (Park et al. 2023) on projected margin
      gradients; with several checkpoints, the average (TRAK's ensemble). Classification only.

    With several checkpoints, ``tracin`` sums with the learning rates as weights and the other methods average.

    Args:
        model: The model (never modified; BatchNorm/Dropout in eval mode).
        loss_fn: ``(output, labels) -> scalar``, the mean loss of a batch.
        train: Training data (``(inputs, labels)``, Dataset, DataLoader without shuffling) or
            :class:`GradientFeatures` computed before (then ``proj_dim``/``params``/``projection`` are theirs).
        query: Query data with labels.
        method: See above.
        checkpoints: State dicts or files (default: the model as it is).
        lrs: Learning rate per checkpoint (TracIn).
        params: Which parameters.
        proj_dim: Project gradients to this many dimensions (``None``: exact gradients).
        projection: ``"dense"`` or ``"kronecker"`` (see :func:`gradsense.influence.features`).
        seed: Projection / probe / label-sampling seed (``None``: drawn and recorded).
        damping: ``lambda`` of ``influence``/``ekfac``/``trak`` (``None``: the heuristics above).
        curvature: ``"ggn"`` (default, positive semi-definite), ``"hessian"`` or ``"fisher"`` for ``influence``.
        solver: ``"auto"`` (exact up to 2000 parameters, else CG), ``"cg"``, ``"lissa"`` or ``"exact"`` (at most
            5000 parameters) for ``influence``.
        tol: Relative residual at which CG/LiSSA stop (default 1e-8 in float64, 1e-3 in float32).
        maxiter: Iteration limit of CG (default min(parameters, 1000)) and LiSSA (1000).
        factors: Fitted EK-FAC factors to reuse.
        fisher: ``"empirical"`` or ``"sampled"`` labels for fitting EK-FAC.
        curvature_data: Data for the curvature when ``train`` is :class:`GradientFeatures`.
        max_memory: Memory budget.
        chunk_size: Examples per gradient computation.
        show_progress: Progress bars.
        name: Model name for the result.

    Returns:
        :class:`~gradsense.results.influence.InfluenceResult` (``.scores``, ``.top(i, k)``, ``.bottom(i, k)``,
        ``.plot()``).

    Raises:
        TypeError, ValueError: Bad arguments, model or data (before any work).

    Example:
        >>> import gradsense as gs
        >>> model = gs.zoo.load("digits-cnn")
        >>> train, test = gs.zoo.dataset("digits", split="train"), gs.zoo.dataset("digits", split="test")
        >>> inf = gs.influence.scores(model, gs.losses.cross_entropy, train[:200], test[:2], method="grad_cos")
        >>> inf.scores.shape
        torch.Size([2, 200])
    """
    t0 = time.perf_counter()
    seed = draw_seed(seed)
    setup = _Setup(model, loss_fn, train, method=method, checkpoints=checkpoints, lrs=lrs, params=params,
                   proj_dim=proj_dim, projection=projection, seed=seed, damping=damping, curvature=curvature,
                   solver=solver, factors=factors, fisher=fisher, curvature_data=curvature_data, tol=tol,
                   maxiter=maxiter, max_memory=max_memory, chunk_size=chunk_size, show_progress=show_progress,
                   name=name)
    n_q, _, _ = check_labelled(model, loss_fn, query, "query")
    s, q_labels, q_loss = _scores_matrix(setup, query, n_q)
    feats = setup.feats
    tensors = {"scores": s.to(torch.float32) if next(iter(model.parameters())).dtype != torch.float64 else s,
               "query_loss": q_loss}
    if q_labels is not None:
        tensors["query_labels"] = q_labels
    try:
        tensors["train_labels"] = feats._get("labels")
    except (KeyError, ValueError, FileNotFoundError):
        pass
    settings = {"proj_dim": feats.meta.get("projection", {}) and feats.meta["projection"].get("dim"),
                "n_train": feats.n, "n_query": n_q, "curvature": curvature if method == "influence" else None,
                "solver": solver if method == "influence" else None, "fisher": fisher if method == "ekfac" else None}
    res = InfluenceResult.build(tensors, method=method, settings=settings, model=model_fingerprint(model, name),
                                seed=seed, wall_time_s=time.perf_counter() - t0, **setup.describe())
    train_inputs = None if isinstance(train, GradientFeatures) else _inputs_of(train)
    return InfluenceResult(tensors=res.tensors, meta=res.meta,
                           context={"train": train_inputs, "query": _inputs_of(query)})


def self_influence(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    method: Method = "influence",
    checkpoints: Sequence[Any] | None = None,
    lrs: Sequence[float] | float | None = None,
    params: ParamSpec = None,
    proj_dim: int | None = None,
    projection: Projection = "dense",
    seed: int | None = 0,
    damping: float | None = None,
    curvature: Literal["hessian", "ggn", "fisher"] = "ggn",
    solver: Literal["auto", "cg", "lissa", "exact"] = "auto",
    tol: float | None = None,
    maxiter: int | None = None,
    factors: Any = None,
    fisher: Literal["empirical", "sampled"] = "empirical",
    flagged: Tensor | None = None,
    max_memory: int | str | None = None,
    chunk_size: int | None = None,
    show_progress: bool | None = None,
    name: str | None = None,
) -> SelfInfluenceResult:
    """Self-influence ``score(z, z)`` of every training example, for finding mislabelled examples and outliers.

    Same methods and settings as :func:`scores` (``grad_cos`` is 1 by definition and refused): ``influence``
    gives ``g_z^T (C + lambda I)^-1 g_z`` (Koh & Liang 2017; one inverse product per example), ``ekfac`` the same
    with EK-FAC (cheap: no solve), ``tracin`` ``sum_c lr_c |g_z(theta_c)|^2`` (Pruthi et al. 2020), ``grad_dot``
    ``|g_z|^2``. Larger = the example is harder to fit from the others.

    Args:
        flagged: Optional bool mask of known-bad examples, to report the share found in the top 10%.
        (others): As in :func:`scores`, with ``data`` the training data.

    Returns:
        :class:`~gradsense.results.influence.SelfInfluenceResult`.

    Raises:
        TypeError, ValueError: Bad arguments or ``method="grad_cos"``.
    """
    t0 = time.perf_counter()
    _check_method(method)
    if method == "grad_cos":
        raise ValueError("method='grad_cos' gives self-influence 1 for every example; use grad_dot, tracin, "
                         "influence or ekfac.")
    seed = draw_seed(seed)
    setup = _Setup(model, loss_fn, data, method=method, checkpoints=checkpoints, lrs=lrs, params=params,
                   proj_dim=proj_dim, projection=projection, seed=seed, damping=damping, curvature=curvature,
                   solver=solver, factors=factors, fisher=fisher, curvature_data=None, tol=tol, maxiter=maxiter,
                   max_memory=max_memory, chunk_size=chunk_size, show_progress=show_progress, name=name)
    feats = setup.feats
    n = feats.n
    if flagged is not None and (not isinstance(flagged, Tensor) or flagged.shape != (n,)):
        raise ValueError(f"flagged must be a bool tensor of shape ({n},).")
    out = torch.zeros(n, dtype=torch.float64)
    for c, w in enumerate(setup.weights()):
        keys = ("features", "prob") if method == "trak" else ("features",)
        for rows, b in feats.blocks(c, keys=keys, rows=256):
            x, y = take(data, rows.start, rows.stop)
            q = setup.query_vectors(c, x, y).double()
            t = b["features"].double()
            if method == "trak":
                t = t * (1 - b["prob"].double())[:, None]
            out[rows] += w * (q * t).sum(1)
    tensors: dict[str, Tensor] = {"scores": out}
    extra: dict[str, Any] = {}
    if flagged is not None:
        tensors["flagged"] = flagged.bool()
        res0 = SelfInfluenceResult(tensors={"scores": out})
        extra["found"] = f"{res0.fraction_found(flagged.bool(), 0.1):.1%} of {int(flagged.sum())} in the top 10%"
    return SelfInfluenceResult.build(tensors, method=method, settings={"n": n, "proj_dim": proj_dim},
                                     model=model_fingerprint(model, name), seed=seed,
                                     wall_time_s=time.perf_counter() - t0, **setup.describe(), **extra)


def select(
    model: nn.Module,
    loss_fn: Any,
    pool: Any,
    target: Any,
    k: int,
    *,
    aggregate: Literal["mean", "max", "mean_gradient"] = "mean",
    params: ParamSpec = None,
    proj_dim: int | None = None,
    projection: Projection = "dense",
    checkpoints: Sequence[Any] | None = None,
    lrs: Sequence[float] | float | None = None,
    seed: int | None = 0,
    max_memory: int | str | None = None,
    show_progress: bool | None = None,
    name: str | None = None,
) -> SelectionResult:
    """The ``k`` pool examples whose gradients align best with the target set's (LESS, Xia et al. 2024).

    Each pool example ``z`` gets ``cos(g_z, g_t)`` against every target example ``t`` (projected gradients when
    ``proj_dim`` is given, as LESS does), aggregated by ``aggregate``: ``"mean"`` over the target examples (LESS),
    ``"max"``, or ``"mean_gradient"`` (cosine with the target's mean gradient). With several checkpoints the
    cosines are averaged with the learning rates as weights (LESS sums over checkpoints). Higher = training on
    ``z`` moves the model the way the target set wants.

    Args:
        pool: Candidate training data.
        target: The data to align with (e.g. a few examples of the task).
        k: How many to select.
        (others): As in :func:`scores`.

    Returns:
        :class:`~gradsense.results.influence.SelectionResult` (``.selected`` best first, ``.scores``).
    """
    t0 = time.perf_counter()
    if aggregate not in ("mean", "max", "mean_gradient"):
        raise ValueError(f"aggregate must be 'mean', 'max' or 'mean_gradient', got {aggregate!r}.")
    seed = draw_seed(seed)
    n_pool, _, _ = check_labelled(model, loss_fn, pool, "pool")
    check_labelled(model, loss_fn, target, "target")
    check_positive_int(k, "k")
    if k > n_pool:
        raise ValueError(f"k={k} is more than the pool's {n_pool} examples.")
    common = {"proj_dim": proj_dim, "projection": projection, "params": params, "seed": seed,
              "checkpoints": checkpoints, "lrs": lrs, "max_memory": max_memory, "show_progress": show_progress}
    pf = features(model, loss_fn, pool, **common)  # type: ignore[arg-type]
    tf = features(model, loss_fn, target, **common)  # type: ignore[arg-type]
    lr = [1.0 if v is None else float(v) for v in (pf.lrs or [None] * pf.n_checkpoints)]
    total = sum(lr)
    agg = torch.zeros(n_pool, dtype=torch.float64)
    for c in range(pf.n_checkpoints):
        t = tf.features(c).double()
        if aggregate == "mean_gradient":
            t = t.mean(0, keepdim=True)
        t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-30)
        for rows, b in pf.blocks(c):
            p = b["features"].double()
            cos = (p / p.norm(dim=1, keepdim=True).clamp_min(1e-30)) @ t.T
            agg[rows] += lr[c] / total * (cos.max(1).values if aggregate == "max" else cos.mean(1))
    chosen = torch.topk(agg, k).indices
    return SelectionResult.build({"scores": agg, "selected": chosen}, method=f"less-{aggregate}",
                                 settings={"k": k, "proj_dim": proj_dim, "aggregate": aggregate, "n_pool": n_pool,
                                           "n_target": tf.n},
                                 model=model_fingerprint(model, name), seed=seed,
                                 wall_time_s=time.perf_counter() - t0, aggregate=aggregate,
                                 convention=f"cosine of each pool example's gradient with the target set's ({aggregate} "
                                            "over target examples); +1 = same direction")
