"""core.hvp: Hessian-vector products and the Hessian/GGN/Fisher operator against closed forms and the
dense matrices of tiny float64 networks (torch.autograd.functional + eigvalsh)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import gradsense
from gradsense.core.hvp import CurvatureOperator, hvp
from helpers import assert_model_unchanged
from oracles import dense_empirical_fisher, dense_ggn, dense_hessian

# torch's first forward-mode call loads its jvp decompositions through torch.jit.script (torch-internal)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

EXACT = {"rtol": 1e-9, "atol": 1e-11}  # two exact routes to the same matrix, float64


def _flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


# ------------------------------------------------------------------------------ hvp closed forms
@pytest.mark.parametrize("method", ["auto", "forward-over-reverse", "double-backward"])
def test_hvp_of_quadratic_form_is_a_plus_a_transpose_times_v(method):
    a = torch.randn(5, 5, dtype=torch.float64)  # not symmetric
    x0 = torch.randn(5, dtype=torch.float64)
    v = torch.randn(5, dtype=torch.float64)
    hv = hvp(lambda p: p["x"] @ a @ p["x"], {"x": x0}, {"x": v}, method=method)
    torch.testing.assert_close(hv["x"], (a + a.T) @ v, **EXACT)


@pytest.mark.parametrize("method", ["forward-over-reverse", "double-backward"])
def test_hvp_block_structure_over_a_parameter_dict(method):
    # f(a, b) = a^T A a + a^T B b  =>  H = [[A + A^T, B], [B^T, 0]]
    A = torch.randn(3, 3, dtype=torch.float64)
    B = torch.randn(3, 2, dtype=torch.float64)
    params = {"a": torch.randn(3, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    v = {"a": torch.randn(3, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    hv = hvp(lambda p: p["a"] @ A @ p["a"] + p["a"] @ B @ p["b"], params, v, method=method)
    torch.testing.assert_close(hv["a"], (A + A.T) @ v["a"] + B @ v["b"], **EXACT)
    torch.testing.assert_close(hv["b"], B.T @ v["a"], **EXACT)


def test_hvp_of_a_linear_function_is_zero():
    w = torch.randn(4, dtype=torch.float64)
    for method in ("forward-over-reverse", "double-backward"):
        hv = hvp(
            lambda p: p["x"] @ w,
            {"x": torch.randn(4, dtype=torch.float64)},
            {"x": torch.ones(4, dtype=torch.float64)},
            method=method,
        )
        torch.testing.assert_close(hv["x"], torch.zeros(4, dtype=torch.float64), rtol=0, atol=0)


class _CubeNoForwardAD(torch.autograd.Function):
    """x ** 3 with a hand-written (differentiable) backward but no forward-mode/functorch support."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


def test_hvp_auto_falls_back_to_double_backward_with_a_warning():
    x0 = torch.randn(4, dtype=torch.float64)
    v = torch.randn(4, dtype=torch.float64)

    def f(p):
        return _CubeNoForwardAD.apply(p["x"]).sum()

    with pytest.raises(RuntimeError):
        hvp(f, {"x": x0}, {"x": v}, method="forward-over-reverse")
    with pytest.warns(RuntimeWarning, match="falling back to double backward"):
        hv = hvp(f, {"x": x0}, {"x": v})
    torch.testing.assert_close(hv["x"], 6 * x0 * v, **EXACT)  # d2/dx2 sum x^3 = diag(6x)


def test_hvp_argument_errors():
    p = {"x": torch.zeros(3)}
    with pytest.raises(ValueError, match="same keys and shapes"):
        hvp(lambda q: q["x"].sum(), p, {"y": torch.zeros(3)})
    with pytest.raises(ValueError, match="same keys and shapes"):
        hvp(lambda q: q["x"].sum(), p, {"x": torch.zeros(4)})
    with pytest.raises(ValueError, match="hvp method must be"):
        hvp(lambda q: q["x"].sum(), p, p, method="finite-difference")


# ------------------------------------------------------------------------------ hvp on networks
def test_hvp_methods_agree_with_the_dense_hessian(case):
    model, x, y = case.model, case.x, case.y
    params = {n: p.detach() for n, p in model.named_parameters()}
    v = {n: torch.randn_like(p) for n, p in params.items()}

    def f(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    dense = dense_hessian(model, F.cross_entropy, x, y)
    expected = dense @ _flat(v)
    with assert_model_unchanged(model):
        fwd = hvp(f, params, v, method="forward-over-reverse")
        dbl = hvp(f, params, v, method="double-backward")
    torch.testing.assert_close(_flat(fwd), expected, **EXACT)
    torch.testing.assert_close(_flat(dbl), expected, **EXACT)
    assert dense.abs().max() > 1e-3  # the oracle is not trivially zero


# ------------------------------------------------------------------------------ CurvatureOperator
@pytest.fixture
def dense_case(case):
    """The case plus its dense Hessian, GGN and empirical Fisher over all 10 examples (the oracle)."""
    c = case
    c.hessian = dense_hessian(c.model, F.cross_entropy, c.x, c.y)
    return c


def test_operator_hessian_dense_equals_dense_hessian_over_uneven_batches(dense_case):
    c = dense_case
    with assert_model_unchanged(c.model):
        op = CurvatureOperator(c.model, F.cross_entropy, (c.x, c.y), batch_size=3)  # 3+3+3+1
        h = op.dense()
    assert op.shape == (op.numel, op.numel) == c.hessian.shape
    torch.testing.assert_close(h, c.hessian, **EXACT)
    ev, ev_true = torch.linalg.eigvalsh((h + h.T) / 2), torch.linalg.eigvalsh(c.hessian)
    torch.testing.assert_close(ev[[0, -1]], ev_true[[0, -1]], **EXACT)
    assert ev_true[0] < -1e-6 < 1e-6 < ev_true[-1]  # a genuinely indefinite Hessian
    with torch.no_grad():
        torch.testing.assert_close(op.loss(), F.cross_entropy(c.model(c.x), c.y), **EXACT)


def test_operator_ggn_equals_dense_jt_h_j(case):
    c = case
    op = CurvatureOperator(c.model, F.cross_entropy, (c.x, c.y), kind="ggn", batch_size=3)
    g = op.dense()
    expected = dense_ggn(c.model, F.cross_entropy, c.x, c.y)
    torch.testing.assert_close(g, expected, **EXACT)
    assert torch.linalg.eigvalsh(expected).min() > -1e-10  # GGN of a convex loss is PSD


def test_operator_fisher_equals_dense_empirical_fisher(case):
    c = case
    op = CurvatureOperator(c.model, F.cross_entropy, (c.x, c.y), kind="fisher", batch_size=3)
    expected = dense_empirical_fisher(c.model, F.cross_entropy, c.x, c.y)
    torch.testing.assert_close(op.dense(), expected, **EXACT)


def _least_squares(n=7, d=3):
    torch.manual_seed(3)
    lin = nn.Linear(d, 1).double()
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randn(n, 1, dtype=torch.float64)
    xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    return lin, x, y, 2.0 / n * xa.T @ xa  # Hessian = GGN of mean_i (w.x_i + b - y_i)^2


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_operator_closed_form_for_linear_least_squares(kind):
    lin, x, y, expected = _least_squares()
    op = CurvatureOperator(lin, lambda o, t: ((o - t) ** 2).mean(), (x, y), kind=kind, batch_size=4)
    torch.testing.assert_close(op.dense(), expected, **EXACT)


@pytest.mark.filterwarnings("ignore:forward-over-reverse HVP failed:RuntimeWarning")
def test_operator_hessian_with_mse_loss_is_right_through_the_fallback():
    lin, x, y, expected = _least_squares()
    op = CurvatureOperator(lin, gradsense.losses.mse, (x, y), batch_size=4)
    torch.testing.assert_close(op.dense(), expected, **EXACT)


# Regression (fixed): kind='ggn' computes H_out (J v) with jvp(grad(loss)) and no fallback;
#   F.mse_loss(reduction='mean') (also inside gs.losses.mse) fails under forward-over-reverse in
#   torch ('ZeroTensors are immutable', pytorch/pytorch#123996), so the GGN of a least-squares loss
#   raises
@pytest.mark.parametrize("loss_fn", [F.mse_loss, gradsense.losses.mse], ids=["F.mse_loss", "gs.losses.mse"])
def test_operator_ggn_with_mse_loss(loss_fn):
    lin, x, y, expected = _least_squares()
    op = CurvatureOperator(lin, loss_fn, (x, y), kind="ggn", batch_size=4)
    torch.testing.assert_close(op.dense(), expected, **EXACT)


def test_operator_params_subset_is_a_block_of_the_full_hessian(dense_case):
    c = dense_case
    names = [n for n, _ in c.model.named_parameters()]
    sub = names[-2:]  # the last Linear
    op = CurvatureOperator(c.model, F.cross_entropy, (c.x, c.y), params=sub, batch_size=4)
    k = sum(dict(c.model.named_parameters())[n].numel() for n in sub)
    assert op.numel == k
    torch.testing.assert_close(op.dense(), c.hessian[-k:, -k:], **EXACT)


@pytest.mark.parametrize("form", ["dataset", "dataloader", "no-cache", "double-backward"])
def test_operator_data_forms_and_options_agree(mlp_case, form):
    c = mlp_case
    ds = TensorDataset(c.x, c.y)
    kwargs = {}
    data = (c.x, c.y)
    if form == "dataset":
        data = ds
    elif form == "dataloader":
        data = DataLoader(ds, batch_size=4)
    elif form == "no-cache":
        kwargs["cache_data"] = False
    else:
        kwargs["method"] = "double-backward"
    op = CurvatureOperator(c.model, F.cross_entropy, data, batch_size=3, **kwargs)
    v = torch.randn(op.numel, dtype=torch.float64)
    expected = dense_hessian(c.model, F.cross_entropy, c.x, c.y) @ v
    torch.testing.assert_close(op.matvec(v), expected, **EXACT)
    torch.testing.assert_close(op.matvec(v), expected, **EXACT)  # second pass (cached or not) too


# Regression (fixed): CurvatureOperator weights each batch by len(dataset) (num_examples), not by
#   the examples the DataLoader yields, so drop_last=True or a subset sampler scales every product
#   (and loss()) down
@pytest.mark.parametrize("loader", ["drop_last", "subset_sampler"])
def test_operator_over_a_dataloader_that_skips_examples(mlp_case, loader):
    c = mlp_case
    ds = TensorDataset(c.x, c.y)
    if loader == "drop_last":
        data, seen = DataLoader(ds, batch_size=3, drop_last=True), list(range(9))
    else:
        seen = [1, 4, 6, 8]
        data = DataLoader(ds, batch_size=3, sampler=seen)
    op = CurvatureOperator(c.model, F.cross_entropy, data)
    v = torch.randn(op.numel, dtype=torch.float64)
    torch.testing.assert_close(
        op.matvec(v), dense_hessian(c.model, F.cross_entropy, c.x[seen], c.y[seen]) @ v, **EXACT
    )
    with torch.no_grad():
        torch.testing.assert_close(op.loss(), F.cross_entropy(c.model(c.x[seen]), c.y[seen]), **EXACT)


def test_operator_to_scipy_matches_matvec_and_counts_products(mlp_case):
    from scipy.sparse.linalg import eigsh

    c = mlp_case
    op = CurvatureOperator(c.model, F.cross_entropy, (c.x, c.y), batch_size=4)
    assert op.n_matvec == 0
    dense = dense_hessian(c.model, F.cross_entropy, c.x, c.y)
    v = torch.randn(op.numel, dtype=torch.float64)
    torch.testing.assert_close(op @ v, dense @ v, **EXACT)
    assert op.n_matvec == 1
    lo = op.to_scipy()
    assert lo.shape == (64, 64)
    out = lo.matvec(v.numpy())
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, (dense @ v).numpy(), rtol=1e-9, atol=1e-11)
    assert op.n_matvec == 2
    np.testing.assert_allclose(
        lo.matvec(v.numpy()[:, None]).reshape(-1), (dense @ v).numpy(), rtol=1e-9, atol=1e-11
    )
    assert op.n_matvec == 3
    top = eigsh(lo, k=1, which="LA", return_eigenvectors=False, tol=1e-12)
    np.testing.assert_allclose(top, torch.linalg.eigvalsh(dense)[-1:].numpy(), rtol=1e-7)
    before = op.n_matvec
    op.dense()
    assert op.n_matvec == before + op.numel


def test_operator_float32_vectors_are_cast_to_the_model_dtype(mlp_case):
    c = mlp_case
    op = CurvatureOperator(c.model, F.cross_entropy, (c.x, c.y))
    v = torch.randn(op.numel)
    out = op.matvec(v)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, dense_hessian(c.model, F.cross_entropy, c.x, c.y) @ v.double(), **EXACT)


def test_operator_refuses_train_mode_batchnorm(cnn_case):
    c = cnn_case
    c.model.train()
    with assert_model_unchanged(c.model):
        with pytest.raises(ValueError, match=r"BatchNorm/Dropout in train mode.*model\.eval\(\)"):
            CurvatureOperator(c.model, F.cross_entropy, (c.x, c.y))


# Regression (fixed): with allow_train_mode=True the forward-over-reverse HVP fails on BatchNorm's
#   in-place running-stat update and the double-backward fallback runs the module on its own
#   buffers, so every product updates the caller's running_mean/running_var/num_batches_tracked
def test_operator_allow_train_mode_leaves_running_stats_alone(cnn_case):
    c = cnn_case
    c.model.train()
    with assert_model_unchanged(c.model):
        op = CurvatureOperator(c.model, F.cross_entropy, (c.x, c.y), allow_train_mode=True)
        with pytest.warns(RuntimeWarning):
            op.matvec(torch.randn(op.numel, dtype=torch.float64))


def test_operator_argument_errors(mlp_case):
    c = mlp_case
    with pytest.raises(ValueError, match="kind must be 'hessian', 'ggn' or 'fisher'"):
        CurvatureOperator(c.model, F.cross_entropy, (c.x, c.y), kind="kfac")
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        CurvatureOperator(c.model, "cross_entropy", (c.x, c.y))
    with pytest.raises(ValueError, match="data is empty"):
        CurvatureOperator(c.model, F.cross_entropy, (c.x[:0], c.y[:0]))
    op = CurvatureOperator(c.model, F.cross_entropy, (c.x, c.y))
    with pytest.raises(ValueError, match="expected a vector of 64 elements"):
        op.matvec(torch.zeros(63, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected a vector of 64 elements"):
        op.matvec(torch.zeros(64, 1, dtype=torch.float64))
