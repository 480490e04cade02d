"""Integrated Gradients and Expected Gradients against closed forms, the completeness axiom and captum."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsense as gs
from gradsense.attribution import ExpectedGradients, IntegratedGradients, make_baseline, quadrature


class ReluKink(nn.Module):
    """f(x1, x2) = 1 - ReLU(1 - x1 - x2): the IG paper's saturating example in two inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - torch.relu(1 - x[:, 0] - x[:, 1]))[:, None]


def smooth_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 3)).double()


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5),
    )
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 1, 8, 8))
    return net.eval()


def test_linear_closed_form_any_rule():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()
    x, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64)
    for rule in ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"):
        a = gs.attribute(lin, x, target=2, method="integrated_gradients", steps=3, rule=rule, baseline=b)
        torch.testing.assert_close(a.attributions, (x - b) * lin.weight[2], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.delta, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_relu_kink_closed_form():
    # path (a, a) from 0 to (1, 1): the gradient is 1 for a < 1/2 and 0 after, so IG = (1/2, 1/2)
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    a = gs.attribute(ReluKink(), x, target=0, method="ig", steps=10, rule="riemann_middle")
    torch.testing.assert_close(a.attributions, torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    # saturated gradient at x itself is zero - the failure of Saliency that IG fixes
    s = gs.attribute(ReluKink(), x, target=0, method="saliency")
    assert float(s.attributions.abs().sum()) == 0.0


def test_completeness_on_smooth_network():
    net = smooth_net()
    x = torch.randn(5, 6, dtype=torch.float64)
    a = gs.attribute(net, x, target=[0, 1, 2, 0, 1], method="ig", steps=64)
    with torch.no_grad():
        f_x = net(x).gather(1, torch.tensor([[0], [1], [2], [0], [1]])).squeeze(1)
        f_b = net(torch.zeros_like(x)).gather(1, torch.tensor([[0], [1], [2], [0], [1]])).squeeze(1)
    # delta as defined, and small at 64 Gauss-Legendre points for this smooth function
    torch.testing.assert_close(a.delta, a.sum_per_example() - (f_x - f_b), rtol=0, atol=1e-12)
    assert float(a.delta.abs().max()) < 1e-8


def test_quadrature_integrates_polynomials():
    # Gauss-Legendre with n points is exact for degree 2n-1; trapezoid for degree 1
    a, w = quadrature("gausslegendre", 4)
    assert abs(sum(w * a**7) - 1 / 8) < 1e-12
    a, w = quadrature("riemann_trapezoid", 3)
    assert abs(sum(w * (3 * a + 1)) - 2.5) < 1e-12
    with pytest.raises(ValueError, match="unknown integration rule"):
        quadrature("simpson", 4)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle"])
def test_agrees_with_captum(rule):
    captum = pytest.importorskip("captum.attr")
    net = small_cnn()
    x = torch.rand(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    ours = gs.attribute(net, x, target=y, method="ig", steps=20, rule=rule)
    theirs, delta = captum.IntegratedGradients(net).attribute(
        x, target=y, n_steps=20, method=rule, return_convergence_delta=True
    )
    torch.testing.assert_close(ours.attributions, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.delta, delta.to(ours.delta.dtype), rtol=1e-4, atol=1e-5)


def test_captum_trapezoid_is_scaled_by_n_minus_1_over_n():
    """captum's riemann_trapezoid puts n points on [0, 1] but uses widths 1/n (weights sum to (n-1)/n):
    its IG is ours times (n-1)/n. Ours is the trapezoid rule (exact for a linear integrand)."""
    captum = pytest.importorskip("captum.attr")
    net = small_cnn()
    x = torch.rand(4, 1, 8, 8)
    ours = gs.attribute(net, x, target=2, method="ig", steps=20, rule="riemann_trapezoid")
    theirs = captum.IntegratedGradients(net).attribute(x, target=2, n_steps=20, method="riemann_trapezoid")
    torch.testing.assert_close(ours.attributions * 19 / 20, theirs, rtol=1e-5, atol=1e-6)
    _, w = quadrature("riemann_trapezoid", 20)
    assert abs(w.sum() - 1.0) < 1e-12


def test_chunked_equals_unchunked_and_batched_equals_single():
    net = small_cnn()
    x = torch.rand(5, 1, 8, 8)
    full = gs.attribute(net, x, target=1, method="ig", steps=7)
    chunked = gs.attribute(net, x, target=1, method="ig", steps=7, chunk_size=3)
    torch.testing.assert_close(chunked.attributions, full.attributions, rtol=1e-5, atol=1e-6)
    for i in range(5):
        one = gs.attribute(net, x[i : i + 1], target=1, method="ig", steps=7)
        torch.testing.assert_close(one.attributions[0], full.attributions[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("refine", ["uniform", "greedy"])
def test_adaptive_reaches_tolerance_with_fewer_steps_where_easy(refine):
    net = smooth_net(1)
    x = torch.randn(6, 6, dtype=torch.float64) * torch.tensor([0.1, 0.1, 0.1, 2, 2, 2], dtype=torch.float64)[:, None]
    a = gs.attribute(net, x, target=0, method="ig", steps="auto", rtol=1e-3, refine=refine)
    with torch.no_grad():
        gap = net(x)[:, 0] - net(torch.zeros_like(x))[:, 0]
    assert bool((a.delta.abs() <= 1e-3 * gap.abs() + 1e-12).all())
    steps = a.tensors["steps"]
    assert int(steps.min()) < int(steps.max())  # refined per example, not all together
    # independent reference: 256-point Gauss-Legendre IG, accurate to ~1e-12 on this smooth network
    ref = gs.attribute(net, x, target=0, method="ig", steps=256)
    err = (a.attributions - ref.attributions).abs().sum(1)
    assert bool((err <= 10 * 1e-3 * gap.abs() + 1e-9).all()), (err, gap)


def test_adaptive_refines_only_where_the_relu_kink_is():
    # f = 1 - ReLU(1 - x1 - x2) on the path to (0.7, 0.8): the integrand is 1.5 before alpha = 2/3 and 0
    # after, so only intervals around the kink are split; IG -> (0.7, 0.8) * (2/3) * ... exactly (x_i / 1.5)
    x = torch.tensor([[0.7, 0.8]], dtype=torch.float64)
    a = gs.attribute(ReluKink(), x, target=0, method="ig", steps="auto", rtol=1e-3, refine="greedy")
    torch.testing.assert_close(a.attributions, x / 1.5, rtol=2e-3, atol=0)
    assert abs(float(a.delta[0])) <= 1e-3
    assert int(a.tensors["steps"][0]) <= 16  # a uniform grid needs ~1/rtol = 1000 intervals
    u = gs.attribute(ReluKink(), x, target=0, method="ig", steps="auto", rtol=1e-3, max_steps=2048)
    torch.testing.assert_close(u.attributions, x / 1.5, rtol=2e-3, atol=0)
    assert int(u.tensors["steps"][0]) > 64


def test_adaptive_respects_step_cap():
    x = torch.tensor([[0.7, 0.8]], dtype=torch.float64)  # kink at alpha = 2/3: never exact on a dyadic grid
    a = gs.attribute(ReluKink(), x, target=0, method="ig", steps="auto", rtol=1e-15, max_steps=16)
    assert int(a.tensors["steps"][0]) == 16


def test_baselines():
    x = torch.rand(3, 2, 9, 9)
    const = torch.full((1, 1, 9, 9), 0.7).expand(3, 2, 9, 9)
    torch.testing.assert_close(make_baseline("blur", const), const)  # blurring a constant image
    blurred = make_baseline("blur", x)
    assert blurred.var() < x.var()
    u1, u2 = make_baseline("uniform", x, seed=3), make_baseline("uniform", x, seed=3)
    torch.testing.assert_close(u1, u2)
    flat, uf = x.reshape(3, -1), u1.reshape(3, -1)
    assert bool((uf.min(1).values >= flat.min(1).values).all() and (uf.max(1).values <= flat.max(1).values).all())
    assert not torch.equal(u1, make_baseline("uniform", x, seed=4))
    torch.testing.assert_close(make_baseline(0.5, x), torch.full_like(x, 0.5))
    with pytest.raises(ValueError, match="does not broadcast"):
        make_baseline(torch.zeros(2, 9, 9, 9), x)
    with pytest.raises(ValueError, match="baseline must be one of"):
        make_baseline("black", x)


def test_bad_baseline_rejected_before_any_forward():
    calls = []

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            return self.lin(x)

    with pytest.raises(ValueError, match="does not broadcast"):
        gs.attribute(Counting(), torch.randn(3, 4), target=0, method="ig", baseline=torch.zeros(3, 5))
    assert calls == []
    with pytest.raises(ValueError, match="steps must be >= 1"):
        IntegratedGradients(Counting(), steps=0)
    with pytest.raises(ValueError, match="unknown integration rule"):
        IntegratedGradients(Counting(), rule="simpson")


def test_expected_gradients_linear_closed_form():
    torch.manual_seed(0)
    lin = nn.Linear(4, 2).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    ref = torch.randn(1, 4, dtype=torch.float64).repeat(5, 1)  # every draw is the same baseline
    a = gs.attribute(lin, x, target=1, method="expected_gradients", references=ref, n_samples=7)
    torch.testing.assert_close(a.attributions, (x - ref[0]) * lin.weight[1], rtol=1e-12, atol=1e-12)


def test_expected_gradients_is_ig_in_expectation():
    # one reference, many draws of alpha: EG -> IG with that baseline (Monte Carlo, within 5 stderr)
    net = smooth_net(2)
    x = torch.randn(2, 6, dtype=torch.float64)
    ref = torch.randn(1, 6, dtype=torch.float64)
    eg = ExpectedGradients(net, references=ref, n_samples=4000, seed=1).attribute(x, target=0)
    ig = IntegratedGradients(net, steps=64, baseline=ref).attribute(x, target=0)
    # standard error of the alpha average, estimated from a second independent run's spread
    eg2 = ExpectedGradients(net, references=ref, n_samples=4000, seed=2).attribute(x, target=0)
    err = (eg.attributions - ig.attributions).abs().max()
    spread = (eg.attributions - eg2.attributions).abs().max()
    assert float(err) < 5 * float(spread) + 1e-6
    assert float(err) < 0.05 * float(ig.attributions.abs().max())


def test_same_seed_same_numbers():
    net = small_cnn()
    x = torch.rand(2, 1, 8, 8)
    a = gs.attribute(net, x, target=0, method="ig", baseline="uniform", seed=5, steps=5)
    b = gs.attribute(net, x, target=0, method="ig", baseline="uniform", seed=5, steps=5)
    torch.testing.assert_close(a.attributions, b.attributions, rtol=0, atol=0)
