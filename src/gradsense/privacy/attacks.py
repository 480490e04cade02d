"""Optimisation attacks: find inputs whose gradient (or weight update) matches the shared one.

:class:`GradientMatcher` is the objective, a pure function of the dummy inputs: ``functional_call`` runs the
model on the candidate batch, the client's parameter gradient is taken (or its local SGD steps unrolled), a
distance compares it with what was shared, and the gradient of that distance w.r.t. the dummy inputs goes
back through the parameter gradient (double backward). Several restarts are a ``vmap`` dimension over
``torch.func.grad_and_value(... torch.func.grad ...)``: R restarts are one batched call per step. A single
restart runs the same objective with ``torch.autograd.grad(create_graph=True)``, which on a CPU avoids the
transforms' per-operator overhead (up to 2x at batch 1); the two paths agree to rounding (tested).

- ``"dlg"`` (Zhu et al. 2019, Deep Leakage from Gradients): squared L2 distance ``sum_p ||g_p - t_p||^2``,
  L-BFGS (lr 1, up to ``max_iter`` objective evaluations per iteration, history 100, strong-Wolfe line search
  unless ``line_search=None`` as in the paper's code), inputs initialised from ``randn`` and unconstrained; with
  ``labels="joint"`` the labels are optimised too, as softmax logits (the paper's setting).
- ``"inverting"`` (Geiping et al. 2020, Inverting Gradients): ``1 - cos(g, t)`` over all shared parameters
  jointly plus ``tv`` times the total variation (mean absolute difference of neighbouring pixels along
  height plus along width), Adam (lr 0.1) on the signed gradient, the step size divided by 10 after 3/8, 5/8
  and 7/8 of the steps, inputs kept inside the data's bounds after every step (boxed), restarts keeping the
  one with the lowest objective.

The client's model is reproduced as it is: BatchNorm in eval mode uses its running statistics; in train mode
it uses the statistics of the (dummy) batch, as the client's forward did, and every restart updates its own
copy of the running buffers. Dropout in train mode draws a mask the attacker cannot know: by default the
attacker uses the expected network (dropout off); ``dropout="sample"`` draws fresh masks at every evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from gradsense.core.batching import progress
from gradsense.privacy.shared import Shared, local_batches

__all__ = ["DISTANCES", "GradientMatcher", "run_dlg", "run_inverting", "total_variation"]

DISTANCES = ("l2", "cosine")
LossFn = Callable[[Any, Tensor], Tensor]


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation of images ``(..., H, W)``: mean |dx| + mean |dy| (Geiping et al. 2020)."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


class GradientMatcher:
    """The gradient-matching objective of one shared message, as a batched pure function of dummy inputs.

    Args:
        model: The attacked model, used as a template by ``functional_call`` (its modules' train/eval flags
            are read at every call; parameters and buffers are never written).
        loss_fn: The client's ``(output, labels) -> scalar`` loss (batch mean).
        shared: The checked shared message.
        distance: ``"l2"`` or ``"cosine"``.
        tv: Weight of the total-variation prior (images only).
        batch_buffers: Give every restart its own copy of the buffers (needed when a train-mode BatchNorm
            updates its running statistics during the forward).
        joint_labels: The labels argument is a ``(B, C)`` tensor of logits whose softmax is the soft label.
        randomness: ``vmap``'s randomness mode (``"different"`` to sample dropout masks).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, shared: Shared, *, distance: str = "cosine",
                 tv: float = 0.0, batch_buffers: bool = False, joint_labels: bool = False,
                 randomness: str = "error") -> None:
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}.")
        self.model, self.loss_fn, self.shared = model, loss_fn, shared
        self.distance, self.tv, self.joint = distance, float(tv), joint_labels
        self.theta = {n: p.detach() for n, p in model.named_parameters()}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.batch_buffers = batch_buffers
        self.target = shared.tensors
        self.target_sq = sum(t.double().pow(2).sum() for t in self.target.values()).item()
        self.evaluations = 0
        argnums = (0, 1) if joint_labels else 0
        in_dims = (0, 0 if joint_labels else None, 0 if batch_buffers else None)
        self._single = grad_and_value(self._objective, argnums=argnums)
        self._batched = vmap(self._single, in_dims=in_dims, randomness=randomness)
        self._values = vmap(self._objective, in_dims=in_dims, randomness=randomness)

    # ------------------------------------------------------------------ the client, replayed on dummy data
    def _loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        out = functional_call(self.model, {**self.theta, **buffers, **params}, (x,))
        target = torch.softmax(y, dim=-1) if self.joint else y
        return self.loss_fn(out, target)

    def _graph_grad(self, params: dict[str, Tensor], x: Tensor, y: Tensor, buffers: dict[str, Tensor]
                    ) -> dict[str, Tensor]:
        """``torch.autograd.grad(..., create_graph=True)``: the parameter gradient as part of the graph."""
        loss = self._loss(params, x, y, buffers)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        return dict(zip(params, grads))

    def client_message(self, x: Tensor, y: Tensor, buffers: dict[str, Tensor], *, graph: bool = False
                       ) -> dict[str, Tensor]:
        """What the client would share for the batch ``(x, y)``: the gradient, or the unrolled update.

        ``graph=False`` differentiates with ``torch.func.grad`` (composable with ``vmap`` and an outer ``grad``);
        ``graph=True`` with ``torch.autograd.grad(create_graph=True)`` on parameter leaves, for a plain outer
        backward (the single-restart path: the same numbers with less transform overhead).
        """
        start = {n: self.theta[n] for n in self.target}
        if graph:
            start = {n: t.detach().requires_grad_(True) for n, t in start.items()}
        grad_of = self._graph_grad if graph else grad(self._loss)
        if self.shared.kind == "gradient":
            return grad_of(start, x, y, buffers)
        current = start
        for idx in local_batches(x.shape[0], int(self.shared.local_steps), self.shared.batch_size):
            g = grad_of(current, x[idx], y[idx], buffers)
            current = {n: current[n] - float(self.shared.lr) * g[n] for n in current}
        return {n: current[n] - start[n] for n in current}

    def _single_autograd(self, x: Tensor, y: Tensor, buffers: dict[str, Tensor]) -> tuple[Any, Tensor]:
        """Gradient(s) and value of the objective for one restart by plain autograd (double backward)."""
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            yy = y.detach().requires_grad_(True) if self.joint else y
            value = self._objective(xx, yy, buffers, graph=True)
            grads = torch.autograd.grad(value, [xx, yy] if self.joint else [xx])
        return (tuple(grads) if self.joint else grads[0]), value.detach()

    def _objective(self, x: Tensor, y: Tensor, buffers: dict[str, Tensor], graph: bool = False) -> Tensor:
        g = self.client_message(x, y, buffers, graph=graph)
        if self.distance == "l2":
            value = sum((g[n] - self.target[n]).pow(2).sum() for n in g)
        else:
            dot = sum((g[n] * self.target[n]).sum() for n in g)
            norm = torch.sqrt(sum(g[n].pow(2).sum() for n in g))
            value = 1 - dot / (norm * math.sqrt(self.target_sq) + torch.finfo(x.dtype).tiny)
        if self.tv and x.ndim >= 3:
            value = value + self.tv * total_variation(x)
        return value

    # ------------------------------------------------------------------ batched entry points
    def restart_buffers(self, restarts: int) -> dict[str, Tensor]:
        """The buffers to pass: shared by all restarts, or one copy each (train-mode BatchNorm)."""
        if not self.batch_buffers:
            return self.buffers
        return {n: b.unsqueeze(0).expand(restarts, *b.shape).clone() for n, b in self.buffers.items()}

    def value_and_grad(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Objective values ``(R,)`` and gradients w.r.t. ``x`` ``(R, B, ...)`` (and the label logits)."""
        self.evaluations += x.shape[0]
        if x.shape[0] == 1:  # one restart: the same function without the vmap layer (faster on CPU)
            y1 = y[0] if self.joint else y
            buffers = {n: b[0] for n, b in self.restart_buffers(1).items()} if self.batch_buffers else self.buffers
            grads, value = self._single_autograd(x[0], y1, buffers)
            values = value.unsqueeze(0)
            grads = tuple(g.unsqueeze(0) for g in grads) if self.joint else grads.unsqueeze(0)
        else:
            grads, values = self._batched(x, y, self.restart_buffers(x.shape[0]))
        if self.joint:
            return values, grads[0], grads[1]
        return values, grads, None

    def values(self, x: Tensor, y: Tensor) -> Tensor:
        """Objective values ``(R,)`` (no gradient)."""
        self.evaluations += x.shape[0]
        if x.shape[0] == 1:
            buffers = {n: b[0] for n, b in self.restart_buffers(1).items()} if self.batch_buffers else self.buffers
            with torch.enable_grad():
                value = self._objective(x[0].detach(), y[0] if self.joint else y, buffers, graph=True)
            return value.detach().unsqueeze(0)
        return self._values(x, y, self.restart_buffers(x.shape[0])).detach()

    def mismatch(self, x: Tensor, y: Tensor) -> tuple[float, float]:
        """``(||g(x) - t|| / ||t||, 1 - cos(g(x), t))`` for one candidate batch ``x`` (B, ...), not counted
        as an evaluation (a diagnostic, not part of the attack)."""
        with torch.enable_grad():
            g = self.client_message(x.detach(), y, {n: b.clone() for n, b in self.buffers.items()}, graph=True)
        g = {n: t.detach() for n, t in g.items()}
        tiny = torch.finfo(torch.float64).tiny
        diff = sum((g[n].double() - self.target[n].double()).pow(2).sum() for n in g).item()
        dot = sum((g[n].double() * self.target[n].double()).sum() for n in g).item()
        gsq = sum(g[n].double().pow(2).sum() for n in g).item()
        return (math.sqrt(diff / max(self.target_sq, tiny)),
                1.0 - dot / max(math.sqrt(gsq * self.target_sq), tiny))


def _clamp(x: Tensor, bounds: tuple[float, float] | None) -> None:
    if bounds is not None:
        with torch.no_grad():
            x.clamp_(bounds[0], bounds[1])


def run_inverting(matcher: GradientMatcher, x0: Tensor, labels: Tensor, *, steps: int, lr: float = 0.1,
                  signed: bool = True, bounds: tuple[float, float] | None = None, lr_decay: bool = True,
                  show_progress: bool | None = False) -> tuple[Tensor, Tensor, Tensor]:
    """Inverting Gradients' optimisation, every restart at once.

    Args:
        matcher: The objective.
        x0: ``(R, B, ...)`` initial candidates.
        labels: ``(B,)`` labels (the same for every restart).
        steps: Adam steps.
        lr: Adam's step size.
        signed: Step on the sign of the gradient (Geiping et al.'s choice).
        bounds: ``(lo, hi)`` box the candidates are projected into after every step.
        lr_decay: Divide the step size by 10 after 3/8, 5/8 and 7/8 of the steps.
        show_progress: Progress bar.

    Returns:
        ``(best_x (R, B, ...), best_value (R,), trace (steps + 1, R))``: the best candidate of every restart,
        its objective, and the objective at every step (the last row after the final step).
    """
    x = x0.detach().clone().requires_grad_(True)
    _clamp(x, bounds)
    opt = torch.optim.Adam([x], lr=lr)
    milestones = [int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)] if lr_decay else []
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    best_x = x.detach().clone()
    best_v = torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    trace = []
    for _ in progress(range(steps), total=steps, desc="inverting gradients", enabled=show_progress):
        values, gx, _ = matcher.value_and_grad(x.detach(), labels)
        v = values.detach().double().cpu()
        better = v < best_v
        if bool(better.any()):
            best_x[better] = x.detach()[better]
            best_v = torch.where(better, v, best_v)
        trace.append(v)
        x.grad = gx.sign() if signed else gx
        opt.step()
        sched.step()
        _clamp(x, bounds)
    v = matcher.values(x.detach(), labels).double().cpu()
    better = v < best_v
    best_x[better] = x.detach()[better]
    best_v = torch.where(better, v, best_v)
    trace.append(v)
    return best_x, best_v, torch.stack(trace)


def run_dlg(matcher: GradientMatcher, x0: Tensor, y0: Tensor, *, steps: int, lr: float = 1.0, max_iter: int = 20,
            history_size: int = 100, line_search: str | None = "strong_wolfe", stop_mismatch: float | None = None,
            show_progress: bool | None = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Deep Leakage from Gradients: L-BFGS on the inputs (and label logits when joint), one restart at a time.

    Args:
        matcher: The objective (``distance="l2"`` for the paper's attack).
        x0: ``(R, B, ...)`` initial candidates.
        y0: ``(B,)`` labels, or ``(R, B, C)`` initial label logits when the matcher is joint.
        steps: L-BFGS iterations per restart (each runs up to ``max_iter`` objective evaluations).
        lr, max_iter, history_size, line_search: ``torch.optim.LBFGS`` settings.
        stop_mismatch: Stop a restart once the objective falls below this value.
        show_progress: Progress bar.

    Returns:
        ``(best_x (R, B, ...), best_y, best_value (R,), trace (steps + 1, R))``; ``best_y`` are the label
        logits (joint) or the labels.
    """
    restarts = x0.shape[0]
    best_x, best_y = x0.detach().clone(), y0.detach().clone()
    best_v = torch.full((restarts,), math.inf, dtype=torch.float64)
    trace = torch.full((steps + 1, restarts), math.nan, dtype=torch.float64)
    bar = progress(range(restarts * steps), total=restarts * steps, desc="deep leakage (L-BFGS)",
                   enabled=show_progress)
    ticks = iter(bar)
    for r in range(restarts):
        x = x0[r : r + 1].detach().clone().requires_grad_(True)
        y = (y0[r : r + 1].detach().clone().requires_grad_(True) if matcher.joint else y0)
        params = [x, y] if matcher.joint else [x]
        opt = torch.optim.LBFGS(params, lr=lr, max_iter=max_iter, history_size=history_size,
                                line_search_fn=line_search, tolerance_grad=0.0, tolerance_change=0.0)
        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            values, gx, gy = matcher.value_and_grad(x.detach(), y.detach() if matcher.joint else y)
            x.grad = gx
            if matcher.joint:
                y.grad = gy
            return values[0].detach()

        k = 0
        for k in range(steps):
            next(ticks, None)
            before_x = x.detach()[0].clone()
            before_y = y.detach()[0].clone() if matcher.joint else None
            v0 = float(opt.step(closure))  # the objective at the iteration's starting point
            trace[k, r] = v0
            if math.isfinite(v0) and v0 < best_v[r]:
                best_v[r], best_x[r] = v0, before_x
                if matcher.joint:
                    best_y[r] = before_y
            if not math.isfinite(v0) or (stop_mismatch is not None and v0 <= stop_mismatch):
                break
        v = float(matcher.values(x.detach(), y.detach() if matcher.joint else y)[0])
        trace[k + 1, r] = v
        if math.isfinite(v) and v < best_v[r]:
            best_v[r] = v
            best_x[r] = x.detach()[0]
            if matcher.joint:
                best_y[r] = y.detach()[0]
    for _ in ticks:
        pass
    return best_x, best_y, best_v, trace
