"""Evaluation results (save/load, plot, summary, report) and the ``gradsense evaluate`` command."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from matplotlib.figure import Figure

import gradsense as gs
import gradsense.evaluation as ev
from gradsense.cli.evaluate import evaluate_cmd
from gradsense.results import Result
from gradsense.viz.report import Report


@pytest.fixture(scope="module")
def results():
    torch.manual_seed(0)
    model = gs.zoo.load("block-digits-cnn")
    data = gs.zoo.dataset("block-digits")
    x, y = data[:6]
    a = gs.attribute(model, x, target=y, method="saliency")
    bc = gs.zoo.load("breast-cancer-mlp")
    bd = gs.zoo.dataset("breast-cancer")
    return {
        "metric": ev.infidelity(model, x, a, target=y, n_perturbations=4),
        "curve": ev.deletion(model, x, a, target=y, steps=8),
        "random": ev.randomization(model, x, a, target=y, layers=["head.2", "features.7"]),
        "taylor": ev.taylor(model, x, None, target=y, n_directions=2, radii=[0.01, 0.1, 1.0]),
        "table": ev.method_table(model, x, target=y, mask=data.masks[:6], methods=["saliency"], steps=8),
        "global": ev.global_sensitivity(bc, bd, loss_fn=gs.losses.cross_entropy, order=2),
    }


@pytest.mark.parametrize("key", ["metric", "curve", "random", "taylor", "table", "global"])
def test_round_trip_plot_and_summary(results, key, tmp_path):
    r = results[key]
    r.save(tmp_path / key)
    back = Result.load(tmp_path / key)
    assert type(back) is type(r)
    assert back.meta == json.loads(json.dumps(r.meta))
    for k, v in r.tensors.items():
        torch.testing.assert_close(back.tensors[k], v.cpu(), rtol=0, atol=0)
    fig = back.plot()
    assert isinstance(fig, Figure) and fig.axes
    rows = dict(back.summary())
    if isinstance(r, ev.MetricResult):
        assert rows["mean +- s.e."].startswith(f"{r.mean:.4g}")
    report = Report("t")
    report.add_result(back)
    assert back.title in report.render()


def test_mean_and_stderr_are_over_examples(results):
    r = results["metric"]
    v = r.values.double()
    assert abs(r.mean - float(v.mean())) < 1e-12
    assert abs(r.stderr - float(v.std() / len(v) ** 0.5)) < 1e-12


def test_cli_ranks_methods_and_writes_the_run_folder(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(evaluate_cmd, ["--model", "zoo:block-digits-cnn", "--methods", "saliency,gradcam",
                                            "--n", "8", "--steps", "8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "ranked by mass" in res.output and "random" in res.output and "gradcam" in res.output
    assert (out / "report.html").is_file() and (out / "manifest.json").is_file()
    table = Result.load(out / "evaluation-methods")
    assert table.methods[-1] == "random" or table.column("mass")[-1] <= table.column("mass")[0]
    assert "Attribution methods ranked by mass" in (out / "report.html").read_text()


def test_cli_tabular_sensitivity(tmp_path):
    res = CliRunner().invoke(evaluate_cmd, ["--model", "zoo:breast-cancer-mlp", "--order", "2", "--out",
                                            str(tmp_path / "tab")])
    assert res.exit_code == 0, res.output
    assert "Spearman rank agreement, order 1 vs 2" in res.output
    assert (tmp_path / "tab" / "evaluation-global-sensitivity" / "result.json").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--methods", "salience"], "unknown attribution method 'salience'"),
    (["--n", "0"], "--n must be >= 1"),
    (["--dataset", "mnist"], "unknown zoo dataset"),
    (["--target", "cat"], "--target must be"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "never"
    res = CliRunner().invoke(evaluate_cmd, ["--model", "zoo:block-digits-cnn", *args, "--out", str(out)])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output
    assert not out.exists()
