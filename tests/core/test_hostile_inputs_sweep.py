"""Hostile-input sweep over the public API: every mistake is one clear error, and the caller's model is untouched.

A new user's mistakes, run against every public entry point: wrong dtypes (float64 into a float32 model, integer
inputs), wrong shapes, empty data, NaN/Inf, labels out of range, of the wrong dtype, of the wrong length or missing,
data in forms the API does not take (generators, numpy arrays, dicts), models with no parameters or an output with
no obvious tensor, and bad argument values (``k=0``, ``steps=0``, ``sparsity=1.5``, misspelt method names,
``max_memory="bad"``, an ``out=``/``log_dir=`` that is an existing file).

Each case asserts the exception type (``ValueError``/``TypeError``, never an ``IndexError``/``RuntimeError`` from
inside torch), a fragment of the message (what was expected or what to do) and, with
:func:`helpers.assert_model_unchanged`, that the caller's model is bitwise as it was: parameters, buffers,
``requires_grad``, every module's train/eval flag, hooks and ``.grad``.

Found by this sweep and fixed (each a case below): labels out of range reached ``F.cross_entropy`` (``IndexError:
Target 10 is out of bounds``) in ``influence.scores``/``features``/``gradient_alignment``, ``privacy.audit``,
``privacy.client_gradient`` and ``privacy.reconstruct(labels=...)``, also for a label in a later batch of a Dataset;
out-of-range token ids in ``influence.scores`` gave ``IndexError: index out of range in self``; a model without
parameters gave a bare ``StopIteration`` in influence; ``importance(max_memory="bad")`` was accepted;
``attribute(titles=/feature_names=)`` of the wrong length were accepted (and failed later in a plot);
``Monitor(log_dir=<a file>)`` gave ``NotADirectoryError``, ``Monitor(loss_fn="ce")`` was accepted;
``Result.save(<a file>)`` gave ``FileExistsError``; ``InfluenceResult.top(0, k=-1)`` gave a torch
``RuntimeError``; ``audit(attacks="idlg")`` read the name letter by letter (``unknown attack 'i'``), and
``attack_options`` with an unknown option failed after the audit had started; heldout data of the wrong shape failed
inside the audit's fine-tune; integer inputs into a float model named torch's ``mat1 and mat2`` rather than the two
dtypes; misspelt method names gave the list but not the closest name.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradsense as gs
from helpers import assert_model_unchanged

CE = gs.losses.cross_entropy


class MLP(nn.Module):
    """4 -> 8 -> 3 float32 classifier with a Dropout (eval mode), one frozen bias, a hook and a ``.grad`` set."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


class TwoOutputs(MLP):
    """Returns a dict without ``logits``: no obvious tensor to score."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": super().forward(x), "b": x}


class NoParams(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x[:, :3]


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids).mean(1))


def _prepared(model: nn.Module) -> nn.Module:
    model.eval()
    params = list(model.parameters())
    if params:  # what a caller may have on its model, and expects to find again
        params[-1].requires_grad_(False)
        params[0].grad = torch.full_like(params[0], 0.5)
    model.register_forward_hook(lambda *a: None)
    return model


g = torch.Generator().manual_seed(0)
X = torch.randn(8, 4, generator=g)
Y = torch.randint(0, 3, (8,), generator=g)
XQ, YQ = X[:2], Y[:2]
IDS = torch.randint(0, 20, (4, 7), generator=g)
IDS_Y = torch.tensor([0, 1, 2, 1])

# ------------------------------------------------------------------------------ every loss-based entry point
LOSS_ENTRY = {
    "hessian_eigs": lambda m, d, loss=CE: gs.hessian_eigs(m, loss, d, k=1, seed=0, max_hvp=10),
    "hessian_trace": lambda m, d, loss=CE: gs.hessian_trace(m, loss, d, rtol=0.5, seed=0, max_hvp=8),
    "spectral_density": lambda m, d, loss=CE: gs.spectral_density(m, loss, d, steps=3, probes=1, seed=0),
    "loss_surface": lambda m, d, loss=CE: gs.loss_surface(m, loss, d, steps=2, seed=0),
    "interpolate": lambda m, d, loss=CE: gs.interpolate(m, copy.deepcopy(m), loss, d, steps=2),
    "sharpness": lambda m, d, loss=CE: gs.sharpness(m, loss, d, seed=0),
    "importance": lambda m, d, loss=CE: gs.importance(m, loss, d, method="taylor"),
    "global_sensitivity": lambda m, d, loss=CE: gs.global_sensitivity(m, d, loss_fn=loss),
    "influence.scores-train": lambda m, d, loss=CE: gs.influence.scores(m, loss, d, (XQ, YQ)),
    "influence.scores-query": lambda m, d, loss=CE: gs.influence.scores(m, loss, (X, Y), d),
    "influence.features": lambda m, d, loss=CE: gs.influence.features(m, loss, d, proj_dim=4),
    "gradient_alignment": lambda m, d, loss=CE: gs.gradient_alignment(m, loss, {"a": d, "b": (X, Y)}),
    "privacy.audit": lambda m, d, loss=CE: gs.privacy.audit(m, loss, d, attacks=("idlg",), defenses=("none",),
                                                            batch_sizes=(1,), finetune_steps=1),
}

# name: (model factory, data, error, message) - the message alternatives cover each analysis' own wording
BAD_DATA = {
    "float64-into-float32": (MLP, (X.double(), Y), TypeError,
                             r"inputs are torch\.float64 but the model's parameters are torch\.float32"),
    "integer-inputs": (MLP, (X.long(), Y), TypeError,
                       r"(inputs are torch\.int64 \(integers\) but the model's parameters are torch\.float32"
                       r"|dtype torch\.int64, but gradients need floating-point inputs)"),
    "wrong-shape": (MLP, (torch.randn(8, 5), Y), ValueError, r"the model failed on inputs of shape \(8, 5\)"),
    "empty": (MLP, (X[:0], Y[:0]), ValueError, r"empty"),
    "nan": (MLP, (X.masked_fill(X > 1, float("nan")), Y), ValueError, r"NaN/Inf"),
    "inf": (MLP, (X.masked_fill(X > 1, float("inf")), Y), ValueError, r"NaN/Inf"),
    "label-too-large": (MLP, (X, torch.where(Y == 0, 10, Y)), ValueError,
                        r"labels out of range for a model with 3 outputs: found \[10\]; valid class indices are 0\.\.2"),
    "label-negative": (MLP, (X, torch.where(Y == 0, -1, Y)), ValueError, r"labels out of range .* found \[-1\]"),
    "label-out-of-range-in-the-last-example": (
        MLP, TensorDataset(X, torch.cat([Y[:-1], torch.tensor([7])])), ValueError, r"labels out of range .* \[7\]"),
    "float-labels": (MLP, (X, Y.float()), ValueError, r"needs integer class indices .*labels\.long\(\)"),
    "labels-of-another-length": (MLP, (X, Y[:5]), ValueError, r"8 inputs but 5 labels"),
    "labels-missing": (MLP, X, ValueError, r"(needs labels|has no labels|needs labelled data)"),
    "generator": (MLP, ((X[i : i + 2], Y[i : i + 2]) for i in range(0, 8, 2)), TypeError,
                  r"data must be a tensor, an \(inputs, labels\) pair, a Dataset or a DataLoader; got generator"),
    "numpy": (MLP, (X.numpy(), Y.numpy()), TypeError, r"two tensors; got 2 items of types \['ndarray', 'ndarray'\]"),
    "list-of-pairs": (MLP, [(X[i], Y[i]) for i in range(8)], TypeError, r"must be \(inputs, labels\), two tensors"),
    "dict": (MLP, {"x": X, "y": Y}, TypeError, r"got dict"),
    "none": (MLP, None, (TypeError, ValueError), r"(got NoneType|needs calibration data \(data=None given\))"),
    "output-without-an-obvious-tensor": (TwoOutputs, (X, Y), TypeError,
                                         r"no 'logits'.*gs\.losses\.on_output\('a'"),
    "nan-in-the-weights": (lambda: _nan_weights(MLP()), (X, Y), ValueError, r"the loss is nan on the first examples"),
    "model-without-parameters": (NoParams, (X, Y), ValueError,
                                 r"(selects no parameter|has no parameters|no Linear/Conv weight|found none)"),
}
def _nan_weights(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")  # a diverged checkpoint
    return model


# DataLoaders are read by index in influence (which needs a fixed order), so drop_last does not empty them there
EMPTY_LOADER = DataLoader(TensorDataset(X, Y), batch_size=16, drop_last=True)


def _fresh_data(data):
    if isinstance(data, type(i for i in ())):  # a generator is spent once used: rebuild it
        return ((X[i : i + 2], Y[i : i + 2]) for i in range(0, 8, 2))
    return data


@pytest.mark.parametrize("bad", list(BAD_DATA))
@pytest.mark.parametrize("entry", list(LOSS_ENTRY))
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bad_data_is_one_clear_error_and_the_model_is_untouched(entry, bad):
    make, data, error, message = BAD_DATA[bad]
    if bad == "model-without-parameters" and entry == "global_sensitivity":
        pytest.skip("input sensitivity needs no parameters: the model is valid there")
    if bad == "nan-in-the-weights" and entry in ("global_sensitivity", "importance", "privacy.audit"):
        pytest.skip("checked on its own path (NaN maps and scores are reported, not refused)")
    model = _prepared(make())
    if bad == "nan-in-the-weights":  # NaN != NaN: compare the values with equal_nan instead of the bitwise snapshot
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(error, match=message):
            LOSS_ENTRY[entry](model, _fresh_data(data))
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)
        return
    with assert_model_unchanged(model), pytest.raises(error, match=message):
        LOSS_ENTRY[entry](model, _fresh_data(data))


@pytest.mark.parametrize("entry", [e for e in LOSS_ENTRY if not e.startswith(("influence", "gradient"))])
def test_a_dataloader_that_yields_nothing_is_one_clear_error(entry):
    model = _prepared(MLP())
    with assert_model_unchanged(model), pytest.raises(ValueError, match=r"yielded no batches.*drop_last"):
        LOSS_ENTRY[entry](model, EMPTY_LOADER)


@pytest.mark.parametrize("entry", list(LOSS_ENTRY))
def test_a_loss_that_is_not_callable_is_refused(entry):
    model = _prepared(MLP())
    with assert_model_unchanged(model), pytest.raises(TypeError, match=r"loss_fn must be (a )?callable"):
        LOSS_ENTRY[entry](model, (X, Y), loss="cross_entropy")


@pytest.mark.parametrize("entry", ["hessian_eigs", "importance", "influence.scores-train", "loss_surface"])
def test_token_ids_out_of_the_embedding_are_one_clear_error(entry):
    model = _prepared(Tokens())
    with assert_model_unchanged(model), pytest.raises(ValueError, match=r"model failed on inputs of shape \(4, 7\)"
                                                      r" \(torch\.int64\): index out of range"):
        LOSS_ENTRY[entry](model, (IDS + 30, IDS_Y))


@pytest.mark.parametrize("entry", ["hessian_eigs", "influence.scores-train", "privacy.audit"])
def test_train_mode_dropout_in_a_submodule_is_named(entry):
    model = _prepared(MLP())
    model.drop.train()  # the root in eval mode, one submodule back in train mode
    if entry == "privacy.audit":  # the audit attacks a training client: only DP needs eval-mode layers
        call = lambda: gs.privacy.audit(model, CE, (X, Y), attacks=("idlg",), defenses=("dp",), batch_sizes=(1,))  # noqa: E731
    else:
        call = lambda: LOSS_ENTRY[entry](model, (X, Y))  # noqa: E731
    with assert_model_unchanged(model), pytest.raises(ValueError, match=r"(BatchNorm/Dropout in train mode \(drop\)"
                                                      r"|has drop in train mode)"):
        call()


# ------------------------------------------------------------------------------ bad argument values
def _imp(m):
    return gs.importance(m, CE, (X, Y), method="magnitude")


def _scores(m):
    return gs.influence.scores(m, CE, (X, Y), (XQ, YQ))


BAD_ARGS = {
    # attribution
    "attribute-method-misspelt": (lambda m: gs.attribute(m, X, target=0, method="integrated_gradient"), ValueError,
                                  r"unknown attribution method 'integrated_gradient'.*Did you mean 'integrated_gradients'\?"),
    "attribute-method-not-a-string": (lambda m: gs.attribute(m, X, target=0, method=3), TypeError, r"method must be a name"),
    "attribute-steps-0": (lambda m: gs.attribute(m, X, target=0, method="integrated_gradients", steps=0), ValueError,
                          r"steps must be >= 1, got 0"),
    "attribute-steps-float": (lambda m: gs.attribute(m, X, target=0, method="integrated_gradients", steps=2.5),
                              TypeError, r"steps must be an int >= 1, got float 2\.5"),
    "attribute-n-samples-0": (lambda m: gs.attribute(m, X, target=0, method="smoothgrad", n_samples=0), ValueError,
                              r"n_samples must be >= 1"),
    "attribute-option-misspelt": (lambda m: gs.attribute(m, X, target=0, method="integrated_gradients",
                                                         baselines=torch.zeros(1, 4)), ValueError,
                                  r"does not take option\(s\) \['baselines'\]; it takes \[.*'baseline'"),
    "attribute-target-out-of-range": (lambda m: gs.attribute(m, X, target=10), ValueError,
                                      r"target class index out of range: \[10\] for a model with 3 outputs"),
    "attribute-target-negative": (lambda m: gs.attribute(m, X, target=-1), ValueError, r"out of range: \[-1\]"),
    "attribute-target-float": (lambda m: gs.attribute(m, X, target=1.5), TypeError, r"target of type float"),
    "attribute-target-float-tensor": (lambda m: gs.attribute(m, X, target=Y.float()), TypeError,
                                      r"class indices must be integers, got dtype torch\.float32"),
    "attribute-target-wrong-length": (lambda m: gs.attribute(m, X, target=Y[:3]), ValueError,
                                      r"one class index per example \(8\), got shape \(3,\)"),
    "attribute-target-misspelt": (lambda m: gs.attribute(m, X, target="predicte"), ValueError,
                                  r"the only string accepted is 'predicted'"),
    "attribute-target-missing": (lambda m: gs.attribute(m, X, target=None), ValueError, r"target is required"),
    "attribute-inputs-list": (lambda m: gs.attribute(m, X.tolist(), target=0), TypeError,
                              r"inputs must be a torch\.Tensor .* got list"),
    "attribute-inputs-generator": (lambda m: gs.attribute(m, (x for x in X), target=0), TypeError, r"got generator"),
    "attribute-one-example-without-batch": (lambda m: gs.attribute(m, X[0], target=0), ValueError,
                                            r"batch dimension first.*x\.unsqueeze\(0\)"),
    "attribute-empty": (lambda m: gs.attribute(m, X[:0], target=0), ValueError, r"empty \(batch size 0\)"),
    "attribute-nan": (lambda m: gs.attribute(m, X.masked_fill(X > 1, float("nan")), target=0), ValueError, r"NaN/Inf"),
    "attribute-float64": (lambda m: gs.attribute(m, X.double(), target=0), TypeError,
                          r"inputs are torch\.float64 but the model's parameters are torch\.float32"),
    "attribute-integer-inputs": (lambda m: gs.attribute(m, X.long(), target=0), TypeError,
                                 r"gradients need floating-point inputs"),
    "attribute-max-memory-bad": (lambda m: gs.attribute(m, X, target=0, method="integrated_gradients",
                                                        max_memory="bad"), ValueError,
                                 r"max_memory='bad' not understood; use bytes or e\.g\. '512MB'"),
    "attribute-titles-wrong-length": (lambda m: gs.attribute(m, X, target=0, titles=["a"]), ValueError,
                                      r"titles has 1 names, but there are 8 examples"),
    "attribute-titles-a-string": (lambda m: gs.attribute(m, X, target=0, titles="abc"), TypeError,
                                  r"titles must be a list of 8 strings"),
    "attribute-feature-names-wrong-length": (lambda m: gs.attribute(m, X, target=0, feature_names=["a", "b"]),
                                             ValueError, r"feature_names has 2 names, but there are 4 features"),
    "attribute-layer-unknown": (lambda m: gs.attribute(m, X, target=0, method="grad_cam", layer="fc9"), ValueError,
                                r"layer 'fc9' is not a submodule of MLP"),
    "attribute-not-a-module": (lambda m: gs.attribute("model", X, target=0), TypeError,
                               r"model must be a torch\.nn\.Module, got str"),
    # evaluation
    "evaluate-metric-misspelt": (lambda m: gs.evaluate(m, X, torch.ones_like(X), target=0, metric="infidelty"),
                                 ValueError, r"unknown metric 'infidelty'.*Did you mean 'infidelity'\?"),
    "evaluate-maps-of-another-shape": (lambda m: gs.evaluate(m, X, torch.ones(8, 5), target=0, metric="infidelity"),
                                       ValueError, r"attributions have shape \(8, 5\) but the inputs have shape \(8, 4\)"),
    "evaluate-maps-nan": (lambda m: gs.evaluate(m, X, torch.full_like(X, float("nan")), target=0, metric="infidelity"),
                          ValueError, r"attributions contain 32 NaN/Inf"),
    "evaluate-float64": (lambda m: gs.evaluate(m, X.double(), torch.ones_like(X).double(), target=0,
                                               metric="infidelity"), TypeError, r"inputs are torch\.float64"),
    "evaluate-wrong-shape": (lambda m: gs.evaluate(m, torch.randn(8, 5), torch.ones(8, 5), target=0,
                                                   metric="infidelity"), ValueError, r"inputs of shape \(8, 5\)"),
    "evaluate-n-perturbations-0": (lambda m: gs.evaluate(m, X, torch.ones_like(X), target=0, metric="infidelity",
                                                         n_perturbations=0), ValueError, r"n_perturbations must be >= 1"),
    "evaluate-explainer-misspelt": (lambda m: gs.evaluate(m, X, None, target=0, metric="randomization",
                                                          explainer="salency"), ValueError, r"Did you mean 'saliency'\?"),
    "global-sensitivity-target-and-loss": (lambda m: gs.global_sensitivity(m, (X, Y), loss_fn=CE, target=0),
                                           ValueError, r"give exactly one of target="),
    "global-sensitivity-order-4": (lambda m: gs.global_sensitivity(m, (X, Y), loss_fn=CE, order=4), ValueError,
                                   r"order must be 1, 2 or 3"),
    "global-sensitivity-feature-names": (lambda m: gs.global_sensitivity(m, (X, Y), loss_fn=CE, feature_names=["a"]),
                                         ValueError, r"feature_names has 1 names for 4 input variables"),
    "global-sensitivity-batch-size-0": (lambda m: gs.global_sensitivity(m, (X, Y), loss_fn=CE, batch_size=0),
                                        ValueError, r"batch_size must be >= 1"),
    # curvature
    "eigs-k-0": (lambda m: gs.hessian_eigs(m, CE, (X, Y), k=0), ValueError, r"k must be a positive int, got 0"),
    "eigs-k-negative": (lambda m: gs.hessian_eigs(m, CE, (X, Y), k=-1), ValueError, r"k must be a positive int"),
    "eigs-k-more-than-parameters": (lambda m: gs.hessian_eigs(m, CE, (X, Y), k=1000), ValueError,
                                    r"k=1000 asks for 1000 eigenpairs .* use k <= "),
    "eigs-tol-negative": (lambda m: gs.hessian_eigs(m, CE, (X, Y), tol=-1), ValueError, r"tol must be"),
    "eigs-tol-nan": (lambda m: gs.hessian_eigs(m, CE, (X, Y), tol=float("nan")), ValueError, r"tol must be"),
    "eigs-which-misspelt": (lambda m: gs.hessian_eigs(m, CE, (X, Y), which="larget"), ValueError,
                            r"which must be 'largest', 'smallest' or 'both'"),
    "eigs-kind-misspelt": (lambda m: gs.hessian_eigs(m, CE, (X, Y), kind="hesian"), ValueError,
                           r"kind must be 'hessian', 'ggn' or 'fisher'"),
    "eigs-params-unknown": (lambda m: gs.hessian_eigs(m, CE, (X, Y), params=["nope"]), ValueError,
                            r"no parameter or module named 'nope'"),
    "eigs-seed-string": (lambda m: gs.hessian_eigs(m, CE, (X, Y), seed="a"), TypeError, r"seed must be an int"),
    "eigs-batch-size-0": (lambda m: gs.hessian_eigs(m, CE, (X, Y), batch_size=0), ValueError, r"batch_size must be"),
    "trace-rtol-0": (lambda m: gs.hessian_trace(m, CE, (X, Y), rtol=0), ValueError, r"rtol must be a positive number"),
    "trace-method-misspelt": (lambda m: gs.hessian_trace(m, CE, (X, Y), method="hutchpp"), ValueError,
                              r"method must be 'hutch\+\+' or 'hutchinson'"),
    "density-steps-0": (lambda m: gs.spectral_density(m, CE, (X, Y), steps=0), ValueError, r"steps must be a positive"),
    "density-sigma-negative": (lambda m: gs.spectral_density(m, CE, (X, Y), sigma=-1.0), ValueError, r"sigma must be"),
    "density-max-memory-bad": (lambda m: gs.spectral_density(m, CE, (X, Y), max_memory="bad"), ValueError,
                               r"max_memory='bad' not understood"),
    "density-max-memory-negative": (lambda m: gs.spectral_density(m, CE, (X, Y), max_memory=-5), ValueError,
                                    r"max_memory must be positive"),
    # landscape
    "surface-steps-0": (lambda m: gs.loss_surface(m, CE, (X, Y), steps=0), ValueError, r"steps must be >= 2"),
    "surface-steps-1": (lambda m: gs.loss_surface(m, CE, (X, Y), steps=1), ValueError, r"a line needs two points"),
    "surface-span-nan": (lambda m: gs.loss_surface(m, CE, (X, Y), span=float("nan")), ValueError, r"span must be"),
    "surface-directions-misspelt": (lambda m: gs.loss_surface(m, CE, (X, Y), directions="filtr"), ValueError,
                                    r"directions must be 'filter', 'layer', 'hessian'"),
    "surface-dims-3": (lambda m: gs.loss_surface(m, CE, (X, Y), dims=3), ValueError, r"dims must be 1 or 2"),
    "surface-max-memory-bad": (lambda m: gs.loss_surface(m, CE, (X, Y), max_memory="bad"), ValueError,
                               r"max_memory='bad'"),
    "surface-chunk-size-0": (lambda m: gs.loss_surface(m, CE, (X, Y), chunk_size=0), ValueError, r"chunk_size must"),
    "interpolate-other-architecture": (lambda m: gs.interpolate(m, nn.Linear(4, 3), CE, (X, Y), steps=2), ValueError,
                                       r"different architectures"),
    "interpolate-start-after-end": (lambda m: gs.interpolate(m, copy.deepcopy(m), CE, (X, Y), start=1, end=0),
                                    ValueError, r"end must be greater than start"),
    "sharpness-rho-0": (lambda m: gs.sharpness(m, CE, (X, Y), rho=0), ValueError, r"rho must be a positive"),
    "sharpness-kind-misspelt": (lambda m: gs.sharpness(m, CE, (X, Y), kind="samm"), ValueError, r"kind must be one of"),
    "sharpness-n-samples-0": (lambda m: gs.sharpness(m, CE, (X, Y), kind="average", n_samples=0), ValueError,
                              r"n_samples must be an int >= 2"),
    # importance
    "importance-method-misspelt": (lambda m: gs.importance(m, CE, (X, Y), method="taylr"), ValueError,
                                   r"unknown method 'taylr'.*Did you mean 'taylor'\?"),
    "importance-granularity-misspelt": (lambda m: gs.importance(m, CE, (X, Y), method="taylor", granularity="chanel"),
                                        ValueError, r"granularity must be one of .*Did you mean 'channel'\?"),
    "importance-unknown-option": (lambda m: gs.importance(m, CE, (X, Y), method="taylor", foo=1), TypeError,
                                  r"unknown option\(s\) \['foo'\]"),
    "importance-max-memory-bad": (lambda m: gs.importance(m, CE, (X, Y), method="taylor", max_memory="bad"),
                                  ValueError, r"max_memory='bad' not understood"),
    "prune-sparsity-1.5": (lambda m: _imp(m).prune(1.5), ValueError, r"sparsity must be in \[0, 1\).*got 1\.5"),
    "prune-sparsity-negative": (lambda m: _imp(m).prune(-0.1), ValueError, r"sparsity must be in \[0, 1\)"),
    "prune-sparsity-nan": (lambda m: _imp(m).prune(float("nan")), ValueError, r"sparsity must be in \[0, 1\)"),
    "prune-sparsity-string": (lambda m: _imp(m).prune("0.5"), TypeError, r"sparsity must be a number"),
    "prune-sparsity-missing": (lambda m: _imp(m).prune(), TypeError, r"needs a sparsity in \[0, 1\)"),
    "prune-structure-misspelt": (lambda m: _imp(m).prune(0.5, structure="chanel"), ValueError,
                                 r"structure must be 'unstructured', 'N:M'"),
    "prune-n-m-contradicts-sparsity": (lambda m: _imp(m).prune(0.5, structure="2:5"), ValueError,
                                       r"sparsity=0\.5 contradicts it"),
    "prune-scope-misspelt": (lambda m: _imp(m).prune(0.5, scope="globl"), ValueError, r"scope must be 'global'"),
    "bits-0": (lambda m: _imp(m).allocate_bits(0), ValueError, r"mean_bits=0 is outside the choices"),
    "bits-string": (lambda m: _imp(m).allocate_bits("4"), TypeError, r"mean_bits must be a number"),
    "bits-no-choices": (lambda m: _imp(m).allocate_bits(4, choices=()), TypeError, r"choices must be a non-empty"),
    # influence
    "influence-method-misspelt": (lambda m: gs.influence.scores(m, CE, (X, Y), (XQ, YQ), method="ekfacc"), ValueError,
                                  r"unknown method 'ekfacc'.*Did you mean 'ekfac'\?"),
    "influence-proj-dim-0": (lambda m: gs.influence.scores(m, CE, (X, Y), (XQ, YQ), proj_dim=0), ValueError,
                             r"proj_dim must be >= 1"),
    "influence-shuffling-loader": (lambda m: gs.influence.scores(m, CE, DataLoader(TensorDataset(X, Y), shuffle=True),
                                                                  (XQ, YQ)), ValueError, r"no fixed order"),
    "influence-top-k-negative": (lambda m: _scores(m).top(0, k=-1), ValueError, r"k must be >= 1, got -1"),
    "influence-top-k-0": (lambda m: _scores(m).bottom(0, k=0), ValueError, r"k must be >= 1, got 0"),
    "features-projection-misspelt": (lambda m: gs.influence.features(m, CE, (X, Y), projection="dens"), ValueError,
                                     r"projection must be 'dense' or 'kronecker'"),
    # privacy
    "reconstruct-attack-misspelt": (lambda m: gs.privacy.reconstruct(m, CE, {}, attack="dlgg"), ValueError,
                                    r"unknown attack 'dlgg'.*Did you mean 'dlg'\?"),
    "reconstruct-labels-out-of-range": (
        lambda m: gs.privacy.reconstruct(m, CE, gs.privacy.client_gradient(m, CE, X[:1], Y[:1]), attack="inverting",
                                         steps=1, input_shape=(4,), labels=torch.tensor([10])),
        ValueError, r"reconstruct: labels out of range for a model with 3 outputs: found \[10\]"),
    "client-gradient-labels-out-of-range": (lambda m: gs.privacy.client_gradient(m, CE, X[:2], torch.tensor([0, 3])),
                                            ValueError, r"client_gradient: labels out of range .* found \[3\]"),
    "client-gradient-wrong-shape": (lambda m: gs.privacy.client_gradient(m, CE, torch.randn(2, 5), Y[:2]), ValueError,
                                    r"client_gradient: the model failed on inputs of shape \(2, 5\)"),
    "audit-attack-misspelt": (lambda m: gs.privacy.audit(m, CE, (X, Y), attacks=("idlgg",)), ValueError,
                              r"unknown attack 'idlgg'.*Did you mean 'idlg'\?"),
    "audit-defence-misspelt": (lambda m: gs.privacy.audit(m, CE, (X, Y), attacks=("idlg",), defenses=("dpp",)),
                               ValueError, r"unknown defence 'dpp'.*Did you mean 'dp'\?"),
    "audit-batch-size-0": (lambda m: gs.privacy.audit(m, CE, (X, Y), attacks=("idlg",), batch_sizes=(0,)), ValueError,
                           r"batch_sizes entry must be >= 1"),
    "audit-batch-larger-than-data": (lambda m: gs.privacy.audit(m, CE, (X, Y), attacks=("idlg",), batch_sizes=(100,)),
                                     ValueError, r"data holds 8 examples; 1 batch\(es\) of 100 need 100"),
    "audit-unknown-attack-option": (lambda m: gs.privacy.audit(m, CE, (X, Y), attacks=("idlg",), defenses=("none",),
                                                               batch_sizes=(1,), attack_options={"idlg": {"stps": 3}}),
                                    TypeError, r"attack_options\['idlg'\] has unknown option\(s\) \['stps'\] Did you mean 'steps'\?"),
    "audit-heldout-of-another-shape": (lambda m: gs.privacy.audit(m, CE, (X, Y), attacks=("idlg",), defenses=("none",),
                                                                  batch_sizes=(1,), heldout=(torch.randn(4, 5), Y[:4])),
                                       ValueError, r"audit \(heldout\): the model failed on inputs of shape \(4, 5\)"),
    "audit-defence-value-out-of-range": (lambda m: gs.privacy.audit(m, CE, (X, Y), attacks=("idlg",),
                                                                    defenses=("prune:2",)), ValueError,
                                         r"cannot read defence 'prune:2': Prune\.keep must be in \(0, 1\], got 2\.0\.$"),
    # monitor
    "monitor-quantities-misspelt": (lambda m: gs.monitor.Monitor(m, quantities="standrd"), ValueError,
                                    r"Did you mean 'standard'\?"),
    "monitor-quantity-misspelt": (lambda m: gs.monitor.Monitor(m, quantities=["grad_norn"]), ValueError,
                                  r"unknown quantities \['grad_norn'\].*Did you mean 'grad_norm'\?"),
    "monitor-every-0": (lambda m: gs.monitor.Monitor(m, every=0), ValueError, r"every must be >= 1"),
    "monitor-optimizer-string": (lambda m: gs.monitor.Monitor(m, optimizer="adam"), TypeError,
                                 r"optimizer must be a torch\.optim\.Optimizer"),
    "monitor-max-memory-bad": (lambda m: gs.monitor.Monitor(m, max_memory="bad"), ValueError, r"max_memory='bad'"),
    "monitor-loss-fn-string": (lambda m: gs.monitor.Monitor(m, loss_fn="ce"), TypeError, r"loss_fn must be callable"),
    "monitor-held-out-without-labels": (lambda m: gs.monitor.Monitor(m, loss_fn=CE, held_out=X,
                                                                     quantities=["grad_norm", "curvature"]),
                                        ValueError, r"held_out holds inputs only"),
    "monitor-not-a-module": (lambda m: gs.monitor.Monitor("model"), TypeError, r"model must be a torch\.nn\.Module"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bad_arguments_are_one_clear_error_and_the_model_is_untouched(case):
    call, error, message = BAD_ARGS[case]
    model = _prepared(MLP())
    with assert_model_unchanged(model), pytest.raises(error, match=message):
        call(model)


def test_an_audit_given_one_attack_name_runs_that_attack():
    model = _prepared(MLP())
    with assert_model_unchanged(model):
        res = gs.privacy.audit(model, CE, (X, Y), attacks="idlg", defenses="none", batch_sizes=1, finetune_steps=1)
    assert {row["attack"] for row in res.rows} == {"idlg"}


def test_a_file_where_a_folder_is_needed_is_one_clear_error(tmp_path):
    a_file = tmp_path / "taken.bin"
    a_file.write_bytes(b"not a folder")
    model = _prepared(MLP())
    res = gs.attribute(model, X, target=0)
    with pytest.raises(ValueError, match=re.escape(f"directory='{a_file}' is a file, not a folder")):
        res.save(a_file)
    with pytest.raises(ValueError, match=r"lies inside .*taken\.bin, which is a file"):
        res.save(a_file / "run")
    with assert_model_unchanged(model), pytest.raises(ValueError, match=r"log_dir=.* is a file, not a folder"):
        gs.monitor.Monitor(model, torch.optim.SGD(model.parameters(), lr=0.1), log_dir=a_file)
    with assert_model_unchanged(model), pytest.raises(ValueError, match=r"exists and is not a folder"):
        gs.influence.features(model, CE, (X, Y), out=a_file)
    assert a_file.read_bytes() == b"not a folder"


@pytest.mark.parametrize("size", ["8GB", "512 MB", "2GiB", 10**9])
def test_memory_budgets_as_sizes_are_accepted(size):
    model = _prepared(MLP())
    with assert_model_unchanged(model):
        res = gs.loss_surface(model, CE, (X, Y), steps=2, seed=0, max_memory=size)
    full = gs.loss_surface(model, CE, (X, Y), steps=2, seed=0)
    torch.testing.assert_close(res.tensors["losses"], full.tensors["losses"], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["tuple", "dict", "model-output"])
@pytest.mark.parametrize("entry", ["influence.scores-train", "privacy.audit", "gradient_alignment"])
def test_tuple_dict_and_model_outputs_are_scored_like_the_logits(entry, kind):
    from transformers.modeling_outputs import SequenceClassifierOutput

    wrap = {"tuple": lambda o: (o, o.sum()), "dict": lambda o: {"logits": o, "h": o},
            "model-output": lambda o: SequenceClassifierOutput(logits=o)}[kind]

    class Wrapped(MLP):
        def forward(self, x):
            return wrap(super().forward(x))

    plain, wrapped = _prepared(MLP()), _prepared(Wrapped())
    wrapped.load_state_dict(plain.state_dict())
    with assert_model_unchanged(wrapped):
        got = LOSS_ENTRY[entry](wrapped, (X, Y))
    want = LOSS_ENTRY[entry](plain, (X, Y))
    for name, t in want.tensors.items():
        torch.testing.assert_close(got.tensors[name], t, rtol=0, atol=0, equal_nan=True, msg=name)


def test_suggestions_name_the_closest_choice_and_nothing_when_none_is_close():
    from gradsense.core.checks import check_choice, suggest

    assert suggest("integrated_gradient", ["saliency", "integrated_gradients"]) == " Did you mean 'integrated_gradients'?"
    assert suggest("Integrated-Gradients", ["integrated_gradients"]) == " Did you mean 'integrated_gradients'?"
    assert suggest("integ", ["saliency", "integrated_gradients"]) == " Did you mean 'integrated_gradients'?"
    assert suggest("xyz", ["saliency", "integrated_gradients"]) == ""
    assert suggest(3, ["a"]) == ""
    assert check_choice("a", ["a", "b"], "kind") == "a"
    with pytest.raises(ValueError, match=r"kind must be one of \['a', 'bb'\], got \['x'\]\.$"):
        check_choice(["x"], ["a", "bb"], "kind")  # unhashable: still one clear error


def test_label_checks_leave_the_global_rng_and_train_mode_statistics_alone():
    from gradsense.core.checks import check_module_batch

    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 3)).train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with assert_model_unchanged(model):
        check_module_batch(model, CE, X, Y, what="probe")
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    assert F.softmax(model.eval()(X), dim=1).shape == (8, 3)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: gs.load_model("zoo:digits-cnn", weights=123), TypeError, r"weights must be a file path .* got int"),
        (lambda: gs.load_model(None), ValueError, r"model spec must be a non-empty string"),
        (lambda: gs.load_data(123), ValueError, r"data spec must be 'zoo:NAME'.*got 123"),
        (lambda: gs.load_data("zoo:digits", limit=0), ValueError, r"limit must be a positive int, got 0"),
        (lambda: gs.load_data("zoo:digits", split="val"), ValueError, r"split must be .train. or .test., got .val."),
    ],
    ids=["weights-not-a-path", "model-spec-none", "data-spec-int", "limit-0", "split-val"],
)
def test_loading_mistakes_are_one_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("text", ["3,x,4", "3,,4", "3,16,", "3;16;16", "3,16.5,16", "3,0,16"])
def test_an_input_shape_with_a_typo_is_refused_not_shortened(text):
    from gradsense.io.data import parse_shape

    with pytest.raises(ValueError, match=r"input shape must be positive integers like 3,32,32; got"):
        parse_shape(text)
    assert parse_shape(" 3x16x16 ") == parse_shape("3,16,16") == parse_shape([3, 16, 16]) == (3, 16, 16)
