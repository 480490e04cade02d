"""Zeroth-order gradient estimates: exact directional derivatives on a quadratic (against autograd), unbiased
within standard errors, chunking and seeds."""

from __future__ import annotations

import pytest
import torch

from gradsense.core.zeroth import _directions, zeroth_order_grad

A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, -1.0], [0.0, -1.0, 4.0]], dtype=torch.float64)


def quad(p):
    t = torch.cat([p["x"], p["y"].reshape(-1)])
    return 0.5 * t[:3] @ A @ t[:3] + 2.0 * (t[3:] ** 2).sum() + t[3] * t[0]


def test_directional_derivatives_are_exact_on_a_quadratic():
    params = {"x": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), "y": torch.full((2, 2), 0.3, dtype=torch.float64)}
    est = zeroth_order_grad(quad, params, probes=6, mu=0.1, seed=3)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    g = torch.autograd.grad(quad(leaves), list(leaves.values()))
    u = _directions(params, 6, torch.Generator().manual_seed(3), "gaussian")
    truth = (u["x"] @ g[0]) + (u["y"].reshape(6, -1) @ g[1].reshape(-1))
    # a quadratic: central differences are exact whatever mu
    torch.testing.assert_close(est.directional, truth, rtol=1e-10, atol=1e-10)
    assert est.n_forward == 12


def test_the_estimate_is_unbiased_within_standard_errors():
    a = torch.linspace(-2, 2, 10, dtype=torch.float64)
    q = 400
    est = zeroth_order_grad(lambda p: (a * p["w"]).sum(), {"w": torch.zeros(10, dtype=torch.float64)}, probes=q,
                            seed=0, distribution="rademacher")
    # g_hat_k - a_k = (1/q) sum_j sum_{i != k} a_i u_ji u_jk: variance sum_{i != k} a_i^2 / q
    sd = torch.sqrt(((a**2).sum() - a**2) / q)
    z = (est.grad["w"] - a) / sd
    assert float(z.abs().max()) < 4.5, z


def test_chunks_and_the_vmap_fallback_give_the_same_numbers_and_seeds_repeat():
    params = {"x": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), "y": torch.ones(2, 2, dtype=torch.float64)}
    a = zeroth_order_grad(quad, params, probes=7, seed=1)
    b = zeroth_order_grad(quad, params, probes=7, seed=1, chunk_size=2)

    def no_vmap(p):
        if float(p["x"].sum()) > 1e9:  # .item() is refused under vmap: data-dependent control flow
            raise AssertionError
        return quad(p)

    with pytest.warns(RuntimeWarning, match="one probe at a time"):
        c = zeroth_order_grad(no_vmap, params, probes=7, seed=1)
    for other in (b, c):
        torch.testing.assert_close(other.grad["x"], a.grad["x"], rtol=1e-12, atol=1e-12)
    assert not torch.equal(zeroth_order_grad(quad, params, probes=7, seed=2).grad["x"], a.grad["x"])
    with pytest.raises(ValueError, match="probes"):
        zeroth_order_grad(quad, params, probes=0)
    with pytest.raises(ValueError, match="mu"):
        zeroth_order_grad(quad, params, mu=0.0)
