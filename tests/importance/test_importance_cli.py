"""``gradsense importance``: tables, run folder and report; one clear line and exit code 2 for bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gradsense.cli.importance import importance_cmd

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
BASE = ["--model", "zoo:digits-cnn", "--dataset", "digits", "--n", "64", "--n-heldout", "64"]


def test_importance_command_writes_tables_run_folder_and_report(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(importance_cmd, [*BASE, "--method", "fisher", "--structure", "2:4", "--bits", "4",
                                            "--params", r"features\.(3|7)\.weight|head\.2\.weight",
                                            "--compare", "magnitude", "--sparsities", "0.3,0.6", "--out", str(out)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    for text in ("Layers ranked by fisher", "Measured vs predicted", "fisher 2:4 50% weights", "fisher mixed", "uniform 4 bits",
                 "Bits per tensor", "Sparsity sweep"):
        assert text in r.output, text
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["type"] for e in manifest["results"]] == ["ImportanceResult", "PruneResult", "BitsResult", "SweepResult"]
    for fig in ("importance-layers", "masks-sparsity", "bits", "sweep-loss"):
        assert (out / "figures" / f"{fig}.png").is_file()
    html = (out / "report.html").read_text()
    assert "Measured vs predicted" in html and "Sparsity sweep" in html and "Per-layer bits" in html


def test_channel_structure_without_sweep():
    r = CliRunner().invoke(importance_cmd, [*BASE, "--method", "taylor", "--structure", "channel", "--sparsity", "0.25",
                                            "--compare", ""], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "taylor channel 25% channels" in r.output and "Sparsity sweep" not in r.output


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--method", "snip"], "unknown --method"),
        (["--method", "taylor", "--sparsity", "1.2"], "[0, 1)"),
        (["--method", "taylor", "--structure", "3:8x"], "structure must be"),
        (["--method", "taylor", "--structure", "4:8"], "does not divide the input dimension 9 of 'features.0.weight'"),
        (["--method", "hessian", "--bits", "5"], "not one of --choices"),
        (["--method", "taylor", "--compare", "magnitude,nope"], "--compare"),
        (["--method", "gaprune"], "Python API"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, match):
    out = tmp_path / "never"
    r = CliRunner().invoke(importance_cmd, [*BASE, *args, "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert match in r.output and "Traceback" not in r.output
    assert not out.exists()
