"""landscape.interpolate and perturbed_copy: exact endpoints, a closed form, BatchNorm buffers against a
state-dict twin, architectures that differ, the caller's models untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from landscape_models import make_bn_cnn, make_mlp
from torch import nn

import gradsense.losses as losses
from gradsense.landscape import interpolate, perturbed_copy
from helpers import assert_model_unchanged

F64 = {"rtol": 1e-10, "atol": 1e-12}


def _data(shape=(4,), n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("vectorize", [True, False])
def test_endpoints_are_the_models_own_losses_exactly(vectorize):
    a, b = make_mlp(0), make_mlp(1)
    x, y = _data()
    with torch.no_grad():
        la, lb = F.cross_entropy(a(x), y).item(), F.cross_entropy(b(x), y).item()
    with assert_model_unchanged(a), assert_model_unchanged(b):
        r = interpolate(a, b, losses.cross_entropy, (x, y), steps=5, vectorize=vectorize)
    assert r.losses[0].item() == la and r.losses[-1].item() == lb
    assert r.meta["loss_a"] == la and r.meta["loss_b"] == lb
    assert r.alphas.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_linear_regression_line_matches_its_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.randn(30, generator=g, dtype=torch.float64)
    a, b = nn.Linear(5, 1, bias=False).double(), nn.Linear(5, 1, bias=False).double()
    r = interpolate(a, b, losses.mse, (x, y), steps=9, start=-0.5, end=1.5, vectorize=True)
    wa, wb = a.weight.detach().reshape(-1), b.weight.detach().reshape(-1)
    expected = torch.stack([((x @ ((1 - t) * wa + t * wb) - y) ** 2).mean() for t in r.alphas])
    torch.testing.assert_close(r.losses, expected, **F64)
    assert r.alphas[0].item() == -0.5 and r.alphas[-1].item() == 1.5
    chord = (1 - r.alphas) * r.meta["loss_a"] + r.alphas * r.meta["loss_b"]
    inside = (r.alphas >= 0) & (r.alphas <= 1)
    assert r.barrier == pytest.approx(float((r.losses - chord)[inside].max()), abs=1e-12)
    torch.testing.assert_close(torch.tensor(r.meta["distance"], dtype=torch.float64), (wa - wb).norm(), **F64)


@pytest.mark.parametrize("buffers", [True, False])
def test_batchnorm_buffers_against_a_state_dict_twin(buffers):
    a, b = make_bn_cnn(0), make_bn_cnn(1)
    x, y = _data((1, 5, 5))
    r = interpolate(a, b, losses.cross_entropy, (x, y), steps=3, buffers=buffers)
    sa, sb = a.state_dict(), b.state_dict()
    params = {n for n, _ in a.named_parameters()}
    mid = {}
    for k, v in sa.items():
        mix = v.is_floating_point() and (k in params or buffers)
        mid[k] = 0.5 * v + 0.5 * sb[k] if mix else v
    twin = copy.deepcopy(a)
    twin.load_state_dict(mid)
    with torch.no_grad():
        expected = F.cross_entropy(twin(x), y).item()
    assert r.losses[1].item() == pytest.approx(expected, rel=1e-12)


def test_state_dict_as_the_second_model():
    a, b = make_bn_cnn(0), make_bn_cnn(1)
    x, y = _data((1, 5, 5))
    ref = interpolate(a, b, losses.cross_entropy, (x, y), steps=4)
    got = interpolate(a, b.state_dict(), losses.cross_entropy, (x, y), steps=4)
    torch.testing.assert_close(got.losses, ref.losses, **F64)
    params_only = {n: p.detach() for n, p in b.named_parameters()}  # buffers missing: model_a's are used
    got2 = interpolate(a, params_only, losses.cross_entropy, (x, y), steps=4)
    ref2 = interpolate(a, b, losses.cross_entropy, (x, y), steps=4, buffers=False)
    torch.testing.assert_close(got2.losses[:-1], ref2.losses[:-1], **F64)


def test_different_architectures_name_the_parameter_that_differs():
    x, y = _data()
    a = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    wider = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with pytest.raises(ValueError, match=r"parameter '0.weight' has shape \(5, 4\) in model_a but \(6, 4\) in model_b"):
        interpolate(a, wider, losses.cross_entropy, (x, y))
    deeper = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Linear(3, 3)).double()
    with pytest.raises(ValueError, match=r"parameter '3\.weight' is in model_b but not in model_a"):
        interpolate(a, deeper, losses.cross_entropy, (x, y))
    with pytest.raises(ValueError, match=r"parameter '3\.weight' is in model_a but not in model_b"):
        interpolate(deeper, a, losses.cross_entropy, (x, y))
    prefixed = {f"module.{k}": v for k, v in a.state_dict().items()}
    with pytest.raises(ValueError, match=r"'module\.0\.weight'.*prefix"):
        interpolate(a, prefixed, losses.cross_entropy, (x, y))


def test_bad_input():
    a, b = make_mlp(0), make_mlp(1)
    x, y = _data()
    with pytest.raises(ValueError, match="steps must be >= 2"):
        interpolate(a, b, losses.cross_entropy, (x, y), steps=1)
    with pytest.raises(ValueError, match="end must be greater"):
        interpolate(a, b, losses.cross_entropy, (x, y), start=1.0, end=0.0)
    with pytest.raises(TypeError, match="model_b must be"):
        interpolate(a, [1, 2], losses.cross_entropy, (x, y))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ perturbed copy
def test_perturbed_copy_moves_each_filter_by_scale_times_its_norm_and_leaves_the_model():
    model = make_bn_cnn(0)
    with assert_model_unchanged(model):
        moved = perturbed_copy(model, scale=0.5, seed=3)
    for (name, p), q in zip(model.named_parameters(), moved.parameters()):
        delta = (q - p).detach()
        if p.ndim == 1:
            assert torch.count_nonzero(delta) == 0, name  # biases and BatchNorm stay (Li et al. 2018)
        else:
            torch.testing.assert_close(delta.flatten(1).norm(dim=1), 0.5 * p.detach().flatten(1).norm(dim=1), **F64)
    again = perturbed_copy(model, scale=0.5, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(moved.parameters(), again.parameters()))
    x, y = _data((1, 5, 5))
    r = interpolate(model, moved, losses.cross_entropy, (x, y), steps=5, names=("model", "perturbed"))
    assert r.title == "Linear interpolation: model -> perturbed"
    with pytest.raises(ValueError, match="scale"):
        perturbed_copy(model, scale=float("inf"))
