"""Defences: exact pruning fraction, DP-SGD's clip + noise against an explicit loop and Opacus, quantisation
bounds, local steps against torch.optim.SGD, epsilon against the closed-form RDP conversion."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from privacy_cases import images, relu_mlp, sigmoid_cnn

import gradsense as gs
from gradsense.privacy.defenses import (
    RDP_ORDERS,
    clip_and_noise,
    dp_epsilon,
    parse_defense,
    prune_gradient,
    quantize_gradient,
)
from helpers import assert_model_unchanged
from oracles import per_example_loop_grads

CE = gs.losses.cross_entropy


def _grad(model, n=4, seed=0):
    x = images(n, seed=seed)
    y = torch.arange(n) % 4
    return x, y, gs.privacy.client_gradient(model, CE, x, y)


@pytest.mark.parametrize("keep", [0.01, 0.1, 0.37, 1.0])
def test_pruning_keeps_exactly_the_stated_fraction_of_largest_entries(keep):
    model = sigmoid_cnn()
    _, _, g = _grad(model)
    pruned = prune_gradient(g, keep)
    flat, kept = torch.cat([v.flatten() for v in g.values()]), torch.cat([v.flatten() for v in pruned.values()])
    n = flat.numel()
    assert int((kept != 0).sum()) == max(1, round(keep * n))
    on = kept != 0
    assert torch.equal(kept[on], flat[on])
    if not bool(on.all()):
        assert float(flat[on].abs().min()) >= float(flat[~on].abs().max())


def test_dp_mechanism_equals_an_explicit_per_example_loop():
    """sum_i g_i / max(1, ||g_i|| / C) + N(0, (sigma C)^2), divided by B, with the same noise draw."""
    model = sigmoid_cnn()
    x, y = images(5, seed=3), torch.tensor([0, 1, 2, 3, 0])
    clip, sigma = 0.05, 0.7
    with assert_model_unchanged(model):
        got = gs.privacy.DPNoise(sigma, clip).share(model, CE, x, y, generator=torch.Generator().manual_seed(7))
    per = per_example_loop_grads(model, CE, x, y)  # {name: (B, *shape)} by a Python loop of autograd.grad
    names = list(per)
    norms = [math.sqrt(sum(float(per[n][i].pow(2).sum()) for n in names)) for i in range(5)]
    assert max(norms) > clip  # clipping is active
    gen = torch.Generator().manual_seed(7)
    for n in names:
        total = sum(per[n][i] * min(1.0, clip / norms[i]) for i in range(5))
        noise = torch.randn(total.shape, generator=gen, dtype=total.dtype)
        torch.testing.assert_close(got[n], (total + sigma * clip * noise) / 5, rtol=1e-10, atol=1e-12)


def test_dp_noise_has_the_stated_standard_deviation():
    zeros = {"w": torch.zeros(4, 50_000, dtype=torch.float64)}
    out = clip_and_noise(zeros, clip=2.0, noise_multiplier=1.5, generator=torch.Generator().manual_seed(0))["w"]
    std, n = float(out.std()), out.numel()
    expected = 1.5 * 2.0 / 4
    assert abs(std - expected) < 4 * expected / math.sqrt(2 * n)  # 4 standard errors of a sample std


@pytest.mark.peer
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_clipping_agrees_with_opacus_per_sample_clipping():
    opacus = pytest.importorskip("opacus")
    model = relu_mlp().float()
    x, y = images(6, seed=5).float(), torch.tensor([0, 1, 2, 3, 1, 2])
    clip = 0.1
    ours = clip_and_noise(gs.core.per_example_grads(model, CE, x, y), clip, 0.0)
    peer = opacus.GradSampleModule(copy.deepcopy(model).train(), loss_reduction="mean")  # hooks record in train mode
    opt = opacus.optimizers.DPOptimizer(torch.optim.SGD(peer.parameters(), lr=0.0), noise_multiplier=0.0,
                                        max_grad_norm=clip, expected_batch_size=6, loss_reduction="mean")
    CE(peer(x), y).backward()
    opt.pre_step()
    for (name, p) in peer._module.named_parameters():
        # Opacus divides by (norm + 1e-6): agreement to ~1e-5 relative
        torch.testing.assert_close(p.grad, ours[name], rtol=2e-5, atol=1e-8)


def test_quantisation_fp16_and_int8_bounds():
    model = sigmoid_cnn()
    _, _, g = _grad(model)
    half = quantize_gradient(g, "fp16")
    for n, v in g.items():
        assert torch.equal(half[n], v.half().double())
    q = quantize_gradient(g, "int8")
    for n, v in g.items():
        s = float(v.abs().max()) / 127
        assert (q[n] - v).abs().max() <= s / 2 + 1e-15
        assert torch.unique(q[n]).numel() <= 255
        assert torch.allclose(torch.round(q[n] / s), q[n] / s, atol=1e-9)


def test_local_steps_equal_plain_sgd():
    model = sigmoid_cnn()
    x, y = images(6, seed=8), torch.tensor([0, 1, 2, 3, 0, 1])
    with assert_model_unchanged(model):
        upd = gs.privacy.LocalSteps(steps=5, lr=0.3, batch_size=4).share(model, CE, x, y)
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(twin.parameters(), lr=0.3)
    order = torch.arange(6)
    start = 0
    for _ in range(5):  # consecutive mini-batches of 4, cycling
        idx = order[torch.arange(start, start + 4) % 6]
        start = (start + 4) % 6
        opt.zero_grad()
        CE(twin(x[idx]), y[idx]).backward()
        opt.step()
    for (n, p0), p1 in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(upd.delta[n], p1.detach() - p0.detach(), rtol=1e-10, atol=1e-13)


def test_epsilon_of_one_full_batch_release_matches_the_closed_form():
    """q = 1, one step: RDP of the Gaussian mechanism is alpha / (2 sigma^2); converted with
    eps = rdp + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1) (Balle et al. 2020), minimised
    over the same orders."""
    pytest.importorskip("opacus")
    sigma, delta = 1.3, 1e-5
    orders = RDP_ORDERS
    closed = min(a / (2 * sigma**2) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
                 for a in orders if a > 1)
    eps, accountant = dp_epsilon(sigma, 1.0, 1, delta)
    assert abs(eps - closed) < 1e-6 * closed and "opacus" in accountant
    assert dp_epsilon(0.0, 1.0, 1, delta) is None


@pytest.mark.parametrize(("spec", "label"), [("none", "none"), ("prune:0.2", "prune 20%"), ("dp:0.5:2", "DP σ=0.5 C=2"),
                                             ("int8", "int8"), ("fp16", "fp16"), ("local:3:0.05", "3 local steps")])
def test_defence_names(spec, label):
    assert parse_defense(spec).label == label


@pytest.mark.parametrize("spec", ["prun", "prune:2", "dp:-1", "local:0", "int8:3", "prune:x"])
def test_bad_defence_names_say_what_is_allowed(spec):
    with pytest.raises(ValueError, match=r"defence|must"):
        parse_defense(spec)
