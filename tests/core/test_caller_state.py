"""Regression and audit: no public entry point changes the caller's model, in any train/eval mix, even when it raises.

Found moving the caller's state, each reproduced here first:

- ``gs.interpolate(a, b, ..., allow_train_mode=True)`` moved the BatchNorm running statistics of *both* models:
  the endpoint states held ``buffer.detach()``, which shares the caller's storage;
- ``ImportanceResult.prune(...)`` / ``.allocate_bits(...)`` with ``heldout=`` after the caller switched the model
  to ``train()`` moved the running statistics, then failed with a raw functorch error ("in-place operation that
  would mutate a captured Tensor");
- ``gs.importance`` looked at the root's train flag only: ``model.eval(); model.drop.train()`` scored silently.

The oracle is a bitwise snapshot of the model (:func:`helpers.assert_model_unchanged`: parameter and buffer
values, ``requires_grad``, every module's ``training`` flag, every hook dict, ``.grad``), taken around every
public entry point on a model with BatchNorm and Dropout in four train/eval mixes, with a frozen parameter, a
caller's hook and a ``.grad`` already set - for calls that succeed and for calls that raise.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradsense as gs
from gradsense.core.functional import functional, training_stochastic_layers
from helpers import assert_model_unchanged

CE = gs.losses.cross_entropy


class Net(nn.Module):
    """conv -> BatchNorm -> softplus -> Dropout -> linear on (N, 1, 5, 5), float64, with trained statistics."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(18, 3)
        self.double()
        with torch.no_grad():
            self.train()
            for _ in range(3):
                self(torch.randn(8, 1, 5, 5, dtype=torch.float64) + 0.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(F.softplus(self.bn(self.conv(x)))).flatten(1))


def _data(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _model(mode: str) -> Net:
    m = Net()
    if mode == "dropout-train":  # root in eval mode, one Dropout back in train mode
        m.drop.train()
    elif mode == "bn-train":
        m.bn.train()
    elif mode == "root-train-leaves-eval":  # train flags set, but no BatchNorm/Dropout in train mode
        m.train()
        m.bn.eval()
        m.drop.eval()
    # what a caller may have on its model, and expects to find again
    m.conv.bias.requires_grad_(False)
    m.fc.weight.grad = torch.full_like(m.fc.weight, 0.25)
    m.fc.register_forward_hook(lambda *a: None)
    return m


X, Y = _data()
HELD = _data(6, seed=2)

# deterministic analyses refuse BatchNorm/Dropout in train mode; attribution (and the metrics that run it) may run them
ENTRY_POINTS = {
    "attribute-saliency": lambda m: gs.attribute(m, X, target=Y, method="saliency"),
    "attribute-ig": lambda m: gs.attribute(m, X, target="predicted", method="integrated_gradients", steps=4),
    "attribute-smoothgrad": lambda m: gs.attribute(m, X, target=Y, method="smoothgrad", n_samples=3, seed=0),
    "attribute-gradcam": lambda m: gs.attribute(m, X, target=Y, method="grad_cam"),
    "attribute-loss-target": lambda m: gs.attribute(m, X, target=gs.targets.Loss(CE, Y), method="saliency"),
    "evaluate-infidelity": lambda m: gs.evaluate(m, X, torch.ones_like(X), target=Y, metric="infidelity",
                                                 n_perturbations=4),
    "evaluate-deletion": lambda m: gs.evaluate(m, X, torch.rand_like(X), target=Y, metric="deletion", steps=4),
    "evaluate-taylor": lambda m: gs.evaluate(m, X, None, target=Y, metric="taylor", n_directions=2),
    "evaluate-randomization": lambda m: gs.evaluate(m, X, None, target=Y, metric="randomization",
                                                    explainer="saliency"),
    "global-sensitivity": lambda m: gs.global_sensitivity(m, (X, Y), loss_fn=CE, order=2),
    "importance-taylor": lambda m: gs.importance(m, CE, (X, Y), method="taylor"),
    "importance-prune": lambda m: gs.importance(m, CE, (X, Y), method="fisher", heldout=HELD).prune(0.3),
    "importance-bits": lambda m: gs.importance(m, CE, (X, Y), method="fisher", heldout=HELD).allocate_bits(4),
    "importance-hessian": lambda m: gs.importance(m, CE, (X, Y), method="hessian", probes=2, max_hvp=8),
    "importance-sweep": lambda m: gs.importance.sweep(m, CE, (X, Y), HELD, methods=["magnitude", "taylor"],
                                                      sparsities=[0.5]),
    "importance-measure": lambda m: gs.importance.measure(m, CE, HELD, {"fc.weight": torch.rand(3, 18) > 0.5}),
    "importance-apply": lambda m: gs.importance.apply(m, {"fc.weight": torch.rand(3, 18) > 0.5})(X),
    "hessian-eigs": lambda m: gs.hessian_eigs(m, CE, (X, Y), k=1, seed=0),
    "hessian-trace": lambda m: gs.hessian_trace(m, CE, (X, Y), rtol=0.5, seed=0),
    "spectral-density": lambda m: gs.spectral_density(m, CE, (X, Y), steps=4, probes=1, seed=0),
    "curvature-operator": lambda m: gs.curvature.operator(m, CE, (X, Y)).matvec(
        torch.ones(sum(p.numel() for p in m.parameters() if p.requires_grad), dtype=torch.float64)),
    "loss-surface": lambda m: gs.loss_surface(m, CE, (X, Y), steps=3, seed=0),
    "interpolate": lambda m: gs.interpolate(m, copy.deepcopy(m), CE, (X, Y), steps=3),
    "sharpness-sam": lambda m: gs.sharpness(m, CE, (X, Y), kind="sam", seed=0),
    "sharpness-average": lambda m: gs.sharpness(m, CE, (X, Y), kind="average", n_samples=2, seed=0),
}
STOCHASTIC_OK = ({name for name in ENTRY_POINTS if name.startswith(("attribute", "evaluate"))} - {"evaluate-taylor"}) | {
    "importance-apply"}  # apply makes a copy in the same modes
MODES = ["eval", "dropout-train", "bn-train", "root-train-leaves-eval"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(ENTRY_POINTS))
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
def test_no_entry_point_changes_the_callers_model(name, mode):
    model = _model(mode)
    stochastic = bool(training_stochastic_layers(model))
    with assert_model_unchanged(model):
        if stochastic and name not in STOCHASTIC_OK:
            # refused before any work, naming the layer the root-only checks missed
            layer = "drop" if mode == "dropout-train" else "bn"
            with pytest.raises(ValueError, match=rf"BatchNorm/Dropout in train mode \({layer}\).*model\.eval\(\)"):
                ENTRY_POINTS[name](model)
        else:
            ENTRY_POINTS[name](model)


BAD_CALLS = {
    "attribute": lambda m: gs.attribute(m, X, target=7, method="integrated_gradients", steps=4),
    "evaluate": lambda m: gs.evaluate(m, X, torch.ones_like(X), target=9, metric="infidelity", n_perturbations=4),
    "importance": lambda m: gs.importance(m, CE, (X, Y + 3), method="taylor"),
    "hessian-eigs": lambda m: gs.hessian_eigs(m, CE, (X, Y - 1), k=1),
    "loss-surface": lambda m: gs.loss_surface(m, CE, (X.float(), Y), steps=3),
    "sharpness": lambda m: gs.sharpness(m, CE, X, kind="sam"),
    "global-sensitivity": lambda m: gs.global_sensitivity(m, (X.flatten(1), Y), loss_fn=CE),
}


@pytest.mark.parametrize("mode", ["eval", "root-train-leaves-eval"])
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_a_call_that_raises_leaves_the_model_unchanged(name, mode):
    model = _model(mode)
    with assert_model_unchanged(model), pytest.raises((ValueError, TypeError)):
        BAD_CALLS[name](model)


def test_a_forward_that_fails_midway_leaves_a_train_mode_model_unchanged():
    # attribution runs the caller's module itself: train-mode BatchNorm updates its statistics on every forward,
    # and a failure after some forwards must still put them back
    model = _model("bn-train")
    calls = []

    def forward(z):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("forward failed")
        return model(z)

    with assert_model_unchanged(model), pytest.warns(UserWarning, match="train mode"), \
            pytest.raises(RuntimeError, match="forward failed"):
        gs.attribution.IntegratedGradients(model, forward=forward, steps=4, chunk_size=4).attribute(X, Y)


class TokenNet(nn.Module):
    """Embedding -> LayerNorm -> Dropout -> mean over tokens -> linear, for ``attribute_tokens``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.norm, self.drop, self.head = nn.Embedding(12, 6), nn.LayerNorm(6), nn.Dropout(0.2), nn.Linear(6, 2)
        self.eval()

    def forward(self, input_ids, attention_mask=None):
        h = self.drop(self.norm(self.emb(input_ids)))
        return self.head(h.mean(1))


@pytest.mark.parametrize("mode", ["eval", "dropout-train"])
@pytest.mark.parametrize("method", ["integrated_gradients", "input_x_gradient"])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_attribute_tokens_leaves_the_model_unchanged(mode, method):
    model = TokenNet()
    if mode == "dropout-train":
        model.drop.train()
    model.head.register_forward_hook(lambda *a: None)
    model.emb.weight.requires_grad_(False)
    ids = torch.randint(0, 12, (3, 5), generator=torch.Generator().manual_seed(0))
    options = {"steps": 4} if method == "integrated_gradients" else {}
    with assert_model_unchanged(model):
        gs.attribute_tokens(model, ids, target=1, method=method, baseline="zeros", **options)
    with assert_model_unchanged(model), pytest.raises(ValueError, match="out of range"):
        gs.attribute_tokens(model, ids + 20, target=1, baseline="zeros")  # refused, nothing changed
    with assert_model_unchanged(model), pytest.raises(ValueError, match="needs a tokenizer with pad_token_id"):
        gs.attribute_tokens(model, ids, target=1)  # the default 'pad' baseline, without a tokenizer


# ------------------------------------------------------------------------------------------ the reproductions
def test_interpolate_in_train_mode_leaves_both_models_running_statistics_alone():
    a, b = Net(), Net()
    with torch.no_grad():
        b.fc.weight.add_(0.1)
    a.train()
    b.train()
    stats = [(m.bn.running_mean.clone(), m.bn.running_var.clone(), m.bn.num_batches_tracked.clone()) for m in (a, b)]
    with assert_model_unchanged(a), assert_model_unchanged(b):
        res = gs.interpolate(a, b, CE, (X, Y), steps=3, allow_train_mode=True)
    for m, (mean, var, count) in zip((a, b), stats):
        assert torch.equal(m.bn.running_mean, mean) and torch.equal(m.bn.running_var, var)
        assert torch.equal(m.bn.num_batches_tracked, count)
    # the endpoints are each model's own train-mode loss (train-mode BatchNorm: batch statistics; Dropout: a seed)
    assert torch.isfinite(res.losses).all()


def test_a_functional_call_never_hands_the_callers_buffers_to_a_train_mode_batchnorm():
    model = Net()
    model.bn.train()
    fm = functional(model)
    mean = model.bn.running_mean.clone()
    with torch.no_grad():
        fm(fm.params, X)
    assert torch.equal(model.bn.running_mean, mean)
    assert fm.buffers["bn.running_mean"].data_ptr() != model.bn.running_mean.data_ptr()
    assert not torch.equal(fm.buffers["bn.running_mean"], mean)  # the copy took the update


@pytest.mark.parametrize("verb", ["prune", "allocate_bits"])
def test_measuring_after_the_caller_switched_to_train_mode_is_one_clear_error_and_moves_nothing(verb):
    model = _model("eval")
    res = gs.importance(model, CE, (X, Y), method="fisher", heldout=HELD)
    before = getattr(res, verb)(0.3) if verb == "prune" else res.allocate_bits(4)
    model.train()  # e.g. to fine-tune
    call = (lambda **kw: res.prune(0.3, **kw)) if verb == "prune" else (lambda **kw: res.allocate_bits(4, **kw))
    with assert_model_unchanged(model):
        with pytest.raises(ValueError, match=rf"{verb}: measuring on the held-out data: BatchNorm/Dropout in train "
                                             r"mode \(bn, drop\).*model\.eval\(\).*measure=False"):
            call()
        unmeasured = call(measure=False)  # the masks/bits themselves need no forward
    assert unmeasured.measured is None
    model.eval()
    again = call()
    assert again.measured == before.measured  # the same model, measured the same


def test_measuring_after_the_weights_changed_is_refused():
    model = _model("eval")
    res = gs.importance(model, CE, (X, Y), method="taylor", heldout=HELD)
    with torch.no_grad():
        model.fc.weight.mul_(1.5)  # e.g. a training step since
    with assert_model_unchanged(model), pytest.raises(ValueError, match="changed since importance\\(\\) scored it"):
        res.prune(0.3)
    assert res.prune(0.3, measure=False).measured is None


def test_importance_checks_every_module_with_the_shared_message():
    model = _model("dropout-train")
    assert not model.training  # the root is in eval mode: the old check passed and scored silently
    with assert_model_unchanged(model), pytest.raises(ValueError) as info:
        gs.importance(model, CE, (X, Y), method="taylor")
    with pytest.raises(ValueError) as landscape:
        gs.loss_surface(model, CE, (X, Y), steps=3)
    message = str(info.value)
    assert message == "importance: BatchNorm/Dropout in train mode (drop), so the result would depend on the " \
                      "batch and on random masks. Call model.eval() first."
    assert message.split(": ", 1)[1].rstrip(".") in str(landscape.value)  # one message, whichever analysis


def test_zoo_loaders_hand_out_independent_models():
    a = gs.zoo.load("digits-cnn")
    with torch.no_grad():
        next(a.parameters()).add_(1.0)
    a.train()
    b = gs.zoo.load("digits-cnn")
    assert not torch.equal(next(a.parameters()), next(b.parameters()))
    assert not b.training
    d1 = gs.zoo.dataset("digits")
    d1.inputs.add_(1.0)
    assert not torch.equal(d1.inputs, gs.zoo.dataset("digits").inputs)


def test_a_measurer_measures_the_model_as_it_is_at_each_call():
    # it caches the baseline and the gradient; a model changed between two calls must not get stale numbers
    model = _model("eval")
    masks = {"fc.weight": torch.rand(3, 18, generator=torch.Generator().manual_seed(3)) > 0.5}
    meas = gs.importance.Measurer(model, CE, HELD, calibration=(X, Y))
    meas(masks)
    with torch.no_grad():
        model.fc.bias.add_(0.7)
    assert meas(masks) == gs.importance.Measurer(model, CE, HELD, calibration=(X, Y))(masks)
