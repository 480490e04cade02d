"""What a client shares: every accepted form means the same; every bad form is one clear error before any work."""

from __future__ import annotations

import copy

import pytest
import torch
from privacy_cases import bn_cnn, images, sigmoid_cnn

import gradsense as gs
from gradsense.privacy.shared import as_shared
from helpers import CountingModule, assert_model_unchanged
from oracles import full_batch_grad

CE = gs.losses.cross_entropy


def test_client_gradient_equals_autograd_and_leaves_train_mode_statistics_alone():
    model = bn_cnn().train()
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    twin = copy.deepcopy(model)
    with assert_model_unchanged(model):
        g = gs.privacy.client_gradient(model, CE, x, y)
    want = full_batch_grad(twin, CE, x, y)  # a train-mode forward on the twin: batch statistics
    for n in want:
        torch.testing.assert_close(g[n], want[n], rtol=1e-12, atol=1e-14)


def test_mapping_sequence_and_autograd_output_are_the_same_message():
    model = sigmoid_cnn()
    x, y = images(2), torch.tensor([1, 3])
    loss = CE(model(x), y)
    seq = torch.autograd.grad(loss, list(model.parameters()))
    as_map = gs.privacy.client_gradient(model, CE, x, y)
    a, b = as_shared(model, seq), as_shared(model, as_map)
    assert a.names == b.names == [n for n, _ in model.named_parameters()]
    for n in a.names:
        torch.testing.assert_close(a.tensors[n], b.tensors[n])
    r1 = gs.privacy.reconstruct(model, CE, seq, attack="inverting", steps=5, batch_size=2, input_shape=(1, 6, 6))
    r2 = gs.privacy.reconstruct(model, CE, as_map, attack="inverting", steps=5, batch_size=2, input_shape=(1, 6, 6))
    assert torch.equal(r1.inputs, r2.inputs)


def test_frozen_parameters_are_not_expected():
    model = sigmoid_cnn()
    model[0].weight.requires_grad_(False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    seq = torch.autograd.grad(CE(model(images(1)), torch.tensor([0])), [p for p in model.parameters() if p.requires_grad])
    assert as_shared(model, seq).names == names


def _bad_cases(model):
    g = gs.privacy.client_gradient(model, CE, images(1), torch.tensor([0]))
    names = list(g)
    missing = {k: v for k, v in g.items() if k != names[-1]}
    wrong_shape = {**g, names[0]: g[names[0]].flatten()}
    unknown = {**g, "head.weight": g[names[0]]}
    nan = {**g, names[1]: torch.full_like(g[names[1]], float("nan"))}
    ints = {**g, names[1]: g[names[1]].long()}
    not_tensor = {**g, names[1]: g[names[1]].tolist()}
    return [
        (missing, ValueError, rf"lacks 1 of the {len(names)} expected parameters: \['{names[-1]}'\]"),
        (wrong_shape, ValueError, rf"'{names[0]}' has shape \(\d+,\), but the parameter has shape"),
        (unknown, ValueError, r"not parameters of CountingModule: \['head.weight'\]"),
        (nan, ValueError, "NaN/Inf"),
        (ints, TypeError, "expected floating point"),
        (not_tensor, TypeError, "is list, expected a tensor"),
        (list(g.values())[:-1], ValueError, "sequence of 5 tensors, but the model has 6 trainable"),
        ("gradient.pt", TypeError, "must be a mapping"),
        (gs.privacy.WeightUpdate(g, local_steps=0, lr=0.1), ValueError, "local_steps must be >= 1"),
        (gs.privacy.WeightUpdate(g, local_steps=2, lr=-1.0), ValueError, "lr must be a positive number"),
    ]


@pytest.mark.parametrize("attack", ["idlg", "inverting"])
def test_bad_shared_is_one_clear_error_before_any_forward(attack):
    model = CountingModule(sigmoid_cnn())
    cases = _bad_cases(model)
    calls = model.calls
    for bad, kind, message in cases:
        with assert_model_unchanged(model), pytest.raises(kind, match=message):
            gs.privacy.reconstruct(model, CE, bad, attack=attack, input_shape=(1, 6, 6))
    assert model.calls == calls


def test_bad_arguments_fail_before_work():
    model = CountingModule(sigmoid_cnn())
    g = gs.privacy.client_gradient(model, CE, images(1), torch.tensor([0]))
    calls = model.calls
    for kwargs, match in [({"attack": "rgap"}, "unknown attack"), ({"batch_size": 0}, "batch_size must be >= 1"),
                          ({"attack": "inverting"}, "needs the shape of one input"),
                          ({"labels": "joint", "input_shape": (1, 6, 6)}, "only for attack='dlg'"),
                          ({"labels": torch.tensor([0, 1]), "input_shape": (1, 6, 6)}, r"shape \(1,\)"),
                          ({"attack": "dlg", "input_shape": (1, 6, 6), "bounds": (1.0, 0.0)}, "lo < hi"),
                          ({"attack": "dlg", "input_shape": (1, 6, 6), "label_method": "magic"}, "label_method"),
                          ({"attack": "dlg", "input_shape": (1, 6, 6), "distance": "l1"}, "distance must be"),
                          ({"attack": "inverting", "input_shape": (1, 6, 6), "lr": 0.0}, "lr must be"),
                          ({"attack": "inverting", "input_shape": (1, 6, 6), "tv": -1.0}, "tv must be"),
                          ({"attack": "inverting", "input_shape": (1, 6, 6), "dropout": "drop"}, "dropout must be"),
                          ({"attack": "idlg", "batch_size": 3}, "needs input_shape")]:
        with pytest.raises((ValueError, TypeError), match=match):
            gs.privacy.reconstruct(model, CE, g, **kwargs)
    assert model.calls == calls
