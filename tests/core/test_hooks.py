"""core.hooks: captured activations and gradients against a manual forward and a split model, and
no hook left behind after normal and failing runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradsense.core.hooks import capture, resolve_layers
from helpers import assert_model_unchanged, hooks_on

EXACT = {"rtol": 1e-12, "atol": 1e-12}


@pytest.fixture
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Softplus(), nn.Linear(4, 3)).double()


def _split_gradient(net, x, k, weights):
    """d (weights * net(x)).sum() / d (output of net[k]), through a model split at k."""
    with torch.no_grad():
        h = net[: k + 1](x)
    h = h.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((weights * net[k + 1 :](h)).sum(), h)
    return h.detach(), g


@pytest.mark.parametrize("layers", [["0", "2"], [0, 2]], ids=["by-name", "by-module"])
def test_capture_activations_and_gradients_match_a_split_model(net, layers):
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(6, 3, dtype=torch.float64)
    spec = layers if isinstance(layers[0], str) else [net[i] for i in layers]
    with assert_model_unchanged(net):
        with capture(net, spec) as cap:
            out = net(x)
            torch.autograd.grad((weights * out).sum(), x)
    assert set(cap.activations) == set(cap.gradients) == {"0", "2"}
    for k in (0, 2):
        act, grad = _split_gradient(net, x.detach(), k, weights)
        torch.testing.assert_close(cap.activations[str(k)], act, **EXACT)
        torch.testing.assert_close(cap.gradients[str(k)], grad, **EXACT)
        assert not cap.activations[str(k)].requires_grad


def test_capture_activations_only(net):
    x = torch.randn(3, 4, dtype=torch.float64)
    with capture(net, "2", gradients=False) as cap:
        net(x).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(cap.activations["2"], net[:3](x), **EXACT)
    assert cap.gradients == {}
    assert hooks_on(net) == {}


def test_capture_keep_graph_lets_you_differentiate_through_the_activation(net):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with capture(net, "0", keep_graph=True, gradients=False) as cap:
        net(x)
    (g,) = torch.autograd.grad(cap.activations["0"].sum(), x)
    torch.testing.assert_close(g, net[0].weight.detach().sum(0).expand(3, 4), **EXACT)


def test_capture_under_no_grad_records_activations_without_gradient_hooks(net):
    x = torch.randn(3, 4, dtype=torch.float64)
    with capture(net, "4") as cap, torch.no_grad():
        out = net(x)
    torch.testing.assert_close(cap.activations["4"], out, **EXACT)
    assert cap.gradients == {}


def test_capture_no_hook_remains_after_a_normal_run(net):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with assert_model_unchanged(net):
        with capture(net, ["0", "1", "2", "3", "4"]) as cap:
            out = net(x)
            assert set(hooks_on(net)) == {"0", "1", "2", "3", "4"}
    assert hooks_on(net) == {}
    # the tensor hooks went too: a backward after the block records nothing
    torch.autograd.grad(out.sum(), x)
    assert cap.gradients == {}


class _RaiseInForward(nn.Module):
    def forward(self, x):
        raise RuntimeError("forward failed midway")


class _RaiseInBackwardFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("backward failed midway")


class _RaiseInBackward(nn.Module):
    def forward(self, x):
        return _RaiseInBackwardFn.apply(x)


def test_no_hook_remains_after_a_forward_that_raises():
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), _RaiseInForward(), nn.Linear(3, 2)).double()
    with assert_model_unchanged(net):
        with pytest.raises(RuntimeError, match="forward failed midway"):
            with capture(net, ["0", "3"]) as cap:
                net(torch.randn(2, 4, dtype=torch.float64))
    assert hooks_on(net) == {}
    assert set(cap.activations) == {"0"}  # recorded up to the failure


def test_no_hook_remains_after_a_backward_that_raises():
    net = nn.Sequential(nn.Linear(4, 3), _RaiseInBackward(), nn.Linear(3, 2)).double()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    with assert_model_unchanged(net):
        with pytest.raises(RuntimeError, match="backward failed midway"):
            with capture(net, ["0", "2"]) as cap:
                torch.autograd.grad(net(x).sum(), x)
    assert hooks_on(net) == {}
    assert set(cap.gradients) == {"2"}  # the layer after the failure got its gradient


# Regression (fixed): capture stores t.detach(), which shares storage with the layer output, so an
#   in-place op after the layer (ReLU(inplace=True)) overwrites the recorded activation
def test_capture_activation_survives_a_following_inplace_op():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 1)).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    with capture(net, "0") as cap:
        torch.autograd.grad(net(x).sum(), x)
    with torch.no_grad():
        pre = net[0](x)
    assert (pre < 0).any()  # the in-place ReLU really changes something
    # the gradient w.r.t. the pre-activation is right: w2 * 1[pre > 0]
    torch.testing.assert_close(cap.gradients["0"], net[2].weight.detach().expand(5, 4) * (pre > 0), **EXACT)
    torch.testing.assert_close(cap.activations["0"], pre, **EXACT)


# ------------------------------------------------------------------------------ resolve_layers
def test_resolve_layers_names_and_modules(net):
    assert resolve_layers(net, "2") == {"2": net[2]}
    assert resolve_layers(net, net[4]) == {"4": net[4]}
    assert resolve_layers(net, ["0", net[3]]) == {"0": net[0], "3": net[3]}
    assert resolve_layers(net, net) == {"<root>": net}


@pytest.mark.parametrize(
    ("layers", "error", "match"),
    [
        ("7", ValueError, "layer '7' is not a submodule of Sequential"),
        (nn.Linear(1, 1), ValueError, "not a submodule of this model"),
        ([], ValueError, "no layer given"),
        ([3], TypeError, "must be names or nn.Modules, got int"),
    ],
    ids=["unknown-name", "foreign-module", "empty", "bad-type"],
)
def test_resolve_layers_errors(net, layers, error, match):
    with pytest.raises(error, match=match):
        resolve_layers(net, layers)
    with pytest.raises(error, match=match):
        with capture(net, layers):
            pass  # pragma: no cover
    assert hooks_on(net) == {}
