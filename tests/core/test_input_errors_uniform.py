"""Regression: every mistake is one clear error from the one checking path, before any work, in every analysis.

The analyses used to differ: ``evaluate``, ``global_sensitivity`` and ``importance`` let wrong shapes and float64
inputs reach torch (``mat1 and mat2 must have the same dtype``); labels out of range gave ``IndexError: Target 10
is out of bounds`` everywhere; ``data=x`` with cross-entropy reached ``cross_entropy(..., None)``; tuple/dict
outputs gave ``AttributeError: 'tuple' object has no attribute 'logits'``; an empty DataLoader gave
``IndexError``/``KeyError: 1``; ``global_sensitivity`` with train-mode Dropout died inside vmap; shape messages
named the internal two-row probe (``expected input[2, 1, 5, 5]``).

The matrix runs every entry point on every bad input and asserts the exception type, the message (what was
expected, what was given, what to do) and that no work happened: a :class:`helpers.CountingModule` sees at most
the one first forward (plus, for a shape error found on the probe rows, one rerun on the caller's batch so that
torch's message names the caller's shapes).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradsense as gs
from cases import make_cnn_case
from helpers import CountingModule, assert_model_unchanged

CE = gs.losses.cross_entropy
CASE = make_cnn_case()  # float64 BatchNorm CNN on (10, 1, 5, 5), 3 classes
X, Y = CASE.x, CASE.y
N = X.shape[0]

LOSS_ANALYSES = {
    "importance": lambda m, d: gs.importance(m, CE, d, method="taylor"),
    "importance-heldout": lambda m, d: gs.importance(m, CE, (X, Y), method="magnitude", heldout=d),
    "sweep": lambda m, d: gs.importance.sweep(m, CE, (X, Y), d, methods=["magnitude"], sparsities=[0.5]),
    "measure": lambda m, d: gs.importance.measure(m, CE, d, {"0.weight": torch.ones(2, 1, 3, 3, dtype=torch.bool)}),
    "hessian-eigs": lambda m, d: gs.hessian_eigs(m, CE, d, k=1, seed=0),
    "hessian-trace": lambda m, d: gs.hessian_trace(m, CE, d, rtol=0.5, seed=0),
    "spectral-density": lambda m, d: gs.spectral_density(m, CE, d, steps=4, probes=1, seed=0),
    "curvature-operator": lambda m, d: gs.curvature.operator(m, CE, d),
    "loss-surface": lambda m, d: gs.loss_surface(m, CE, d, steps=3, seed=0),
    "interpolate": lambda m, d: gs.interpolate(m, m, CE, d, steps=3),
    "sharpness": lambda m, d: gs.sharpness(m, CE, d, kind="sam", seed=0),
    "global-sensitivity": lambda m, d: gs.global_sensitivity(m, d, loss_fn=CE),
}

INPUT_ANALYSES = {
    "attribute": lambda m, x: gs.attribute(m, x, target=0, method="integrated_gradients", steps=4),
    "evaluate": lambda m, x: gs.evaluate(m, x, torch.ones_like(x), target=0, metric="infidelity", n_perturbations=4),
    "evaluate-taylor": lambda m, x: gs.evaluate(m, x, None, target=0, metric="taylor", n_directions=2),
    "global-sensitivity-target": lambda m, x: gs.global_sensitivity(m, x, target=0, order=2),
}


def _loader(x, y, **kw):
    return DataLoader(TensorDataset(x, y), batch_size=4, **kw)


BAD_DATA = {
    # name: (data, error, message, forwards allowed)
    "shape": ((X.flatten(1), Y), ValueError, r"the model failed on inputs of shape \(10, 25\) \(torch\.float64\)",
              ([2, 10], [10])),
    "dtype": ((X.float(), Y), TypeError, r"inputs are torch\.float32 but the model's parameters are torch\.float64; "
              r"convert them with inputs\.to\(torch\.float64\)", ([2], [10])),
    "label-too-large": ((X, torch.where(Y == 0, 3, Y)), ValueError,
                        r"labels out of range for a model with 3 outputs: found \[3\]; valid class indices are 0\.\.2",
                        ([2], [10])),
    "label-negative": ((X, torch.where(Y == 0, -1, Y)), ValueError, r"labels out of range .* found \[-1\]",
                       ([2], [10])),
    "label-in-a-later-batch": (_loader(X, torch.cat([Y[:-1], torch.tensor([7])])), ValueError,
                               r"labels out of range for a model with 3 outputs: found \[7\]", ([2], [4])),
    "labels-missing": (X, ValueError, r"needs labels.*data= gave inputs only.*\(inputs, labels\)", ([], [2], [10])),
    "float-labels": ((X, Y.double()), ValueError, r"needs integer class indices .* got torch\.float64 labels.*long\(\)",
                     ([2], [10])),
    "empty-loader": (DataLoader(TensorDataset(X, Y), batch_size=64, drop_last=True), ValueError, r"yielded no batches: the DataLoader has 10 examples, batch_size=64 and drop_last=True"
                     r".*drop_last=False", ([],)),
}


@pytest.mark.parametrize("bad", list(BAD_DATA))
@pytest.mark.parametrize("name", list(LOSS_ANALYSES))
def test_loss_analyses_refuse_bad_data_before_work(name, bad):
    data, error, message, allowed = BAD_DATA[bad]
    if name == "global-sensitivity" and bad == "labels-missing":
        message = r"loss_fn= needs labels"
    counting = CountingModule(CASE.model)
    with assert_model_unchanged(CASE.model), pytest.raises(error, match=message) as info:
        LOSS_ANALYSES[name](counting, data)
    if name == "importance-heldout":  # the (good) calibration data's first forward comes first
        allowed = ([], *([2, *a] for a in allowed))  # (an empty held-out loader is found before it)
    assert counting.sizes in [list(a) for a in allowed], counting.sizes  # the first forward at most
    text = str(info.value)
    assert "[2, 1, 5, 5]" not in text and "2x25" not in text  # never the internal probe batch
    assert "Traceback" not in text and "\n" not in text  # one line


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        ("shape", ValueError, r"failed on inputs of shape \(10, 25\)"),
        ("dtype", TypeError, r"inputs are torch\.float32 but the model's parameters are torch\.float64"),
    ],
)
@pytest.mark.parametrize("name", list(INPUT_ANALYSES))
def test_input_analyses_refuse_bad_inputs_before_work(name, bad, error, message):
    x = X.flatten(1) if bad == "shape" else X.float()
    counting = CountingModule(CASE.model)
    with assert_model_unchanged(CASE.model), pytest.raises(error, match=message) as info:
        INPUT_ANALYSES[name](counting, x)
    assert counting.sizes in ([2], [2, 10], [10]), counting.sizes
    assert not re.search(r"\b2x25\b|\[2, ", str(info.value))


def test_a_shape_error_names_the_callers_batch_not_the_probe():
    conv = nn.Conv2d(1, 2, 3)
    with pytest.raises(ValueError) as info:
        gs.attribute(conv, torch.randn(16, 3, 8, 8), target=lambda out, b: out.sum((1, 2, 3)))
    text = str(info.value)
    assert "inputs of shape (16, 3, 8, 8)" in text
    assert "expected input[16, 3, 8, 8] to have 1 channels" in text and "input[2," not in text


def test_a_batch_size_dependent_forward_is_named():
    class FixedBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x.reshape(6, 4))  # only works on exactly 6 rows

    with pytest.raises(ValueError, match=r"failed on the first 2 rows .* but runs on all 6: its forward depends on the "
                                         r"batch size"):
        gs.attribute(FixedBatch(), torch.randn(6, 4), target=0)


# ------------------------------------------------------------------------------------------ model outputs
class Outputs(nn.Module):
    """The CNN's logits returned as a tuple, a dict, a dict without logits or an HF ModelOutput."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.inner, self.kind = CASE.model, kind

    def forward(self, x):
        logits = self.inner(x)
        if self.kind == "tuple":
            return logits, x.sum()
        if self.kind == "dict":
            return {"logits": logits, "aux": x.sum()}
        if self.kind == "dict-no-logits":
            return {"main": logits, "aux": logits * 0}
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=logits)


@pytest.mark.parametrize("kind", ["tuple", "dict", "model-output"])
@pytest.mark.parametrize("name", ["importance", "hessian-eigs", "loss-surface", "sharpness", "global-sensitivity"])
def test_tuple_dict_and_model_outputs_are_read_like_the_plain_logits(name, kind):
    if kind == "model-output":
        pytest.importorskip("transformers")
    wrapped, plain = LOSS_ANALYSES[name](Outputs(kind), (X, Y)), LOSS_ANALYSES[name](CASE.model, (X, Y))
    # the same numbers (accuracy included); parameter names carry the wrapper's "inner." prefix
    assert [k.replace("inner.", "") for k in wrapped.tensors] == list(plain.tensors)
    for (key, value), other in zip(plain.tensors.items(), wrapped.tensors.values()):
        torch.testing.assert_close(other, value, rtol=1e-10, atol=1e-12, msg=key)


def test_an_output_without_an_obvious_tensor_says_how_to_choose():
    model = Outputs("dict-no-logits")
    counting = CountingModule(model)
    with pytest.raises(TypeError, match=r"the model returned a dict with keys \['main', 'aux'\] and no 'logits'.*"
                                        r"gs\.losses\.on_output\('main', gs\.losses\.cross_entropy\)"):
        gs.hessian_eigs(counting, CE, (X, Y), k=1)
    assert counting.sizes == [10]  # curvature's first forward is the whole first batch
    chosen = gs.losses.on_output("main", CE)
    torch.testing.assert_close(gs.hessian_eigs(model, chosen, (X, Y), k=1, seed=0).eigenvalues,
                               gs.hessian_eigs(CASE.model, CE, (X, Y), k=1, seed=0).eigenvalues)
    with pytest.raises(TypeError, match=r"on_output\('nope'\): the model's output has keys \['main', 'aux'\]"):
        gs.loss_surface(model, gs.losses.on_output("nope", CE), (X, Y), steps=3)


def test_on_output_selects_by_index_and_callable_and_keeps_reduction():
    out = (torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.5], [1.5]]))
    y = torch.tensor([0, 1])
    assert torch.equal(gs.losses.on_output(0, CE)(out, y), F.cross_entropy(out[0], y))
    per = gs.losses.on_output(lambda o: o[0], CE)(out, y, reduction="none")
    assert torch.equal(per, F.cross_entropy(out[0], y, reduction="none"))
    assert torch.equal(gs.losses.on_output(1, gs.losses.mse)(out, torch.ones(2, 1)), F.mse_loss(out[1], torch.ones(2, 1)))
    assert gs.losses.label_kind(gs.losses.on_output(1, CE)) == "class"
    with pytest.raises(TypeError, match="select must be a key"):
        gs.losses.on_output(1.5, CE)


def test_label_kinds_of_known_losses():
    kinds = {gs.losses.cross_entropy: "class", gs.losses.nll: "class", F.cross_entropy: "class",
             nn.CrossEntropyLoss(): "class", nn.NLLLoss(): "class", gs.losses.mse: "value", nn.MSELoss(): "value",
             (lambda o, y: o.sum()): None}
    for fn, kind in kinds.items():
        assert gs.losses.label_kind(fn) == kind


def test_ignore_index_labels_are_accepted_and_other_negatives_are_not():
    y = Y.clone()
    y[0] = -100  # torch's ignore_index: the example does not count
    gs.hessian_eigs(CASE.model, CE, (X, y), k=1, seed=0)
    loss = nn.CrossEntropyLoss(ignore_index=-1)
    y[0] = -1
    gs.hessian_eigs(CASE.model, loss, (X, y), k=1, seed=0)
    with pytest.raises(ValueError, match=r"found \[-1\]"):
        gs.hessian_eigs(CASE.model, CE, (X, y), k=1, seed=0)


def test_mse_labels_must_match_the_output():
    with pytest.raises(ValueError, match=r"mse compares each output with a label of the same size: the model gives 3 "
                                         r"value\(s\) per example, the labels have shape \(10,\) \(class indices\?"):
        gs.loss_surface(CASE.model, gs.losses.mse, (X, Y), steps=3)


def test_a_loss_of_your_own_that_fails_is_named():
    def my_loss(out, y):
        return F.cross_entropy(out, y[:, None])  # a bug of the caller's

    counting = CountingModule(CASE.model)
    with pytest.raises(ValueError, match=r"curvature: loss_fn my_loss failed on the model's output of shape \(10, 3\) and "
                                         r"labels of shape \(10,\) \(torch\.int64\): 0D or 1D target tensor expected"):
        gs.hessian_trace(counting, my_loss, (X, Y))
    assert counting.sizes == [10]


# ------------------------------------------------------------------------------------------ the rest of the list
def test_global_sensitivity_with_train_mode_dropout_is_one_clear_error():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).double().eval()
    model[2].train()
    counting = CountingModule(model)
    for order in (1, 2):
        with assert_model_unchanged(model), pytest.raises(
                ValueError, match=r"global_sensitivity: BatchNorm/Dropout in train mode \(inner\.2\).*model\.eval\(\)"):
            gs.global_sensitivity(counting, (torch.randn(5, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.long)),
                                  loss_fn=CE, order=order)
    assert counting.sizes == []


@pytest.mark.parametrize(
    ("inputs", "error", "message"),
    [
        ([], ValueError, r"inputs is an empty list: give at least one sentence"),
        ((), ValueError, r"inputs is an empty tuple"),
        ([1, 2], TypeError, r"inputs as a list must hold sentences \(str\); item 0 is a int.*tensor \(N, T\)"),
        (torch.zeros(0, 4, dtype=torch.long), ValueError, r"input_ids of shape \(0, 4\) hold no tokens"),
    ],
    ids=["empty-list", "empty-tuple", "ints", "no-rows"],
)
def test_attribute_tokens_says_what_is_wrong_with_the_inputs(inputs, error, message):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(error, match=message):
        gs.attribute_tokens(model, inputs)
    with pytest.raises(error, match=message):
        gs.attribute_tokens(model, inputs, target=0)


def test_attribute_tokens_without_a_target_says_so():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ValueError, match="target is required"):
        gs.attribute_tokens(model, torch.zeros(2, 3, dtype=torch.long))


def test_zoo_names_must_be_strings():
    with pytest.raises(TypeError, match=r"dataset name must be a str such as 'digits', got list \['digits'\] \(one "
                                        r"dataset at a time: dataset\('digits'\)\); available datasets:"):
        gs.zoo.dataset(["digits"])
    with pytest.raises(TypeError, match=r"model name must be a str such as 'digits-cnn', got list"):
        gs.zoo.load(["digits-cnn"])


def test_an_empty_dataloader_is_refused_by_iterate_itself():
    from gradsense.core.distributed import iterate

    batches = iterate(DataLoader(TensorDataset(X, Y), batch_size=64, drop_last=True))
    with pytest.raises(ValueError, match="yielded no batches"):
        next(batches)
