"""The one-point-at-a-time surface runs on a private copy of the module (``copy_`` per point, no functional call
per point): bitwise the functional call's numbers, the caller's model untouched, fallbacks where a copy cannot
be exact (tied weights, train mode)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradsense.losses as losses
from gradsense.landscape import LossEvaluator, interpolate, loss_surface
from helpers import assert_model_unchanged


def _functional_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the functional call for every point (the path before the copy existed)."""
    monkeypatch.setattr(LossEvaluator, "_loop_point_fn", lambda self, static, has_acc, fallback: fallback)


def _bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 3))
    with torch.no_grad():  # non-trivial running statistics
        model(torch.randn(16, 2, 5, 5))
    return model.eval()


def test_loop_on_a_copy_is_bitwise_the_functional_call_and_leaves_the_model(monkeypatch):
    model = _bn_cnn()
    x, y = torch.randn(12, 2, 5, 5), torch.randint(0, 3, (12,))
    sentinel = object()
    assert LossEvaluator(model, losses.cross_entropy, (x, y))._loop_point_fn({}, True, sentinel) is not sentinel
    with assert_model_unchanged(model):
        fast = loss_surface(model, losses.cross_entropy, (x, y), steps=5, seed=0, vectorize=False,
                            include_bias_bn=True)
    with monkeypatch.context() as m:
        _functional_only(m)
        slow = loss_surface(model, losses.cross_entropy, (x, y), steps=5, seed=0, vectorize=False,
                            include_bias_bn=True)
    assert torch.equal(fast.losses, slow.losses)
    assert torch.equal(fast.accuracy, slow.accuracy)
    # and an independent oracle at one corner: the model's own forward with the weights moved by hand
    d1, d2 = fast.directions
    moved = _bn_cnn()  # the same seeded model, built again
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.add_(fast.alphas[0].float() * d1[n] + fast.betas[-1].float() * d2[n])
        expect = F.cross_entropy(moved(x), y).item()
    torch.testing.assert_close(fast.losses[0, -1].item(), expect, rtol=1e-5, atol=1e-6)


def test_interpolation_with_buffers_on_the_copy_equals_the_functional_call(monkeypatch):
    a, b = _bn_cnn(), _bn_cnn()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.3)
        b[1].running_mean.add_(0.5)
    x, y = torch.randn(10, 2, 5, 5), torch.randint(0, 3, (10,))
    with assert_model_unchanged(a), assert_model_unchanged(b):
        fast = interpolate(a, b, losses.cross_entropy, (x, y), steps=6, vectorize=False)
    with monkeypatch.context() as m:
        _functional_only(m)
        slow = interpolate(a, b, losses.cross_entropy, (x, y), steps=6, vectorize=False)
    assert torch.equal(fast.losses, slow.losses)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # one tensor under two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_tied_weights_keep_the_functional_call(monkeypatch):
    torch.manual_seed(1)
    model = _Tied().eval()
    x, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    ev = LossEvaluator(model, losses.cross_entropy, (x, y))
    sentinel = object()
    assert ev._loop_point_fn({}, True, sentinel) is sentinel  # tied: the copy could not be exact
    with assert_model_unchanged(model):
        fast = loss_surface(model, losses.cross_entropy, (x, y), steps=3, seed=0, vectorize=False)
    with monkeypatch.context() as m:
        _functional_only(m)
        slow = loss_surface(model, losses.cross_entropy, (x, y), steps=3, seed=0, vectorize=False)
    assert torch.equal(fast.losses, slow.losses)


def test_train_mode_keeps_the_functional_call(dropout_mlp):
    model = dropout_mlp.train()
    x = torch.randn(8, 4, dtype=torch.float64)
    ev = LossEvaluator(model, losses.cross_entropy, (x, torch.zeros(8, dtype=torch.long)), allow_train_mode=True)
    sentinel = object()
    assert ev._loop_point_fn({}, True, sentinel) is sentinel
