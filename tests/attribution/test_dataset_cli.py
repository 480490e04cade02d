"""``gradsense attribute --all --out DIR [--resume]``: the CLI runs attribute_dataset and resumes through --resume."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import gradsense as gs
from gradsense.cli.main import cli
from gradsense.results.attribution import DatasetAttribution

ARGS = ("attribute", "--model", "zoo:breast-cancer-mlp", "--data", "zoo:breast-cancer", "--all", "--n", "40",
        "--shard-size", "8", "--method", "smoothgrad", "--option", "n_samples=3", "--seed", "4")


@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(cli, list(args), catch_exceptions=False)

    return invoke


def _api(out=None):
    model = gs.zoo.load("breast-cancer-mlp")
    x, y = gs.zoo.dataset("breast-cancer", split="test")[:40]
    return gs.attribute_dataset(model, (x, y), method="smoothgrad", n_samples=3, seed=4, shard_size=8, out=out)


def test_all_writes_shards_and_equals_the_api(run, tmp_path):
    out = tmp_path / "run"
    r = run(*ARGS, "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    res = DatasetAttribution.load(out / "dataset-smoothgrad")
    assert isinstance(gs.Result.load(out / "dataset-smoothgrad"), DatasetAttribution)
    ref = _api()
    assert torch.equal(res.attributions, ref.attributions)
    assert torch.equal(res.mean_abs_per_class(), ref.mean_abs_per_class())
    per_class = next(t for t in doc["tables"] if t["name"] == "per_class")
    counts = ref.class_counts()
    assert [int(r[1]) for r in per_class["rows"]] == [int(c) for c in counts if c > 0]
    top = next(t for t in doc["tables"] if t["name"] == "per_feature")
    best = int(ref.mean_abs_per_feature().argmax())
    assert top["rows"][0][0] == gs.load_data("zoo:breast-cancer").feature_names[best]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["results"][0]["type"] == "DatasetAttribution"
    # one line per stage on a pipe (no progress bar), the shards' stage among them
    assert "smoothgrad on 40 example(s) into" in r.stderr


def test_resume_recomputes_a_corrupted_shard_and_refuses_a_rerun_without_it(run, tmp_path):
    out = tmp_path / "run"
    assert run(*ARGS, "--out", str(out)).exit_code == 0
    shard = out / "dataset-smoothgrad" / "shard-000004.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x55
    shard.write_bytes(bytes(data))
    r = run(*ARGS, "--out", str(out))
    assert r.exit_code == 2 and "--resume" in r.output and "Traceback" not in r.output
    r = run(*ARGS, "--out", str(out), "--resume")
    assert r.exit_code == 0, r.output
    assert "recomputed" in r.stderr
    ref = _api()
    assert torch.equal(DatasetAttribution.load(out / "dataset-smoothgrad").attributions, ref.attributions)
    r = run(*ARGS[:-2], "--seed", "5", "--out", str(out), "--resume")
    assert r.exit_code == 2 and "cannot be resumed with these settings" in r.output and "seed" in r.output


@pytest.mark.parametrize("args,match", [
    (("hessian", "--model", "zoo:breast-cancer-mlp", "--out", "x", "--resume"), "nothing to resume"),
    (("attribute", "--model", "zoo:breast-cancer-mlp", "--data", "zoo:breast-cancer", "--resume"), "--resume needs --out"),
    (("attribute", "--model", "zoo:breast-cancer-mlp", "--text", "hi", "--all"), "give --data"),
    (("attribute", "--model", "zoo:breast-cancer-mlp", "--data", "zoo:breast-cancer", "--shard-size", "3"), "--all"),
])
def test_resume_and_all_misuse_is_one_error_line(run, args, match):
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert match in r.output and "Traceback" not in r.output
