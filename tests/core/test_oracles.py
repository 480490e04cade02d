"""The oracles and helpers are themselves checked against closed forms before anything leans on them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import CountingModule, assert_model_unchanged, hooks_on
from oracles import (
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    finite_difference_grad,
    full_batch_grad,
    per_example_loop_grads,
)

TOL = {"rtol": 1e-7, "atol": 1e-9}


def _linear_regression(n: int = 7, d: int = 3) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    lin = nn.Linear(d, 1).double()
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randn(n, 1, dtype=torch.float64)
    return lin, x, y


def test_finite_difference_grad_of_quadratic_matches_closed_form():
    a = torch.randn(5, 5, dtype=torch.float64)
    x = torch.randn(5, dtype=torch.float64)
    fd = finite_difference_grad(lambda z: z @ a @ z, x)
    torch.testing.assert_close(fd, (a + a.T) @ x, rtol=1e-7, atol=1e-8)


def test_finite_difference_grad_refuses_float32():
    with pytest.raises(TypeError, match="float64"):
        finite_difference_grad(lambda z: z.sum(), torch.zeros(3))


def test_dense_hessian_and_ggn_of_linear_mse_match_closed_form():
    # L(w, b) = mean_i (w.x_i + b - y_i)^2  =>  H = GGN = (2/n) sum_i [x_i, 1][x_i, 1]^T
    lin, x, y = _linear_regression()
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    expected = 2.0 / x.shape[0] * xa.T @ xa
    torch.testing.assert_close(dense_hessian(lin, F.mse_loss, x, y), expected, **TOL)
    torch.testing.assert_close(dense_ggn(lin, F.mse_loss, x, y), expected, **TOL)


def test_per_example_and_fisher_oracles_match_closed_form():
    # g_i = 2 (w.x_i + b - y_i) [x_i, 1]
    lin, x, y = _linear_regression()
    r = (lin(x) - y).detach()  # (n, 1)
    grads = per_example_loop_grads(lin, F.mse_loss, x, y)
    torch.testing.assert_close(grads["weight"], (2 * r * x)[:, None, :], **TOL)
    torch.testing.assert_close(grads["bias"], 2 * r, **TOL)
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    g = 2 * r * xa
    torch.testing.assert_close(dense_empirical_fisher(lin, F.mse_loss, x, y), g.T @ g / x.shape[0], **TOL)
    full = full_batch_grad(lin, F.mse_loss, x, y)
    torch.testing.assert_close(full["weight"], grads["weight"].mean(0), **TOL)


def test_dense_hessian_param_subset_is_a_block_of_the_full_hessian(mlp_case):
    c = mlp_case
    full = dense_hessian(c.model, F.cross_entropy, c.x, c.y)
    sub = dense_hessian(c.model, F.cross_entropy, c.x, c.y, params=["2.weight"])
    start = sum(p.numel() for n, p in c.model.named_parameters() if n in ("0.weight", "0.bias"))
    k = c.model[2].weight.numel()
    torch.testing.assert_close(sub, full[start : start + k, start : start + k], **TOL)


# ------------------------------------------------------------------------------ helpers self-test
def test_assert_model_unchanged_passes_on_read_only_use(mlp):
    with assert_model_unchanged(mlp):
        with torch.no_grad():
            mlp(torch.randn(2, 4, dtype=torch.float64))


@pytest.mark.parametrize(
    "change",
    ["value", "buffer", "requires_grad", "training", "hook", "grad"],
)
def test_assert_model_unchanged_detects_each_kind_of_change(bn_cnn, change):
    def mutate():
        if change == "value":
            with torch.no_grad():
                bn_cnn[0].weight.add_(1.0)
        elif change == "buffer":
            bn_cnn[1].running_mean.add_(1.0)
        elif change == "requires_grad":
            bn_cnn[4].bias.requires_grad_(False)
        elif change == "training":
            bn_cnn[1].train()
        elif change == "hook":
            bn_cnn[2].register_forward_hook(lambda *a: None)
        elif change == "grad":
            bn_cnn(torch.randn(2, 1, 5, 5, dtype=torch.float64)).sum().backward()

    with pytest.raises(AssertionError, match="the model changed"):
        with assert_model_unchanged(bn_cnn):
            mutate()


def test_assert_model_unchanged_reraises_the_original_exception(mlp):
    with pytest.raises(KeyError, match="original"):
        with assert_model_unchanged(mlp):
            raise KeyError("original")


def test_assert_model_unchanged_reports_a_change_even_when_the_block_raises(mlp):
    with pytest.raises(AssertionError, match="block raised") as info:
        with assert_model_unchanged(mlp):
            mlp.train()
            raise KeyError("original")
    assert isinstance(info.value.__cause__, KeyError)


def test_hooks_on_and_counting_module():
    net = CountingModule(nn.Linear(2, 1))
    assert hooks_on(net) == {}
    h = net.inner.register_forward_pre_hook(lambda *a: None)
    assert hooks_on(net) == {"inner": {"_forward_pre_hooks": 1}}
    h.remove()
    net(torch.zeros(3, 2))
    net(torch.zeros(1, 2))
    assert (net.calls, net.rows) == (2, 4)
