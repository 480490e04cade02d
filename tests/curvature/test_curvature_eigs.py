"""hessian_eigs and the curvature operator against closed forms (a quadratic with a known spectrum) and
the exact dense Hessian of tiny float64 networks (torch.autograd.functional.hessian + eigvalsh); per-layer
eigenvalues against the diagonal blocks; the gradient overlap; seeds; the caller's model; bad input;
agreement with PyHessian where PyHessian is right."""

from __future__ import annotations

import warnings

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
from torch.utils.data import DataLoader, TensorDataset

import gradsense as gs
from gradsense.curvature import hessian_eigs, operator
from helpers import assert_model_unchanged
from oracles import dense_ggn, dense_hessian, full_batch_grad

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

CE = F.cross_entropy


@pytest.fixture(scope="module")
def quadratic():
    spectrum = torch.cat([torch.tensor([9.0, 4.0, 2.5, -6.0, -3.0, -0.5], dtype=torch.float64),
                          torch.linspace(-0.2, 0.3, 34, dtype=torch.float64)])
    a = symmetric_with_spectrum(spectrum, seed=3)
    model = Quadratic(15, 25)
    data = (torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
    return model, quadratic_loss(a), data, a, spectrum


# ------------------------------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_quadratic_with_a_known_spectrum(quadratic, which):
    model, loss, data, a, spectrum = quadratic
    res = hessian_eigs(model, loss, data, k=3, which=which, tol=1e-10, seed=0)
    srt = torch.sort(spectrum, descending=True).values
    expected = {"largest": srt[:3], "smallest": srt.flip(0)[:3], "both": torch.cat([srt[:3], srt.flip(0)[:3]])}[which]
    torch.testing.assert_close(res.eigenvalues, expected, rtol=1e-9, atol=1e-10)
    assert res.converged
    # eigenvectors come as parameter dicts with the model's names and shapes, and satisfy A v = lambda v
    vecs = res.eigenvectors
    assert vecs is not None and len(vecs) == expected.numel()
    for lam, v in zip(res.eigenvalues, vecs):
        assert list(v) == ["a.w", "b.w"] and v["a.w"].shape == (15,) and v["b.w"].shape == (25,)
        flat = torch.cat([v["a.w"], v["b.w"]])
        torch.testing.assert_close(a @ flat, lam * flat, rtol=0, atol=1e-8)


def test_quadratic_per_layer_eigenvalues_are_those_of_the_diagonallayer_slices(quadratic):
    model, loss, data, a, _ = quadratic
    res = hessian_eigs(model, loss, data, k=2, tol=1e-10, per="layer", seed=1)
    assert res.groups == ["a", "b"]
    for name, sl in (("a", slice(0, 15)), ("b", slice(15, 40))):
        ref = torch.linalg.eigvalsh(a[sl, sl]).flip(0)[:2]
        torch.testing.assert_close(res.group_eigenvalues[name], ref, rtol=1e-9, atol=1e-10)
    assert res.tensors["group_numel"].tolist() == [15, 25]


# ------------------------------------------------------------------------------------------ dense Hessians
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_eigenvalues_match_the_dense_hessian(case, which):
    h = dense_hessian(case.model, CE, case.x, case.y)
    ref = torch.linalg.eigvalsh(h)
    ref = ref.flip(0)[:3] if which == "largest" else ref[:3]
    res = hessian_eigs(case.model, CE, (case.x, case.y), k=3, which=which, tol=1e-9, seed=0)
    scale = float(torch.linalg.eigvalsh(h).abs().max())
    err = (res.eigenvalues - ref).abs()
    assert bool((err <= 1e-6 * ref.abs() + 1e-10 * scale).all()), (res.eigenvalues, ref)
    assert res.converged and res.n_hvp > 0
    # the reported residual is ||H v - lambda v|| (up to rounding)
    v = res.flat_eigenvectors
    true_res = torch.linalg.vector_norm(v @ h - res.eigenvalues[:, None] * v, dim=1)
    assert bool((true_res <= res.residuals * 1.01 + 1e-10 * scale).all()), (true_res, res.residuals)


def test_top_eigenvalues_of_a_wider_network_and_its_gradient_overlap():
    case = make_wide_mlp_case()
    h = dense_hessian(case.model, CE, case.x, case.y)
    evals, evecs = torch.linalg.eigh(h)
    res = hessian_eigs(case.model, CE, (case.x, case.y), k=3, tol=1e-8, seed=0)
    torch.testing.assert_close(res.eigenvalues, evals.flip(0)[:3], rtol=1e-6, atol=0)
    g = torch.cat([t.reshape(-1) for t in full_batch_grad(case.model, CE, case.x, case.y).values()])
    top = evecs[:, -3:].flip(1)  # columns, largest first
    expected = torch.cumsum((top.T @ g) ** 2, 0) / (g @ g)
    torch.testing.assert_close(res.tensors["gradient_overlap"], expected, rtol=1e-6, atol=1e-9)
    assert res.gradient_overlap == pytest.approx(float(expected[-1]), rel=1e-6)


def test_per_layer_top_eigenvalues_equal_the_block_eigenvalues(case):
    h = dense_hessian(case.model, CE, case.x, case.y)
    res = hessian_eigs(case.model, CE, (case.x, case.y), k=1, tol=1e-9, per="layer", seed=0)
    blocks = layer_slices(case.model)
    assert res.groups == list(blocks)
    for name, sl in blocks.items():
        ref = torch.linalg.eigvalsh(h[sl, sl]).max()
        got = res.group_eigenvalues[name][0]
        assert abs(float(got - ref)) <= 1e-7 * abs(float(ref)) + 1e-10, (name, got, ref)


def test_params_restricts_the_space(mlp_case):
    names = ["2.weight", "2.bias"]
    h = dense_hessian(mlp_case.model, CE, mlp_case.x, mlp_case.y, params=names)
    res = hessian_eigs(mlp_case.model, CE, (mlp_case.x, mlp_case.y), k=2, tol=1e-9, params=names, seed=0)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(h).flip(0)[:2], rtol=1e-7, atol=1e-12)
    assert res.meta["param_names"] == names and res.meta["numel"] == h.shape[0]


# ------------------------------------------------------------------------------------------ the operator
def test_operator_is_the_hessian_and_works_with_scipy(cnn_case):
    from scipy.sparse.linalg import eigsh

    h = dense_hessian(cnn_case.model, CE, cnn_case.x, cnn_case.y)
    op = operator(cnn_case.model, CE, (cnn_case.x, cnn_case.y))
    v = torch.randn(op.numel, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), h @ v, rtol=1e-9, atol=1e-11)
    top = eigsh(op.to_scipy(), k=1, which="LA", tol=1e-10)[0]
    assert abs(float(top[0]) - float(torch.linalg.eigvalsh(h)[-1])) < 1e-8


def test_gauss_newton_eigenvalues(mlp_case):
    ggn = dense_ggn(mlp_case.model, CE, mlp_case.x, mlp_case.y)
    res = hessian_eigs(mlp_case.model, CE, (mlp_case.x, mlp_case.y), k=2, tol=1e-9, kind="ggn", seed=0)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(ggn).flip(0)[:2], rtol=1e-7, atol=1e-12)


# ------------------------------------------------------------------------------------------ hygiene
def test_same_seed_same_numbers_and_batching_does_not_matter(cnn_case):
    data = (cnn_case.x, cnn_case.y)
    with assert_model_unchanged(cnn_case.model):
        r1 = hessian_eigs(cnn_case.model, CE, data, k=2, seed=5, per="layer")
        r2 = hessian_eigs(cnn_case.model, CE, data, k=2, seed=5, per="layer")
    assert torch.equal(r1.eigenvalues, r2.eigenvalues) and torch.equal(r1.residuals, r2.residuals)
    assert torch.equal(r1.flat_eigenvectors, r2.flat_eigenvectors) and r1.n_hvp == r2.n_hvp
    assert r1.meta["seed"] == 5
    loader = DataLoader(TensorDataset(*data), batch_size=3)
    r3 = hessian_eigs(cnn_case.model, CE, loader, k=2, seed=5)
    torch.testing.assert_close(r3.eigenvalues, r1.eigenvalues, rtol=1e-8, atol=1e-12)


def test_unseeded_runs_record_their_seed(mlp_case):
    r = hessian_eigs(mlp_case.model, CE, (mlp_case.x, mlp_case.y), k=1, overlap=False, return_vectors=False)
    assert isinstance(r.meta["seed"], int) and r.eigenvectors is None and r.gradient_overlap is None
    again = hessian_eigs(mlp_case.model, CE, (mlp_case.x, mlp_case.y), k=1, seed=r.meta["seed"], overlap=False)
    assert torch.equal(again.eigenvalues, r.eigenvalues)


@pytest.mark.filterwarnings("ignore:forward-over-reverse HVP failed:RuntimeWarning")
def test_model_unchanged_when_the_run_fails(bn_cnn):
    x = torch.randn(4, 1, 5, 5, dtype=torch.float64)

    def exploding(out, y):
        if out.requires_grad or torch._C._functorch.is_functorch_wrapped_tensor(out):
            raise RuntimeError("boom")
        return CE(out, y)

    with assert_model_unchanged(bn_cnn), pytest.raises(RuntimeError, match="boom"):
        hessian_eigs(bn_cnn, exploding, (x, torch.zeros(4, dtype=torch.long)), k=1, seed=0)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_gives_one_clear_error_before_any_work(mlp_case, bn_cnn):
    data = (mlp_case.x, mlp_case.y)
    model = mlp_case.model
    with pytest.raises(ValueError, match="must return a scalar"):
        hessian_eigs(model, lambda o, y: F.cross_entropy(o, y, reduction="none"), data)
    with pytest.raises(ValueError, match="selects no parameter"):
        hessian_eigs(model, CE, data, params="no_such_layer")
    with pytest.raises(ValueError, match="only 64 parameters"):
        hessian_eigs(model, CE, data, k=65)
    with pytest.raises(ValueError, match="only 64 parameters"):
        hessian_eigs(model, CE, data, k=33, which="both")
    with pytest.raises(ValueError, match="no batches"):
        loader = DataLoader(TensorDataset(*data), batch_size=100, drop_last=True)
        hessian_eigs(model, CE, loader)
    with pytest.raises(ValueError, match="empty"):
        hessian_eigs(model, CE, (mlp_case.x[:0], mlp_case.y[:0]))
    with pytest.raises(ValueError, match="which must be"):
        hessian_eigs(model, CE, data, which="top")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        hessian_eigs(lambda x: x, CE, data)
    bn_cnn.train()
    with pytest.raises(ValueError, match="train mode"):
        hessian_eigs(bn_cnn, CE, (torch.randn(4, 1, 5, 5, dtype=torch.float64), torch.zeros(4, dtype=torch.long)))


def test_non_convergence_warns_and_says_so(mlp_case):
    with pytest.warns(RuntimeWarning, match="did not reach"):
        r = hessian_eigs(mlp_case.model, CE, (mlp_case.x, mlp_case.y), k=3, which="smallest", tol=1e-12,
                         max_hvp=5, basis_size=4, seed=0)
    assert not r.converged and r.n_hvp == 5


# ------------------------------------------------------------------------------------------ peer
@pytest.mark.peer
def test_top_eigenvalue_agrees_with_pyhessian_on_the_bundled_cnn():
    pyhessian = pytest.importorskip("pyhessian")
    model = gs.zoo.load("digits-cnn")
    x, y = gs.zoo.dataset("digits", split="test")[:64]
    ours = hessian_eigs(model, CE, (x, y), k=1, tol=1e-4, seed=0)
    peer_model = gs.zoo.load("digits-cnn")  # PyHessian calls model.eval() and backward() on its model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        theirs = pyhessian.hessian(peer_model, CE, data=(x, y), cuda=False).eigenvalues(maxIter=300, tol=1e-6)[0][0]
    assert ours.converged and ours.n_hvp < 40
    # PyHessian at tol=1e-6 is within ~2e-6 of the eigenvalue here (at its default tol=1e-3, ~2e-3 off)
    assert abs(float(ours.eigenvalues[0]) - theirs) <= 2e-5 * abs(theirs), (float(ours.eigenvalues[0]), theirs)
