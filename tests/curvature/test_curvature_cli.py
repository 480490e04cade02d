"""``gradsense hessian``: the table, the run folder and report, and one clear line for bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gradsense.cli.hessian import hessian_cmd

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def test_hessian_command_prints_tables_and_writes_a_run_folder(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(
        hessian_cmd,
        ["--model", "zoo:digits-cnn", "--dataset", "digits", "--n", "32", "--k", "2", "--per", "layer",
         "--steps", "10", "--probes", "1", "--rtol", "0.1", "--seed", "0", "--out", str(out)],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    for text in ("Hessian eigenvalues", "residual", "trace (Hutch++)", "Per group", "features.0", "Tr(H_l)/n_l"):
        assert text in r.output, text
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["type"] for e in manifest["results"]] == ["EigenResult", "TraceResult", "DensityResult"]
    for name in ("eigenvalues", "trace", "density"):
        assert (out / "figures" / f"hessian-{name}.png").is_file()
    html = (out / "report.html").read_text()
    assert "Hessian eigenvalues" in html and "Hessian trace" in html and "spectral density" in html


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--k", "0"], "--k must be >= 1"),
        (["--n", "0"], "--n must be >= 1"),
        (["--k", "30000"], "only 24170 parameters"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, match):
    r = CliRunner().invoke(hessian_cmd, ["--model", "zoo:digits-cnn", "--dataset", "digits", "--n", "8", *args])
    assert r.exit_code == 2, r.output
    assert match in r.output and "Traceback" not in r.output


def test_hessian_command_takes_the_criterion_and_shows_the_error_estimate():
    r = CliRunner().invoke(
        hessian_cmd,
        ["--model", "zoo:digits-cnn", "--dataset", "digits", "--n", "32", "--k", "2", "--criterion", "eigenvalue",
         "--tol", "1e-4", "--steps", "5", "--probes", "1", "--rtol", "0.2", "--seed", "0"],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    assert "rel. error" in r.output and "Hessian eigenvalues" in r.output
    r = CliRunner().invoke(hessian_cmd, ["--model", "zoo:digits-cnn", "--dataset", "digits", "--n", "8",
                                         "--criterion", "exact"])
    assert r.exit_code == 2 and "exact" in r.output
