"""Saliency and Input x Gradient against finite differences, closed forms and captum; the shared
attribution machinery (registry, option checks, warnings, model hygiene, early argument checks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradsense as gs
from gradsense.attribution import METHODS, InputXGradient, Saliency
from gradsense.results import AttributionResult
from helpers import CountingModule, assert_model_unchanged
from oracles import finite_difference_grad

FD = {"rtol": 1e-6, "atol": 1e-8}
EXACT = {"rtol": 1e-10, "atol": 1e-12}


def _target_sum(model, classes):
    n = classes.shape[0]
    return lambda z: model(z)[torch.arange(n), classes].sum()


# ------------------------------------------------------------------------------ correctness
def test_saliency_matches_finite_differences(case):
    x, classes = case.x[:5], case.y[:5]
    with assert_model_unchanged(case.model):
        a = gs.attribute(case.model, x, target=classes, method="saliency")
    assert isinstance(a, AttributionResult)
    torch.testing.assert_close(
        a.attributions, finite_difference_grad(_target_sum(case.model, classes), x), **FD
    )
    with torch.no_grad():
        torch.testing.assert_close(a.scores, case.model(x)[torch.arange(5), classes], **EXACT)
    torch.testing.assert_close(a.inputs, x, rtol=0, atol=0)


@pytest.mark.peer
@pytest.mark.parametrize("use_abs", [False, True], ids=["signed", "abs"])
def test_saliency_matches_captum(case, use_abs):
    captum_attr = pytest.importorskip("captum.attr")
    x, classes = case.x, case.y
    ours = Saliency(case.model, abs=use_abs).attribute(x, classes)
    theirs = captum_attr.Saliency(case.model).attribute(
        x.clone().requires_grad_(True), target=classes, abs=use_abs
    )
    torch.testing.assert_close(ours.attributions, theirs.detach(), **EXACT)
    assert ours.meta["signed"] is (not use_abs)
    assert ours.meta["settings"] == {"abs": use_abs}


@pytest.mark.peer
def test_input_x_gradient_matches_captum_and_finite_differences(case):
    captum_attr = pytest.importorskip("captum.attr")
    x, classes = case.x, case.y
    ours = gs.attribute(case.model, x, target=classes, method="input_x_gradient")
    theirs = captum_attr.InputXGradient(case.model).attribute(x.clone().requires_grad_(True), target=classes)
    torch.testing.assert_close(ours.attributions, theirs.detach(), **EXACT)
    fd = finite_difference_grad(_target_sum(case.model, classes), x)
    torch.testing.assert_close(ours.attributions, x * fd, **FD)


def test_closed_forms_on_a_linear_model():
    lin = nn.Linear(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    w = lin.weight.detach()
    torch.testing.assert_close(Saliency(lin).attribute(x, 2).attributions, w[2].expand(4, 5), **EXACT)
    torch.testing.assert_close(
        Saliency(lin, abs=True).attribute(x, [0, 1, 2, 0]).attributions, w[[0, 1, 2, 0]].abs(), **EXACT
    )
    ixg = InputXGradient(lin).attribute(x, 1)
    torch.testing.assert_close(ixg.attributions, x * w[1], **EXACT)
    # completeness for a bias-free linear model: sum(x * grad) = output
    lin0 = nn.Linear(5, 3, bias=False).double()
    ixg0 = InputXGradient(lin0).attribute(x, 1)
    torch.testing.assert_close(ixg0.sum_per_example(), lin0(x)[:, 1].detach(), **EXACT)


def test_predicted_target_uses_the_argmax_class(mlp_case):
    c = mlp_case
    with torch.no_grad():
        pred = c.model(c.x).argmax(1)
    a = gs.attribute(c.model, c.x, target="predicted")
    b = gs.attribute(c.model, c.x, target=pred)
    torch.testing.assert_close(a.attributions, b.attributions, rtol=0, atol=0)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)


def test_chunked_attribution_equals_unchunked(case):
    a = gs.attribute(case.model, case.x, target=case.y, chunk_size=3)
    b = gs.attribute(case.model, case.x, target=case.y, max_memory="1GB")
    torch.testing.assert_close(a.attributions, b.attributions, **EXACT)


def test_loss_and_callable_targets(mlp_case):
    c = mlp_case
    a = gs.attribute(c.model, c.x, target=gs.targets.Loss(F.cross_entropy, c.y))
    fd = finite_difference_grad(lambda z: F.cross_entropy(c.model(z), c.y, reduction="sum"), c.x)
    torch.testing.assert_close(a.attributions, fd, **FD)
    b = gs.attribute(c.model, c.x, target=lambda out, batch: out[:, 0] - out[:, 1])
    fd = finite_difference_grad(lambda z: (c.model(z)[:, 0] - c.model(z)[:, 1]).sum(), c.x)
    torch.testing.assert_close(b.attributions, fd, **FD)


def test_result_metadata(mlp_case):
    c = mlp_case
    a = gs.attribute(c.model, c.x[:3], target=1, method="gradient", titles=["a", "b", "c"])
    assert a.method == "saliency"
    assert a.meta["target"] == "logit of class 1"
    assert a.meta["titles"] == ["a", "b", "c"]
    assert a.meta["model"] == gs.core.model_fingerprint(c.model)
    assert a.meta["wall_time_s"] >= 0


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient"])
def test_chunk_size_bounds_every_gradient_pass(mlp, method):
    counting = CountingModule(mlp)
    x = torch.randn(7, 4, dtype=torch.float64)
    a = gs.attribute(counting, x, target=1, method=method, chunk_size=3)
    b = gs.attribute(mlp, x, target=1, method=method)
    torch.testing.assert_close(a.attributions, b.attributions, **EXACT)
    # a 2-row forward for the target's checks, then the gradient chunks 3 + 3 + 1 (which give the scores)
    assert counting.sizes == [2, 3, 3, 1]


# Regression (fixed): attribute() runs target='predicted' and the final scores as one forward over
#   the whole batch, ignoring chunk_size/max_memory (documented as rows per forward/backward)
def test_chunk_size_bounds_every_forward(mlp):
    counting = CountingModule(mlp)
    gs.attribute(counting, torch.randn(7, 4, dtype=torch.float64), target="predicted", chunk_size=3)
    assert max(counting.sizes) <= 3, counting.sizes


# ------------------------------------------------------------------------------ registry and options
def test_method_names_and_aliases():
    assert METHODS["saliency"] is METHODS["gradient"] is Saliency
    assert METHODS["input_x_gradient"] is METHODS["inputxgradient"] is InputXGradient
    x = torch.randn(2, 5, dtype=torch.float64)
    lin = nn.Linear(5, 2).double()
    a = gs.attribute(lin, x, target=0, method="Input-X-Gradient")
    assert a.method == "input_x_gradient"


def test_unknown_method_lists_the_available_ones(mlp):
    with pytest.raises(
        ValueError, match=r"unknown attribution method 'nope'; available: \[.*'input_x_gradient'.*'saliency'"
    ):
        gs.attribute(mlp, torch.randn(2, 4, dtype=torch.float64), target=0, method="nope")


def test_unknown_option_lists_the_accepted_ones(mlp):
    with pytest.raises(
        ValueError, match=r"does not take option\(s\) \['steps'\]; it takes \[.*'abs'.*'chunk_size'"
    ):
        gs.attribute(mlp, torch.randn(2, 4, dtype=torch.float64), target=0, method="saliency", steps=8)
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['abs'\]"):
        gs.attribute(
            mlp, torch.randn(2, 4, dtype=torch.float64), target=0, method="input_x_gradient", abs=True
        )


def test_a_model_with_zero_gradient_warns():
    class Const(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2).double()

        def forward(self, x):
            return self.lin(x * 0.0)

    with pytest.warns(UserWarning, match="every attribution is exactly zero"):
        a = gs.attribute(Const(), torch.randn(2, 3, dtype=torch.float64), target=0)
    torch.testing.assert_close(a.attributions, torch.zeros(2, 3, dtype=torch.float64), rtol=0, atol=0)


def test_train_mode_with_dropout_warns(dropout_mlp):
    dropout_mlp.train()
    with assert_model_unchanged(dropout_mlp):
        with pytest.warns(UserWarning, match="BatchNorm/Dropout in train mode"):
            gs.attribute(dropout_mlp, torch.randn(3, 4, dtype=torch.float64), target=0)


# Regression (fixed): on a train-mode BatchNorm model attribute() only warns, then every forward it
#   runs (predicted/validate/gradients/scores) updates the caller's
#   running_mean/running_var/num_batches_tracked
def test_train_mode_batchnorm_running_stats_are_left_alone(bn_cnn):
    bn_cnn.train()
    with assert_model_unchanged(bn_cnn):
        with pytest.warns(UserWarning, match="train mode"):
            gs.attribute(bn_cnn, torch.randn(3, 1, 5, 5, dtype=torch.float64), target=0)


# ------------------------------------------------------------------------------ the caller's model
@pytest.mark.parametrize("method", ["saliency", "input_x_gradient"])
def test_the_callers_model_is_unchanged(case, method):
    for p in case.model.parameters():
        p.requires_grad_(False)  # a frozen model stays frozen
    case.model[0].register_forward_hook(lambda *a: None)  # and the caller's own hooks stay
    with assert_model_unchanged(case.model):
        a = gs.attribute(case.model, case.x, target=case.y, method=method)
    assert a.attributions.abs().sum() > 0


@pytest.mark.parametrize(
    ("target", "match"),
    [(99, "out of range"), ([0, 1], "one class index per example"), ("nope", "not understood")],
    ids=["out-of-range", "wrong-count", "bad-string"],
)
def test_the_callers_model_is_unchanged_after_a_failing_call(case, target, match):
    with assert_model_unchanged(case.model):
        with pytest.raises(ValueError, match=match):
            gs.attribute(case.model, case.x, target=target)


@pytest.mark.parametrize("fail_at", [1, 2, 3], ids=["outputs", "memory-estimate", "gradient-pass"])
def test_the_callers_model_is_unchanged_when_the_forward_raises_midway(mlp, fail_at):
    # forwards: 1 outputs ('predicted', validation, scores), 2 the memory estimate (temporary hooks), 3 gradients
    calls = []

    def forward(z):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("forward failed")
        return mlp(z)

    # the first forward's error comes back as a ValueError naming the inputs (the original chained)
    expected = ValueError if fail_at == 1 else RuntimeError
    with assert_model_unchanged(mlp):
        with pytest.raises(expected, match="forward failed") as info:
            Saliency(mlp, forward=forward).attribute(torch.randn(3, 4, dtype=torch.float64), "predicted")
    assert len(calls) == fail_at
    if fail_at == 1:
        assert "inputs of shape (3, 4)" in str(info.value) and isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize(
    ("inputs", "target", "options", "error", "match"),
    [
        (torch.zeros(3, 4, dtype=torch.long), 0, {}, TypeError, "floating-point"),
        (torch.tensor([[0.0, float("nan"), 0.0, 0.0]]), 0, {}, ValueError, "NaN/Inf"),
        (torch.zeros(4, dtype=torch.float64), 0, {}, ValueError, "batch dimension"),
        (torch.zeros(0, 4, dtype=torch.float64), 0, {}, ValueError, "empty"),
        ([[0.0] * 4], 0, {}, TypeError, "must be a torch.Tensor"),
        (torch.zeros(3, 4, dtype=torch.float64), "nope", {}, ValueError, "not understood"),
        (torch.zeros(3, 4, dtype=torch.float64), [0, 1], {}, ValueError, "one class index per example"),
        (torch.zeros(3, 4, dtype=torch.float64), True, {}, TypeError, "bool"),
        (torch.zeros(3, 4, dtype=torch.float64), 0, {"chunk_size": 0}, ValueError, "chunk_size"),
        (torch.zeros(3, 4, dtype=torch.float64), 0, {"max_memory": "lots"}, ValueError, "max_memory"),
        (torch.zeros(3, 4, dtype=torch.float64), 0, {"steps": 3}, ValueError, "does not take"),
    ],
    ids=[
        "int-inputs",
        "nan",
        "no-batch-dim",
        "empty",
        "list",
        "bad-target",
        "target-count",
        "bool-target",
        "chunk-size",
        "max-memory",
        "unknown-option",
    ],
)
def test_bad_arguments_are_refused_before_any_forward(mlp, inputs, target, options, error, match):
    counting = CountingModule(mlp)
    with pytest.raises(error, match=match):
        gs.attribute(counting, inputs, target=target, **options)
    assert counting.calls == 0
