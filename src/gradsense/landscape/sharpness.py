"""Sharpness of a minimum: worst-case (SAM), average-case, and first-order flatness (GAM).

All three measure how the loss changes in a Euclidean ball of radius ``rho`` around the model's
(selected) parameters ``w``, over the whole dataset:

- ``kind="sam"``: rho-sharpness ``max_{||e|| <= rho} L(w + e) - L(w)`` (Foret, Kleiner, Mobahi &
  Neyshabur 2021, "Sharpness-Aware Minimization for Efficiently Improving Generalization", eq. 1),
  estimated by normalised gradient ascent on the sphere: ``e_1 = rho g(w) / ||g(w)||`` (SAM's own
  one-step ascent), then ``e_{t+1} = rho g(w + e_t) / ||g(w + e_t)||``. The fixed points are the KKT
  points of the maximisation with the constraint active, and for a quadratic at its minimum the
  iteration is the power method, converging to ``rho^2 lambda_max / 2``. The value is the largest
  ``L(w + e_t) - L(w)`` seen, a lower bound of the true maximum.
- ``kind="average"``: average-case sharpness ``E_e L(w + e) - L(w)`` for ``e`` uniform on the sphere of
  radius ``rho`` (a Gaussian vector rescaled to norm ``rho`` over all selected parameters together; not
  per filter), with its standard error. For a quadratic it is ``rho^2 tr(H) / (2 D)``. The samples are
  evaluated as a batch (vmap), like grid points.
- ``kind="first-order"``: first-order flatness ``rho * max_{||e|| <= rho} ||grad L(w + e)||`` (Zhang,
  Zhang, Ma, Li & Zhang 2023, "Gradient Norm Aware Minimization Seeks First-Order Flatness and Improves
  Generalization", GAM), by normalised ascent on ``||grad L||`` whose gradient is ``H g / ||g||``:
  ``e_1 = rho H(w) g / ||H(w) g||`` (GAM's one-step approximation), then the same from ``w + e_t``.
  For a quadratic at its minimum it is ``rho^2 lambda_max`` (twice SAM's value).

Every evaluation is a pass over the whole dataset; the result says how many of each kind were used
(``n_loss`` forward-only, ``n_grad`` gradients, ``n_hvp`` Hessian-vector products).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad_and_value

from gradsense.core.distributed import DataLike, all_reduce_sum
from gradsense.core.functional import ParamSpec, check_model, flatten, model_fingerprint, unflatten
from gradsense.core.hvp import hvp
from gradsense.landscape.directions import draw_seed
from gradsense.landscape.engine import LossEvaluator
from gradsense.results.landscape import SharpnessResult

__all__ = ["sharpness"]

Kind = Literal["sam", "average", "first-order"]
KINDS = ("sam", "average", "first-order")
DEFAULT_STEPS = {"sam": 5, "first-order": 3}
Params = dict[str, Tensor]


class _Gradients:
    """Dataset-average loss, gradient and Hessian-vector product at a point, with counters."""

    def __init__(self, ev: LossEvaluator, loss_fn: Callable[[Any, Any], Tensor]) -> None:
        self.ev, self.loss_fn = ev, loss_fn
        self.like = ev.params
        self.n_grad = 0
        self.n_hvp = 0

    def _batch_loss(self, x: Any, y: Any) -> Callable[[Params], Tensor]:
        fm, loss_fn = self.ev.fm, self.loss_fn
        return lambda p: loss_fn(fm(p, x), y)

    def value_and_grad(self, w: Tensor) -> tuple[float, Tensor]:
        p = unflatten(w, self.like)
        value = torch.zeros((), dtype=torch.float64)
        acc = torch.zeros_like(w)
        seen = torch.zeros((), dtype=torch.float64)
        for x, y in self.ev.batches:
            g, v = grad_and_value(lambda q, x=x, y=y: self.loss_fn(self.ev.fm(q, x), y))(p)
            acc += flatten(g).detach() * x.shape[0]
            value += v.detach().to("cpu", torch.float64) * x.shape[0]
            seen += x.shape[0]
        self.n_grad += 1
        n = float(all_reduce_sum(seen))
        return float(all_reduce_sum(value)) / n, all_reduce_sum(acc) / n

    def hvp(self, w: Tensor, v: Tensor) -> Tensor:
        p, vd = unflatten(w, self.like), unflatten(v, self.like)
        acc = torch.zeros_like(w)
        seen = torch.zeros((), dtype=torch.float64)
        for x, y in self.ev.batches:
            acc += flatten(hvp(self._batch_loss(x, y), p, vd)).detach() * x.shape[0]
            seen += x.shape[0]
        self.n_hvp += 1
        return all_reduce_sum(acc) / float(all_reduce_sum(seen))


def _unit(v: Tensor, gen: torch.Generator) -> Tensor:
    """``v / ||v||``, or a random unit vector when ``v`` is zero."""
    n = torch.linalg.vector_norm(v)
    if float(n) > 0 and math.isfinite(float(n)):
        return v / n
    r = torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device)
    return r / torch.linalg.vector_norm(r)


def sharpness(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: DataLike,
    *,
    rho: float = 0.05,
    kind: Kind = "sam",
    seed: int | None = None,
    steps: int | None = None,
    n_samples: int = 32,
    params: ParamSpec = None,
    batch_size: int = 512,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    vectorize: bool | None = None,
    show_progress: bool | None = False,
    name: str | None = None,
) -> SharpnessResult:
    """How much the loss can rise (or its gradient grow) within distance ``rho`` of the model.

    See the module docstring for the three kinds and their references. The ball is Euclidean over all
    selected parameters together (``params=`` narrows it, e.g. to exclude BatchNorm).

    Args:
        model: The module (never modified; must be in eval mode if it has BatchNorm/Dropout).
        loss_fn: ``(output, labels) -> scalar`` mean loss of a batch.
        data: Tensor, ``(inputs, labels)``, Dataset or DataLoader; every evaluation uses all of it.
        rho: Radius of the ball (> 0).
        kind: ``"sam"``, ``"average"`` or ``"first-order"``.
        seed: Seed of the random start (SAM/first-order, used when the gradient is zero) and of the
            samples (average); ``None`` draws one, recorded in the result.
        steps: Ascent steps (SAM default 5, first-order default 3; ``1`` is SAM's/GAM's own one-step
            approximation). Not used by ``"average"``.
        n_samples: Number of random perturbations for ``"average"`` (>= 2).
        params: Which parameters span the ball (see :data:`~gradsense.core.functional.ParamSpec`).
        batch_size: Examples per model call.
        chunk_size: Samples per vectorised call (``"average"``); default from the memory budget.
        max_memory: Memory budget.
        vectorize: vmap the samples (``"average"``): ``None`` (as in
            :func:`~gradsense.landscape.loss_surface`), ``True``, ``False``.
        show_progress: Progress bar.
        name: Model name for the result.

    Returns:
        A :class:`~gradsense.results.landscape.SharpnessResult` with ``value``, ``loss`` (``L(w)``),
        ``stderr`` (average), ``trajectory`` (per ascent step or per sample), ``n_loss``, ``n_grad``,
        ``n_hvp`` and ``converged``.

    Raises:
        TypeError: Bad argument types.
        ValueError: ``rho`` <= 0, an unknown ``kind``, ``steps`` < 1, ``n_samples`` < 2, or a train-mode
            model with BatchNorm/Dropout.

    Example:
        >>> model = torch.nn.Linear(4, 1, bias=False)
        >>> x = torch.randn(64, 4)
        >>> s = sharpness(model, torch.nn.functional.mse_loss, (x, x @ model.weight.detach().T), rho=0.1,
        ...               kind="sam", seed=0)
        >>> s.n_grad, s.n_loss  # 5 ascent gradients, then the loss at the last point
        (5, 1)
    """
    t0 = time.perf_counter()
    check_model(model)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)):
        raise TypeError(f"rho must be a positive number, got {type(rho).__name__} {rho!r}.")
    if not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"rho must be a positive finite number, got {rho!r}.")
    rho = float(rho)
    if kind == "average":
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
            raise ValueError(f"n_samples must be an int >= 2 (a standard error needs two), got {n_samples!r}.")
    else:
        steps = DEFAULT_STEPS[kind] if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}.")
    seed = draw_seed(seed, shared=True)
    ev = LossEvaluator(model, loss_fn, data, params=params, batch_size=batch_size, what="sharpness")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w = flatten(ev.params).detach()
    extra: dict[str, Any] = {}
    if kind == "average":
        value, loss0, traj, stderr, n_loss, vectorized = _average(
            ev, w, rho, n_samples, gen, chunk_size, max_memory, vectorize, show_progress
        )
        n_grad = n_hvp = 0
        converged = None
        extra["vectorized"] = vectorized
        perturbation = None
    else:
        grads = _Gradients(ev, loss_fn)
        runner = _sam if kind == "sam" else _first_order
        value, loss0, traj, perturbation, n_loss = runner(ev, grads, w, rho, steps, gen)  # type: ignore[arg-type]
        n_grad, n_hvp, stderr = grads.n_grad, grads.n_hvp, None
        last, prev = float(traj[-1]), float(traj[-2]) if traj.numel() > 1 else float("nan")
        converged = bool(abs(last - prev) <= 1e-3 * max(abs(last), 1e-12)) if traj.numel() > 1 else False
    tensors: dict[str, Tensor] = {"trajectory": traj}
    if perturbation is not None:
        tensors["perturbation"] = perturbation.detach().cpu()
    return SharpnessResult.build(
        tensors,
        method=f"sharpness/{kind}",
        settings={"kind": kind, "rho": rho, "steps": steps if kind != "average" else None,
                  "n_samples": n_samples if kind == "average" else None, "batch_size": batch_size,
                  "examples": ev.n_examples, "ball": "L2, all selected parameters together"},
        model=model_fingerprint(model, name),
        seed=seed,
        wall_time_s=time.perf_counter() - t0,
        kind=kind,
        rho=rho,
        value=float(value),
        loss=float(loss0),
        stderr=stderr,
        n_loss=int(n_loss),
        n_grad=int(n_grad),
        n_hvp=int(n_hvp),
        converged=converged,
        dimension=int(w.numel()),
        **extra,
    )


def _sam(
    ev: LossEvaluator, grads: _Gradients, w: Tensor, rho: float, steps: int, gen: torch.Generator
) -> tuple[float, float, Tensor, Tensor, int]:
    loss0, g = grads.value_and_grad(w)
    e = rho * _unit(g, gen)
    rises: list[float] = []
    best, best_e = -math.inf, e
    for _ in range(steps - 1):
        value, g = grads.value_and_grad(w + e)
        rises.append(value - loss0)
        if rises[-1] > best:
            best, best_e = rises[-1], e
        e = rho * _unit(g, gen)
    value, _ = ev.loss_at(unflatten(w + e, ev.params))
    rises.append(value - loss0)
    if rises[-1] > best:
        best, best_e = rises[-1], e
    return best, loss0, torch.tensor(rises, dtype=torch.float64), best_e, 1


def _first_order(
    ev: LossEvaluator, grads: _Gradients, w: Tensor, rho: float, steps: int, gen: torch.Generator
) -> tuple[float, float, Tensor, Tensor, int]:
    loss0, g = grads.value_and_grad(w)
    gnorm = float(torch.linalg.vector_norm(g))
    norms = [gnorm]
    best, best_e = gnorm, torch.zeros_like(w)
    e = torch.zeros_like(w)
    for _ in range(steps):
        if float(torch.linalg.vector_norm(g)) > 0:
            ascent = grads.hvp(w + e, _unit(g, gen))  # grad_e ||grad L(w + e)|| = H g / ||g||
        else:
            ascent = torch.zeros_like(w)
        e = rho * _unit(ascent, gen)
        _, g = grads.value_and_grad(w + e)
        norms.append(float(torch.linalg.vector_norm(g)))
        if norms[-1] > best:
            best, best_e = norms[-1], e
    return rho * best, loss0, rho * torch.tensor(norms, dtype=torch.float64), best_e, 0


def _average(
    ev: LossEvaluator,
    w: Tensor,
    rho: float,
    n_samples: int,
    gen: torch.Generator,
    chunk_size: int | None,
    max_memory: int | str | None,
    vectorize: bool | None,
    show_progress: bool | None,
) -> tuple[float, float, Tensor, float, int, bool]:
    like = ev.params
    # one seed per sample, so the samples do not depend on how they are chunked
    sub_seeds = torch.randint(0, 2**62, (n_samples,), generator=gen).tolist()

    def make(sl: slice) -> Params:
        rows = []
        for i in range(sl.start, sl.stop):
            g = torch.Generator(device="cpu").manual_seed(int(sub_seeds[i]))
            z = torch.randn(w.shape, generator=g, dtype=w.dtype).to(w.device)
            rows.append(w + rho * z / torch.linalg.vector_norm(z))
        stacked = torch.stack(rows)
        return {n: t for n, t in zip(like, _split_rows(stacked, like))}

    loss0, _ = ev.loss_at()
    pts = ev.evaluate(make, n_samples, moving=like, chunk_size=chunk_size, max_memory=max_memory,
                      vectorize=vectorize, show_progress=show_progress, desc="average sharpness")
    rises = pts.losses - loss0
    value = float(rises.mean())
    stderr = float(rises.std(unbiased=True)) / math.sqrt(n_samples)
    return value, loss0, rises, stderr, n_samples + 1, pts.vectorized


def _split_rows(stacked: Tensor, like: Params) -> list[Tensor]:
    out, offset = [], 0
    for t in like.values():
        out.append(stacked[:, offset : offset + t.numel()].reshape(stacked.shape[0], *t.shape))
        offset += t.numel()
    return out
