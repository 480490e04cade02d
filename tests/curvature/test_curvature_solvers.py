"""The solvers on explicit symmetric matrices with a known spectrum: thick-restart Lanczos, Lanczos
quadrature, adaptive Hutch++/Hutchinson (closed forms; the standard error checked over many seeds)."""

from __future__ import annotations

import math

import pytest
import torch

from gradsense.curvature import hutchpp, lanczos_eigs, lanczos_quadrature
from gradsense.curvature.lanczos import ThickRestartLanczos


def _matrix(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = eigenvalues.numel()
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = (q * eigenvalues) @ q.T
    return 0.5 * (a + a.T)


@pytest.fixture(scope="module")
def spectrum() -> torch.Tensor:
    # outliers (one negative, larger in magnitude than most) above a bulk in [-1, 1]
    return torch.cat([torch.tensor([50.0, 20.0, 10.0, -30.0, -7.0], dtype=torch.float64),
                      torch.linspace(-1.0, 1.0, 145, dtype=torch.float64)])


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_lanczos_extreme_eigenvalues_of_a_known_spectrum_with_restarts(spectrum, which):
    a = _matrix(spectrum)
    out = lanczos_eigs(lambda rows: rows @ a, a.shape[0], k=3, which=which, tol=1e-10, basis_size=12, seed=1)
    srt = torch.sort(spectrum, descending=True).values
    expected = {"largest": srt[:3], "smallest": srt.flip(0)[:3], "both": torch.cat([srt[:3], srt.flip(0)[:3]])}[which]
    torch.testing.assert_close(out.eigenvalues, expected, rtol=1e-9, atol=1e-9)
    assert bool(out.converged.all())
    assert out.restarts >= 1  # basis 12 < what convergence needs: the thick restart is exercised
    # the reported residual is the true one, and the vectors are orthonormal
    true_res = torch.linalg.vector_norm(out.eigenvectors @ a - out.eigenvalues[:, None] * out.eigenvectors, dim=1)
    torch.testing.assert_close(out.residuals, true_res, rtol=1e-3, atol=1e-11)
    gram = out.eigenvectors @ out.eigenvectors.T
    torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=torch.float64), rtol=0, atol=1e-10)


def test_largest_is_algebraic_not_largest_in_magnitude():
    # PyHessian's power iteration returns -30 here (largest magnitude); the largest eigenvalue is 5
    a = _matrix(torch.cat([torch.tensor([-30.0, 5.0]), torch.linspace(-1, 1, 38)]).double())
    out = lanczos_eigs(lambda rows: rows @ a, 40, k=1, tol=1e-8, seed=0)
    assert abs(float(out.eigenvalues[0]) - 5.0) < 1e-7


def test_lanczos_stops_on_the_residual_and_reports_non_convergence():
    a = _matrix(torch.linspace(0.0, 1.0, 300, dtype=torch.float64) ** 3)  # no gap at the top: slow
    loose = lanczos_eigs(lambda rows: rows @ a, 300, k=1, tol=1e-2, seed=0)
    tight = lanczos_eigs(lambda rows: rows @ a, 300, k=1, tol=1e-8, max_matvec=25, seed=0)
    assert loose.converged.all() and loose.residuals[0] <= 1e-2 * loose.eigenvalues[0]
    assert not tight.converged.any() and tight.n_matvec == 25
    assert loose.n_matvec < 100


def test_lanczos_on_a_low_rank_operator_and_the_full_space():
    # rank 2: the Krylov space is invariant after 2 steps; a fresh direction continues the search
    u = torch.randn(2, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a = u.T @ torch.diag(torch.tensor([4.0, 2.0], dtype=torch.float64)) @ u
    ref = torch.linalg.eigvalsh(a).flip(0)
    out = lanczos_eigs(lambda rows: rows @ a, 30, k=3, tol=1e-8, seed=0)
    torch.testing.assert_close(out.eigenvalues, ref[:3], rtol=1e-9, atol=1e-9)
    # k = n on a tiny matrix: every eigenvalue
    b = _matrix(torch.tensor([3.0, -1.0, 2.0, 0.5], dtype=torch.float64))
    out = lanczos_eigs(lambda rows: rows @ b, 4, k=4, tol=1e-12, seed=0)
    torch.testing.assert_close(out.eigenvalues, torch.tensor([3.0, 2.0, 0.5, -1.0], dtype=torch.float64))


def test_lanczos_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        ThickRestartLanczos(torch.ones(5), k=6)
    with pytest.raises(ValueError, match="which must be"):
        ThickRestartLanczos(torch.ones(5), which="top")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nonzero"):
        ThickRestartLanczos(torch.zeros(5))


def test_lanczos_quadrature_is_exact_for_low_degree_moments(spectrum):
    a = _matrix(spectrum, seed=2)
    starts = torch.randn(3, a.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    nodes, weights, n_matvec = lanczos_quadrature(lambda rows: rows @ a, starts, steps=10)
    assert n_matvec == 30
    torch.testing.assert_close(weights.sum(1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    v = starts / starts.norm(dim=1, keepdim=True)
    power = torch.eye(a.shape[0], dtype=torch.float64)
    for j in range(0, 20):  # Gauss quadrature with 10 nodes is exact up to degree 19
        exact = ((v @ power) * v).sum(1)
        approx = (weights * nodes**j).sum(1)
        torch.testing.assert_close(approx, exact, rtol=1e-7, atol=1e-9 * 50.0**j)
        power = power @ a


def test_lanczos_quadrature_with_as_many_steps_as_the_dimension_finds_the_spectrum():
    lam = torch.tensor([5.0, 3.0, 1.0, -2.0, 0.5, 4.0], dtype=torch.float64)
    a = _matrix(lam)
    nodes, _weights, _ = lanczos_quadrature(lambda rows: rows @ a, torch.ones(1, 6, dtype=torch.float64), steps=20)
    assert nodes.shape == (1, 6)  # stops at the dimension
    torch.testing.assert_close(nodes[0], torch.sort(lam).values, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------ trace
def _decaying(n: int = 300, seed: int = 0) -> torch.Tensor:
    return _matrix(1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.5 * 100.0, seed=seed)


def test_hutchpp_is_exact_when_the_sketch_spans_the_space():
    a = _matrix(torch.linspace(-2.0, 5.0, 12, dtype=torch.float64))
    est = hutchpp(lambda rows: rows @ a, 12, rtol=1e-6, seed=0, block=8)
    assert est.converged and est.stderr == 0.0 and est.rank == 12
    assert abs(est.value - float(a.trace())) < 1e-10


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    a = _decaying()
    truth = float(a.trace())
    pp = hutchpp(lambda rows: rows @ a, 300, rtol=0.01, seed=0)
    hutch = hutchpp(lambda rows: rows @ a, 300, rtol=0.01, seed=0, method="hutchinson", max_matvec=20000)
    for est in (pp, hutch):
        assert est.converged and est.stderr <= 0.01 * abs(est.value)
        assert abs(est.value - truth) <= 4 * est.stderr
    assert hutch.rank == 0 and pp.rank > 0
    assert pp.n_matvec * 3 < hutch.n_matvec


def test_hutchpp_group_traces_add_up_and_match_the_diagonal_blocks():
    a = _decaying(120, seed=4)
    groups = [torch.arange(0, 10), torch.arange(10, 70), torch.arange(70, 120)]
    est = hutchpp(lambda rows: rows @ a, 120, rtol=0.002, seed=1, groups=groups, max_matvec=3000)
    assert abs(float(est.group_values.sum()) - est.value) < 1e-9 * abs(est.value)
    for idx, val, se in zip(groups, est.group_values, est.group_stderr):
        block = float(a[idx][:, idx].trace())
        assert abs(float(val) - block) <= 4 * float(se) + 1e-9, (float(val), block, float(se))


def test_hutchpp_standard_error_is_honest_over_many_seeds():
    # the fraction of runs whose error is within 2 standard errors should be near 95%
    a = _decaying(200, seed=5) + 0.05 * _matrix(torch.randn(200, dtype=torch.float64).abs(), seed=6)
    truth = float(a.trace())
    within2 = within3 = 0
    runs = 200
    for seed in range(runs):
        est = hutchpp(lambda rows: rows @ a, 200, rtol=0.02, seed=seed)
        err = abs(est.value - truth)
        within2 += err <= 2 * est.stderr
        within3 += err <= 3 * est.stderr
    assert within2 / runs >= 0.85, within2
    assert within3 / runs >= 0.95, within3
    assert within2 / runs <= 0.995  # error bars that are not absurdly wide either


def test_hutchinson_standard_error_is_honest_over_many_seeds():
    a = _matrix(torch.rand(60, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5, seed=7)
    truth = float(a.trace())
    hits = sum(
        abs((e := hutchpp(lambda rows: rows @ a, 60, rtol=0.01, seed=s, method="hutchinson")).value - truth)
        <= 2 * e.stderr
        for s in range(200)
    )
    assert 0.85 <= hits / 200 <= 0.995, hits


def test_hutchpp_respects_the_budget_and_reports_it():
    a = _decaying()
    est = hutchpp(lambda rows: rows @ a, 300, rtol=1e-6, max_matvec=40, seed=0)
    assert not est.converged and est.n_matvec <= 40 and math.isfinite(est.stderr)
    with pytest.raises(ValueError, match="method"):
        hutchpp(lambda rows: rows @ a, 300, method="girard")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rtol"):
        hutchpp(lambda rows: rows @ a, 300, rtol=0.0)
