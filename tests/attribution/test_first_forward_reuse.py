"""The first forward (the shared input check) is the clean-input forward IG and SmoothGrad need anyway:
no separate probe pass, the same numbers as a model call of their own."""

from __future__ import annotations

import torch
from torch import nn

import gradsense as gs
from helpers import CountingModule, assert_model_unchanged


def _model() -> CountingModule:
    torch.manual_seed(0)
    return CountingModule(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval())


def test_ig_runs_the_clean_inputs_once_and_its_scores_are_the_models():
    model = _model()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    with assert_model_unchanged(model.inner):
        a = gs.attribute(model, x, target=y, method="ig", steps=4)
    # first forward on the 6 clean rows (reused for F(x)), the size estimate (2 rows), the 4 x 6 path
    # points, F(baseline): no two-row probe and no second forward of the clean rows
    assert sorted(model.sizes) == [2, 6, 6, 24]
    with torch.no_grad():
        out = model.inner(x)
        f_x = out.gather(1, y[:, None]).squeeze(1)
        f_b = model.inner(torch.zeros_like(x)).gather(1, y[:, None]).squeeze(1)
    assert torch.equal(a.scores, f_x)  # the same batch of rows: bitwise the model's own call
    torch.testing.assert_close(a.tensors["delta"], a.attributions.sum(1) - (f_x - f_b), rtol=0, atol=1e-12)


def test_smoothgrad_reuses_the_first_forward_for_its_scores():
    model = _model()
    x = torch.randn(4, 5, dtype=torch.float64)
    a = gs.attribute(model, x, target=1, method="smoothgrad", n_samples=3)
    assert sorted(model.sizes) == [2, 4, 12]  # clean rows once, size estimate, 3 x 4 noisy rows
    with torch.no_grad():
        assert torch.equal(a.scores, model.inner(x)[:, 1])


def test_a_chunk_smaller_than_the_batch_keeps_ig_exact():
    model = _model()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    a = gs.attribute(model, x, target=y, method="ig", steps=4, chunk_size=4)
    with torch.no_grad():
        f_x = model.inner(x).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(a.scores, f_x, rtol=0, atol=1e-12)


def test_saliency_keeps_the_two_row_probe():
    model = _model()
    x = torch.randn(6, 5, dtype=torch.float64)
    gs.attribute(model, x, target=0, method="saliency")
    assert sorted(model.sizes) == [2, 2, 6]  # probe, size estimate, the gradient pass (its own scores)
