"""Gradients: input gradients of a batch (chunked), per-example parameter gradients (vmap), and the
dataset-averaged loss gradient.

- :func:`input_gradients` differentiates a per-row target w.r.t. the input rows. Rows may be an
  expanded batch (path steps, noise samples): ``index`` says which example each row belongs to.
  Only input gradients are computed; parameters' ``.grad`` is never touched.
- :func:`per_example_grads` computes ``d loss(f(x_i), y_i) / d theta`` for every example with
  ``torch.func.vmap(torch.func.grad(...))`` over a functional copy of the model: this works on
  BatchNorm networks in eval mode (Opacus refuses BatchNorm in any mode).
- :func:`loss_gradient` averages the loss gradient over a whole dataset, weighted by batch size.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from gradsense.core.batching import chunk_size_for, chunks, estimate_example_bytes, progress
from gradsense.core.checks import check_eval_mode, check_inputs
from gradsense.core.distributed import DataLike, all_reduce_sum, iterate
from gradsense.core.functional import (
    ParamSpec,
    check_model,
    describe_training,
    functional,
    training_stochastic_layers,
)
from gradsense.core.targets import Batch, Target

__all__ = ["input_gradients", "loss_gradient", "per_example_grads", "warn_if_train_mode"]

LossFn = Callable[[Tensor, Tensor], Tensor]

def warn_if_train_mode(model: nn.Module, what: str) -> None:
    """Warn when ``model`` is in train mode and has BatchNorm/Dropout (results then depend on the batch)."""
    layers = training_stochastic_layers(model)
    if layers:
        warnings.warn(
            f"{what}: {describe_training(layers)}, so results depend on the "
            "batch and on randomness. Call model.eval() first unless that is what you want.",
            UserWarning,
            stacklevel=3,
        )


def input_gradients(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    *,
    index: Tensor | None = None,
    labels: Tensor | None = None,
    forward: Callable[[Tensor], Any] | None = None,
    row_forward: Callable[[Tensor, Tensor], Any] | None = None,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    n_examples: int | None = None,
    show_progress: bool | None = False,
    desc: str = "gradients",
) -> tuple[Tensor, Tensor]:
    """Gradient of a per-row target w.r.t. each input row, in chunks under a memory budget.

    Args:
        model: The module (not modified; its train/eval mode is used as it is).
        inputs: ``(n, ...)`` floating-point rows.
        target: A resolved :class:`~gradsense.core.targets.Target`.
        index: ``(n,)`` example index of each row (default ``arange(n)``).
        labels: Optional labels of the rows, passed to the target in ``batch.labels``.
        forward: How to run the model on a chunk of rows (default ``model(rows)``).
        row_forward: Like ``forward`` but also given the rows' example indices, ``fn(rows, index)``:
            for models with further per-example inputs (attention masks, token ids).
        chunk_size: Rows per chunk; default from the memory budget.
        max_memory: Memory budget (bytes or e.g. ``"2GB"``); default a quarter of free memory.
        n_examples: Number of original examples, for the target's range checks (default ``n``).
        show_progress: Progress bar (``None``: on a TTY).
        desc: Progress bar label.

    Returns:
        ``(gradients, scores)``: gradients shaped like ``inputs`` and the target value of each row.

    Raises:
        TypeError, ValueError: Bad inputs (see :func:`~gradsense.core.checks.check_inputs`) or a
            target that does not fit the model output.
    """
    check_model(model)
    check_inputs(inputs)
    n = inputs.shape[0]
    index = torch.arange(n, device=inputs.device) if index is None else index
    if index.shape != (n,):
        raise ValueError(f"index must have shape ({n},), got {tuple(index.shape)}.")
    if row_forward is not None:
        run = lambda rows, idx: row_forward(rows, idx)  # noqa: E731
    else:
        plain = forward or model
        run = lambda rows, idx: plain(rows)  # noqa: E731
    if chunk_size is None:
        per_row = estimate_example_bytes(model, inputs[:2].detach(), forward=lambda r: run(r, index[:2]))
        chunk_size = chunk_size_for(per_row, max_memory=max_memory, total=n, device=inputs.device)
    else:
        chunk_size = chunk_size_for(1, chunk_size=chunk_size, total=n)
    grads = torch.empty_like(inputs)
    scores = torch.empty(n, dtype=inputs.dtype, device=inputs.device)
    validated = False
    parts = list(chunks(n, chunk_size))
    for sl in progress(parts, total=len(parts), desc=desc, enabled=show_progress):
        x = inputs[sl].detach().requires_grad_(True)
        with torch.enable_grad():
            out = run(x, index[sl])
            if not validated:
                target.validate(out, n_examples if n_examples is not None else n)
                validated = True
            batch = Batch(inputs=x, index=index[sl], labels=None if labels is None else labels[sl])
            s = target(out, batch)
            if s.shape != (x.shape[0],):
                raise ValueError(f"target returned shape {tuple(s.shape)}, expected ({x.shape[0]},).")
            (g,) = torch.autograd.grad(s.sum(), x, allow_unused=True)
        grads[sl] = torch.zeros_like(x) if g is None else g
        scores[sl] = s.detach()
    return grads, scores


def _example_loss(fm: Any, loss_fn: LossFn) -> Callable[..., Tensor]:
    def compute(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = fm(params, x.unsqueeze(0))
        return loss_fn(out, y.unsqueeze(0)).reshape(())

    return compute


def per_example_grads(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    labels: Tensor,
    *,
    params: ParamSpec = None,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    show_progress: bool | None = False,
) -> dict[str, Tensor]:
    """Per-example gradients of ``loss_fn(model(x_i), y_i)`` w.r.t. the selected parameters.

    Uses ``vmap(grad(...))`` over a functional copy of the model, in chunks of examples. Each example
    is run as a batch of one, so BatchNorm must be in eval mode (running statistics); in train mode a
    ``ValueError`` says so.

    Args:
        model: The module (never modified).
        loss_fn: ``(output, labels) -> scalar`` (mean or sum over a batch of one is the same).
        inputs: ``(N, ...)`` inputs.
        labels: ``(N, ...)`` labels.
        params: Which parameters (see :data:`~gradsense.core.functional.ParamSpec`).
        chunk_size: Examples per vmap call; default from the memory budget.
        max_memory: Memory budget.
        show_progress: Progress bar.

    Returns:
        ``{name: tensor of shape (N, *param.shape)}``.

    Raises:
        ValueError: BatchNorm/Dropout in train mode; mismatched inputs and labels.
    """
    check_model(model)
    check_inputs(inputs, needs_grad=False)
    if not isinstance(labels, Tensor) or labels.shape[0] != inputs.shape[0]:
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a tensor with one row per input ({inputs.shape[0]}), got {got}.")
    check_eval_mode(model, "per_example_grads")
    fm = functional(model, params)
    n = inputs.shape[0]
    if chunk_size is None:
        per = estimate_example_bytes(model, inputs[:1]) + 2 * 4 * fm.numel
        chunk_size = chunk_size_for(per, max_memory=max_memory, total=n, device=inputs.device)
    else:
        chunk_size = chunk_size_for(1, chunk_size=chunk_size, total=n)
    fn = vmap(grad(_example_loss(fm, loss_fn)), in_dims=(None, 0, 0))
    out: dict[str, list[Tensor]] = {k: [] for k in fm.params}
    parts = list(chunks(n, chunk_size))
    for sl in progress(parts, total=len(parts), desc="per-example gradients", enabled=show_progress):
        g = fn(fm.params, inputs[sl], labels[sl])
        for k in out:
            out[k].append(g[k].detach())
    return {k: torch.cat(v) for k, v in out.items()}


def loss_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataLike,
    *,
    params: ParamSpec = None,
    batch_size: int = 256,
) -> dict[str, Tensor]:
    """Gradient of the dataset-average loss w.r.t. the selected parameters.

    Each batch's mean loss gradient is weighted by its size and the sum divided by the number of
    examples actually seen (a DataLoader may drop or subsample), so the result equals the gradient
    of the mean loss over those examples whatever the batching (for a ``loss_fn`` that averages).

    Args:
        model: The module (never modified, ``.grad`` untouched).
        loss_fn: ``(output, labels) -> scalar`` averaged over the batch.
        data: Tensor, (inputs, labels), Dataset or DataLoader.
        params: Which parameters.
        batch_size: Batch size for tensors and Datasets.

    Returns:
        ``{name: gradient}``.
    """
    check_model(model)
    check_eval_mode(model, "loss_gradient")
    fm = functional(model, params)
    acc = {k: torch.zeros_like(v) for k, v in fm.params.items()}
    seen = torch.zeros((), dtype=torch.float64)

    def batch_loss(p: dict[str, Tensor], x: Tensor, y: Tensor | None) -> Tensor:
        return loss_fn(fm(p, x), y)

    g_fn = grad(batch_loss)
    for x, y in iterate(data, batch_size=batch_size):
        g = g_fn(fm.params, x, y)
        for k in acc:
            acc[k] += g[k].detach() * x.shape[0]
        seen += x.shape[0]
    total = float(all_reduce_sum(seen))
    return {k: all_reduce_sum(v) / total for k, v in acc.items()}
