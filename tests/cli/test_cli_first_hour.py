"""A new user's first hour: their own model file, a ``torch.save`` state dict, a CSV and tensor files, on every command.

Found trying it and fixed (each reproduced here):

- ``gradsense influence`` and ``gradsense audit`` took only zoo names and ``.npz``/``.safetensors`` files (both
  are on the shared option set now; these tests run them on a user's CSV and tensor files against the API);
- a CSV read without ``--label-column`` turned its ``label`` column into a feature, and the run then failed on the
  model's input width with nothing pointing at the cause: a warning now names the column and the option;
- text data on a model without an embedding layer answered with the Python API's advice (``use gs.attribute(model,
  x, ...)``) rather than what to do on the command line;
- a misspelt ``--attacks`` name was found only after the model and data had been loaded;
- ``gradsense attribute`` on a CSV printed the settings but not one attribution: it now ranks the features by mean
  |attribution| (with the signed mean), in the terminal and in ``--json``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gradsense as gs
from gradsense.cli.main import cli

MODEL_FILE = '''
from torch import nn


def build(n_features: int = 6, n_classes: int = 3):
    return nn.Sequential(nn.Linear(n_features, 16), nn.Tanh(), nn.Linear(16, n_classes))


def linear():
    return nn.Linear(6, 3)
'''


def _build() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


@pytest.fixture()
def user(tmp_path, monkeypatch):
    """A user's folder: my.py:build, w.pt (a plain torch.save state dict), train/test CSV and .npz files."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.py").write_text(MODEL_FILE)
    torch.manual_seed(0)
    model = _build().eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    g = np.random.default_rng(0)
    x = g.standard_normal((30, 6)).astype(np.float32)
    y = g.integers(0, 3, 30)
    for name, rows in (("train", slice(0, 24)), ("test", slice(24, 30))):
        lines = ["a,b,c,d,e,f,label"] + [",".join([*(repr(float(v)) for v in xr), str(int(yr))])
                                          for xr, yr in zip(x[rows], y[rows])]
        (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n")
        np.savez(tmp_path / f"{name}.npz", inputs=x[rows], labels=y[rows])
    (tmp_path / "text.jsonl").write_text('{"text": "A man plays guitar.", "label": 0}\n')
    return model, torch.from_numpy(x), torch.from_numpy(y).long()


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "80"})


def test_attribute_on_a_csv_ranks_the_features_as_the_closed_form_says(user, tmp_path):
    torch.manual_seed(1)
    lin = nn.Linear(6, 3)
    torch.save(lin.state_dict(), tmp_path / "lin.pt")
    r = _invoke("attribute", "--model", "my.py:linear", "--weights", "lin.pt", "--data", "train.csv",
                "--label-column", "label", "--method", "saliency", "--n", "24", "--json")
    assert r.exit_code == 0, r.output
    table = next(t for t in json.loads(r.stdout)["tables"] if t["name"] == "saliency-features")
    _, _, y = user
    grads = lin.weight.detach()[y[:24]]  # saliency of a linear model: the gradient is the target class's row of W
    names = list("abcdef")
    got = {row[1]: (float(row[2]), float(row[3])) for row in table["rows"]}
    assert [row[1] for row in table["rows"]] == [names[j] for j in grads.abs().mean(0).argsort(descending=True)]
    for j, name in enumerate(names):
        assert got[name][0] == pytest.approx(float(grads[:, j].abs().mean()), rel=1e-3)
        assert got[name][1] == pytest.approx(float(grads[:, j].mean()), rel=1e-3, abs=1e-6)
    shown = _invoke("attribute", "--model", "my.py:linear", "--weights", "lin.pt", "--data", "train.csv",
                    "--label-column", "label", "--n", "24")
    assert "Features by mean |attribution| over 24 example(s) (all 6)" in shown.output
    assert max(len(line) for line in shown.stdout.splitlines()) <= 80


def test_influence_reads_a_csv_with_label_column_and_matches_the_api(user, tmp_path):
    model, x, y = user
    r = _invoke("influence", "--model", "my.py:build", "--weights", "w.pt", "--train", "train.csv", "--query",
                "test.csv", "--label-column", "label", "--k", "2", "--out", "run")
    assert r.exit_code == 0, r.output
    assert "proponent" in r.output and max(len(line) for line in r.stdout.splitlines()) <= 80
    got = gs.Result.load(tmp_path / "run" / "influence").scores
    # the oracle: the API on the same numbers read by numpy, and the weights loaded by torch itself
    want = gs.influence.scores(model, gs.losses.cross_entropy, (x[:24], y[:24]), (x[24:], y[24:]),
                               method="grad_cos").scores
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_influence_json_is_one_document_with_the_table(user):
    r = _invoke("influence", "--model", "my.py:build", "--weights", "w.pt", "--train", "train.npz", "--query",
                "test.npz", "--k", "1", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["command"] == "influence" and "influence" in doc["results"]
    table = next(t for t in doc["tables"] if t["name"] == "influence")
    assert table["header"][3] == "proponent" and len(table["rows"]) == 6  # 6 queries x k=1


def test_audit_reads_tensor_files_and_heldout_data(user):
    r = _invoke("audit", "--model", "my.py:build", "--weights", "w.pt", "--data", "train.npz", "--heldout",
                "test.npz", "--attacks", "idlg", "--defenses", "none,prune:0.5", "--batch-sizes", "1",
                "--n-heldout", "6", "--finetune-steps", "1", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert {t["name"] for t in doc["tables"]} == {"leakage", "cost"}
    leaks = next(t for t in doc["tables"] if t["name"] == "leakage")
    assert [row[0] for row in leaks["rows"]] == ["idlg", "idlg"]  # one attack x two defences


def test_audit_of_a_file_needs_heldout_data_or_no_cost(user):
    base = ("audit", "--model", "my.py:build", "--weights", "w.pt", "--data", "train.csv", "--label-column", "label",
            "--attacks", "idlg", "--defenses", "none", "--batch-sizes", "1")
    r = _invoke(*base)
    assert r.exit_code == 2 and "--heldout SPEC" in r.output and "Traceback" not in r.output
    ok = _invoke(*base, "--n-heldout", "0")
    assert ok.exit_code == 0, ok.output
    assert max(len(line) for line in ok.stdout.splitlines()) <= 80


def test_a_misspelt_attack_is_refused_before_anything_is_loaded(user):
    r = _invoke("audit", "--model", "missing.py:build", "--data", "train.npz", "--attacks", "idlg,dlgg")
    assert r.exit_code == 2
    assert "unknown attack 'dlgg' in --attacks" in r.output and "Did you mean 'dlg'?" in r.output
    assert "missing.py" not in r.output and "Traceback" not in r.output


@pytest.mark.filterwarnings("default")
def test_a_csv_read_without_label_column_names_the_likely_label_column(user):
    r = _invoke("hessian", "--model", "my.py:build", "--weights", "w.pt", "--data", "train.csv")
    assert r.exit_code == 2
    assert "its column 'label' is read as a feature" in r.output and "--label-column label" in r.output
    assert "Traceback" not in r.output
    ok = _invoke("hessian", "--model", "my.py:build", "--weights", "w.pt", "--data", "train.csv", "--label-column",
                 "label", "--k", "1", "--probes", "1", "--steps", "4", "--rtol", "0.5")
    assert ok.exit_code == 0, ok.output
    assert "read as a feature" not in ok.output


def test_text_data_on_a_model_without_embeddings_says_what_to_use(user):
    r = _invoke("attribute", "--model", "my.py:build", "--data", "text.jsonl")
    assert r.exit_code == 2
    assert "text.jsonl is text" in r.output and "no nn.Embedding layer" in r.output and "zoo:minilm" in r.output
    assert "gs.attribute(" not in r.output


@pytest.mark.parametrize("command", ["attribute", "evaluate", "hessian", "landscape", "importance", "influence",
                                     "audit", "doctor"])
def test_every_command_takes_the_shared_model_and_data_options(command):
    r = _invoke(command, "--help")
    assert r.exit_code == 0
    for option in ("--model", "--weights", "--label-column", "--input-shape", "--normalize", "--loss", "--device",
                   "--max-memory", "--seed", "--json"):
        assert option in r.output, (command, option)
    assert max(len(line) for line in r.output.splitlines()) <= 80
