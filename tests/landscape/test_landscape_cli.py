"""``gradsense landscape``: a surface and sharpness table on the bundled CNN, files written, clean errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gradsense.cli.landscape import landscape_cmd


@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(landscape_cmd, list(args), catch_exceptions=False)

    return invoke


def test_landscape_writes_results_figures_and_report(run, tmp_path):
    out = tmp_path / "run"
    r = run("--model", "zoo:digits-cnn", "--dataset", "digits", "--n", "32", "--steps", "3", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "loss at the model" in r.output and "Sharpness" in r.output
    for kind in ("sam", "average", "first-order"):
        assert kind in r.output
    manifest = json.loads((out / "manifest.json").read_text())
    names = {e["name"] for e in manifest["results"]}
    assert names == {"surface", "sharpness-sam", "sharpness-average", "sharpness-first-order"}
    assert (out / "figures" / "surface.png").stat().st_size > 0
    assert (out / "report.html").read_text().count("data:image/png;base64") == 4


def test_landscape_one_dimensional_without_sharpness(run):
    r = run("--model", "zoo:digits-cnn", "--dataset", "digits", "--n", "16", "--steps", "5", "--dims", "1",
            "--no-sharpness")
    assert r.exit_code == 0, r.output
    assert "5 points" in r.output and "Sharpness" not in r.output


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--steps", "1"], "--steps must be >= 2"),
        (["--span", "0"], "--span must be > 0"),
        (["--n", "0"], "--n must be >= 1"),
        (["--rho", "-1"], "--rho must be > 0"),
    ],
)
def test_bad_input_is_one_clean_line(run, args, match):
    r = run("--model", "zoo:digits-cnn", "--dataset", "digits", *args)
    assert r.exit_code == 2, r.output
    assert match in r.output and "Traceback" not in r.output


def test_unknown_model_is_a_clean_error(run):
    r = run("--model", "zoo:nope", "--dataset", "digits", "--steps", "3")
    assert r.exit_code == 2 and "error:" in r.output


def test_hessian_directions_from_the_cli(run):
    r = run("--model", "zoo:breast-cancer-mlp", "--dataset", "breast-cancer", "--n", "64", "--steps", "3",
            "--directions", "hessian", "--no-sharpness")
    assert r.exit_code == 0, r.output
    assert "hessian" in r.output


def test_a_second_command_adds_to_the_same_run_folder(run, tmp_path):
    from gradsense.cli.hessian import hessian_cmd

    out = tmp_path / "run"
    r = run("--model", "zoo:digits-cnn", "--dataset", "digits", "--n", "16", "--steps", "3", "--dims", "1",
            "--no-sharpness", "--out", str(out))
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(hessian_cmd, ["--model", "zoo:digits-cnn", "--dataset", "digits", "--n", "16", "--k", "1",
                                         "--steps", "5", "--probes", "1", "--rtol", "0.2", "--out", str(out)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["name"] for e in manifest["results"]] == ["surface", "hessian-eigenvalues", "hessian-trace",
                                                         "hessian-density"]
    html = (out / "report.html").read_text()
    assert "loss surface" in html.lower() and "Hessian eigenvalues" in html
    assert html.count("data:image/png;base64") == 4  # the surface's figure and the three curvature figures
