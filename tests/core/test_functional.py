"""core.functional: the pure-function view of a model, parameter selection, flat vectors, ModelState."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradsense.core.functional import (
    ModelState,
    flatten,
    functional,
    model_fingerprint,
    preserve_model,
    select_parameters,
    unflatten,
)
from helpers import assert_model_unchanged, hooks_on


def test_functional_call_equals_module_call(case):
    with assert_model_unchanged(case.model):
        fm = functional(case.model)
        torch.testing.assert_close(fm(fm.params, case.x), case.model(case.x), rtol=0, atol=0)
        assert fm.names == [n for n, _ in case.model.named_parameters()]
        assert fm.numel == sum(p.numel() for p in case.model.parameters())


def test_functional_uses_the_given_params_and_keeps_the_rest(mlp):
    x = torch.randn(3, 4, dtype=torch.float64)
    fm = functional(mlp, params=["4"])  # the last Linear only
    assert fm.names == ["4.weight", "4.bias"]
    assert set(fm.frozen) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    new = {"4.weight": torch.zeros_like(mlp[4].weight), "4.bias": torch.arange(3, dtype=torch.float64)}
    with assert_model_unchanged(mlp):
        out = fm(new, x)
    torch.testing.assert_close(out, torch.arange(3, dtype=torch.float64).expand(3, 3), rtol=0, atol=0)


def test_functional_params_are_differentiable_without_touching_grad(mlp):
    x = torch.randn(3, 4, dtype=torch.float64)
    fm = functional(mlp)
    with assert_model_unchanged(mlp):
        g = torch.func.grad(lambda p: fm(p, x).sum())(fm.params)
    expected = torch.autograd.grad(mlp(x).sum(), list(mlp.parameters()))
    for got, want in zip(g.values(), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ select_parameters
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
        self.head = nn.Linear(4, 2)
        self.head2 = nn.Linear(2, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - not called
        return self.head2(self.head(self.features(x).flatten(1)))


ALL = [
    "features.0.weight",
    "features.0.bias",
    "features.1.weight",
    "features.1.bias",
    "head.weight",
    "head.bias",
    "head2.weight",
]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, ALL),
        ("weight$", ["features.0.weight", "features.1.weight", "head.weight", "head2.weight"]),
        (r"^features\.0\.", ["features.0.weight", "features.0.bias"]),
        (
            ["head.bias", "features.1.weight"],
            ["features.1.weight", "head.bias"],
        ),  # model order, not spec order
        (["features"], ALL[:4]),
        (["features.0", "head2"], ["features.0.weight", "features.0.bias", "head2.weight"]),
        ([""], ALL),  # the root module by name
        (nn.Linear, ["head.weight", "head.bias", "head2.weight"]),
        ((nn.Conv2d, nn.BatchNorm2d), ALL[:4]),
        (
            lambda name, p: p.ndim == 1,
            ["features.0.bias", "features.1.weight", "features.1.bias", "head.bias"],
        ),
    ],
    ids=[
        "none",
        "regex-suffix",
        "regex-prefix",
        "names",
        "module-name",
        "module-names",
        "root",
        "type",
        "types",
        "callable",
    ],
)
def test_select_parameters(spec, expected):
    net = _Net()
    chosen = select_parameters(net, spec)
    assert list(chosen) == expected
    named = dict(net.named_parameters())
    assert all(chosen[n] is named[n] for n in expected)  # the module's own tensors


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("nothing_matches", ValueError, "selects no parameter"),
        (nn.LSTM, ValueError, "selects no parameter"),
        (lambda n, p: False, ValueError, "selects no parameter"),
        (["head.weigth"], ValueError, "no parameter or module named 'head.weigth'"),
        (["head", 3], TypeError, "must be names"),
        (3.5, TypeError, "params must be None, a regex string"),
    ],
    ids=["regex-none", "type-none", "callable-none", "unknown-name", "non-str-entry", "bad-type"],
)
def test_select_parameters_errors(spec, error, match):
    with pytest.raises(error, match=match):
        select_parameters(_Net(), spec)


def test_unknown_name_error_suggests_similar_names():
    with pytest.raises(ValueError, match=r"Similar names: \[.*'head\.weight'"):
        select_parameters(_Net(), ["head.weigth"])


def test_non_module_is_refused_with_a_clear_message():
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got function"):
        functional(lambda x: x)


# ------------------------------------------------------------------------------ flatten / unflatten
def test_flatten_unflatten_round_trip(bn_cnn):
    params = dict(bn_cnn.named_parameters())
    flat = flatten(params)
    assert flat.shape == (sum(p.numel() for p in params.values()),)
    manual = torch.cat([p.detach().reshape(-1) for p in params.values()])
    torch.testing.assert_close(flat.detach(), manual, rtol=0, atol=0)
    back = unflatten(flat.detach(), params)
    assert list(back) == list(params)
    for k in params:
        torch.testing.assert_close(back[k], params[k].detach(), rtol=0, atol=0)
    # and the other way round: a vector survives unflatten -> flatten
    v = torch.randn(flat.numel(), dtype=torch.float64)
    torch.testing.assert_close(flatten(unflatten(v, params)), v, rtol=0, atol=0)
    # sequences flatten too
    torch.testing.assert_close(flatten(list(params.values())).detach(), manual, rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad", [torch.zeros(80), torch.zeros(82), torch.zeros(81, 1)], ids=["short", "long", "2d"]
)
def test_unflatten_length_error(bn_cnn, bad):
    with pytest.raises(ValueError, match="expected a 1-D vector of 81 elements"):
        unflatten(bad, dict(bn_cnn.named_parameters()))


def test_flatten_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="nothing to flatten"):
        flatten({})


# ------------------------------------------------------------------------------ ModelState / preserve_model
@pytest.mark.parametrize("change", ["value", "buffer", "requires_grad", "training", "hook", "new-parameter"])
def test_model_state_diff_detects_each_kind_of_change(bn_cnn, change):
    before = ModelState.capture(bn_cnn, values=True)
    assert before.diff(ModelState.capture(bn_cnn, values=True)) == []
    if change == "value":
        with torch.no_grad():
            bn_cnn[4].weight[0, 0] += 1e-9
        expected = "value of 4.weight changed"
    elif change == "buffer":
        bn_cnn[1].running_var.mul_(2.0)
        expected = "value of 1.running_var changed"
    elif change == "requires_grad":
        bn_cnn[0].bias.requires_grad_(False)
        expected = "requires_grad of 0.bias: True -> False"
    elif change == "training":
        bn_cnn[1].train()
        expected = "training of module 1: False -> True"
    elif change == "hook":
        bn_cnn[3].register_forward_pre_hook(lambda *a: None)
        expected = "hooks of module 3"
    else:
        bn_cnn[4].extra = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        expected = "the set of parameters changed"
    problems = before.diff(ModelState.capture(bn_cnn, values=True))
    assert any(expected in p for p in problems), problems


def test_model_state_restore_puts_back_flags_and_removes_new_hooks_only(mlp):
    keep = mlp[0].register_forward_hook(lambda *a: None)
    state = ModelState.capture(mlp)
    mlp.train()
    mlp[2].weight.requires_grad_(False)
    mlp[2].register_forward_hook(lambda *a: None)
    mlp.register_forward_pre_hook(lambda *a: None, with_kwargs=True)
    mlp[4].register_full_backward_hook(lambda *a: None)
    state.restore()
    assert not any(m.training for m in mlp.modules())
    assert all(p.requires_grad for p in mlp.parameters())
    assert hooks_on(mlp) == {"0": {"_forward_hooks": 1}}
    keep.remove()
    assert hooks_on(mlp) == {}


def test_preserve_model_restores_on_normal_exit(dropout_mlp):
    dropout_mlp[2].train()  # a mixed state must come back exactly
    with assert_model_unchanged(dropout_mlp):
        with preserve_model(dropout_mlp, eval_mode=True) as m:
            assert m is dropout_mlp
            assert not any(mod.training for mod in m.modules())
            m[0].register_forward_hook(lambda *a: None)
            m[3].weight.requires_grad_(False)
    assert dropout_mlp[2].training and not dropout_mlp.training


def test_preserve_model_restores_when_the_block_raises(dropout_mlp):
    with assert_model_unchanged(dropout_mlp):
        with pytest.raises(RuntimeError, match="boom"):
            with preserve_model(dropout_mlp):
                dropout_mlp.train()
                dropout_mlp[3].register_forward_pre_hook(lambda *a: None)
                dropout_mlp[0].register_forward_hook(lambda *a, **k: None, with_kwargs=True)
                dropout_mlp[0].weight.requires_grad_(False)
                raise RuntimeError("boom")


def test_model_fingerprint_tracks_weights_only(mlp):
    a = model_fingerprint(mlp)
    assert a == model_fingerprint(mlp)
    assert a["parameters"] == 64 and a["class"] == "Sequential"
    mlp.train()
    assert model_fingerprint(mlp)["sha256"] == a["sha256"]
    with torch.no_grad():
        mlp[0].bias[0] += 1.0
    assert model_fingerprint(mlp)["sha256"] != a["sha256"]


def test_preserve_model_restores_plain_attributes_libraries_set_on_first_use():
    """Regression: transformers marks a module `_output_capturing_hooks_installed = True` when it adds
    capture hooks; removing the hooks but keeping the mark silently broke the caller's model."""
    from gradsense.core.functional import ModelState, preserve_model

    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    net.flag = False
    before = ModelState.capture(net)
    with preserve_model(net):
        net[0]._hooks_installed = True
        net.flag = True
    assert not hasattr(net[0], "_hooks_installed") and net.flag is False
    assert before.diff(ModelState.capture(net)) == []
    net.flag = True
    assert any("attributes of module <root>" in d for d in before.diff(ModelState.capture(net)))
