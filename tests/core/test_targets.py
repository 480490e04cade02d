"""core.targets: every accepted ``target=`` form against a hand computation or a per-example loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradsense
from gradsense.core.targets import (
    Batch,
    CallableTarget,
    ClassLogit,
    Contrastive,
    CosineSimilarity,
    LogProbability,
    Loss,
    Probability,
    RegressionOutput,
    Target,
    as_target,
)

N, C = 5, 4


@pytest.fixture
def out():
    return torch.randn(N, C, dtype=torch.float64)


def _batch(n=N, index=None):
    return Batch(inputs=torch.zeros(n, 1), index=torch.arange(n) if index is None else index)


def _hand_log_softmax(o):
    return torch.stack(
        [
            torch.stack(
                [o[i, c] - math.log(sum(math.exp(v) for v in o[i].tolist())) for c in range(o.shape[1])]
            )
            for i in range(o.shape[0])
        ]
    )


# ------------------------------------------------------------------------------ class targets
@pytest.mark.parametrize(
    "form",
    [2, [0, 3, 1, 1, 2], torch.tensor([0, 3, 1, 1, 2]), (0, 3, 1, 1, 2), torch.tensor(2)],
    ids=["int", "list", "tensor", "tuple", "0d-tensor"],
)
def test_class_forms_pick_the_logit(out, form):
    t = as_target(form, N)
    assert isinstance(t, ClassLogit)
    t.validate(out, N)
    classes = (
        [int(form)] * N
        if isinstance(form, int) or (torch.is_tensor(form) and form.ndim == 0)
        else list(map(int, form))
    )
    expected = torch.stack([out[i, classes[i]] for i in range(N)])
    torch.testing.assert_close(t(out, _batch()), expected, rtol=0, atol=0)


def test_log_probability_and_probability_match_hand_computation(out):
    classes = [1, 0, 3, 3, 2]
    logp = _hand_log_softmax(out)
    expected_logp = torch.stack([logp[i, classes[i]] for i in range(N)])
    torch.testing.assert_close(LogProbability(classes)(out, _batch()), expected_logp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        Probability(classes)(out, _batch()), expected_logp.exp(), rtol=1e-12, atol=1e-12
    )
    # a single class for every row
    torch.testing.assert_close(Probability(2)(out, _batch()), logp[:, 2].exp(), rtol=1e-12, atol=1e-12)


def test_per_example_classes_follow_the_row_index(out):
    # rows 0..4 of an expanded batch belong to examples [2, 2, 0, 1, 0]
    classes = torch.tensor([3, 1, 0])
    index = torch.tensor([2, 2, 0, 1, 0])
    got = ClassLogit(classes)(out, _batch(index=index))
    expected = torch.stack([out[r, int(classes[index[r]])] for r in range(N)])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_predicted_is_fixed_from_the_original_inputs():
    lin = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0], [-2.0, 0.0]], dtype=torch.float64)  # predicted classes 0 and 1
    calls = []

    def predict():
        calls.append(1)
        return lin(x)

    t = as_target("predicted", 2, predict=predict)
    assert len(calls) == 1
    torch.testing.assert_close(t.classes, torch.tensor([0, 1]))
    # on rows whose own prediction flips, the class stays the one of the original example
    flipped = -x
    assert lin(flipped).argmax(1).tolist() == [1, 0]
    got = t(lin(flipped), _batch(2))
    torch.testing.assert_close(got, torch.tensor([-1.0, -2.0], dtype=torch.float64), rtol=0, atol=0)


# ------------------------------------------------------------------------------ Loss target
def _loop_ce(out, y):
    return torch.stack([F.cross_entropy(out[i : i + 1], y[i : i + 1]) for i in range(out.shape[0])])


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(),
        F.cross_entropy,
        gradsense.losses.cross_entropy,
        lambda o, y: F.cross_entropy(o, y),  # reduces to a scalar: mapped with vmap
    ],
    ids=["module", "functional", "gs-losses", "reducing-lambda"],
)
def test_loss_target_equals_a_per_example_loop(out, loss_fn):
    y = torch.tensor([0, 3, 2, 1, 3])
    t = as_target(Loss(loss_fn, y), N)
    t.validate(out, N)
    torch.testing.assert_close(t(out, _batch()), _loop_ce(out, y), rtol=1e-12, atol=1e-12)
    # expanded rows use their example's label
    index = torch.tensor([4, 4, 0, 2, 1])
    torch.testing.assert_close(t(out, _batch(index=index)), _loop_ce(out, y[index]), rtol=1e-12, atol=1e-12)


def test_loss_target_does_not_change_the_callers_loss_module(out):
    module = nn.CrossEntropyLoss()
    Loss(module, torch.zeros(N, dtype=torch.long))(out, _batch())
    assert module.reduction == "mean"
    assert module(out, torch.zeros(N, dtype=torch.long)).ndim == 0


def test_loss_target_mse_on_vector_outputs_is_the_per_example_mean(out):
    labels = torch.randn(N, C, dtype=torch.float64)
    t = Loss(F.mse_loss, labels)
    expected = torch.stack([((out[i] - labels[i]) ** 2).mean() for i in range(N)])
    torch.testing.assert_close(t(out, _batch()), expected, rtol=1e-12, atol=1e-12)


def test_loss_target_label_count_is_checked(out):
    with pytest.raises(ValueError, match="3 labels for 5 examples"):
        Loss(F.cross_entropy, torch.zeros(3, dtype=torch.long)).validate(out, N)
    with pytest.raises(TypeError, match="needs a callable loss_fn"):
        Loss("cross_entropy", torch.zeros(N, dtype=torch.long))


# ------------------------------------------------------------------------------ other targets
def test_cosine_similarity_matches_hand_formula():
    emb = torch.randn(N, 6, dtype=torch.float64)
    ref = torch.randn(6, dtype=torch.float64)
    refs = torch.randn(3, 6, dtype=torch.float64)

    def cos(a, b):
        return (a @ b) / (a.norm() * b.norm())

    got = CosineSimilarity(ref)(emb, _batch())
    torch.testing.assert_close(got, torch.stack([cos(emb[i], ref) for i in range(N)]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, F.cosine_similarity(emb, ref[None], dim=1), rtol=1e-12, atol=1e-12)
    index = torch.tensor([2, 0, 0, 1, 2])
    got = CosineSimilarity(refs)(emb, _batch(index=index))
    torch.testing.assert_close(
        got, torch.stack([cos(emb[i], refs[index[i]]) for i in range(N)]), rtol=1e-12, atol=1e-12
    )
    with pytest.raises(ValueError, match="does not match the reference"):
        CosineSimilarity(torch.randn(5)).validate(emb, N)
    with pytest.raises(ValueError, match="3 references for 5 examples"):
        CosineSimilarity(refs).validate(emb, N)
    with pytest.raises(TypeError, match="floating-point tensor"):
        CosineSimilarity(torch.arange(6))


def test_regression_output():
    out2 = torch.randn(N, 3, dtype=torch.float64)
    torch.testing.assert_close(RegressionOutput(2)(out2, _batch()), out2[:, 2], rtol=0, atol=0)
    torch.testing.assert_close(RegressionOutput(-1)(out2, _batch()), out2[:, 2], rtol=0, atol=0)
    out1 = torch.randn(N, dtype=torch.float64)
    torch.testing.assert_close(RegressionOutput()(out1, _batch()), out1, rtol=0, atol=0)
    out3 = torch.randn(N, 2, 2, dtype=torch.float64)  # flattened per row
    torch.testing.assert_close(RegressionOutput(3)(out3, _batch()), out3[:, 1, 1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="index 3 out of range for 3 outputs"):
        RegressionOutput(3).validate(out2, N)
    with pytest.raises(TypeError, match="must be an int"):
        RegressionOutput(True)


def test_contrastive_is_a_minus_b(out):
    t = as_target(Contrastive(2, LogProbability([0, 1, 2, 3, 0])), N)
    t.validate(out, N)
    expected = out[:, 2] - torch.log_softmax(out, 1)[torch.arange(N), torch.tensor([0, 1, 2, 3, 0])]
    torch.testing.assert_close(t(out, _batch()), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="before as_target"):
        Contrastive(0, 1)(out, _batch())


def test_contrastive_resolves_predicted_once():
    lin = nn.Linear(3, C).double()
    x = torch.randn(N, 3, dtype=torch.float64)
    t = as_target(Contrastive("predicted", 0), N, predict=lambda: lin(x))
    o = lin(x).detach()
    torch.testing.assert_close(t(o, _batch()), o.max(1).values - o[:, 0], rtol=0, atol=0)


def test_callable_target_shapes(out):
    t = as_target(lambda o, b: o[:, 1:2], N)  # (n, 1) is accepted and squeezed
    assert isinstance(t, CallableTarget)
    torch.testing.assert_close(t(out, _batch()), out[:, 1], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"one scalar per row, shape \(5,\); got \(5, 2\)"):
        as_target(lambda o, b: o[:, :2], N)(out, _batch())
    with pytest.raises(TypeError, match="must return a tensor"):
        as_target(lambda o, b: 1.0, N)(out, _batch())


def test_ready_target_objects_pass_through():
    t = ClassLogit(1)
    assert as_target(t, N) is t
    assert isinstance(t, Target)


def test_model_output_objects_are_read():
    logits = torch.randn(N, C, dtype=torch.float64)

    class Output:
        def __init__(self):
            self.logits = logits

    torch.testing.assert_close(ClassLogit(1)(Output(), _batch()), logits[:, 1], rtol=0, atol=0)
    torch.testing.assert_close(ClassLogit(1)((logits, None), _batch()), logits[:, 1], rtol=0, atol=0)
    with pytest.raises(TypeError, match="cannot read a tensor"):
        ClassLogit(1)({"x": 1}, _batch())


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("target", "match"),
    [(4, r"out of range: \[4\]"), (-1, r"out of range: \[-1\]"), ([0, 1, 9, 1, 0], r"out of range: \[9\]")],
    ids=["int-too-big", "negative", "one-of-many"],
)
def test_class_index_out_of_range(out, target, match):
    with pytest.raises(ValueError, match=match):
        as_target(target, N).validate(out, N)


def test_wrong_number_of_per_example_targets(out):
    with pytest.raises(ValueError, match=r"one class index per example \(5\), got shape \(3,\)"):
        as_target([0, 1, 2], N)
    with pytest.raises(ValueError, match="3 class indices but there are 5 examples"):
        ClassLogit([0, 1, 2]).validate(out, N)
    with pytest.raises(ValueError, match="got shape"):
        as_target(torch.zeros(5, 1, dtype=torch.long), N)


def test_class_target_needs_a_2d_output():
    with pytest.raises(ValueError, match=r"needs a \(batch, classes\) output"):
        ClassLogit(0).validate(torch.zeros(N), N)


@pytest.mark.parametrize(
    ("target", "error", "match"),
    [
        (True, TypeError, "not a bool"),
        ([True, False, True, True, False], TypeError, "must be integers"),
        ([0.0, 1.0, 2.0, 1.0, 0.0], TypeError, "must be integers"),
        (torch.tensor([0.5, 1, 2, 1, 0]), TypeError, "must be integers"),
        (1.0, TypeError, "not supported"),
        ("nope", ValueError, "not understood"),
        (None, ValueError, "target is required"),
        (object(), TypeError, "not supported"),
    ],
    ids=["bool", "bool-list", "float-list", "float-tensor", "float", "unknown-string", "none", "object"],
)
def test_bad_targets_are_refused(target, error, match):
    with pytest.raises(error, match=match):
        as_target(target, N)


# Regression (fixed): as_target turns a 0-d float/bool tensor into a class with int(t) (1.7 -> class
#   1, True -> 1) instead of refusing it like 1-d float/bool tensors
@pytest.mark.parametrize("target", [torch.tensor(1.7), torch.tensor(True)], ids=["0d-float", "0d-bool"])
def test_zero_dim_float_or_bool_tensor_is_refused(target):
    with pytest.raises(TypeError):
        as_target(target, N)


def test_predicted_needs_a_way_to_predict_and_a_2d_output():
    with pytest.raises(ValueError, match="needs the model's output"):
        as_target("predicted", N)
    with pytest.raises(ValueError, match=r"needs a \(batch, classes\) output"):
        as_target("predicted", N, predict=lambda: torch.zeros(N))
