"""Infidelity and max-sensitivity (Yeh et al. 2019): closed forms on linear/quadratic models, a slow
per-example loop, agreement with captum.metrics on the same perturbations, chunking, determinism."""

from __future__ import annotations

import pytest
import torch
from eval_models import Linear1, Quadratic

import gradsense as gs
import gradsense.evaluation as ev
from gradsense.targets import RegressionOutput
from helpers import CountingModule, assert_model_unchanged

TOL = {"rtol": 1e-10, "atol": 1e-12}  # float64, same operations up to summation order


def _x(n=5, d=6, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------- closed forms
def test_infidelity_of_the_gradient_of_a_linear_model_is_zero():
    model, x = Linear1(6), _x()
    a = model.w.detach().expand_as(x)  # the exact gradient
    r = ev.infidelity(model, x, a, target=RegressionOutput(0), n_perturbations=32, perturbation="gaussian")
    torch.testing.assert_close(r.values, torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-24)


def test_infidelity_of_input_x_gradient_is_zero_with_input_scaled_perturbations():
    # Yeh et al.: I x G pairs with perturbations measured relative to the input (I / x)
    model, x = Linear1(6), _x()
    a = x * model.w.detach()
    for kind in ("gaussian", "subset"):
        r = ev.infidelity(model, x, a, target=RegressionOutput(0), perturbation=kind, multiply_by_inputs=True)
        torch.testing.assert_close(r.values, torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-24)
    # ...and is not zero with plain perturbations (so the flag matters)
    r = ev.infidelity(model, x, a, target=RegressionOutput(0), perturbation="gaussian")
    assert float(r.values.min()) > 1e-4


def test_infidelity_of_a_zero_map_is_the_mean_squared_output_change():
    model, x = Linear1(6), _x()
    pert = torch.randn(7, 5, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    r = ev.infidelity(model, x, torch.zeros_like(x), target=RegressionOutput(0), n_perturbations=7, perturbation=pert)
    w = model.w.detach()
    expected = ((pert @ w) ** 2).mean(0)  # f(x) - f(x - I) = w . I
    torch.testing.assert_close(r.values, expected, **TOL)
    # the Monte-Carlo standard error of each value, written out
    torch.testing.assert_close(r.tensors["value_stderr"], ((pert @ w) ** 2).std(0) / 7**0.5, **TOL)


def test_gaussian_infidelity_is_sigma_squared_norm_w_squared_in_expectation():
    model, x = Linear1(4), _x(n=1, d=4)
    sigma, s = 0.2, 4000
    r = ev.infidelity(model, x, torch.zeros_like(x), target=RegressionOutput(0), n_perturbations=s,
                      noise_scale=sigma, seed=5)
    truth = sigma**2 * float(model.w.detach().pow(2).sum())
    se = float(r.tensors["value_stderr"][0])
    assert abs(float(r.values[0]) - truth) < 4 * se  # a statistical test: within 4 standard errors


def _loop_infidelity(model, x, a, y, pert, normalize=False):
    """Per example, per perturbation, one forward at a time (the obviously-correct twin)."""
    out = []
    for i in range(x.shape[0]):
        dots, diffs = [], []
        fx = model(x[i : i + 1])[0, y[i]]
        for s in range(pert.shape[0]):
            dots.append(float((pert[s, i] * a[i]).sum()))
            diffs.append(float(fx - model(x[i : i + 1] - pert[s, i : i + 1])[0, y[i]]))
        d, f = torch.tensor(dots, dtype=torch.float64), torch.tensor(diffs, dtype=torch.float64)
        beta = (d * f).sum() / (d * d).sum() if normalize else 1.0
        out.append(((beta * d - f) ** 2).mean())
    return torch.stack(out)


@pytest.mark.parametrize("normalize", [False, True])
def test_infidelity_matches_a_per_example_loop(mlp_case, normalize):
    c = mlp_case
    a = torch.randn(c.x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pert = ev.perturbations("gaussian", c.x, 9, seed=4, noise_scale=0.3)
    with torch.no_grad():
        want = _loop_infidelity(c.model, c.x, a, c.y, pert, normalize)
    r = ev.infidelity(c.model, c.x, a, target=c.y, n_perturbations=9, seed=4, noise_scale=0.3, normalize=normalize)
    torch.testing.assert_close(r.values, want, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------- captum
@pytest.mark.parametrize(("kind", "normalize", "mbi"), [("gaussian", False, False), ("gaussian", True, False),
                                                        ("subset", False, True)])
def test_infidelity_agrees_with_captum_on_the_same_perturbations(cnn_case, kind, normalize, mbi):
    captum_metrics = pytest.importorskip("captum.metrics")
    c = cnn_case
    a = gs.attribute(c.model, c.x, target=c.y, method="input_x_gradient" if mbi else "saliency").attributions
    s, n = 6, c.x.shape[0]
    pert = ev.perturbations(kind, c.x, s, seed=2, noise_scale=0.2, fraction=0.3)  # (S, N, ...)
    ex_major = pert.transpose(0, 1).reshape(n * s, *c.x.shape[1:])  # captum repeats examples: row i*S + s

    if mbi:
        @captum_metrics.infidelity_perturb_func_decorator(True)
        def perturb(inputs):
            return inputs - ex_major
    else:
        def perturb(inputs):
            return ex_major, inputs - ex_major

    theirs = captum_metrics.infidelity(c.model, perturb, c.x, a, target=c.y, n_perturb_samples=s, normalize=normalize)
    ours = ev.infidelity(c.model, c.x, a, target=c.y, n_perturbations=s, perturbation=pert, normalize=normalize,
                         multiply_by_inputs=mbi)
    torch.testing.assert_close(ours.values, theirs, rtol=1e-9, atol=1e-12)


def test_max_sensitivity_agrees_with_captum_on_the_same_perturbations(cnn_case):
    captum_metrics = pytest.importorskip("captum.metrics")
    from captum.attr import Saliency

    c = cnn_case
    s, n = 5, c.x.shape[0]
    ys = ev.perturbations("uniform", c.x, s, seed=3, radius=0.05)
    ex_major = ys.transpose(0, 1).reshape(n * s, *c.x.shape[1:])

    def perturb(inputs, radius):
        return inputs + ex_major

    theirs = captum_metrics.sensitivity_max(Saliency(c.model).attribute, c.x, perturb_func=perturb,
                                            n_perturb_samples=s, target=c.y, abs=False)
    ours = ev.max_sensitivity(c.model, c.x, None, target=c.y, explainer="saliency", n_perturbations=s,
                              perturbation=ys)
    torch.testing.assert_close(ours.values, theirs, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------- max-sensitivity closed forms
def test_max_sensitivity_of_a_linear_models_gradient_is_zero():
    model, x = Linear1(6), _x()
    r = ev.max_sensitivity(model, x, None, target=RegressionOutput(0), explainer="saliency", n_perturbations=8)
    torch.testing.assert_close(r.values, torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("norm", ["fro", "inf", 1])
def test_max_sensitivity_of_a_quadratic_is_the_largest_relative_change_of_ax(norm):
    model, x = Quadratic(4, linear=False), _x(n=3, d=4)
    ys = ev.perturbations("uniform", x, 6, seed=0, radius=0.1)
    r = ev.max_sensitivity(model, x, None, target=RegressionOutput(0), explainer="saliency", n_perturbations=6,
                           perturbation=ys, norm=norm)
    A = model.A.detach()
    p = {"fro": 2.0, "inf": float("inf"), 1: 1.0}[norm]
    num = torch.linalg.vector_norm(ys @ A, p, dim=-1)  # grad(x + y) - grad(x) = A y
    den = torch.linalg.vector_norm(x @ A, p, dim=-1)
    torch.testing.assert_close(r.values, (num / den).amax(0), **TOL)
    torch.testing.assert_close(r.tensors["sensitivities"], num / den, **TOL)


# ------------------------------------------------------------------------------------------- engine rules
def test_infidelity_chunked_equals_unchunked_and_is_deterministic(cnn_case):
    c = cnn_case
    a = gs.attribute(c.model, c.x, target=c.y, method="saliency")
    full = ev.infidelity(c.model, c.x, a, target=c.y, n_perturbations=8, seed=1)
    one = ev.infidelity(c.model, c.x, a, target=c.y, n_perturbations=8, seed=1, chunk_size=3)
    tiny = ev.infidelity(c.model, c.x, a, target=c.y, n_perturbations=8, seed=1, max_memory=2000)
    torch.testing.assert_close(one.values, full.values, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(tiny.values, full.values, rtol=1e-12, atol=1e-14)
    other = ev.infidelity(c.model, c.x, a, target=c.y, n_perturbations=8, seed=2)
    assert not torch.allclose(other.values, full.values)


def test_perturbed_forwards_are_chunked_under_the_budget(mlp_case):
    c = mlp_case
    counting = CountingModule(c.model)
    ev.infidelity(counting, c.x, torch.zeros_like(c.x), target=c.y, n_perturbations=7, chunk_size=16)
    # 7 x 10 perturbed rows in chunks of at most 16 rows, plus the clean inputs
    assert max(counting.sizes) <= 16
    assert sum(counting.sizes) == 2 + 10 + 70  # validation on 2 rows, clean, perturbed (plain int counters are reset by preserve_model: use the list)


def test_max_sensitivity_is_deterministic_and_chunk_invariant(mlp_case):
    c = mlp_case
    kw = {"target": c.y, "explainer": "smoothgrad", "explainer_options": {"n_samples": 4}, "n_perturbations": 6}
    a = ev.max_sensitivity(c.model, c.x, None, **kw)
    b = ev.max_sensitivity(c.model, c.x, None, **kw)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)


def test_metrics_leave_the_model_unchanged_also_when_they_raise(cnn_case):
    c = cnn_case
    model = c.model.train()  # train-mode BatchNorm: buffers must be put back too
    a = torch.ones_like(c.x)
    with pytest.warns(UserWarning, match="train mode"), assert_model_unchanged(model):
        ev.infidelity(model, c.x, a, target=c.y, n_perturbations=3)
    with pytest.warns(UserWarning), assert_model_unchanged(model):
        ev.max_sensitivity(model, c.x, None, target=c.y, explainer="saliency", n_perturbations=2)

    def boom(model, rows, target):
        raise RuntimeError("explainer failed")

    with pytest.warns(UserWarning), assert_model_unchanged(model), pytest.raises(RuntimeError, match="explainer"):
        ev.max_sensitivity(model, c.x, None, target=c.y, explainer=boom, n_perturbations=2)


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_any_forward(mlp_case):
    c = mlp_case
    counting = CountingModule(c.model)
    a = torch.zeros_like(c.x)
    with pytest.raises(ValueError, match=r"attributions have shape \(10, 3\) but the inputs have shape \(10, 4\)"):
        ev.infidelity(counting, c.x, a[:, :3], target=c.y)
    bad = a.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        ev.infidelity(counting, c.x, bad, target=c.y)
    with pytest.raises(ValueError, match="n_perturbations must be >= 1, got 0"):
        ev.infidelity(counting, c.x, a, target=c.y, n_perturbations=0)
    with pytest.raises(ValueError, match="n_perturbations must be >= 1, got 0"):
        ev.max_sensitivity(counting, c.x, None, target=c.y, explainer="saliency", n_perturbations=0)
    with pytest.raises(ValueError, match="unknown perturbation 'salt'"):
        ev.infidelity(counting, c.x, a, target=c.y, perturbation="salt")
    with pytest.raises(ValueError, match=r"shape \(n_perturbations, N, \.\.\.\)"):
        ev.infidelity(counting, c.x, a, target=c.y, n_perturbations=2, perturbation=torch.zeros(3, 10, 4))
    with pytest.raises(TypeError, match="AttributionResult"):
        ev.infidelity(counting, c.x, a.numpy(), target=c.y)
    with pytest.raises(ValueError, match="explainer="):
        ev.max_sensitivity(counting, c.x, a, target=c.y)
    with pytest.raises(ValueError, match="does not take option"):
        ev.max_sensitivity(counting, c.x, None, target=c.y, explainer="saliency", explainer_options={"steps": 3})
    assert counting.sizes == []  # no forward ran


def test_evaluate_dispatches_and_lists_metrics(mlp_case):
    c = mlp_case
    a = gs.attribute(c.model, c.x, target=c.y, method="saliency")
    r = ev.evaluate(c.model, c.x, a, target=c.y, metric="infidelity", n_perturbations=4)
    direct = ev.infidelity(c.model, c.x, a, target=c.y, n_perturbations=4)
    torch.testing.assert_close(r.values, direct.values, rtol=0, atol=0)
    assert r.meta["explained"] == "saliency"
    with pytest.raises(ValueError, match=r"unknown metric 'fidelity'; available metrics: \[.*'infidelity'.*\]"):
        ev.evaluate(c.model, c.x, a, target=c.y, metric="fidelity")
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['steps'\]"):
        ev.evaluate(c.model, c.x, a, target=c.y, metric="infidelity", steps=3)
    # max-sensitivity takes its explainer from an AttributionResult
    s = ev.evaluate(c.model, c.x, a, target=c.y, metric="max_sensitivity", n_perturbations=3)
    assert s.meta["settings"]["explainer"] == "saliency"
    assert set(ev.metric_names()) >= {"infidelity", "max_sensitivity", "deletion", "insertion", "randomization",
                                      "hyperparameter_sensitivity", "taylor", "attribution_mass", "pointing_game"}
