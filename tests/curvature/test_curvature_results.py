"""EigenResult, TraceResult and DensityResult: save/load round trips (no pickle), summaries, figures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from gradsense.curvature import (
    DensityResult,
    EigenResult,
    TraceResult,
    hessian_eigs,
    hessian_trace,
    spectral_density,
)
from gradsense.results import Result

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

CE = F.cross_entropy


@pytest.fixture(scope="module")
def results():
    from cases import make_cnn_case

    case = make_cnn_case()
    data = (case.x, case.y)
    return {
        "eigs": hessian_eigs(case.model, CE, data, k=3, per="layer", seed=0, name="tiny-cnn"),
        "trace": hessian_trace(case.model, CE, data, rtol=0.05, per="layer", seed=0),
        "trace-plain": hessian_trace(case.model, CE, data, rtol=0.05, seed=0, method="hutchinson"),
        "density": spectral_density(case.model, CE, data, steps=15, probes=2, per="layer", seed=0),
    }


@pytest.mark.parametrize("key", ["eigs", "trace", "trace-plain", "density"])
def test_round_trip_summary_and_plot(results, key, tmp_path):
    res = results[key]
    loaded = Result.load(res.save(tmp_path / key))
    assert type(loaded) is type(res)
    assert set(loaded.tensors) == set(res.tensors)
    for name, t in res.tensors.items():
        torch.testing.assert_close(loaded.tensors[name], t.cpu(), rtol=0, atol=0, equal_nan=True)
    assert dict(loaded.summary()) == dict(res.summary())  # (result.json sorts the settings keys)
    assert loaded.n_hvp == res.n_hvp > 0 and loaded.meta["seed"] == 0
    fig = loaded.plot()
    assert isinstance(fig, Figure) and fig.axes
    assert "<table>" in loaded._repr_html_()


def test_eigen_result_accessors(results):
    res: EigenResult = results["eigs"]
    assert res.meta["model"]["name"] == "tiny-cnn"
    rows = dict(res.summary())
    assert rows["converged"] == "True" and rows["Hessian-vector products"] == str(res.n_hvp)
    assert "top eigenvalue, 0" in rows
    vecs = res.eigenvectors
    assert vecs is not None and len(vecs) == 3
    assert float(sum((t**2).sum() for t in vecs[0].values())) == pytest.approx(1.0, abs=1e-9)
    assert 0.0 <= res.gradient_overlap <= 1.0
    labels = [t.get_text() for t in res.plot().axes[0].get_yticklabels()]
    assert labels[:3] == ["lambda_1", "lambda_2", "lambda_3"] and "0: lambda_1" in labels


def test_trace_result_accessors(results):
    res: TraceResult = results["trace"]
    groups = res.per_group
    assert list(groups) == ["0", "1", "4"]
    assert sum(d["trace"] for d in groups.values()) == pytest.approx(res.value, rel=1e-9)
    assert all(d["mean"] == pytest.approx(d["trace"] / d["numel"]) for d in groups.values())
    assert dict(res.summary())["trace"].startswith(f"{res.value:.6g}")
    plain: TraceResult = results["trace-plain"]
    assert plain.per_group == {} and plain.tensors["running"][-1] == pytest.approx(plain.value)


def test_density_result_accessors(results):
    res: DensityResult = results["density"]
    ax = res.plot().axes[0]
    assert ax.get_yscale() == "log" and len(ax.get_lines()) == 1 + len(res.groups)
    assert res.moment(0) == pytest.approx(1.0)


def test_error_estimates_are_saved_loaded_and_shown(results, tmp_path):
    r = results["eigs"]
    assert r.errors is not None and r.errors.shape == r.eigenvalues.shape
    # the estimate never exceeds the residual (|theta - lambda| <= r always), up to the dtype's rounding floor
    floor = torch.finfo(torch.float64).eps * float(r.eigenvalues.abs().max())
    assert bool((r.errors <= torch.clamp(r.residuals, min=floor) * (1 + 1e-9)).all())
    back = Result.load(r.save(tmp_path / "eigs"))
    assert torch.equal(back.errors, r.errors) and torch.equal(back.tensors["group_errors"], r.tensors["group_errors"])
    assert "relative_errors=[" in repr(back) and "converged=" in repr(back)
    assert any(k.startswith("estimated eigenvalue errors") for k, _ in back.summary())
