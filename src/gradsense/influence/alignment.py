"""Gradient alignment between groups: tasks, domains, classes, or objectives on the same data.

For groups ``G_1..G_m`` with mean loss gradients ``g_a`` (over the selected parameters), the alignment is the
``m x m`` matrix ``cos(g_a, g_b)`` (as in multi-task gradient conflict, Yu et al. 2020 "PCGrad", and GAPrune's
domain/general alignment), overall and per layer (``per="layer"``: the same cosine restricted to each layer's
parameters). Two per-example statistics come with it:

- coherence of a group: the mean pairwise cosine of its examples' gradients, ``(|sum_i u_i|^2 - n) / (n (n-1))``
  for unit gradients ``u_i`` (Chatterjee 2020, "coherent gradients"): 1 when all examples pull the same way;
- conflict between groups: the fraction of per-example pairs, one from each group, with ``cos < 0`` (within a
  group: distinct examples). Groups that are objectives on the same data pair each example with itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gradsense.core.checks import draw_seed
from gradsense.core.functional import ParamSpec, model_fingerprint, select_parameters
from gradsense.core.grad import loss_gradient
from gradsense.influence.features import check_labelled, features
from gradsense.results.influence import AlignmentResult

__all__ = ["gradient_alignment"]


def _layer_groups(model: nn.Module, names: list[str], per: str | None) -> dict[str, list[str]]:
    if per is None:
        return {}
    if per != "layer":
        raise ValueError(f"per must be 'layer' or None, got {per!r}.")
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(n.rsplit(".", 1)[0] if "." in n else "(root)", []).append(n)
    return out


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if float(na) == 0 or float(nb) == 0:
        return float("nan")
    return float(a @ b / (na * nb))


def gradient_alignment(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor] | None,
    groups: Mapping[str, Any],
    *,
    data: Any = None,
    per: str | None = "layer",
    params: ParamSpec = None,
    proj_dim: int | None = None,
    seed: int | None = 0,
    batch_size: int = 256,
    max_memory: int | str | None = None,
    show_progress: bool | None = None,
    name: str | None = None,
) -> AlignmentResult:
    """How the loss gradients of groups (tasks, domains, classes, objectives) align: the ``G x G`` cosine matrix.

    Args:
        model: The model (never modified; BatchNorm/Dropout in eval mode).
        loss_fn: ``(output, labels) -> scalar`` mean loss, for groups given as data (``None`` when every group is
            an objective).
        groups: ``{name: data}`` (tasks, domains, classes) or ``{name: loss function}`` (objectives on ``data``);
            at least two.
        data: The data the objectives are evaluated on (objectives only).
        per: ``"layer"`` adds each layer's cosine matrix; ``None`` only the overall one.
        params: Which parameters.
        proj_dim: Project per-example gradients (coherence and conflict) to this many dimensions; the mean
            gradients and cosines are always exact.
        seed: Projection seed.
        batch_size: Batch size of the mean-gradient passes.
        max_memory: Memory budget of the per-example gradients.
        show_progress: Progress bars.
        name: Model name for the result.

    Returns:
        :class:`~gradsense.results.influence.AlignmentResult` (``.cosine``, ``.layer_cosine(name)``,
        ``tensors["coherence"]``, ``tensors["conflict"]``, ``.table()``, ``.plot()``).

    Raises:
        TypeError, ValueError: Fewer than two groups, objectives without ``data``, bad data or model.

    Example:
        >>> import gradsense as gs
        >>> model, digits = gs.zoo.load("digits-cnn"), gs.zoo.dataset("digits", split="test")
        >>> x, y = digits[:]
        >>> groups = {"zeros": (x[y == 0], y[y == 0]), "ones": (x[y == 1], y[y == 1])}
        >>> res = gs.gradient_alignment(model, gs.losses.cross_entropy, groups)
        >>> res.cosine.shape
        torch.Size([2, 2])
    """
    t0 = time.perf_counter()
    if not isinstance(groups, Mapping) or len(groups) < 2:
        raise ValueError("groups must be a mapping of at least two names to data or to loss functions.")
    names = [str(k) for k in groups]
    objectives = [callable(v) and not isinstance(v, (nn.Module, tuple, list, Tensor)) for v in groups.values()]
    if any(objectives) and not all(objectives):
        raise ValueError("groups must be all data (tasks, domains) or all loss functions (objectives), not a mix.")
    objective_mode = all(objectives)
    if objective_mode:
        if data is None:
            raise ValueError("groups of loss functions (objectives) need data= to evaluate them on.")
        for k, fn in groups.items():
            check_labelled(model, fn, data, f"data (objective {k!r})")
    else:
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable (output, labels) -> scalar for groups given as data.")
        for k, d in groups.items():
            check_labelled(model, loss_fn, d, f"group {k!r}")
    seed = draw_seed(seed)
    pnames = list(select_parameters(model, params))
    layers = _layer_groups(model, pnames, per)

    means: list[dict[str, Tensor]] = []
    units: list[Tensor] = []
    for k in names:
        fn = groups[k] if objective_mode else loss_fn
        d = data if objective_mode else groups[k]
        means.append(loss_gradient(model, fn, d, params=pnames, batch_size=batch_size))
        f = features(model, fn, d, proj_dim=proj_dim, params=pnames, seed=seed, max_memory=max_memory,
                     show_progress=show_progress).features().double()
        units.append(f / f.norm(dim=1, keepdim=True).clamp_min(1e-300))
    g = len(names)
    flat = [torch.cat([m[p].reshape(-1) for p in pnames]).double() for m in means]
    cosine = torch.tensor([[_cos(flat[i], flat[j]) for j in range(g)] for i in range(g)], dtype=torch.float64)
    tensors: dict[str, Tensor] = {"cosine": cosine, "norm": torch.stack([v.norm() for v in flat])}
    for layer, members in layers.items():
        vecs = [torch.cat([m[p].reshape(-1) for p in members]).double() for m in means]
        tensors[f"cosine/{layer}"] = torch.tensor([[_cos(vecs[i], vecs[j]) for j in range(g)] for i in range(g)],
                                                  dtype=torch.float64)
    coherence = torch.zeros(g, dtype=torch.float64)
    conflict = torch.zeros(g, g, dtype=torch.float64)
    for i in range(g):
        u = units[i]
        n = u.shape[0]
        s = u.sum(0)
        coherence[i] = ((s @ s - (u * u).sum()) / (n * (n - 1))) if n > 1 else float("nan")
        for j in range(g):
            if objective_mode and i != j:
                conflict[i, j] = float(((units[i] * units[j]).sum(1) < 0).double().mean())
                continue
            v = units[j]
            neg = 0
            for start in range(0, n, 1024):
                c = u[start:start + 1024] @ v.T
                neg += int((c < 0).sum())
            if i == j:
                pairs = n * (n - 1)
                conflict[i, j] = neg / pairs if pairs else float("nan")
            else:
                conflict[i, j] = neg / (n * v.shape[0])
    tensors["coherence"], tensors["conflict"] = coherence, conflict
    return AlignmentResult.build(
        tensors, method="gradient_alignment",
        settings={"per": per, "proj_dim": proj_dim, "objectives": objective_mode, "params": None if params is None
                  else str(params)},
        model=model_fingerprint(model, name), seed=seed, wall_time_s=time.perf_counter() - t0,
        groups=names, layers=list(layers), n_examples=[int(u.shape[0]) for u in units],
        pairs="same example across objectives" if objective_mode else "all pairs (distinct within a group)")
