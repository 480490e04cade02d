"""hessian_trace against the exact trace of dense float64 Hessians: within 3 standard errors, within 1% at
convergence, per-layer traces equal to the diagonal blocks' traces, honest standard errors over seeds,
Hutch++ against Hutchinson, seeds, the caller's model, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from curvature_cases import (
    Quadratic,
    layer_slices,
    make_trained_mlp_case,
    quadratic_loss,
    symmetric_with_spectrum,
)

from gradsense.curvature import hessian_trace
from helpers import assert_model_unchanged
from oracles import dense_hessian

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

CE = F.cross_entropy


@pytest.fixture(scope="module")
def wide():
    case = make_trained_mlp_case()
    return case, dense_hessian(case.model, CE, case.x, case.y)


def test_quadratic_trace_is_exact():
    a = symmetric_with_spectrum(torch.linspace(-3.0, 7.0, 30, dtype=torch.float64), seed=1)
    res = hessian_trace(Quadratic(10, 20), quadratic_loss(a), (torch.zeros(3, 1), torch.zeros(3)), per="layer", seed=0)
    assert res.converged and res.stderr == 0.0
    assert res.value == pytest.approx(float(a.trace()), abs=1e-9)
    groups = res.per_group
    assert groups["a"]["trace"] == pytest.approx(float(a[:10, :10].trace()), abs=1e-9)
    assert groups["b"]["trace"] == pytest.approx(float(a[10:, 10:].trace()), abs=1e-9)
    assert groups["b"]["mean"] == pytest.approx(float(a[10:, 10:].trace()) / 20, abs=1e-10)


def test_trace_of_tiny_networks(case):
    h = dense_hessian(case.model, CE, case.x, case.y)
    res = hessian_trace(case.model, CE, (case.x, case.y), rtol=0.01, per="layer", seed=0)
    truth = float(h.trace())
    assert res.converged
    assert abs(res.value - truth) <= 3 * res.stderr + 1e-9 * abs(truth)
    assert abs(res.value - truth) <= 0.01 * abs(truth)
    for name, sl in layer_slices(case.model).items():
        d = res.per_group[name]
        assert abs(d["trace"] - float(h[sl, sl].trace())) <= 3 * d["stderr"] + 1e-8 * abs(truth), name


def test_trace_of_a_network_larger_than_the_sketch(wide):
    case, h = wide
    truth = float(h.trace())
    res = hessian_trace(case.model, CE, (case.x, case.y), rtol=0.003, per="layer", seed=0)
    assert res.converged and 0 < res.meta["rank"] < h.shape[0] and res.stderr > 0
    assert abs(res.value - truth) <= 3 * res.stderr
    assert abs(res.value - truth) <= 0.01 * abs(truth)  # 3 s.e. <= 0.9%
    # per-layer traces: the diagonal blocks' traces, and they add up to the total
    groups = res.per_group
    assert sum(d["trace"] for d in groups.values()) == pytest.approx(res.value, rel=1e-9)
    for name, sl in layer_slices(case.model).items():
        block = float(h[sl, sl].trace())
        assert abs(groups[name]["trace"] - block) <= 4 * groups[name]["stderr"] + 1e-9, (name, groups[name], block)
        assert groups[name]["numel"] == sl.stop - sl.start


def test_hutchinson_option_and_hutchpp_needs_fewer_products(wide):
    case, h = wide
    truth = float(h.trace())
    pp = hessian_trace(case.model, CE, (case.x, case.y), rtol=0.02, seed=1)
    hutch = hessian_trace(case.model, CE, (case.x, case.y), rtol=0.02, seed=1, method="hutchinson")
    for res in (pp, hutch):
        assert res.converged and abs(res.value - truth) <= 3 * res.stderr
    assert hutch.method == "hutchinson" and hutch.meta["rank"] == 0
    assert pp.n_hvp < hutch.n_hvp


def test_standard_error_is_honest_over_seeds(wide):
    case, h = wide
    truth = float(h.trace())
    z = torch.tensor([
        (r.value - truth) / r.stderr
        for r in (hessian_trace(case.model, CE, (case.x, case.y), rtol=0.05, seed=s) for s in range(30))
    ])
    assert float((z.abs() <= 2).float().mean()) >= 0.8, z
    assert float((z.abs() <= 3).float().mean()) >= 0.9, z
    assert float(z.abs().max()) < 5, z


def test_same_seed_same_numbers_and_the_model_is_unchanged(cnn_case):
    data = (cnn_case.x, cnn_case.y)
    with assert_model_unchanged(cnn_case.model):
        r1 = hessian_trace(cnn_case.model, CE, data, rtol=0.05, seed=3, method="hutchinson", per="layer")
        r2 = hessian_trace(cnn_case.model, CE, data, rtol=0.05, seed=3, method="hutchinson", per="layer")
    assert r1.value == r2.value and r1.stderr == r2.stderr and r1.n_hvp == r2.n_hvp
    assert torch.equal(r1.tensors["group_trace"], r2.tensors["group_trace"])
    r3 = hessian_trace(cnn_case.model, CE, data, rtol=0.05, seed=4, method="hutchinson")
    assert r3.value != r1.value


def test_budget_and_bad_input(mlp_case):
    data = (mlp_case.x, mlp_case.y)
    with pytest.warns(RuntimeWarning, match="max_hvp"):
        r = hessian_trace(mlp_case.model, CE, data, rtol=1e-6, max_hvp=20, method="hutchinson", seed=0)
    assert not r.converged and r.n_hvp <= 20
    with pytest.raises(ValueError, match="rtol"):
        hessian_trace(mlp_case.model, CE, data, rtol=0)
    with pytest.raises(ValueError, match="method"):
        hessian_trace(mlp_case.model, CE, data, method="girard")
    with pytest.raises(ValueError, match="must return a scalar"):
        hessian_trace(mlp_case.model, lambda o, y: o.sum(1), data)
    with pytest.raises(ValueError, match="selects no parameter"):
        hessian_trace(mlp_case.model, CE, data, params=["0.weight"], per={"nothing": "^9"})
    with pytest.raises(ValueError, match="per must be"):
        hessian_trace(mlp_case.model, CE, data, per="neuron")


@pytest.mark.parametrize("per", ["block", "parameter"])
def test_block_and_parameter_groups_are_diagonal_blocks_of_the_dense_hessian(per):
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)),  # block "0"
        torch.nn.Softplus(),
        torch.nn.Linear(4, 3),  # block "2"
    ).double().eval()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    h = dense_hessian(model, CE, x, y)
    res = hessian_trace(model, CE, (x, y), rtol=0.002, per=per, seed=0)
    sizes = [(n, p.numel()) for n, p in model.named_parameters()]
    if per == "block":
        expected_groups = {"0": (0, sum(k for n, k in sizes if n.startswith("0."))), "2": None}
        expected_groups["2"] = (expected_groups["0"][1], sum(k for _, k in sizes))
    else:
        expected_groups, pos = {}, 0
        for n, k in sizes:
            expected_groups[n] = (pos, pos + k)
            pos += k
    assert list(res.per_group) == list(expected_groups)
    for name, (lo, hi) in expected_groups.items():
        d = res.per_group[name]
        truth = float(h[lo:hi, lo:hi].trace())
        assert d["numel"] == hi - lo
        assert abs(d["trace"] - truth) <= 3 * d["stderr"] + 1e-8 * abs(truth), (name, d, truth)
