"""Per-example squared gradient norms from hooks against a per-example loop (the independent oracle)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monitor_models import Siamese, TextModel, mlp, zoo_model
from torch import nn

from gradsense.core.per_example import PerExampleNorms, pair_sq_norms
from helpers import assert_model_unchanged


def loop_sq_norms(model, loss_fn, inputs, labels, scale):
    """||scale * grad of example i's own loss||^2 per parameter, one example at a time."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: [] for n in params}
    for i in range(inputs.shape[0]):
        g = torch.autograd.grad(loss_fn(model(inputs[i : i + 1]), labels[i : i + 1]), list(params.values()))
        for n, gi in zip(params, g):
            out[n].append((scale * gi).square().sum())
    return {n: torch.stack(v) for n, v in out.items()}


def check(model, loss_fn, x, y, **kw):
    with PerExampleNorms(model, **kw) as pe:
        loss_fn(model(x), y).backward()
    expected = loop_sq_norms(model, loss_fn, x, y, 1.0 / x.shape[0])
    got = pe.squared_norms
    assert not pe.excluded, pe.excluded
    assert set(got) == set(expected)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-14, msg=n)
    return pe


def test_every_rule_matches_the_loop():
    model = zoo_model()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    pe = check(model, F.cross_entropy, x, y)
    assert pe.rules == {"conv": "conv", "gn": "norm", "conv2": "conv", "bn": "norm", "conv1d": "conv", "ln": "norm",
                        "rms": "norm", "scale": "vmap", "head": "linear"}


@pytest.mark.parametrize("batch_first", [False, True])
def test_text_model_embedding_attention_sequences(batch_first):
    torch.manual_seed(3)
    model = TextModel(batch_first=batch_first).double()
    ids = torch.randint(0, 7, (4, 6))
    ids[0, -2:] = 0  # padding tokens get no embedding gradient
    ids[1, :3] = 5  # repeated tokens
    y = torch.tensor([0, 1, 1, 0])
    pe = check(model, F.cross_entropy, ids, y)
    assert pe.rules["attn"] == "vmap" and pe.rules["emb"] == "embedding"
    assert "attn.out_proj.weight" in pe.squared_norms


def test_siamese_calls_add_before_the_norm_and_accumulation_concatenates():
    torch.manual_seed(4)
    model = Siamese().double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    y = torch.randn(6, 1, dtype=torch.float64)
    with PerExampleNorms(model) as pe:
        for sl in (slice(0, 4), slice(4, 6)):  # two micro-batches, each loss a mean over its own rows
            F.mse_loss(model(x[sl]), y[sl]).backward()
            pe.end_backward()
    assert pe.n_examples == 6
    first = loop_sq_norms(model, F.mse_loss, x[:4], y[:4], 1 / 4)
    second = loop_sq_norms(model, F.mse_loss, x[4:], y[4:], 1 / 2)
    for n, v in pe.squared_norms.items():
        torch.testing.assert_close(v, torch.cat([first[n], second[n]]), rtol=1e-9, atol=1e-14)


def test_batchnorm1d_on_rows_eval_mode():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model(torch.randn(16, 5, dtype=torch.float64))  # running statistics
    model.eval()
    check(model, F.cross_entropy, torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,)))


def test_sum_reduction_scale_and_frozen_parameters():
    model = mlp()
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    loss = lambda out, t: F.cross_entropy(out, t, reduction="sum")  # noqa: E731
    with PerExampleNorms(model) as pe:
        loss(model(x), y).backward()
    expected = loop_sq_norms(model, loss, x, y, 1.0)
    assert set(pe.squared_norms) == {"0.bias", "2.weight", "2.bias"}
    for n, v in pe.squared_norms.items():
        torch.testing.assert_close(v, expected[n], rtol=1e-9, atol=1e-14)


def test_contributions_sum_to_the_batch_gradient_with_train_mode_batchnorm():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2)).double().train()
    x, y = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
    with PerExampleNorms(model) as pe:
        F.cross_entropy(model(x), y).backward()
    assert pe.coupled == ["1"]
    # a one-example batch: its contribution is the whole gradient
    model.zero_grad()
    with PerExampleNorms(model) as pe1:
        F.cross_entropy(model(x[:1]), y[:1]).backward()
    for n, p in model.named_parameters():
        if n.startswith("1."):  # batch statistics of one example make xhat = 0 / 0-ish; skip BN itself
            continue
        torch.testing.assert_close(pe1.squared_norms[n][0], p.grad.square().sum(), rtol=1e-9, atol=1e-14)


def test_hooks_removed_grads_untouched_and_flattening_models_excluded():
    model = mlp()
    x = torch.randn(4, 5, dtype=torch.float64)
    with assert_model_unchanged(model):
        with PerExampleNorms(model) as pe:
            with torch.no_grad():
                model(x)
        assert pe.n_examples == 0

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x.reshape(-1, 3)).reshape(x.shape[0], -1).sum(1)

    flat = Flat().double()
    with pytest.warns(RuntimeWarning, match="batch of 4"):
        with PerExampleNorms(flat) as pe:
            flat(torch.randn(4, 2, 3, dtype=torch.float64)).sum().backward()
    assert set(pe.excluded) == {"lin.weight", "lin.bias"}


def test_pair_sq_norms_gram_and_materialised_paths_agree():
    torch.manual_seed(6)
    for t, p, q in [(5, 2, 3), (2, 8, 9), (1, 3, 4)]:
        a, d = torch.randn(3, t, p, dtype=torch.float64), torch.randn(3, t, q, dtype=torch.float64)
        expected = torch.einsum("btq,btp->bqp", d, a).square().sum((1, 2))
        torch.testing.assert_close(pair_sq_norms(a, d), expected)
        torch.testing.assert_close(pair_sq_norms(a, d, max_memory=1), expected)  # one row per chunk


def test_conv_gram_path_and_two_calls():
    torch.manual_seed(7)

    class Wide(nn.Module):  # few positions, many channels: the patches' Gram matrices are the cheaper route
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 16, 3, dilation=1)
            self.head = nn.Linear(16 * 4, 2)

        def forward(self, x):  # the same conv on both halves of each example
            return self.head(torch.tanh(self.conv(x[:, :8]) + self.conv(x[:, 8:])).flatten(1))

    model = Wide().double()
    x, y = torch.randn(5, 16, 4, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    check(model, F.cross_entropy, x, y)


def test_inplace_activation_after_a_layer():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3), nn.Hardtanh(inplace=True)).double()
    check(model, F.cross_entropy, torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,)))
