"""Predicted vs actual change: exact on quadratics, the closed-form passing radius of a cubic, a wrong
gradient estimate fails at once, and the curvature term against dense per-example Hessians."""

from __future__ import annotations

import math

import pytest
import torch
from eval_models import Cubic, Quadratic

import gradsense.evaluation as ev
from gradsense.targets import RegressionOutput
from helpers import CountingModule, assert_model_unchanged

RADII = torch.logspace(-3, 0, 13, dtype=torch.float64)


def _x(n=3, d=4, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_second_order_is_exact_on_a_quadratic_and_first_order_error_is_the_closed_form():
    model, x = Quadratic(4), _x()
    u = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with assert_model_unchanged(model):
        r = ev.taylor(model, x, None, target=RegressionOutput(0), directions=u, relative=False)
    assert torch.isinf(r.tensors["radius_order2"]).all()
    assert float(r.errors(2).max()) < 1e-9
    A, c = model.A.detach(), model.c.detach()
    u = u / u.norm(dim=-1, keepdim=True)
    slope = ((x @ A + c)[None] * u).sum(-1)  # (D, N): g . u
    quad = 0.5 * ((u @ A) * u).sum(-1)  # u^T A u / 2
    for ri, rad in enumerate(RADII.tolist()):
        err = (rad**2 * quad).abs().sum(0) / (rad * slope + rad**2 * quad).abs().sum(0)
        torch.testing.assert_close(r.errors(1)[:, ri], err, rtol=1e-8, atol=1e-12)


def test_the_first_passing_radius_of_a_cubic_is_the_closed_form():
    # f = k x^3 in 1-D, x0 = 1, u = +1: actual = k(3r + 3r^2 + r^3), first order 3kr -> error (3r + r^2)/(3 + 3r + r^2)
    model = Cubic()
    x = torch.ones(1, 1, dtype=torch.float64)
    radii = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)
    r = ev.taylor(model, x, None, target=RegressionOutput(0), directions=torch.ones(1, 1, 1, dtype=torch.float64),
                  radii=radii, relative=False, tol=0.1)
    e1 = (radii + radii**2 / 3) / (1 + radii + radii**2 / 3)
    e2 = (radii**2 / 3) / (1 + radii + radii**2 / 3)  # second order adds 3k r^2 exactly
    torch.testing.assert_close(r.errors(1)[0], e1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r.errors(2)[0], e2, rtol=1e-9, atol=1e-12)
    # (r + r^2/3) = 0.1 (1 + r + r^2/3)  <=>  0.3 r^2 + 0.9 r - 0.1 = 0: the passing radius is its positive root
    root = (-0.9 + math.sqrt(0.81 + 0.12)) / 0.6
    crossing = radii[radii > root][0]
    assert float(r.values[0]) == float(crossing)
    # second order: (r^2/3) = 0.1 (1 + r + r^2/3)  <=>  0.3 r^2 - 0.1 r - 0.1 = 0
    root2 = (0.1 + math.sqrt(0.01 + 0.12)) / 0.6
    assert float(r.tensors["radius_order2"][0]) == float(radii[radii > root2][0])
    assert float(r.tensors["radius_order2"][0]) > float(r.values[0])


def test_a_wrong_gradient_estimate_fails_at_the_smallest_radius(mlp_case):
    c = mlp_case
    exact = ev.taylor(c.model, c.x, None, target=c.y, order=1)
    from gradsense.core.grad import input_gradients
    from gradsense.core.targets import as_target

    g, _ = input_gradients(c.model, c.x, as_target(c.y, 10))
    doubled = ev.taylor(c.model, c.x, 2 * g, target=c.y, order=1)
    given = ev.taylor(c.model, c.x, g, target=c.y, order=1)
    torch.testing.assert_close(given.errors(1), exact.errors(1), rtol=1e-10, atol=1e-12)
    assert bool((doubled.values == RADII[0]).all())  # 100% off from the start
    assert bool((exact.values > RADII[0]).all())


def test_curvature_term_matches_dense_per_example_hessians(mlp_case):
    c = mlp_case
    u = torch.randn(3, 10, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r = ev.taylor(c.model, c.x, None, target=c.y, directions=u, relative=False, radii=[0.05, 0.2])
    un = u / u.norm(dim=-1, keepdim=True)
    for i in range(10):
        def f(z, i=i):
            return c.model(z[None])[0, c.y[i]]

        g = torch.autograd.functional.jacobian(f, c.x[i])
        h = torch.autograd.functional.hessian(f, c.x[i])
        with torch.no_grad():
            for ri, rad in enumerate((0.05, 0.2)):
                act = torch.stack([f(c.x[i] + rad * un[d, i]) - f(c.x[i]) for d in range(3)])
                pred = torch.stack([rad * g @ un[d, i] + 0.5 * rad**2 * un[d, i] @ h @ un[d, i] for d in range(3)])
                want = (pred - act).abs().sum() / act.abs().sum()
                assert abs(float(r.errors(2)[i, ri]) - float(want)) < 1e-9 * max(1.0, float(want))


def test_chunking_does_not_change_the_result_and_bad_input(mlp_case):
    c = mlp_case
    a = ev.taylor(c.model, c.x, None, target=c.y, n_directions=3)
    b = ev.taylor(c.model, c.x, None, target=c.y, n_directions=3, chunk_size=7)
    torch.testing.assert_close(a.errors(2), b.errors(2), rtol=1e-10, atol=1e-12)
    counting = CountingModule(c.model)
    with pytest.raises(ValueError, match="radii must be"):
        ev.taylor(counting, c.x, None, target=c.y, radii=[0.1, 0.05])
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        ev.taylor(counting, c.x, None, target=c.y, order=3)
    with pytest.raises(ValueError, match="n_directions must be >= 1"):
        ev.taylor(counting, c.x, None, target=c.y, n_directions=0)
    with pytest.raises(ValueError, match="directions must have shape"):
        ev.taylor(counting, c.x, None, target=c.y, directions=torch.ones(2, 10, 3, dtype=torch.float64))
    assert counting.sizes == []
