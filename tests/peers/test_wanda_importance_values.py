"""Wanda (Sun, Liu, Bair & Kolter 2024) against its reference code, on a tiny token model.

Source: locuslab/wanda (commit 8e8fc87) ``lib/layerwrapper.py::WrappedGPT.add_batch`` (the running
``scaler_row`` of squared input-feature norms) and ``lib/prune.py::prune_wanda`` (``W_metric = |W| *
sqrt(scaler_row)``; unstructured: per output row, the ``int(cols * sparsity)`` lowest by a stable sort are pruned;
``prune_n:prune_m``: in every group of ``prune_m`` input columns the ``prune_n`` lowest are pruned). Wanda has no
test suite with numbers; its reference code is re-implemented below line by line (numpy-free, float32 as there)
and run on the same calibration batches, and its metric and masks are the expected values.

gradsense's ``importance(method="wanda")`` normalises ``||X_j||`` by the number of calibration samples, exactly as
``scaler_row`` does, so the scores are equal, not just proportional. Masks: ``prune(scope="row")`` is Wanda's
per-output comparison group; ``prune(structure="2:4")`` keeps 2 of every 4 consecutive inputs, i.e. Wanda's
``prune_n=2, prune_m=4``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsense as gs


class TokenMLP(nn.Module):
    """``(n, T, 8)`` tokens -> Linear(8, 8) -> GELU -> Linear(8, 4) -> mean over tokens -> ``(n, 4)`` logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x))).mean(1)


class WrappedGPT:
    """wanda ``lib/layerwrapper.py::WrappedGPT`` (the part Wanda uses): a running mean of ``||x_j||^2``."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.columns = layer.weight.data.shape[1]
        self.scaler_row = torch.zeros(self.columns)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if isinstance(self.layer, nn.Linear):
            if len(inp.shape) == 3:
                inp = inp.reshape((-1, inp.shape[-1]))
            inp = inp.t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def _wanda_reference(model: TokenMLP, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``prune_wanda``'s calibration: hook every Linear, run the batches, ``W_metric = |W| * sqrt(scaler_row)``."""
    layers = {"fc1.weight": model.fc1, "fc2.weight": model.fc2}
    wrapped = {k: WrappedGPT(m) for k, m in layers.items()}
    handles = [m.register_forward_hook(lambda _m, inp, out, k=k: wrapped[k].add_batch(inp[0].data, out.data))
               for k, m in layers.items()]
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.abs(layers[k].weight.data) * torch.sqrt(wrapped[k].scaler_row.reshape((1, -1)))
            for k in layers}


def _wanda_row_mask(w_metric: torch.Tensor, sparsity_ratio: float) -> torch.Tensor:
    """``prune_wanda`` unstructured branch; returns True = keep (Wanda's ``W_mask`` is True = prune)."""
    w_mask = torch.zeros_like(w_metric) == 1
    sort_res = torch.sort(w_metric, dim=-1, stable=True)
    indices = sort_res[1][:, : int(w_metric.shape[1] * sparsity_ratio)]
    w_mask.scatter_(1, indices, True)
    return ~w_mask


def _wanda_nm_mask(w_metric: torch.Tensor, prune_n: int, prune_m: int) -> torch.Tensor:
    """``prune_wanda`` structured n:m branch; returns True = keep."""
    w_mask = torch.zeros_like(w_metric) == 1
    for ii in range(w_metric.shape[1]):
        if ii % prune_m == 0:
            tmp = w_metric[:, ii : (ii + prune_m)].float()
            w_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    return ~w_mask


def _setup():
    torch.manual_seed(0)
    model = TokenMLP().eval()
    x = torch.randn(10, 5, 8)  # 10 calibration samples of 5 tokens
    y = torch.randint(0, 4, (10,))
    return model, x, y


def test_wanda_scores_equal_the_reference_metric():
    model, x, y = _setup()
    batch = 4  # batches of 4, 4, 2: the reference's running mean and our sum / N must agree
    want = _wanda_reference(model, list(x.split(batch)))
    res = gs.importance(model, gs.losses.cross_entropy, (x, y), method="wanda", batch_size=batch)
    assert set(res.scores) == set(want)
    for k in want:
        torch.testing.assert_close(res.scores[k].float(), want[k], rtol=1e-5, atol=1e-7)


def test_wanda_row_and_two_four_masks_equal_the_reference():
    model, x, y = _setup()
    want = _wanda_reference(model, [x])
    res = gs.importance(model, gs.losses.cross_entropy, (x, y), method="wanda")
    for sparsity in (0.25, 0.5, 0.3, 0.7):  # 8 inputs: 2, 4, 2.4 and 5.6 weights per row
        masks = res.prune(sparsity, scope="row", measure=False)
        for k, metric in want.items():
            cols = metric.shape[1]
            ref = _wanda_row_mask(metric, sparsity)
            if round(cols * sparsity + 1e-9) == int(cols * sparsity):  # same count: same mask, same tie order
                torch.testing.assert_close(masks[k], ref, rtol=0, atol=0)
            else:  # documented difference (5.6): Wanda floors the count (int), gradsense rounds half up
                assert bool(((~masks[k]).sum(1) == int(cols * sparsity) + 1).all())
                assert bool((masks[k] <= ref).all())  # the one extra weight is the next in Wanda's order
            kept = masks[k].sum(1)
            assert bool((kept == kept[0]).all())  # every output row keeps the same number of weights
    nm = res.prune(structure="2:4", measure=False)
    for k, metric in want.items():
        torch.testing.assert_close(nm[k], _wanda_nm_mask(metric, 2, 4), rtol=0, atol=0)


def test_row_scope_is_for_unstructured_masks_only():
    model, x, y = _setup()
    res = gs.importance(model, gs.losses.cross_entropy, (x, y), method="wanda", granularity="channel")
    with pytest.raises(ValueError, match="scope='row' is for unstructured pruning"):
        res.prune(0.5, structure="channel", scope="row", measure=False)
