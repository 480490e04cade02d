"""Dataset-level input sensitivity: which input variables the loss (or a target) is sensitive to, to first,
second and third order (after "Sensitivity Analysis on Loss Landscape", 2024).

For every example ``i`` and input variable ``j`` we compute the derivatives of the per-example loss
``L_i`` along ``e_j``: ``dL/dx_j``, ``d^2L/dx_j^2`` (the diagonal of the input Hessian) and
``d^3L/dx_j^3``, and report their mean absolute value (and signed mean) over the whole dataset, with the
Spearman rank agreement between the orders' feature rankings.

Order 1 is one reverse-mode pass (:func:`gradsense.core.grad.input_gradients`). Orders 2 and 3 are nested
forward-mode derivatives of the batched per-example loss along the basis direction ``e_j`` given to every
example at once: since ``L_i`` depends on ``x_i`` only (eval mode), ``jvp`` of the ``(B,)`` vector of losses
gives every example's own directional derivative, and one nested ``jvp`` returns orders 2 and 3 together.
The ``D`` basis directions are a ``vmap`` dimension; examples are chunked under the memory budget, with a
progress bar over chunks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap

from gradsense.core.batching import chunk_size_for, chunks, estimate_example_bytes, parse_memory, progress
from gradsense.core.checks import (
    check_eval_mode,
    check_inputs,
    check_labels,
    check_positive_int,
    first_forward,
)
from gradsense.core.distributed import DataLike, all_reduce_sum, iterate, num_examples
from gradsense.core.functional import check_model, model_fingerprint, preserve_model
from gradsense.core.grad import input_gradients
from gradsense.core.targets import Batch, Loss, Target, TargetLike, as_target
from gradsense.evaluation.similarity import spearman
from gradsense.results.evaluation import GlobalSensitivityResult

__all__ = ["global_sensitivity", "input_derivatives"]

REFERENCE = "Sensitivity Analysis on Loss Landscape (2024): per-input first-, second- and third-order derivatives"


def input_derivatives(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    index: Tensor,
    *,
    order: int = 3,
    forward: Callable[[Tensor], Any] | None = None,
    chunk_size: int | None = None,
) -> dict[int, Tensor]:
    """``{k: d^k target_i / dx_ij^k}`` for ``k = 2..order``, each shaped like ``inputs``.

    Args:
        model: The module (examples must be independent: eval mode).
        inputs: ``(B, ...)`` inputs.
        target: Resolved target; row ``r`` is example ``index[r]``.
        index: ``(B,)`` example indices for the target.
        order: 2 or 3.
        forward: How to run the model (default ``model(x)``).
        chunk_size: Basis directions per ``vmap`` call (default all).

    Returns:
        The derivatives of orders 2..``order``.
    """
    run = forward or model
    b = inputs.shape[0]
    d = inputs[0].numel()

    def per_example(z: Tensor) -> Tensor:
        return target(run(z), Batch(inputs=z, index=index))

    def first(z: Tensor, v: Tensor) -> Tensor:
        return jvp(per_example, (z,), (v,))[1]

    def second(z: Tensor, v: Tensor) -> Tensor:
        return jvp(lambda w: first(w, v), (z,), (v,))[1]

    def both(v: Tensor) -> tuple[Tensor, Tensor]:
        if order == 2:
            out = second(inputs, v)
            return out, out
        return jvp(lambda w: second(w, v), (inputs,), (v,))  # (d2, d3)

    out2 = torch.empty(b, d, dtype=inputs.dtype, device=inputs.device)
    out3 = torch.empty(b, d, dtype=inputs.dtype, device=inputs.device)
    size = d if chunk_size is None else max(1, min(chunk_size, d))
    eye = torch.eye(d, dtype=inputs.dtype, device=inputs.device)
    for sl in chunks(d, size):
        basis = eye[sl].reshape(-1, 1, *inputs.shape[1:]).expand(-1, b, *inputs.shape[1:])
        d2, d3 = vmap(both)(basis)  # (k, B)
        out2[:, sl] = d2.T.detach()
        out3[:, sl] = d3.T.detach()
    res = {2: out2.reshape(inputs.shape)}
    if order == 3:
        res[3] = out3.reshape(inputs.shape)
    return res


def global_sensitivity(
    model: nn.Module,
    data: DataLike,
    *,
    target: TargetLike | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    order: int = 1,
    batch_size: int = 256,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    forward: Callable[[Tensor], Any] | None = None,
    feature_names: Sequence[str] | None = None,
    show_progress: bool | None = None,
    name: str | None = None,
) -> GlobalSensitivityResult:
    """Per-feature mean ``|d^k L / dx_j^k|`` over a dataset, ``k = 1..order``, with rank agreement between orders.

    Args:
        model: The module (never modified; use eval mode so that examples are independent).
        data: Tensor, ``(inputs, labels)``, Dataset or DataLoader.
        target: What to differentiate (int class, ``"predicted"``, a ``gs.targets`` object, a callable), or
        loss_fn: a loss ``(output, labels) -> loss`` with the data's labels (exactly one of the two).
        order: Highest derivative order: 1, 2 or 3.
        batch_size: Batch size for tensors and Datasets.
        chunk_size: Examples per derivative call; default from ``max_memory``.
        max_memory: Memory budget (bytes or e.g. ``"2GB"``).
        forward: How to run the model on a batch.
        feature_names: Names of the input variables (default from a zoo dataset's ``feature_names``).
        show_progress: Progress bar over chunks (``None``: on a TTY).
        name: Model name for the metadata.

    Returns:
        A :class:`~gradsense.results.GlobalSensitivityResult`.

    Raises:
        ValueError: Both or neither of ``target``/``loss_fn``, ``loss_fn`` without labels, ``order`` not in
            1..3, empty data, before any work.
        TypeError: Wrong argument types.
    """
    check_model(model)
    if (target is None) == (loss_fn is None):
        raise ValueError("give exactly one of target= (e.g. 'predicted' or a class) and loss_fn= (a loss with labels).")
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}.")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (output, labels) -> loss, got {type(loss_fn).__name__}.")
    check_positive_int(batch_size, "batch_size")
    if chunk_size is not None:
        check_positive_int(chunk_size, "chunk_size")
    if max_memory is not None:
        parse_memory(max_memory)
    total_n = num_examples(data)
    if total_n == 0:
        raise ValueError("data is empty: need at least one example.")
    if feature_names is None:
        feature_names = getattr(data, "feature_names", None) or getattr(getattr(data, "dataset", None), "feature_names", None)
    per_example_targets = isinstance(target, (Tensor, list, tuple)) and not isinstance(target, str)
    # examples must be independent and the function deterministic: the derivatives are per example, and the
    # forward-mode orders run under vmap, which refuses Dropout's random masks
    check_eval_mode(model, "global_sensitivity")
    run = forward or model
    t0 = time.perf_counter()
    sums_abs: dict[int, Tensor] = {}
    sums: dict[int, Tensor] = {}
    seen = 0
    offset = 0
    described = ""
    with preserve_model(model):
        # read once (as the other analyses do), so that every batch's labels are checked before the first one's work
        batches = list(iterate(data, batch_size=batch_size))
        first: Any = None
        for x, y in batches:
            check_inputs(x, name="data inputs")
            x = x.detach()
            if feature_names is not None and len(feature_names) != x[0].numel():
                raise ValueError(f"feature_names has {len(feature_names)} names for {x[0].numel()} input variables.")
            b = x.shape[0]
            if loss_fn is not None and y is None:
                raise ValueError("loss_fn= needs labels: give data as (inputs, labels), or use target=.")
            if first is None:  # the shared first-forward check: shapes and dtypes, before any work
                first = first_forward(run, x, what="global_sensitivity", model=model)
            if loss_fn is not None:
                resolved: Target = Loss(loss_fn, y)
                gidx = torch.arange(b, device=x.device)
                if seen == 0:
                    for _, labels in batches:
                        check_labels(loss_fn, first, labels, what="global_sensitivity")
            elif per_example_targets:
                resolved = as_target(target, total_n)  # type: ignore[arg-type]
                gidx = torch.arange(offset, offset + b, device=x.device)
            else:
                resolved = as_target(target, b, predict=lambda x=x, run=run: run(x))  # type: ignore[arg-type]
                gidx = torch.arange(b, device=x.device)
            resolved.validate(first, total_n if per_example_targets else b)
            described = resolved.describe()
            if chunk_size is None:
                per = estimate_example_bytes(model, x[:2], forward=forward) * (1 if order == 1 else x[0].numel() * 4 * order)
                chunk = chunk_size_for(per, max_memory=max_memory, total=b, device=x.device)
            else:
                chunk = chunk_size_for(1, chunk_size=chunk_size, total=b)
            parts = list(chunks(b, chunk))
            for sl in progress(parts, total=len(parts), desc=f"global sensitivity (order {order})", enabled=show_progress):
                xs, idx = x[sl], gidx[sl]
                g, _ = input_gradients(model, xs, resolved, index=idx, forward=forward, chunk_size=xs.shape[0],
                                       n_examples=total_n if per_example_targets else b)
                derivs = {1: g}
                if order >= 2:
                    derivs.update(input_derivatives(model, xs, resolved, idx, order=order, forward=forward))
                for k, v in derivs.items():
                    va, vs = v.abs().sum(0).double(), v.sum(0).double()
                    sums_abs[k] = sums_abs[k] + va if k in sums_abs else va
                    sums[k] = sums[k] + vs if k in sums else vs
            seen += b
            offset += b
    count = float(all_reduce_sum(torch.tensor(float(seen), dtype=torch.float64)))
    tensors: dict[str, Tensor] = {}
    for k in range(1, order + 1):
        tensors[f"mean_abs_order{k}"] = all_reduce_sum(sums_abs[k]) / count
        tensors[f"mean_order{k}"] = all_reduce_sum(sums[k]) / count
    rho = torch.eye(order, dtype=torch.float64)
    for a in range(order):
        for c in range(a + 1, order):
            val = spearman(tensors[f"mean_abs_order{a + 1}"].reshape(1, -1), tensors[f"mean_abs_order{c + 1}"].reshape(1, -1))
            rho[a, c] = rho[c, a] = val[0]
    names = list(feature_names) if feature_names is not None else None
    tensors["spearman"] = rho
    return GlobalSensitivityResult.build(
        tensors, method="global_sensitivity", settings={"order": order, "batch_size": batch_size},
        model=model_fingerprint(model, name), wall_time_s=time.perf_counter() - t0, order=order,
        n_examples=int(count), feature_names=names, target=described, reference=REFERENCE,
    )
