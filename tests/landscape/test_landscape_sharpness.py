"""landscape.sharpness against closed forms.

What is tested, precisely:

- Quadratic ``L(w) = mean (x.w - y)^2`` (Hessian ``H = 2 X^T X / n``) at its minimum, for rho in
  {1e-3, 0.05, 1}: SAM sharpness ``max_{||e||<=rho} L(w+e) - L(w) = rho^2 lambda_max / 2`` and first-order
  flatness ``rho * max ||grad L(w+e)|| = rho^2 lambda_max`` (both exact for a quadratic, any rho), and
  average-case sharpness within 4 standard errors of ``rho^2 tr(H) / (2 D)``.
- The same quadratic away from its minimum: SAM equals the trust-region maximum
  ``max_{||e||<=rho} g.e + e^T H e / 2`` (solved by bisection on the secular equation).
- A nonlinear tanh network at an exact minimum (targets = its own outputs, so L = 0 and grad = 0): as
  rho -> 0 (rho = 1e-3), SAM / (rho^2 / 2) and first-order / rho^2 approach lambda_max of the dense Hessian
  (torch.autograd.functional.hessian + eigvalsh) to 1%.
- SAM with one step is SAM's own estimate ``L(w + rho g/||g||) - L(w)``; evaluation counts; seeds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradsense.losses as losses
from gradsense.landscape import sharpness
from helpers import assert_model_unchanged
from oracles import dense_hessian


def quadratic(at_minimum: bool, n: int = 40, d: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double().eval()
    with torch.no_grad():
        w = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.T if at_minimum else torch.randn(1, d, generator=g,
                                                                                         dtype=torch.float64)
        model.weight.copy_(w)
    w = model.weight.detach().reshape(-1)
    return model, (x, y), 2 * x.T @ x / n, 2 * x.T @ (x @ w - y) / n


@pytest.mark.parametrize("rho", [1e-3, 0.05, 1.0])
def test_quadratic_at_its_minimum_sam_and_first_order_closed_forms(rho):
    model, data, hess, _ = quadratic(at_minimum=True)
    lam = torch.linalg.eigvalsh(hess)
    assert lam[-2] / lam[-1] < 0.85  # the ascent is a power iteration: error ~ (lambda_2 / lambda_1)^(2 t)
    with assert_model_unchanged(model):
        sam = sharpness(model, losses.mse, data, rho=rho, kind="sam", steps=60, seed=0)
        fo = sharpness(model, losses.mse, data, rho=rho, kind="first-order", steps=60, seed=0)
    assert sam.value == pytest.approx(0.5 * rho**2 * float(lam[-1]), rel=1e-6)
    assert fo.value == pytest.approx(rho**2 * float(lam[-1]), rel=1e-6)
    assert sam.converged and fo.converged


def test_quadratic_average_case_within_four_standard_errors():
    model, data, hess, _ = quadratic(at_minimum=True)
    rho = 0.3
    res = sharpness(model, losses.mse, data, rho=rho, kind="average", n_samples=400, seed=1, vectorize=True)
    truth = rho**2 * float(torch.trace(hess)) / (2 * hess.shape[0])
    assert res.stderr is not None and res.stderr > 0
    assert abs(res.value - truth) <= 4 * res.stderr
    assert res.n_loss == 401 and res.n_grad == 0 and res.n_hvp == 0
    # every sample lies on the sphere: 1/2 lambda_min rho^2 <= rise <= 1/2 lambda_max rho^2
    lam = torch.linalg.eigvalsh(hess)
    assert bool((res.trajectory >= 0.5 * rho**2 * lam[0] - 1e-12).all())
    assert bool((res.trajectory <= 0.5 * rho**2 * lam[-1] + 1e-12).all())


def _trust_region_max(g: torch.Tensor, hess: torch.Tensor, rho: float) -> float:
    """max_{||e|| <= rho} g.e + e^T H e / 2 (g != 0): e(mu) = (mu I - H)^{-1} g, ||e(mu)|| = rho, mu > lambda_max."""
    lam, vec = torch.linalg.eigh(hess)
    gc = vec.T @ g
    lo, hi = float(lam[-1]) + 1e-12, float(lam[-1]) + float(g.norm()) / rho + 1.0
    for _ in range(200):
        mu = 0.5 * (lo + hi)
        if float((gc / (mu - lam)).norm()) > rho:
            lo = mu
        else:
            hi = mu
    e = vec @ (gc / (0.5 * (lo + hi) - lam))
    return float(g @ e + 0.5 * e @ hess @ e)


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_quadratic_off_minimum_sam_is_the_trust_region_maximum(rho):
    model, data, hess, grad = quadratic(at_minimum=False)
    res = sharpness(model, losses.mse, data, rho=rho, kind="sam", steps=60, seed=0)
    assert res.value == pytest.approx(_trust_region_max(grad, hess, rho), rel=1e-6)
    # SAM's one-step estimate is a lower bound, equal to L(w + rho g/||g||) - L(w)
    one = sharpness(model, losses.mse, data, rho=rho, kind="sam", steps=1, seed=0)
    e = rho * grad / grad.norm()
    assert one.value == pytest.approx(float(grad @ e + 0.5 * e @ hess @ e), rel=1e-9)
    assert one.value <= res.value + 1e-12
    assert (one.n_grad, one.n_loss, one.n_hvp) == (1, 1, 0)
    assert (res.n_grad, res.n_loss) == (60, 1)


def _network_at_a_minimum():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double().eval()
    x = torch.randn(20, 3, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).reshape(-1)  # zero residual: L = 0 and grad L = 0 exactly at w
    return model, x, y


def test_nonlinear_network_as_rho_goes_to_zero_approaches_lambda_max():
    model, x, y = _network_at_a_minimum()
    lam_max = float(torch.linalg.eigvalsh(dense_hessian(model, losses.mse, x, y))[-1])
    rho = 1e-3
    sam = sharpness(model, losses.mse, (x, y), rho=rho, kind="sam", steps=40, seed=0)
    fo = sharpness(model, losses.mse, (x, y), rho=rho, kind="first-order", steps=40, seed=0)
    assert sam.value / (0.5 * rho**2) == pytest.approx(lam_max, rel=1e-2)
    assert fo.value / rho**2 == pytest.approx(lam_max, rel=1e-2)
    # grad L(w) is exactly zero here, so the first step starts from a random direction without an HVP
    assert (fo.n_grad, fo.n_hvp, fo.n_loss) == (41, 39, 0)


def test_worst_case_is_above_the_average_case_on_a_network(mlp_case):
    data = (mlp_case.x, mlp_case.y)
    sam = sharpness(mlp_case.model, losses.cross_entropy, data, rho=0.2, kind="sam", seed=0)
    avg = sharpness(mlp_case.model, losses.cross_entropy, data, rho=0.2, kind="average", n_samples=16, seed=0)
    assert sam.value >= float(avg.trajectory.max())
    assert (sam.n_grad, sam.n_loss, sam.n_hvp) == (5, 1, 0)  # default 5 ascent steps


def test_average_case_vmapped_equals_the_loop_and_is_deterministic(case):
    data = (case.x, case.y)
    kw = {"rho": 0.1, "kind": "average", "n_samples": 6, "seed": 3}
    a = sharpness(case.model, losses.cross_entropy, data, vectorize=True, chunk_size=4, **kw)
    b = sharpness(case.model, losses.cross_entropy, data, vectorize=False, **kw)
    torch.testing.assert_close(a.trajectory, b.trajectory, rtol=1e-10, atol=1e-12)
    c = sharpness(case.model, losses.cross_entropy, data, vectorize=True, chunk_size=6, **kw)
    torch.testing.assert_close(a.trajectory, c.trajectory, rtol=1e-10, atol=1e-12)  # chunking-independent samples
    d = sharpness(case.model, losses.cross_entropy, data, vectorize=True, chunk_size=4, **{**kw, "seed": 4})
    assert not torch.equal(a.trajectory, d.trajectory)


def test_model_unchanged_and_no_grad_left(case):
    with assert_model_unchanged(case.model):
        for kind in ("sam", "average", "first-order"):
            sharpness(case.model, losses.cross_entropy, (case.x, case.y), kind=kind, steps=2 if kind != "average"
                      else None, n_samples=3, seed=0)
    assert all(p.grad is None for p in case.model.parameters())


def test_result_roundtrip_and_summary(tmp_path, mlp_case):
    from gradsense.results import Result

    res = sharpness(mlp_case.model, losses.cross_entropy, (mlp_case.x, mlp_case.y), kind="first-order", seed=0)
    back = Result.load(res.save(tmp_path / "s"))
    assert type(back).__name__ == "SharpnessResult"
    assert back.value == res.value and float(back) == res.value
    rows = dict(back.summary())
    assert "GAM" in rows["definition"] and rows["evaluations"] == "0 loss, 4 gradient, 3 HVP"
    assert back.plot().axes[0].get_label() == "sharpness"
    assert math.isfinite(res.loss)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rho": 0.0}, ValueError, "rho must be a positive"),
        ({"rho": -1.0}, ValueError, "rho must be a positive"),
        ({"rho": "big"}, TypeError, "rho must be a positive"),
        ({"kind": "adaptive"}, ValueError, "kind must be one of"),
        ({"steps": 0}, ValueError, "steps must be an int >= 1"),
        ({"kind": "average", "n_samples": 1}, ValueError, "n_samples must be an int >= 2"),
    ],
)
def test_bad_input(mlp_case, kwargs, error, match):
    with pytest.raises(error, match=match):
        sharpness(mlp_case.model, losses.cross_entropy, (mlp_case.x, mlp_case.y), **kwargs)


def test_train_mode_batchnorm_is_refused(bn_cnn):
    bn_cnn.train()
    x, y = torch.randn(4, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match=r"model.eval\(\)"):
        sharpness(bn_cnn, losses.cross_entropy, (x, y))
