"""Repeated eigenvalues, null spaces and what ``converged`` and ``tol`` mean, against exact spectra.

A single Krylov space sees one direction of each eigenspace; these tests pin down that ``hessian_eigs`` /
``lanczos_eigs`` still return every copy of a repeated eigenvalue (explicit matrices with chosen
multiplicities, ``x^T A x`` models, Kronecker-structured regression heads ``I (x) M`` incl. ``per="layer"``,
ReLU/MaxPool networks with null spaces), for ``which="largest"|"smallest"|"both"``; that ``converged`` is
never claimed without the confirmation; and that ``criterion="eigenvalue"`` delivers the eigenvalue accuracy
asked for, with an error estimate close to the true error. Oracles: ``eigvalsh`` of the matrix, of the dense
Hessian (``torch.autograd.functional.hessian``) or of the dense Gauss-Newton matrix, all float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from curvature_cases import (
    Quadratic,
    layer_slices,
    make_wide_mlp_case,
    quadratic_loss,
    symmetric_with_spectrum,
)
from torch import nn

import gradsense as gs
from gradsense.curvature import hessian_eigs, lanczos_eigs
from oracles import dense_ggn, dense_hessian

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

F64 = torch.float64


def _expected(spectrum: torch.Tensor, k: int, which: str) -> torch.Tensor:
    srt = torch.sort(spectrum, descending=True).values
    return {"largest": srt[:k], "smallest": srt.flip(0)[:k], "both": torch.cat([srt[:k], srt.flip(0)[:k]])}[which]


# ------------------------------------------------------------------------------------------ the issue's case
def _linear_head(out: int = 2, n: int = 4, d: int = 3) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    m = nn.Linear(d, out, bias=False).double()
    with torch.no_grad():
        m.weight.copy_(torch.randn(out, d, generator=g, dtype=F64))
    return m, torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, out, generator=g, dtype=F64)


@pytest.mark.parametrize("criterion", ["residual", "eigenvalue"])
@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_linear_regression_head_returns_both_copies(which, criterion):
    # the Hessian of mean((x W^T - y)^2) is I_2 (x) 2 X^T X / (N * 2): every eigenvalue twice
    m, x, y = _linear_head()
    h = dense_hessian(m, gs.losses.mse, x, y)
    torch.testing.assert_close(h, torch.kron(torch.eye(2, dtype=F64), 2 * x.T @ x / 8), rtol=1e-12, atol=1e-14)
    ref = torch.linalg.eigvalsh(h)
    res = hessian_eigs(m, gs.losses.mse, (x, y), k=2, which=which, tol=1e-8, criterion=criterion, seed=0)
    torch.testing.assert_close(res.eigenvalues, _expected(ref, 2, which), rtol=1e-7, atol=1e-12)
    assert res.converged
    v = res.flat_eigenvectors
    gram = v @ v.T
    torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=F64), rtol=0, atol=1e-8)  # distinct copies


def test_the_issue_reproduction_verbatim():
    torch.manual_seed(0)
    m = nn.Linear(3, 2, bias=False).double()
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    res = gs.hessian_eigs(m, gs.losses.mse, (x, y), k=2)
    top = torch.linalg.eigvalsh(dense_hessian(m, gs.losses.mse, x, y)).flip(0)[:2]
    assert float(top[0] - top[1]) < 1e-12  # truly repeated
    torch.testing.assert_close(res.eigenvalues, top, rtol=1e-6, atol=0)
    assert res.converged


# ------------------------------------------------------------------------------------------ chosen multiplicities
@pytest.mark.parametrize("criterion", ["residual", "eigenvalue"])
@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_explicit_matrix_with_chosen_multiplicities(which, criterion):
    # a triple top, a double second, a double bottom, over a bulk; basis 12 forces thick restarts
    spectrum = torch.cat([torch.tensor([6.0, 6.0, 6.0, 4.0, 4.0, -5.0, -5.0, -3.0], dtype=F64),
                          torch.linspace(-1.0, 1.0, 72, dtype=F64)])
    a = symmetric_with_spectrum(spectrum, seed=4)
    k = 4
    out = lanczos_eigs(lambda rows: rows @ a, 80, k=k, which=which, tol=1e-9, criterion=criterion,
                       basis_size=12, seed=2)
    torch.testing.assert_close(out.eigenvalues, _expected(spectrum, k, which), rtol=1e-7, atol=1e-8)
    assert bool(out.converged.all()) and out.runs >= 2
    gram = out.eigenvectors @ out.eigenvectors.T
    torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=F64), rtol=0, atol=1e-7)
    # the reported residuals are the true ones (the coupling to the locked vectors included)
    true_res = torch.linalg.vector_norm(out.eigenvectors @ a - out.eigenvalues[:, None] * out.eigenvectors, dim=1)
    assert bool((true_res <= 1.01 * out.residuals + 1e-12).all()), (true_res, out.residuals)


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_quadratic_model_with_repeated_eigenvalues_and_per_layer(which):
    # theta^T A theta / 2 over two layers; A block-diagonal with repeated values inside each block
    sa = torch.tensor([3.0, 3.0, 1.0, -2.0, -2.0, 0.5, 0.2, -0.1], dtype=F64)
    sb = torch.tensor([5.0, 5.0, 5.0, -4.0, 0.3, 0.1, -0.3, 0.0, 0.0, 0.2], dtype=F64)
    a = torch.block_diag(symmetric_with_spectrum(sa, seed=1), symmetric_with_spectrum(sb, seed=2))
    model = Quadratic(8, 10)
    data = (torch.zeros(2, 1, dtype=F64), torch.zeros(2, dtype=torch.long))
    res = hessian_eigs(model, quadratic_loss(a), data, k=3, which=which, tol=1e-10, per="layer", seed=0)
    torch.testing.assert_close(res.eigenvalues, _expected(torch.cat([sa, sb]), 3, which), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(res.group_eigenvalues["a"], _expected(sa, 3, which), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(res.group_eigenvalues["b"], _expected(sb, 3, which), rtol=1e-8, atol=1e-9)
    assert res.converged


def test_kronecker_multi_output_head_per_layer():
    # an MLP regression head with 3 outputs: the head's block is I_3 (x) (2/(3N)) Phi^T Phi, every value 3 times
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False)).double().eval()
    x, y = torch.randn(10, 4, generator=g, dtype=F64), torch.randn(10, 3, generator=g, dtype=F64)
    h = dense_hessian(model, gs.losses.mse, x, y)
    blocks = layer_slices(model)
    head = torch.linalg.eigvalsh(h[blocks["2"], blocks["2"]]).flip(0)
    assert float(head[0] - head[2]) < 1e-12 * float(head[0])  # a triple top eigenvalue
    res = hessian_eigs(model, gs.losses.mse, (x, y), k=3, tol=1e-9, per="layer", seed=0)
    torch.testing.assert_close(res.group_eigenvalues["2"], head[:3], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(res.group_eigenvalues["0"], torch.linalg.eigvalsh(h[blocks["0"], blocks["0"]]).flip(0)[:3],
                               rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(h).flip(0)[:3], rtol=1e-7, atol=1e-12)
    assert res.converged


# ------------------------------------------------------------------------------------------ null spaces
def _relu_maxpool_net() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(12, 2)).double().eval()
    with torch.no_grad():
        model[0].bias[0] = -100.0  # a dead channel: its weights have no curvature at all
    x = torch.randn(3, 1, 4, 4, generator=g, dtype=F64)
    return model, x, torch.randn(3, 2, generator=g, dtype=F64)


@pytest.mark.parametrize("which", ["smallest", "both"])
def test_gauss_newton_null_space_of_a_relu_maxpool_net(which):
    model, x, y = _relu_maxpool_net()
    ggn = dense_ggn(model, gs.losses.mse, x, y)
    ref = torch.linalg.eigvalsh(ggn)
    scale = float(ref.abs().max())
    assert int((ref.abs() <= 1e-12 * scale).sum()) >= 20  # a large null space (rank <= N * C = 6)
    res = hessian_eigs(model, gs.losses.mse, (x, y), k=2, which=which, tol=1e-6, kind="ggn", seed=0)
    small = res.eigenvalues[-2:]
    assert bool((small.abs() <= 1e-9 * scale).all()), small  # [0, 0], not [0, the next distinct value]
    if which == "both":
        torch.testing.assert_close(res.eigenvalues[:2], ref.flip(0)[:2], rtol=1e-7, atol=0)
    assert res.converged


def test_hessian_null_space_of_the_last_layer_of_a_relu_maxpool_net():
    # last layer only: H = I_2 (x) (1/N) Phi^T Phi with dead features -> eigenvalue 0 many times
    model, x, y = _relu_maxpool_net()
    ref = torch.linalg.eigvalsh(dense_hessian(model, gs.losses.mse, x, y, params=["4.weight"]))
    scale = float(ref.abs().max())
    res = hessian_eigs(model, gs.losses.mse, (x, y), k=3, which="smallest", tol=1e-6, params=["4.weight"], seed=0)
    assert bool((res.eigenvalues.abs() <= 1e-9 * scale).all()), res.eigenvalues
    assert bool((ref[:3].abs() <= 1e-12 * scale).all())
    assert res.converged


# ------------------------------------------------------------------------------------------ never a false claim
def test_a_budget_too_small_to_confirm_is_not_converged():
    m, x, y = _linear_head()
    with pytest.warns(RuntimeWarning, match="did not reach"):
        res = hessian_eigs(m, gs.losses.mse, (x, y), k=2, tol=1e-8, max_hvp=3, seed=0)
    assert not res.converged
    assert bool(res.tensors["pair_converged"][0])  # the extreme value itself is right (a copy has the same value)
    spectrum = torch.cat([torch.tensor([6.0, 6.0, 4.0], dtype=F64), torch.linspace(-1.0, 1.0, 40, dtype=F64)])
    a = symmetric_with_spectrum(spectrum, seed=4)
    for budget in (3, 10, 20):
        out = lanczos_eigs(lambda rows: rows @ a, 43, k=2, tol=1e-9, max_matvec=budget, seed=0)
        assert out.n_matvec <= budget and not bool(out.converged.all()), budget


# ------------------------------------------------------------------------------------------ eigenvalue accuracy
def test_eigenvalue_criterion_meets_the_accuracy_asked_for_with_an_honest_estimate():
    case = make_wide_mlp_case()
    ref = torch.linalg.eigvalsh(dense_hessian(case.model, F.cross_entropy, case.x, case.y)).flip(0)
    for tol in (1e-3, 1e-5):
        by_value = hessian_eigs(case.model, F.cross_entropy, (case.x, case.y), k=1, tol=tol, criterion="eigenvalue",
                                seed=0, overlap=False)
        by_residual = hessian_eigs(case.model, F.cross_entropy, (case.x, case.y), k=1, tol=tol, seed=0, overlap=False)
        true = abs(float(by_value.eigenvalues[0] - ref[0]))
        est = float(by_value.errors[0])
        assert by_value.converged and true <= tol * float(ref[0]), (tol, true)
        assert true / 3 <= est <= 3 * true, (tol, est, true)
        assert by_value.n_hvp <= by_residual.n_hvp
        # the residual criterion reports its (much smaller) error estimate too, and it bounds the truth
        true_r = abs(float(by_residual.eigenvalues[0] - ref[0]))
        assert true_r <= 3 * float(by_residual.errors[0]) + 1e-13


def test_bad_criterion_is_one_clear_error(mlp_case):
    with pytest.raises(ValueError, match="criterion must be"):
        hessian_eigs(mlp_case.model, F.cross_entropy, (mlp_case.x, mlp_case.y), criterion="exact")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eigenvalue_criterion_on_a_crowded_top_of_the_spectrum(seed):
    # four close outliers over a bulk: the Ritz gap is a poor guide here, the estimate must still be honest
    spectrum = torch.cat([torch.tensor([1.0, 0.97, 0.95, 0.9], dtype=F64),
                          torch.rand(296, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.8])
    a = symmetric_with_spectrum(spectrum, seed=2)
    for tol in (1e-3, 1e-6):
        by_value = lanczos_eigs(lambda rows: rows @ a, 300, k=1, tol=tol, criterion="eigenvalue", seed=seed)
        by_residual = lanczos_eigs(lambda rows: rows @ a, 300, k=1, tol=tol, seed=seed)
        true = abs(float(by_value.eigenvalues[0]) - 1.0)
        est = float(by_value.errors[0])
        assert bool(by_value.converged.all()) and true <= tol, (tol, true)
        assert true / 3 <= est <= 3 * true, (tol, est, true)
        assert by_value.n_matvec < by_residual.n_matvec
