"""Labels from a shared gradient: iDLG's sign rule for one example, label counts for a batch.

With cross-entropy on softmax outputs, the last layer ``z = W h + b`` has gradients (mean over a batch of B)

    dL/db_c = (1/B) sum_i (p_ic - y_ic),        dL/dW_c = (1/B) sum_i (p_ic - y_ic) h_i.

- ``"idlg"`` (Zhao et al. 2020, iDLG): for one example only the true class has ``p_c - y_c < 0``, so the
  label is ``argmin_c dL/db_c``; without a bias, ``argmin_c sum_j dL/dW_cj`` (the row sums are
  ``(p_c - y_c) sum_j h_j``, and ``sum_j h_j > 0`` after ReLU or sigmoid features).
- ``"count"`` (the count extension, in the spirit of Geng et al. 2022 and Wainakh et al. 2022's LLG*): the
  bias gradient gives ``n_c = B (pbar_c - dL/db_c)``, where ``pbar`` is the batch's mean prediction. The
  attacker estimates ``pbar`` (and, without a bias, the mean feature sum ``sbar``, with
  ``n_c = B (pbar_c - rowsum_c / sbar)``) from the model's outputs on ``probes`` random inputs in the data's
  range, then rounds to counts that add up to B (largest remainders), after giving one example to every class
  whose entry is negative (which, with ``p_c >= 0``, only a present class can have). This is exact when the model's
  prediction (and feature sum) does not depend on the input, e.g. a last layer with zero weights, and close
  for untrained networks, whose predictions vary little; on a confident trained model ``pbar`` is close to
  the label shares and the bias gradient carries less.
- ``"llg"`` (Wainakh et al. 2022, LLG, no model queries): classes with a negative weight-row sum are present;
  the impact ``m = (1 + 1/C) sum_{c: g_c<0} g_c / B`` is subtracted from a class each time it is taken, and the
  remaining labels go to the most negative rows.

For a weight update after local steps, ``-delta / (lr * local_steps)`` stands in for the gradient.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad

from gradsense.privacy.shared import Shared

__all__ = ["LABEL_METHODS", "find_last_layer", "pseudo_gradient", "recover_labels", "round_counts"]

LABEL_METHODS = ("idlg", "count", "llg")


def find_last_layer(model: nn.Module, shared: Shared, layer: str | None = None) -> tuple[str, str | None, int]:
    """The classifier layer whose gradient reveals the labels: ``(weight name, bias name or None, classes)``.

    Args:
        model: The model.
        shared: The checked shared message (the layer's weight must be in it).
        layer: Module name of the last ``nn.Linear``; default the last ``nn.Linear`` in ``named_modules()``
            order whose weight is shared.

    Raises:
        ValueError: No such layer, or its weight was not shared.
    """
    modules = dict(model.named_modules())
    if layer is not None:
        if layer not in modules or not isinstance(modules[layer], nn.Linear):
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            raise ValueError(f"label recovery: {layer!r} is not an nn.Linear of the model; its Linear layers: {linears}.")
        candidates = [layer]
    else:
        candidates = [n for n, m in modules.items() if isinstance(m, nn.Linear)][::-1]
    for name in candidates:
        prefix = f"{name}." if name else ""
        w, b = f"{prefix}weight", f"{prefix}bias"
        if w in shared.tensors:
            return w, (b if b in shared.tensors else None), int(modules[name].out_features)
    raise ValueError(
        "label recovery needs the gradient of the model's last nn.Linear (the classifier) and found none "
        f"among the shared parameters {shared.names[:5]}. Pass labels= yourself, or name the layer with layer=."
    )


def pseudo_gradient(shared: Shared, name: str) -> Tensor:
    """The shared gradient of ``name``, or ``-delta / (lr * local_steps)`` for a weight update."""
    t = shared.tensors[name]
    if shared.kind == "update":
        return -t / (float(shared.lr) * int(shared.local_steps))
    return t


def round_counts(expected: Tensor, total: int) -> Tensor:
    """Non-negative integer counts adding up to ``total``, nearest to ``expected`` (largest remainders)."""
    e = expected.detach().double().clamp(min=0).cpu()
    if float(e.sum()) > 0:
        e = e * (total / float(e.sum()))
    else:
        e = torch.full_like(e, total / e.numel())
    base = torch.floor(e).long()
    short = total - int(base.sum())
    if short > 0:
        order = torch.argsort(e - base.double(), descending=True, stable=True)
        base[order[:short]] += 1
    elif short < 0:  # only possible through rounding of the rescaled sum
        order = torch.argsort(e - base.double(), stable=True)
        for i in order.tolist():
            if short == 0:
                break
            if base[i] > 0:
                base[i] -= 1
                short += 1
    return base


def _counts_to_labels(counts: Tensor) -> Tensor:
    return torch.repeat_interleave(torch.arange(counts.numel()), counts)


def _probe_statistics(model: nn.Module, weight: str, probes: Tensor, logits_of: Callable[[Any], Tensor],
                      buffers: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Mean softmax prediction ``pbar`` and mean feature sum ``sbar`` of the last layer on probe inputs.

    ``sbar``: every row of ``d mean_i(sum_c z_ic) / dW`` is the mean feature vector ``mean_i h_i``.
    """
    theta = {n: p.detach() for n, p in model.named_parameters()}

    def total_logit(w: Tensor, b: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        z = logits_of(functional_call(model, {**theta, **b, weight: w}, (probes,)))
        return z.sum(dim=1).mean(), z

    gw, z = grad(total_logit, has_aux=True)(theta[weight], buffers)
    return torch.softmax(z.detach().double(), dim=1).mean(dim=0), gw[0].detach().double().sum()


def recover_labels(
    model: nn.Module,
    shared: Shared,
    batch_size: int,
    *,
    method: str = "auto",
    layer: str | None = None,
    probes: Tensor | None = None,
    logits_of: Callable[[Any], Tensor] | None = None,
    buffers: dict[str, Tensor] | None = None,
) -> Tensor:
    """Labels of the client's batch from the shared gradient of the classifier layer (sorted; order is lost).

    Args:
        model: The model (never modified).
        shared: The checked shared message.
        batch_size: Number of examples in the client's batch (known to the server in FedSGD).
        method: ``"idlg"`` (one example), ``"count"``, ``"llg"``, or ``"auto"`` (``"idlg"`` for one example,
            else ``"count"``). See the module docstring.
        layer: Module name of the classifier ``nn.Linear`` (default: the last one).
        probes: Random inputs on which the ``"count"`` method estimates the mean prediction (required for it).
        logits_of: How to get logits from the model's output (default: the output itself, or ``.logits``).
        buffers: Buffers for the probe forwards (default: copies of the model's).

    Returns:
        ``(batch_size,)`` int64 labels, sorted.

    Raises:
        ValueError: Unknown method, ``"idlg"`` with more than one example, no classifier layer shared,
            ``"count"`` without probes.
    """
    if method == "auto":
        method = "idlg" if batch_size == 1 else "count"
    if method not in LABEL_METHODS:
        raise ValueError(f"label method must be one of {('auto', *LABEL_METHODS)}, got {method!r}.")
    weight, bias, num_classes = find_last_layer(model, shared, layer)
    gw = pseudo_gradient(shared, weight).detach().double()
    gb = None if bias is None else pseudo_gradient(shared, bias).detach().double()
    rows = gw.sum(dim=1)
    if method == "idlg":
        if batch_size != 1:
            raise ValueError(f"iDLG's sign rule recovers the label of one example; the batch has {batch_size}. "
                             "Use method='count' or 'llg' for batches.")
        rule = gb if gb is not None else rows
        if not bool((rule != 0).any()):
            warnings.warn("label recovery: the classifier layer's gradient is zero (dead features or a perfect "
                          "prediction), so the label is not identifiable; class 0 is returned.", UserWarning,
                          stacklevel=2)
        return torch.atleast_1d(rule.argmin()).cpu()
    if method == "llg":
        g = rows.clone().cpu()
        impact = g.clamp(max=0).sum() * (1 + 1 / num_classes) / batch_size
        present = [c for c in torch.argsort(g).tolist() if g[c] < 0][:batch_size]
        labels = list(present)
        for c in present:
            g[c] -= impact
        while len(labels) < batch_size:
            c = int(g.argmin())
            labels.append(c)
            g[c] -= impact
        return torch.tensor(sorted(labels), dtype=torch.long)
    if probes is None:
        raise ValueError("the 'count' label method needs probe inputs to estimate the mean prediction.")
    logits_of = logits_of or (lambda out: out if isinstance(out, Tensor) else out.logits)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()} if buffers is None else buffers
    pbar, sbar = _probe_statistics(model, weight, probes, logits_of, buffers)
    pbar = pbar.cpu()
    signal = gb.cpu() if gb is not None else rows.cpu() / float(sbar)
    expected = batch_size * (pbar - signal)
    # a negative entry means the class is present (p_c >= 0): one example each, the most negative first, then the
    # remaining examples by the estimated counts
    present = [c for c in torch.argsort(signal).tolist() if signal[c] < 0][:batch_size]
    counts = torch.zeros(num_classes, dtype=torch.long)
    counts[present] = 1
    rest = batch_size - len(present)
    if rest:
        counts += round_counts((expected - counts.double()).clamp(min=0), rest)
    return _counts_to_labels(counts)
