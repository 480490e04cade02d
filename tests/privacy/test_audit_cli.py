"""``gradsense audit``: tables within 80 columns, run folder and report; one clear line and exit code 2 for bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gradsense.cli.audit import audit_cmd
from gradsense.cli.main import cli

BASE = ["--model", "zoo:photos-lenet", "--data", "photos", "--untrained", "--steps", "5", "--dlg-steps", "1",
        "--batch-sizes", "1,2", "--n-heldout", "32", "--finetune-steps", "2"]


def test_audit_command_prints_tables_and_writes_a_run_folder(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(audit_cmd, [*BASE, "--attacks", "idlg,inverting", "--defenses", "none,prune:0.2,dp:0.5",
                                       "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "What zoo:photos-lenet (untrained) leaks" in r.output and "Accuracy cost" in r.output
    assert "not recognisable" in r.output
    assert max(len(line) for line in r.output.splitlines()) <= 80
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["type"] for e in manifest["results"]] == ["AuditResult"]
    for fig in ("privacy-reconstructions", "privacy-tradeoff"):
        assert (out / "figures" / f"{fig}.png").is_file()
    html = (out / "report.html").read_text()
    assert "Privacy audit" in html and "accuracy cost" in html


def test_audit_is_registered_on_the_main_command():
    r = CliRunner().invoke(cli, ["audit", "--help"])
    assert r.exit_code == 0 and "--defenses" in r.output


@pytest.mark.parametrize(("args", "match"), [
    (["--attacks", "idlg,rgap"], "unknown attack"),
    (["--defenses", "none,blur"], "unknown defence"),
    (["--batch-sizes", "1,x"], "comma-separated"),
    (["--data", "cifar10"], "unknown zoo dataset"),
    (["--n-batches", "0"], "--n-batches must be >= 1"),
])
def test_bad_arguments_are_one_line_and_exit_code_2(args, match, tmp_path):
    argv = [*BASE, *args] if "--data" not in args else [a for a in BASE if a not in ("--data", "photos")] + args
    r = CliRunner().invoke(audit_cmd, [*argv, "--out", str(tmp_path / "x")])
    assert r.exit_code == 2, r.output
    assert match in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()
