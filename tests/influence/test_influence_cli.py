"""``gradsense influence``: a run folder that resumes, readable tables, one clear error for bad input."""

from __future__ import annotations

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import gradsense as gs
from gradsense.cli.main import cli


def _run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_influence_command_writes_a_run_folder_that_resumes(tmp_path):
    out = tmp_path / "run"
    args = ("influence", "--model", "zoo:digits-cnn", "--train", "digits:train[:60]", "--query", "digits:test[:2]",
            "--method", "grad_cos", "--k", "3", "--proj-dim", "128", "--self-influence", "--out", str(out))
    r = _run(*args)
    assert r.exit_code == 0, r.output
    assert "proponent" in r.output and "opponent" in r.output and "self-influential" in r.output
    assert max(len(line) for line in r.stdout.splitlines()) <= 80  # stderr: progress lines naming paths
    res = gs.Result.load(out / "influence")
    assert res.scores.shape == (2, 60)
    assert (out / "report.html").is_file() and (out / "figures" / "influence.png").is_file()
    feats = gs.influence.GradientFeatures.load(out / "features")
    assert feats.sharded and feats.dim == 128
    again = _run(*args)
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = _run(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    torch.testing.assert_close(gs.Result.load(out / "influence").scores, res.scores, rtol=0, atol=0)


def test_influence_command_reads_tensor_files_and_checkpoints(tmp_path):
    x, y = gs.zoo.dataset("digits", split="train")[:20]
    save_file({"inputs": x.contiguous(), "labels": y.contiguous()}, str(tmp_path / "train.safetensors"))
    model = gs.zoo.load("digits-cnn")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "ckpt.safetensors"))
    r = _run("influence", "--model", "zoo:digits-cnn", "--train", str(tmp_path / "train.safetensors"), "--query",
             "digits:test[:1]", "--method", "tracin", "--checkpoint", str(tmp_path / "ckpt.safetensors"),
             "--lr", "0.5")
    assert r.exit_code == 0, r.output
    assert "tracin" in r.output


def test_influence_command_bad_input_is_one_line(tmp_path):
    base = ("influence", "--model", "zoo:digits-cnn", "--query", "digits:test[:1]")
    for extra, match in [
        (("--train", "nosuchdata"), "unknown"),
        (("--train", "digits:train[:5]", "--resume"), "--resume needs --out"),
        (("--train", "digits:train[:5]", "--lr", "0.1"), "one --lr per --checkpoint"),
        (("--train", str(tmp_path / "missing.safetensors")), "does not exist"),
        (("--train", "digits:train[:5]", "--k", "0"), "--k"),
    ]:
        r = _run(*base, *extra)
        assert r.exit_code == 2, (extra, r.output)
        assert match in r.output and "Traceback" not in r.output, (extra, r.output)


def test_influence_command_takes_the_shared_data_options():
    import json

    r = _run("influence", "--model", "zoo:digits-cnn", "--data", "zoo:digits", "--split", "train", "--n", "30",
             "--query", "zoo:digits", "--n-query", "2", "--method", "grad_dot", "--k", "2", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    x, y = gs.zoo.dataset("digits", split="train")[:30]
    xq, yq = gs.zoo.dataset("digits", split="test")[:2]
    ref = gs.influence.scores(gs.zoo.load("digits-cnn"), gs.losses.cross_entropy, (x, y), (xq, yq), method="grad_dot")
    table = next(t for t in doc["tables"] if t["name"] == "influence")
    assert table["rows"][0][3].startswith(f"#{int(ref.top(0, 2).indices[0])} ")
    got = torch.tensor(doc["results"]["influence"]["tensors"]["scores"], dtype=ref.scores.dtype)
    torch.testing.assert_close(got, ref.scores, rtol=1e-5, atol=1e-7)
    both = _run("influence", "--model", "zoo:digits-cnn", "--data", "zoo:digits", "--train", "digits:train[:5]",
                "--query", "digits:test[:1]")
    assert both.exit_code == 2 and "--data or --train" in both.output
