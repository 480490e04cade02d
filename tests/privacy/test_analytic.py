"""The analytic attack on a Linear first layer: x = dL/dW_i / dL/db_i, exact."""

from __future__ import annotations

import pytest
import torch
from privacy_cases import images, relu_mlp
from torch import nn

import gradsense as gs
from helpers import assert_model_unchanged

CE = gs.losses.cross_entropy


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_example_is_recovered_exactly(dtype):
    model = relu_mlp().to(dtype)
    x, y = images(1, seed=7).to(dtype), torch.tensor([2])
    g = gs.privacy.client_gradient(model, CE, x, y)
    with assert_model_unchanged(model):
        rec = gs.privacy.reconstruct(model, CE, g, attack="analytic", input_shape=(1, 6, 6), truth=(x, y))
    torch.testing.assert_close(rec.inputs, x, rtol=1e-5, atol=1e-5)
    assert rec.labels.tolist() == [2]
    assert float(rec.psnr[0]) > 90 if dtype == torch.float64 else float(rec.psnr[0]) > 80


def _one_unit_per_example(x: torch.Tensor, hidden: int, seed: int = 0) -> nn.Module:
    """A ReLU first layer whose every unit fires for exactly one example of ``x`` (bias between the largest and
    the second-largest pre-activation), so every example owns several units."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), hidden), nn.ReLU(), nn.Linear(hidden, 3)).double()
    with torch.no_grad():
        pre = x.flatten(1) @ model[1].weight.T  # (B, hidden)
        top2 = pre.topk(2, dim=0).values
        model[1].bias.copy_(-(top2[0] + top2[1]) / 2)
    return model.eval()


def test_a_batch_is_recovered_exactly_when_each_unit_sees_one_example():
    x = images(4, seed=11)
    model = _one_unit_per_example(x, hidden=48)
    owners = (x.flatten(1) @ model[1].weight.T + model[1].bias > 0).sum(dim=1)
    assert owners.min() >= 2  # the construction: every example owns at least two units
    y = torch.tensor([0, 1, 2, 1])
    g = gs.privacy.client_gradient(model, CE, x, y)
    rec = gs.privacy.reconstruct(model, CE, g, attack="analytic", batch_size=4, input_shape=(1, 6, 6), truth=(x, y))
    torch.testing.assert_close(rec.inputs[rec.tensors["order"]], x, rtol=1e-5, atol=1e-5)
    assert rec.meta["analytic"]["groups"] == 4


def test_analytic_attack_needs_a_linear_first_layer():
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(32, 3)).double()
    g = gs.privacy.client_gradient(conv, CE, images(1), torch.tensor([0]))
    with pytest.raises(ValueError, match="not the model's first layer"):
        gs.privacy.reconstruct(conv, CE, g, attack="analytic", input_shape=(1, 6, 6))
