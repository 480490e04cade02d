"""SmoothGrad, SmoothGrad^2 and VarGrad against closed forms of a quadratic model and captum's statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsense as gs
from gradsense.attribution import SmoothGrad


class Quadratic(nn.Module):
    """f(x) = sum_i a_i x_i^2: gradient 2 a x, so under x + N(0, s^2) noise
    E[grad] = 2 a x, E[grad^2] = 4 a^2 (x^2 + s^2), Var[grad] = 4 a^2 s^2."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a * x**2).sum(1, keepdim=True)


def test_linear_model_smoothgrad_equals_weights():
    torch.manual_seed(0)
    lin = nn.Linear(5, 2).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    a = gs.attribute(lin, x, target=1, method="smoothgrad", n_samples=8, noise_level=0.5)
    torch.testing.assert_close(a.attributions, lin.weight[1].expand(3, 5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_quadratic_closed_forms_within_standard_errors(kind):
    a = torch.tensor([0.5, -1.0, 2.0, 1.5], dtype=torch.float64)
    model = Quadratic(a)
    x = torch.tensor([[1.0, 2.0, -1.0, 0.5]], dtype=torch.float64)
    sigma, n = 0.3, 4000
    res = gs.attribute(model, x, target=0, method=kind, n_samples=n, sigma=sigma, seed=0).attributions[0]
    g_mean = 2 * a * x[0]
    if kind == "smoothgrad":
        expected, sd = g_mean, (2 * a.abs() * sigma)
    elif kind == "smoothgrad_sq":
        expected = 4 * a**2 * (x[0] ** 2 + sigma**2)
        # Var[(2a(x+e))^2] = 16 a^4 (4 x^2 s^2 + 2 s^4)
        sd = (16 * a**4 * (4 * x[0] ** 2 * sigma**2 + 2 * sigma**4)).sqrt()
    else:
        expected = 4 * a**2 * sigma**2
        sd = 4 * a**2 * sigma**2 * (2.0**0.5)  # variance of a sample variance of Gaussians: s^2 sqrt(2/n)
    stderr = sd / n**0.5
    assert bool(((res - expected).abs() <= 5 * stderr + 1e-12).all()), (res, expected, stderr)


def test_noise_level_is_relative_to_range():
    a = torch.ones(3, dtype=torch.float64)
    x = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)  # range 2 -> sigma = 0.15 * 2 = 0.3
    v = gs.attribute(Quadratic(a), x, target=0, method="vargrad", n_samples=20000, seed=0).attributions[0]
    torch.testing.assert_close(v, torch.full((3,), 4 * 0.3**2, dtype=torch.float64), rtol=0.05, atol=0)


def test_wraps_integrated_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(4, 2).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    # SmoothGrad over IG on a linear model: mean over noise of (x + e) * w
    res = gs.attribute(lin, x, target=0, method="smoothgrad", base="integrated_gradients",
                       base_options={"steps": 4}, n_samples=6, seed=1)
    g = torch.Generator().manual_seed(1)
    flat = x.reshape(3, -1)
    sigma = 0.15 * (flat.max(1).values - flat.min(1).values)
    noise = torch.randn((6, 3, 4), generator=g, dtype=torch.float64) * sigma[None, :, None]
    expected = ((x[None] + noise) * lin.weight[0]).mean(0)
    torch.testing.assert_close(res.attributions, expected, rtol=1e-10, atol=1e-12)


def test_agrees_with_captum_noise_tunnel_statistically():
    captum = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    a = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    model = Quadratic(a)
    x = torch.tensor([[1.0, 2.0, -1.0]], dtype=torch.float64)
    theirs = captum.NoiseTunnel(captum.Saliency(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=3000, stdevs=0.3, target=0, abs=False
    )
    ours = gs.attribute(model, x, target=0, method="smoothgrad", n_samples=3000, sigma=0.3)
    stderr = 2 * a.abs() * 0.3 / 3000**0.5
    assert bool(((ours.attributions - theirs).abs() <= 6 * stderr).all())


def test_deterministic_and_chunked():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    r1 = gs.attribute(net, x, target=1, method="smoothgrad", n_samples=9, seed=3)
    r2 = gs.attribute(net, x, target=1, method="smoothgrad", n_samples=9, seed=3, chunk_size=4)
    r3 = gs.attribute(net, x, target=1, method="smoothgrad", n_samples=9, seed=4)
    torch.testing.assert_close(r1.attributions, r2.attributions, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(r1.attributions, r3.attributions)


@pytest.mark.parametrize("kind", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_batched_equals_a_per_example_loop_over_the_same_noise(kind):
    from gradsense.attribution.noise import noisy_rows

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    target = torch.tensor([0, 2, 1, 1, 0])
    n_samples = 7
    ours = gs.attribute(net, x, target=target, method=kind, n_samples=n_samples, seed=11, chunk_size=3)
    rows = noisy_rows(x, n_samples, seed=11).reshape(n_samples, *x.shape)  # the draws the method uses
    expected = torch.empty_like(x)
    for i in range(x.shape[0]):  # one example, one noisy copy at a time, plain autograd
        grads = []
        for s in range(n_samples):
            z = rows[s, i].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(net(z.unsqueeze(0))[0, target[i]], z)
            grads.append(g)
        g = torch.stack(grads)
        expected[i] = {"smoothgrad": g.mean(0), "smoothgrad_sq": (g**2).mean(0), "vargrad": g.var(0, unbiased=False)}[kind]
    torch.testing.assert_close(ours.attributions, expected, rtol=1e-10, atol=1e-12)


def test_bad_options():
    lin = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        SmoothGrad(lin, n_samples=0)
    with pytest.raises(ValueError, match="kind must be one of"):
        SmoothGrad(lin, kind="median")
    with pytest.raises(ValueError, match="unknown attribution method"):
        SmoothGrad(lin, base="nope")
    with pytest.raises(ValueError, match="noise_level"):
        SmoothGrad(lin, noise_level=-1)
