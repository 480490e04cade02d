"""core.grad: input gradients, per-example parameter gradients and the dataset loss gradient, each
against finite differences or a plain autograd loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradsense.core.grad import input_gradients, loss_gradient, per_example_grads
from gradsense.core.targets import ClassLogit, LogProbability, Loss
from helpers import assert_model_unchanged
from oracles import finite_difference_grad, full_batch_grad, per_example_loop_grads

FD = {"rtol": 1e-6, "atol": 1e-8}  # central differences, eps=1e-6, float64
EXACT = {"rtol": 1e-10, "atol": 1e-12}  # two autograd routes to the same number


def _loop_input_grads(model, rows, classes_of_row):
    out = []
    for r in range(rows.shape[0]):
        xi = rows[r : r + 1].detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xi)[0, classes_of_row[r]], xi)
        out.append(g[0])
    return torch.stack(out)


# ------------------------------------------------------------------------------ input_gradients
def test_input_gradients_match_finite_differences(case):
    model, x = case.model, case.x[:4]
    classes = torch.tensor([2, 0, 1, 2])
    with assert_model_unchanged(model):
        grads, scores = input_gradients(model, x, ClassLogit(classes))

    def f(z):  # eval mode: rows are independent, so the gradient of the sum is per row
        return model(z)[torch.arange(4), classes].sum()

    torch.testing.assert_close(grads, finite_difference_grad(f, x), **FD)
    with torch.no_grad():
        torch.testing.assert_close(scores, model(x)[torch.arange(4), classes], **EXACT)


def test_input_gradients_of_a_linear_model_are_its_weights():
    lin = nn.Linear(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    grads, _ = input_gradients(lin, x, ClassLogit([2, 0, 0, 1]))
    torch.testing.assert_close(grads, lin.weight.detach()[[2, 0, 0, 1]], **EXACT)


@pytest.mark.parametrize("chunk_size", [1, 3, 10], ids=["chunk1", "chunk3", "chunk10"])
def test_input_gradients_chunked_equals_unchunked_and_per_example_loop(case, chunk_size):
    classes = case.y
    target = LogProbability(classes)
    full, full_scores = input_gradients(case.model, case.x, target, max_memory="1GB")
    chunked, chunked_scores = input_gradients(case.model, case.x, target, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, full, **EXACT)
    torch.testing.assert_close(chunked_scores, full_scores, **EXACT)

    def logp(model):
        return lambda z: torch.log_softmax(model(z), 1)

    loop = []
    for i in range(case.x.shape[0]):
        xi = case.x[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(logp(case.model)(xi)[0, classes[i]], xi)
        loop.append(g[0])
    torch.testing.assert_close(full, torch.stack(loop), **EXACT)


def test_input_gradients_expanded_rows_use_their_examples_class(case):
    # 3 examples expanded to 7 rows (as path steps / noise samples do), each row perturbed
    classes = torch.tensor([2, 0, 1])
    index = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    rows = case.x[:3][index] + 0.1 * torch.randn(7, *case.x.shape[1:], dtype=torch.float64)
    grads, scores = input_gradients(
        case.model, rows, ClassLogit(classes), index=index, n_examples=3, chunk_size=2
    )
    torch.testing.assert_close(grads, _loop_input_grads(case.model, rows, classes[index].tolist()), **EXACT)
    with torch.no_grad():
        torch.testing.assert_close(scores, case.model(rows)[torch.arange(7), classes[index]], **EXACT)


def test_input_gradients_loss_target_follows_the_index(mlp_case):
    c = mlp_case
    index = torch.tensor([3, 3, 1, 0])
    rows = c.x[index] + 0.05
    grads, _ = input_gradients(c.model, rows, Loss(F.cross_entropy, c.y), index=index, n_examples=10)
    loop = []
    for r in range(4):
        xi = rows[r : r + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(c.model(xi), c.y[index[r : r + 1]]), xi)
        loop.append(g[0])
    torch.testing.assert_close(grads, torch.stack(loop), **EXACT)


def test_input_gradients_leave_grad_and_model_untouched(bn_cnn):
    x = torch.randn(3, 1, 5, 5, dtype=torch.float64)
    x_before = x.clone()
    with assert_model_unchanged(bn_cnn):
        input_gradients(bn_cnn, x, ClassLogit(1), chunk_size=2)
    assert all(p.grad is None for p in bn_cnn.parameters())
    assert not x.requires_grad and x.grad is None
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)


def test_input_gradients_custom_forward(mlp):
    x = torch.randn(3, 4, dtype=torch.float64)
    grads, _ = input_gradients(mlp, x, ClassLogit(0), forward=lambda z: mlp(2.0 * z))
    loop = _loop_input_grads(lambda z: mlp(2.0 * z), x, [0, 0, 0])
    torch.testing.assert_close(grads, loop, **EXACT)


def test_input_gradients_zero_for_inputs_the_target_ignores():
    class Ignore(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.ones(2, dtype=torch.float64))

        def forward(self, x):
            return self.b.expand(x.shape[0], 2)

    grads, scores = input_gradients(Ignore(), torch.randn(3, 4, dtype=torch.float64), ClassLogit(1))
    torch.testing.assert_close(grads, torch.zeros(3, 4, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(scores, torch.ones(3, dtype=torch.float64), rtol=0, atol=0)


def test_input_gradients_errors(mlp):
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"index must have shape \(3,\)"):
        input_gradients(mlp, x, ClassLogit(0), index=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        input_gradients(mlp, x, ClassLogit(7))
    with pytest.raises(ValueError, match=r"target returned shape \(3, 3\)"):

        class Bad(ClassLogit):
            def __call__(self, output, batch):
                return output

        input_gradients(mlp, x, Bad(0))
    with pytest.raises(TypeError, match="floating-point"):
        input_gradients(mlp, torch.zeros(3, 4, dtype=torch.long), ClassLogit(0))


# ------------------------------------------------------------------------------ per_example_grads
@pytest.mark.parametrize("chunk_size", [None, 1, 3], ids=["auto", "chunk1", "chunk3"])
def test_per_example_grads_match_autograd_loop(case, chunk_size):
    loop = per_example_loop_grads(case.model, F.cross_entropy, case.x, case.y)
    with assert_model_unchanged(case.model):
        got = per_example_grads(case.model, F.cross_entropy, case.x, case.y, chunk_size=chunk_size)
    assert list(got) == list(loop)
    for k in loop:
        torch.testing.assert_close(got[k], loop[k], **EXACT)
    # and their mean is the full-batch gradient of the mean loss
    full = full_batch_grad(case.model, F.cross_entropy, case.x, case.y)
    for k in full:
        torch.testing.assert_close(got[k].mean(0), full[k], **EXACT)


def test_per_example_grads_in_eval_mode_dropout_model(dropout_mlp):
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    loop = per_example_loop_grads(dropout_mlp, F.cross_entropy, x, y)
    got = per_example_grads(dropout_mlp, F.cross_entropy, x, y, chunk_size=4)
    for k in loop:
        torch.testing.assert_close(got[k], loop[k], **EXACT)


def test_per_example_grads_closed_form_for_linear_mse():
    lin = nn.Linear(3, 1).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 1, dtype=torch.float64)
    r = (lin(x) - y).detach()  # d/dw (w.x + b - y)^2 = 2 r x
    got = per_example_grads(lin, F.mse_loss, x, y)
    torch.testing.assert_close(got["weight"], (2 * r * x)[:, None, :], **EXACT)
    torch.testing.assert_close(got["bias"], 2 * r, **EXACT)


def test_per_example_grads_params_subset(cnn_case):
    c = cnn_case
    names = ["1.weight", "4.bias"]
    loop = per_example_loop_grads(c.model, F.cross_entropy, c.x, c.y, params=names)
    got = per_example_grads(c.model, F.cross_entropy, c.x, c.y, params=names, chunk_size=4)
    assert list(got) == names
    for k in names:
        assert got[k].shape == (10, *dict(c.model.named_parameters())[k].shape)
        torch.testing.assert_close(got[k], loop[k], **EXACT)
    got_regex = per_example_grads(c.model, F.cross_entropy, c.x, c.y, params="bias$")
    assert list(got_regex) == ["0.bias", "1.bias", "4.bias"]


@pytest.mark.parametrize("which", ["bn", "dropout"])
def test_per_example_grads_refuse_train_mode(which, bn_cnn, dropout_mlp):
    model = bn_cnn if which == "bn" else dropout_mlp
    x = (
        torch.randn(4, 1, 5, 5, dtype=torch.float64)
        if which == "bn"
        else torch.randn(4, 4, dtype=torch.float64)
    )
    model.train()
    with assert_model_unchanged(model):
        with pytest.raises(ValueError, match=r"BatchNorm/Dropout in train mode.*model\.eval\(\)"):
            per_example_grads(model, F.cross_entropy, x, torch.zeros(4, dtype=torch.long))


def test_per_example_grads_label_mismatch(mlp):
    with pytest.raises(ValueError, match=r"one row per input \(4\), got \(3,\)"):
        per_example_grads(
            mlp, F.cross_entropy, torch.randn(4, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="got list"):
        per_example_grads(mlp, F.cross_entropy, torch.randn(4, 4, dtype=torch.float64), [0, 1, 2, 0])


# ------------------------------------------------------------------------------ loss_gradient
@pytest.mark.parametrize("batch_size", [1, 3, 4, 10, 256])
def test_loss_gradient_is_the_full_batch_gradient_whatever_the_batching(case, batch_size):
    full = full_batch_grad(case.model, F.cross_entropy, case.x, case.y)
    with assert_model_unchanged(case.model):
        got = loss_gradient(case.model, F.cross_entropy, (case.x, case.y), batch_size=batch_size)
    assert list(got) == list(full)
    for k in full:
        torch.testing.assert_close(got[k], full[k], **EXACT)


@pytest.mark.parametrize("form", ["dataset", "dataloader"])
def test_loss_gradient_over_dataset_and_dataloader(case, form):
    ds = TensorDataset(case.x, case.y)
    data = ds if form == "dataset" else DataLoader(ds, batch_size=4)
    full = full_batch_grad(case.model, F.cross_entropy, case.x, case.y)
    got = loss_gradient(case.model, F.cross_entropy, data, batch_size=3)
    for k in full:
        torch.testing.assert_close(got[k], full[k], **EXACT)


def test_loss_gradient_params_subset(mlp_case):
    c = mlp_case
    full = full_batch_grad(c.model, F.cross_entropy, c.x, c.y, params=["2.weight"])
    got = loss_gradient(c.model, F.cross_entropy, (c.x, c.y), params=["2.weight"], batch_size=4)
    assert list(got) == ["2.weight"]
    torch.testing.assert_close(got["2.weight"], full["2.weight"], **EXACT)


# Regression (fixed): loss_gradient weights batches by len(dataset) (num_examples), not by the
#   examples the DataLoader actually yields, so drop_last=True or a sampler over a subset scales the
#   gradient down
@pytest.mark.parametrize("loader", ["drop_last", "subset_sampler"])
def test_loss_gradient_dataloader_that_skips_examples(mlp_case, loader):
    c = mlp_case
    ds = TensorDataset(c.x, c.y)
    if loader == "drop_last":
        data, seen = DataLoader(ds, batch_size=3, drop_last=True), list(range(9))
    else:
        seen = [0, 2, 5, 7]
        data = DataLoader(ds, batch_size=3, sampler=seen)
    full = full_batch_grad(c.model, F.cross_entropy, c.x[seen], c.y[seen])
    got = loss_gradient(c.model, F.cross_entropy, data)
    for k in full:
        torch.testing.assert_close(got[k], full[k], **EXACT)


# Regression (fixed): loss_gradient on a train-mode BatchNorm model fails inside torch.func.grad
#   with a RuntimeError about mutating a captured tensor, not a clear ValueError (per_example_grads
#   says what to do)
def test_loss_gradient_train_mode_batchnorm_fails_clearly(cnn_case):
    c = cnn_case
    c.model.train()
    with assert_model_unchanged(c.model):
        with pytest.raises(ValueError, match="train mode"):
            loss_gradient(c.model, F.cross_entropy, (c.x, c.y))


def test_loss_gradient_train_mode_dropout_free_model_is_fine(mlp_case):
    c = mlp_case
    c.model.train()  # no BatchNorm/Dropout: train mode changes nothing
    full = full_batch_grad(c.model, F.cross_entropy, c.x, c.y)
    got = loss_gradient(c.model, F.cross_entropy, (c.x, c.y), batch_size=4)
    for k in full:
        torch.testing.assert_close(got[k], full[k], **EXACT)
