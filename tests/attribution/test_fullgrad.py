"""FullGrad: the full-gradient completeness identity f(x) = grad_x f . x + sum_layers grad_z f . b on
piecewise-linear networks (MLP, CNN, BatchNorm CNN in eval mode), a layer-by-layer autograd twin of
every term and of the post-processed map, and the usual batching and hygiene checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradsense as gs
from gradsense.attribution.base import METHODS
from gradsense.attribution.fullgrad import FullGrad, bias_layers, effective_bias
from helpers import CountingModule, assert_model_unchanged, hooks_on

IDENTITY = {"rtol": 1e-10, "atol": 1e-10}  # float64 sums of a few hundred terms
EXACT = {"rtol": 1e-10, "atol": 1e-12}


def relu_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()


def relu_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).double().eval()


def bn_cnn(seed: int = 0) -> nn.Module:
    """Conv -> BN -> ReLU -> conv without bias -> BN without affine -> ReLU -> pool -> linear, eval mode
    with non-trivial running statistics and BN weights."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).double()
    with torch.no_grad():
        net[1].weight.copy_(1.0 + 0.5 * torch.randn(3, dtype=torch.float64))
        net[1].bias.copy_(0.3 * torch.randn(3, dtype=torch.float64))
        net.train()
        for _ in range(3):
            net(2.0 * torch.randn(8, 1, 6, 6, dtype=torch.float64) + 0.5)
    net.eval()
    assert float(net[4].running_mean.abs().max()) > 1e-3
    return net


MODELS = {"relu-mlp": relu_mlp, "relu-cnn": relu_cnn, "bn-cnn-eval": bn_cnn}


def inputs_for(net: nn.Module, n: int = 4, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 5) if isinstance(net[0], nn.Linear) else (n, 1, 6, 6)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1, 2][:n])


def twin_terms(net: nn.Sequential, x: Tensor, classes: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
    """Layer by layer, plain autograd: the input term x * grad_x and, for every layer with a bias, the
    elementwise grad_z * b. BatchNorm's bias is read off by applying it to zeros."""
    inp = x.clone().requires_grad_(True)
    h, outs = inp, []
    for layer in net:
        h = layer(h)
        outs.append(h)
    grads = torch.autograd.grad(h[torch.arange(x.shape[0]), classes].sum(), [inp, *outs])
    terms = {}
    for i, layer in enumerate(net):
        if isinstance(layer, nn.BatchNorm2d):
            with torch.no_grad():
                b = layer(torch.zeros(1, layer.num_features, 1, 1, dtype=x.dtype)).reshape(1, -1, 1, 1)
        elif getattr(layer, "bias", None) is not None:
            b = layer.bias.detach().reshape((1, -1) + (1,) * (outs[i].ndim - 2))
        else:
            continue
        terms[i] = grads[i + 1] * b
    return (grads[0] * x).detach(), terms


# ------------------------------------------------------------------------------ completeness
def test_registry():
    assert METHODS["fullgrad"] is FullGrad


@pytest.mark.parametrize("name", list(MODELS))
def test_full_gradient_completeness(name):
    net = MODELS[name]()
    x, y = inputs_for(net)
    res = FullGrad(net, post_process=False).attribute(x, y)
    with torch.no_grad():
        logits = net(x)[torch.arange(4), y]
    assert res.attributions.shape == x.shape
    torch.testing.assert_close(res.sum_per_example() + res.tensors["bias"], logits, **IDENTITY)
    torch.testing.assert_close(res.delta, torch.zeros(4, dtype=x.dtype), rtol=0, atol=1e-10)
    assert float(res.tensors["bias"].abs().min()) > 1e-3  # the bias terms are not negligible here


def test_completeness_fails_for_a_smooth_network():
    """The identity needs piecewise linearity: with softplus the gap is far from zero."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Softplus(), nn.Linear(7, 3)).double().eval()
    x, y = inputs_for(net)
    res = FullGrad(net, post_process=False).attribute(x, y)
    assert float(res.delta.abs().max()) > 1e-2


def test_single_linear_layer_by_hand():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    res = FullGrad(lin, post_process=False).attribute(x, 2)
    torch.testing.assert_close(res.attributions, x * lin.weight[2].detach(), **EXACT)
    torch.testing.assert_close(res.tensors["bias"], lin.bias[2].detach().expand(2), **EXACT)


def test_batchnorm_effective_bias_is_its_output_at_zero():
    net = bn_cnn()
    for bn in (net[1], net[4]):
        with torch.no_grad():
            at_zero = bn(torch.zeros(1, bn.num_features, 1, 1, dtype=torch.float64)).flatten()
        torch.testing.assert_close(effective_bias(bn), at_zero, **EXACT)
    assert bias_layers(net) == ["0", "1", "4", "8"]  # conv "3" has no bias


@pytest.mark.parametrize("name", ["relu-cnn", "bn-cnn-eval"])
def test_every_term_matches_a_layer_by_layer_twin(name):
    net = MODELS[name]()
    x, y = inputs_for(net)
    res = FullGrad(net, post_process=False).attribute(x, y)
    input_term, terms = twin_terms(net, x, y)
    torch.testing.assert_close(res.attributions, input_term, **EXACT)
    per_layer = torch.stack([terms[i].flatten(1).sum(1) for i in sorted(terms)], 1)
    assert res.meta["settings"]["bias_layers"] == [str(i) for i in sorted(terms)]
    torch.testing.assert_close(res.tensors["bias_per_layer"], per_layer, **EXACT)


def _minmax(t: Tensor) -> Tensor:
    flat = t.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo)).reshape(t.shape)


@pytest.mark.parametrize("name", ["relu-cnn", "bn-cnn-eval"])
def test_post_processed_map_matches_the_papers_recipe(name):
    """abs -> min-max per example over each whole term -> bilinear to the input size -> sum over channels;
    spatial layers only (the final Linear's term has no place in the image)."""
    net = MODELS[name]()
    x, y = inputs_for(net)
    res = FullGrad(net).attribute(x, y)
    input_term, terms = twin_terms(net, x, y)
    expected = _minmax(input_term.abs()).sum(1)
    for t in terms.values():
        if t.ndim == 4:
            up = F.interpolate(_minmax(t.abs()), size=(6, 6), mode="bilinear", align_corners=False)
            expected = expected + up.sum(1)
    assert res.attributions.shape == (4, 6, 6) and res.meta["signed"] is False
    torch.testing.assert_close(res.attributions, expected, **EXACT)


def test_post_processed_map_of_an_mlp_is_the_input_term():
    net = relu_mlp()
    x, y = inputs_for(net)
    res = FullGrad(net).attribute(x, y)
    input_term, _ = twin_terms(net, x, y)
    torch.testing.assert_close(res.attributions, _minmax(input_term.abs()), **EXACT)


def test_inplace_relu_keeps_the_identity():
    """Tensor hooks see the gradient of the conv output before ReLU(inplace=True) overwrites it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(27, 2)).double()
    x = torch.randn(3, 1, 3, 3, dtype=torch.float64)
    res = FullGrad(net, post_process=False).attribute(x, 1)
    torch.testing.assert_close(res.delta, torch.zeros(3, dtype=x.dtype), rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------ batching and hygiene
@pytest.mark.parametrize("post_process", [True, False], ids=["map", "raw"])
def test_batched_equals_per_example_and_chunked_equals_unchunked(post_process):
    net = bn_cnn()
    x, y = inputs_for(net)
    full = FullGrad(net, post_process=post_process).attribute(x, y)
    part = FullGrad(net, post_process=post_process, chunk_size=1).attribute(x, y)
    torch.testing.assert_close(part.attributions, full.attributions, **EXACT)
    torch.testing.assert_close(part.tensors["bias_per_layer"], full.tensors["bias_per_layer"], **EXACT)
    single = torch.cat([FullGrad(net, post_process=post_process).attribute(x[i : i + 1], [int(y[i])]).attributions
                        for i in range(4)])
    torch.testing.assert_close(single, full.attributions, **EXACT)


def test_model_unchanged_after_normal_and_failing_runs():
    net = bn_cnn()
    x, y = inputs_for(net)
    with assert_model_unchanged(net):
        gs.attribute(net, x, target=y, method="fullgrad")

    def boom(output: Tensor, batch: object) -> Tensor:
        raise RuntimeError("target failed")

    with assert_model_unchanged(net), pytest.raises(RuntimeError, match="target failed"):
        gs.attribute(net, x, target=boom, method="fullgrad")
    assert hooks_on(net) == {}


def test_batchnorm_in_train_mode_is_refused_before_any_forward():
    """A forward in train mode would update the running statistics: refuse first."""
    net = bn_cnn().train()
    x, y = inputs_for(net)
    counting = CountingModule(net)
    with assert_model_unchanged(net), pytest.raises(ValueError, match="eval mode"):
        FullGrad(counting).attribute(x, y)
    assert counting.calls == 0 and net.training and net[1].training
