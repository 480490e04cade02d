"""Dataset-level input sensitivity: derivative orders 1-3 against finite differences (float64), a linear
model's closed form, batching/chunking invariance, Spearman against scipy, bad input."""

from __future__ import annotations

import pytest
import torch
from eval_models import Linear1
from scipy.stats import spearmanr
from torch.utils.data import DataLoader, TensorDataset

import gradsense as gs
import gradsense.evaluation as ev
from gradsense.core.targets import Loss
from helpers import CountingModule, assert_model_unchanged

CE = torch.nn.functional.cross_entropy


def _per_example_loss(model, x, y, i):
    def f(z):
        return CE(model(z[None]), y[i : i + 1])
    return f


def test_orders_two_and_three_match_finite_differences(mlp_case):
    c = mlp_case
    x, y = c.x[:4], c.y[:4]
    derivs = ev.input_derivatives(c.model, x, Loss(CE, y), torch.arange(4), order=3)
    h = 1e-3
    with torch.no_grad():
        for i in range(4):
            f = _per_example_loss(c.model, x, y, i)
            for j in range(4):
                e = torch.zeros(4, dtype=torch.float64)
                e[j] = h
                # exact second derivative by autograd, third by central differences of it (O(h^2))
                def d2(z, j=j, f=f):
                    with torch.enable_grad():
                        return torch.autograd.functional.hessian(f, z)[j, j]
                want2 = d2(x[i])
                want3 = (d2(x[i] + e) - d2(x[i] - e)) / (2 * h)
                fd2 = (f(x[i] + e) - 2 * f(x[i]) + f(x[i] - e)) / h**2  # and plain finite differences
                assert abs(float(derivs[2][i, j] - want2)) < 1e-10
                assert abs(float(derivs[2][i, j] - fd2)) < 1e-5
                assert abs(float(derivs[3][i, j] - want3)) < 1e-5 * max(1.0, abs(float(want3)))


def test_global_means_match_a_per_example_loop(mlp_case):
    c = mlp_case
    with assert_model_unchanged(c.model):
        r = ev.global_sensitivity(c.model, (c.x, c.y), loss_fn=CE, order=3, batch_size=4)
    rows = {1: [], 2: [], 3: []}
    for i in range(10):
        f = _per_example_loss(c.model, c.x, c.y, i)
        z = c.x[i].clone().requires_grad_(True)
        g = torch.autograd.grad(f(z), z, create_graph=True)[0]
        h_list, t_list = [], []
        for j in range(4):  # plain nested autograd, one coordinate at a time
            hj = torch.autograd.grad(g[j], z, create_graph=True)[0][j]
            t_list.append(torch.autograd.grad(hj, z, retain_graph=True)[0][j])
            h_list.append(hj)
        h_diag, t_diag = torch.stack(h_list), torch.stack(t_list)
        for k, v in ((1, g), (2, h_diag), (3, t_diag)):
            rows[k].append(v.detach())
    for k in (1, 2, 3):
        stack = torch.stack(rows[k])
        torch.testing.assert_close(r.mean_abs(k), stack.abs().mean(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(r.mean(k), stack.mean(0), rtol=1e-9, atol=1e-12)
    for a in range(3):
        for b in range(a + 1, 3):
            want = spearmanr(r.mean_abs(a + 1).numpy(), r.mean_abs(b + 1).numpy()).statistic
            assert abs(float(r.spearman[a, b]) - want) < 1e-12


def test_linear_model_with_squared_error_has_the_closed_form():
    model = Linear1(5)
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def sq(out, labels, reduction="mean"):
        v = (out[:, 0] - labels) ** 2
        return v if reduction == "none" else v.mean()

    r = ev.global_sensitivity(model, (x, y), loss_fn=sq, order=3)
    w = model.w.detach()
    with torch.no_grad():
        res = model(x)[:, 0] - y
    torch.testing.assert_close(r.mean_abs(1), (2 * res[:, None] * w).abs().mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.mean(2), 2 * w**2, rtol=1e-12, atol=1e-12)  # d2/dx_j2 (w.x - y)^2 = 2 w_j^2
    torch.testing.assert_close(r.mean_abs(3), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_batching_chunking_and_data_forms_agree(mlp_case):
    c = mlp_case
    a = ev.global_sensitivity(c.model, (c.x, c.y), loss_fn=CE, order=2)
    b = ev.global_sensitivity(c.model, (c.x, c.y), loss_fn=CE, order=2, batch_size=3, chunk_size=2)
    loader = DataLoader(TensorDataset(c.x, c.y), batch_size=4)
    d = ev.global_sensitivity(c.model, loader, loss_fn=CE, order=2)
    for other in (b, d):
        for k in (1, 2):
            torch.testing.assert_close(other.mean_abs(k), a.mean_abs(k), rtol=1e-10, atol=1e-12)
    # a target instead of a loss: the logit of the predicted class
    t = ev.global_sensitivity(c.model, c.x, target="predicted", order=1, batch_size=3)
    with torch.no_grad():
        pred = c.model(c.x).argmax(1)
    z = c.x.clone().requires_grad_(True)
    g = torch.autograd.grad(c.model(z).gather(1, pred[:, None]).sum(), z)[0]
    torch.testing.assert_close(t.mean_abs(1), g.abs().mean(0), rtol=1e-10, atol=1e-12)


def test_zoo_tabular_ranking_and_bad_input():
    model = gs.zoo.load("breast-cancer-mlp")
    data = gs.zoo.dataset("breast-cancer")
    r = ev.global_sensitivity(model, data, loss_fn=gs.losses.cross_entropy, order=2)
    assert r.feature_names == data.feature_names  # taken from the dataset
    ranked = r.ranking(1)
    assert [v for _, v in ranked] == sorted((v for _, v in ranked), reverse=True)
    counting = CountingModule(model)
    with pytest.raises(ValueError, match=r"exactly one of target= .* and loss_fn="):
        ev.global_sensitivity(counting, data, order=1)
    with pytest.raises(ValueError, match="exactly one"):
        ev.global_sensitivity(counting, data, target=0, loss_fn=CE)
    with pytest.raises(ValueError, match="order must be 1, 2 or 3, got 4"):
        ev.global_sensitivity(counting, data, loss_fn=CE, order=4)
    with pytest.raises(ValueError, match="needs labels"):
        ev.global_sensitivity(counting, data.inputs, loss_fn=CE)
    with pytest.raises(ValueError, match="feature_names has 2 names for 30"):
        ev.global_sensitivity(counting, data, loss_fn=CE, feature_names=["a", "b"])
    assert counting.sizes == []
