"""The public surface: measured vs predicted changes (exact on a quadratic), apply returns a copy, the caller's
model unchanged for every method (also when a call raises), bad input raises one clear error before any work,
results save/load, the callable module, sweeps."""

from __future__ import annotations

import pytest
import torch
from importance_cases import CE, conv_chain, mse, regression_case, tiny_vit

import gradsense.importance as gi
from gradsense.importance import METHODS, apply, importance, measure, sweep
from gradsense.results import Result
from helpers import assert_model_unchanged


def test_measured_change_equals_a_manual_forward_and_second_order_is_exact_on_a_quadratic():
    case = regression_case()
    held = regression_case(seed=4)
    res = importance(case.model, mse, (case.x, case.y), method="taylor", heldout=(held.x, held.y))
    masks = res.prune(0.4)
    m = masks.measured
    w = case.model[0].weight.detach()
    delta = w * masks["0.weight"] - w
    with torch.no_grad():
        after = mse(torch.nn.functional.linear(held.x, w + delta, case.model[0].bias), held.y)
        before = mse(case.model(held.x), held.y)
    assert m["loss_after"] == pytest.approx(float(after), rel=1e-12)
    assert m["loss_change"] == pytest.approx(float(after - before), rel=1e-10)
    # predicted on the calibration data: exact to second order because the loss is quadratic in the weights
    cal = measure(case.model, mse, (case.x, case.y), masks)
    assert cal["predicted_second_order"] == pytest.approx(cal["loss_change"], rel=1e-9)
    assert cal["predicted_first_order"] != pytest.approx(cal["loss_change"], rel=1e-3)
    assert m["metric_before"] is None  # no accuracy for a regression


def test_measured_accuracy_and_prune_without_heldout(cnn_case):
    held = conv_chain(seed=9, n=16)
    case = conv_chain()
    res = importance(case.model, CE, (case.x, case.y), method="taylor2", heldout=(held.x, held.y))
    m = res.prune(0.3).measured
    with torch.no_grad():
        acc = float((case.model(held.x).argmax(1) == held.y).double().mean())
    assert m["metric_before"] == pytest.approx(acc)
    quiet = importance(case.model, CE, (case.x, case.y), method="taylor2")
    masks = quiet.prune(0.3)
    assert masks.measured is None and "not measured" in dict(masks.summary())["measured"]
    later = masks.measure(case.model, CE, (held.x, held.y), calibration=(case.x, case.y))
    assert later.measured["loss_after"] == pytest.approx(m["loss_after"], rel=1e-12)


def _all_methods_cases():
    case = conv_chain()
    gen = conv_chain(seed=2)
    out = []
    for name in METHODS:
        opts = {"reference": (gen.x, gen.y)} if name == "gaprune" else {}
        if name in ("hessian", "ecoflap"):
            opts["probes"] = 4
        gran = "channel" if name == "serene" else "weight"
        out.append((name, gran, opts))
    return case, out


def test_the_callers_model_is_unchanged_by_every_method_and_by_apply():
    case, runs = _all_methods_cases()
    model = case.model
    for p in model[6].parameters():
        p.requires_grad_(False)  # a frozen layer must stay frozen
    model.zero_grad()
    with assert_model_unchanged(model):
        for name, gran, opts in runs:
            res = importance(model, CE, (case.x, case.y), method=name, granularity=gran, heldout=(case.x, case.y), **opts)
            if gran == "weight":
                copy = apply(model, res.prune(0.5))
                assert copy is not model
    with assert_model_unchanged(model), pytest.raises(ValueError):
        importance(model, CE, (case.x, case.y[:3]), method="taylor")


class Logged(torch.nn.Module):
    """Records every forward in a list (``preserve_model`` restores plain int attributes, not lists) and raises
    from call number ``fail_at`` on."""

    def __init__(self, inner: torch.nn.Module, fail_at: int | None = None) -> None:
        super().__init__()
        self.inner, self.log, self.fail_at = inner, [], fail_at

    def forward(self, x):
        self.log.append(int(x.shape[0]))
        if self.fail_at is not None and len(self.log) >= self.fail_at:
            raise RuntimeError("boom")
        return self.inner(x)


@pytest.mark.parametrize(("method", "gran"), [("wanda", "weight"), ("serene", "channel"), ("taylor2", "weight"),
                                              ("hessian", "layer"), ("ecoflap", "weight")])
def test_a_failing_forward_leaves_the_model_unchanged(method, gran):
    case = conv_chain()
    model = Logged(case.model, fail_at=2).eval()  # the loss check passes, the method's own passes fail
    with assert_model_unchanged(model), pytest.raises((RuntimeError, ValueError), match="boom"):
        importance(model, CE, (case.x, case.y), method=method, granularity=gran)
    assert len(model.log) >= 2  # it got past the checks


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "snip"}, ValueError, "unknown method"),
        ({"method": "taylor", "granularity": "neuron"}, ValueError, "granularity must be"),
        ({"method": "serene"}, ValueError, "supports granularity"),
        ({"method": "taylor", "params": "^nothing"}, ValueError, "selects no parameter"),
        ({"method": "taylor", "params": ["no.such"]}, ValueError, "no parameter or module"),
        ({"method": "taylor", "alpha": 3}, TypeError, "unknown option"),
        ({"method": "gaprune"}, ValueError, "reference="),
        ({"method": "hessian", "probes": 1}, ValueError, "probes"),
        ({"method": "pqi", "bits": 1}, ValueError, "between 2 and 16"),
        ({"method": "taylor", "granularity": "head"}, ValueError, "no attention module"),
        ({"method": "ecoflap", "lam": 2}, ValueError, "lam"),
    ],
)
def test_bad_input_fails_before_any_work(kwargs, error, match):
    case = conv_chain()
    counter = Logged(case.model).eval()
    with assert_model_unchanged(counter), pytest.raises(error, match=match):
        importance(counter, CE, (case.x, case.y), **kwargs)
    assert counter.log == []


def test_bad_input_of_models_data_and_prune():
    case = conv_chain()
    with pytest.raises(TypeError, match=r"nn\.Module"):
        importance(lambda x: x, CE, (case.x, case.y), method="taylor")
    with pytest.raises(TypeError, match="loss_fn"):
        importance(case.model, "ce", (case.x, case.y), method="taylor")
    with pytest.raises(ValueError, match="empty"):
        importance(case.model, CE, (case.x[:0], case.y[:0]), method="taylor")
    with pytest.raises(ValueError, match="scalar"):
        importance(case.model, lambda o, y: CE(o, y, reduction="none"), (case.x, case.y), method="taylor")
    case.model.train()
    with pytest.raises(ValueError, match=r"model\.eval"):
        importance(case.model, CE, (case.x, case.y), method="taylor")
    case.model.eval()
    with pytest.raises(ValueError, match="no Linear/Conv weight"):
        importance(torch.nn.Sequential(torch.nn.BatchNorm1d(3)).eval(), CE, (torch.randn(4, 3), torch.zeros(4).long()),
                   method="taylor")
    res = importance(case.model, CE, (case.x, case.y), method="magnitude")
    for s in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            res.prune(s)
    with pytest.raises(TypeError, match="sparsity"):
        res.prune("half")
    with pytest.raises(ValueError, match="scope"):
        res.prune(0.5, scope="block")
    with pytest.raises(ValueError, match="structure must be"):
        res.prune(0.5, structure="diagonal")
    with pytest.raises(ValueError, match="not parameters"):
        apply(case.model, {"nope": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        apply(case.model, {"0.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="bool"):
        apply(case.model, {"0.weight": torch.ones(4, 1, 3, 3)})
    with pytest.raises(ValueError, match=r"nn\.Sequential"):
        apply(tiny_vit().model, {"head.weight": torch.ones(3, 8, dtype=torch.bool)}, compact=True)


def test_magnitude_needs_no_data_and_the_module_is_callable():
    case = conv_chain()
    res = gi(case.model, CE, None, method="magnitude")
    assert isinstance(res, gi.ImportanceResult)
    torch.testing.assert_close(res.scores["3.weight"], case.model[3].weight.detach().abs())
    assert gi.importance is importance and callable(gi) and gi.apply is apply


def test_save_load_roundtrip_and_prune_after_loading(tmp_path):
    case = conv_chain()
    res = importance(case.model, CE, (case.x, case.y), method="hessian", granularity="channel", rtol=0.05)
    res.save(tmp_path / "r")
    back = Result.load(tmp_path / "r")
    assert type(back).__name__ == "ImportanceResult" and back.context is None
    for k in res.scores:
        assert torch.equal(back.scores[k], res.scores[k])
    a, b = res.prune(0.4, structure="channel"), back.prune(0.4, structure="channel")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    b.save(tmp_path / "m")
    masks = Result.load(tmp_path / "m")
    assert all(torch.equal(masks[k], a[k]) for k in a)
    bits = back.allocate_bits(3)
    bits.save(tmp_path / "b")
    assert Result.load(tmp_path / "b").bits == bits.bits
    for r in (res, a, bits):
        assert r.summary() and r.plot() is not None
    assert res.ranking()[0][1] >= res.ranking()[-1][1]
    assert len(res.ranking(level="unit")) == 10


def test_sweep_table_and_plot():
    case = conv_chain()
    held = conv_chain(seed=5)
    res = sweep(case.model, CE, (case.x, case.y), (held.x, held.y), methods=("magnitude", "taylor"),
                sparsities=(0.2, 0.6))
    header, rows = res.table()
    assert len(rows) == 4 and header[0] == "method"
    assert res.tensors["loss"].shape == (2, 2) and not torch.isnan(res.tensors["metric"]).any()
    mag = importance(case.model, CE, (case.x, case.y), method="magnitude", heldout=(held.x, held.y)).prune(0.6)
    assert float(res.tensors["loss"][0, 1]) == pytest.approx(mag.measured["loss_after"], rel=1e-12)
    assert res.plot() is not None and res.plot("metric") is not None and res.grid()[1][0][0] == "magnitude"
    with pytest.raises(ValueError, match="N:M"):
        sweep(case.model, CE, (case.x, case.y), (held.x, held.y), structure="2:4")
