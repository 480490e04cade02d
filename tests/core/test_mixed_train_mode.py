"""Regression: a model whose root is in eval mode but with one BatchNorm back in train mode.

``model.eval(); model[1].train()`` used to pass every train-mode check (they looked at ``model.training``
only): curvature came out silently wrong (4.54 instead of 3.85 for the top eigenvalue of this CNN) and
attribution, curvature and landscapes changed the caller's running statistics. Now every analysis sees
the train-mode layer: those that need a deterministic function refuse it with the layer's name, those
that may run it (attribution, with a warning) leave the buffers as they were.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradsense as gs
from cases import make_cnn_case
from gradsense.core.functional import training_stochastic_layers
from gradsense.core.grad import loss_gradient, per_example_grads
from helpers import assert_model_unchanged

CE = F.cross_entropy


@pytest.fixture
def mixed():
    case = make_cnn_case()
    case.model.eval()
    case.model[1].train()  # the BatchNorm only
    assert not case.model.training
    return case


def test_the_train_mode_layer_is_found_below_an_eval_root(mixed):
    assert training_stochastic_layers(mixed.model) == ["1"]
    mixed.model.eval()
    assert training_stochastic_layers(mixed.model) == []


@pytest.mark.parametrize(
    "call",
    [
        lambda m, d: gs.hessian_eigs(m, CE, d, k=1, seed=0),
        lambda m, d: gs.hessian_trace(m, CE, d, rtol=0.2, seed=0),
        lambda m, d: gs.spectral_density(m, CE, d, steps=5, probes=1, seed=0),
        lambda m, d: gs.loss_surface(m, CE, d, steps=3, seed=0),
        lambda m, d: gs.sharpness(m, CE, d, kind="sam", seed=0),
        lambda m, d: gs.interpolate(m, m, CE, d, steps=3),
        lambda m, d: per_example_grads(m, CE, d[0], d[1]),
        lambda m, d: loss_gradient(m, CE, d),
    ],
    ids=["eigs", "trace", "density", "surface", "sharpness", "interpolate", "per-example", "loss-gradient"],
)
def test_deterministic_analyses_refuse_it_and_name_the_layer(mixed, call):
    with assert_model_unchanged(mixed.model), pytest.raises(ValueError, match=r"train mode \(1\)"):
        call(mixed.model, (mixed.x, mixed.y))


def test_attribution_warns_and_leaves_the_running_statistics_alone(mixed):
    bn = mixed.model[1]
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    with assert_model_unchanged(mixed.model), pytest.warns(UserWarning, match=r"train mode \(1\)"):
        gs.attribute(mixed.model, mixed.x, target=mixed.y, method="integrated_gradients", steps=4)
    torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, var, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:forward-over-reverse HVP failed")
def test_allowed_train_mode_curvature_does_not_move_the_statistics(mixed):
    from gradsense.core.hvp import CurvatureOperator

    bn = mixed.model[1]
    mean = bn.running_mean.clone()
    op = CurvatureOperator(mixed.model, CE, (mixed.x, mixed.y), allow_train_mode=True)
    op.matvec(torch.ones(op.numel, dtype=torch.float64))
    torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=0)
