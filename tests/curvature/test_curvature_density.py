"""spectral_density (stochastic Lanczos quadrature): the spectrum of a quadratic with a known spectrum, the
moments of the density of a tiny float64 network against tr(H^j)/n of its dense Hessian (within their
sampling error), per-layer densities, the broadening, seeds and the caller's model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from curvature_cases import Quadratic, quadratic_loss, symmetric_with_spectrum

from gradsense.curvature import spectral_density
from helpers import assert_model_unchanged
from oracles import dense_hessian

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

CE = F.cross_entropy


def _moment_and_stderr(h: torch.Tensor, j: int, probes: int) -> tuple[float, float]:
    """``tr(H^j)/n`` and the standard error of its estimate from ``probes`` unit Rademacher probes:
    ``Var(v^T M v) = 2 (||M||_F^2 - sum_i M_ii^2) / n^2`` for ``v = g / sqrt(n)``."""
    n = h.shape[0]
    m = torch.linalg.matrix_power(h, j)
    var = 2 * (float((m**2).sum()) - float((m.diagonal() ** 2).sum())) / n**2
    return float(m.trace()) / n, math.sqrt(var / probes)


def test_quadratic_spectrum_is_recovered_exactly():
    spectrum = torch.tensor([4.0, 2.0, 1.0, 0.5, -1.0, -3.0] * 2, dtype=torch.float64)  # 6 distinct values
    a = symmetric_with_spectrum(spectrum, seed=2)
    res = spectral_density(Quadratic(5, 7), quadratic_loss(a), (torch.zeros(2, 1), torch.zeros(2)), steps=30,
                           probes=2, seed=0)
    # the Krylov space has dimension 6 (distinct eigenvalues): Lanczos stops there, nodes = the eigenvalues
    for nodes, weights in zip(res.ritz_values, res.weights):
        live = nodes[weights > 1e-12]
        torch.testing.assert_close(torch.sort(live).values, torch.sort(torch.unique(spectrum)).values,
                                   rtol=1e-9, atol=1e-9)
    assert res.n_hvp == 12  # 6 steps per probe
    # the broadened density peaks at the eigenvalues
    peaks = res.grid[1:-1][(res.density[1:-1] > res.density[:-2]) & (res.density[1:-1] > res.density[2:])]
    torch.testing.assert_close(peaks, torch.sort(torch.unique(spectrum)).values, rtol=0, atol=2e-2)


def test_moments_match_the_dense_hessian(mlp_case):
    h = dense_hessian(mlp_case.model, CE, mlp_case.x, mlp_case.y)
    probes = 48
    res = spectral_density(mlp_case.model, CE, (mlp_case.x, mlp_case.y), steps=12, probes=probes, seed=0)
    assert res.ritz_values.shape == (probes, 12) and res.n_hvp == probes * 12
    torch.testing.assert_close(res.weights.sum(1), torch.ones(probes, dtype=torch.float64), rtol=0, atol=1e-12)
    assert res.moment(0) == pytest.approx(1.0, abs=1e-12)
    for j in (1, 2, 3):
        exact, se = _moment_and_stderr(h, j, probes)
        assert abs(res.moment(j) - exact) <= 4 * se, (j, res.moment(j), exact, se)
    # the broadened density integrates like the quadrature: int rho = 1, int x rho = m1, int x^2 rho = m2 + sigma^2
    g, d, s = res.grid, res.density, res.sigma
    assert float(torch.trapezoid(d, g)) == pytest.approx(1.0, abs=1e-6)
    assert float(torch.trapezoid(g * d, g)) == pytest.approx(res.moment(1), abs=1e-6)
    assert float(torch.trapezoid(g**2 * d, g)) == pytest.approx(res.moment(2) + s**2, abs=1e-6)


def test_per_layer_densities_are_those_of_the_diagonal_blocks(cnn_case):
    h = dense_hessian(cnn_case.model, CE, cnn_case.x, cnn_case.y)
    res = spectral_density(cnn_case.model, CE, (cnn_case.x, cnn_case.y), steps=40, probes=2, per="layer", seed=1)
    assert res.groups == ["0", "1", "4"]
    sizes = [20, 4, 57]
    assert res.tensors["group_numel"].tolist() == sizes
    # each run stops at its Krylov dimension (the last layer's block has rank 20: 22 steps)
    assert 2 * 40 < res.n_hvp <= 2 * (40 + sum(min(40, s) for s in sizes))
    start = 0
    for gi, size in enumerate(sizes):
        block = h[start : start + size, start : start + size]
        start += size
        nodes = res.tensors["group_ritz_values"][gi]
        weights = res.tensors["group_weights"][gi]
        exact_eigs = torch.linalg.eigvalsh(block)
        # enough steps for the block: every node with weight is an eigenvalue of the block
        live = nodes[weights > 1e-10]
        dist = (live[:, None] - exact_eigs[None, :]).abs().min(1).values
        assert float(dist.max()) < 1e-6 * float(exact_eigs.abs().max()), (gi, dist.max())
        assert float(torch.trapezoid(res.tensors["group_density"][gi], res.grid)) == pytest.approx(1.0, abs=1e-6)


def test_without_reorthogonalisation_the_moments_still_hold(mlp_case):
    h = dense_hessian(mlp_case.model, CE, mlp_case.x, mlp_case.y)
    res = spectral_density(mlp_case.model, CE, (mlp_case.x, mlp_case.y), steps=12, probes=32, seed=0,
                           reorthogonalize=False)
    assert res.meta["reorthogonalized"] is False
    for j in (1, 2):
        exact, se = _moment_and_stderr(h, j, 32)
        assert abs(res.moment(j) - exact) <= 4 * se


def test_same_seed_same_numbers_and_the_model_is_unchanged(cnn_case):
    data = (cnn_case.x, cnn_case.y)
    with assert_model_unchanged(cnn_case.model):
        a = spectral_density(cnn_case.model, CE, data, steps=10, probes=3, seed=7)
        b = spectral_density(cnn_case.model, CE, data, steps=10, probes=3, seed=7)
    assert torch.equal(a.ritz_values, b.ritz_values) and torch.equal(a.density, b.density)
    c = spectral_density(cnn_case.model, CE, data, steps=10, probes=3, seed=7, sigma=0.05, grid_points=101)
    assert torch.equal(c.ritz_values, a.ritz_values) and c.sigma == 0.05 and c.grid.numel() == 101


def test_bad_input(mlp_case):
    data = (mlp_case.x, mlp_case.y)
    for kwargs, match in (({"steps": 0}, "steps"), ({"probes": 0}, "probes"), ({"sigma": -1.0}, "sigma"),
                          ({"grid_points": 2}, "grid_points")):
        with pytest.raises(ValueError, match=match):
            spectral_density(mlp_case.model, CE, data, **kwargs)
    with pytest.raises(ValueError, match="must return a scalar"):
        spectral_density(mlp_case.model, lambda o, y: o, data)
