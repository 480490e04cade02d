"""``gs.load_data``: every data form round-trips known tensors exactly; mistakes are one clear error.

Oracles: the tensors we wrote (bitwise, dtype included), pixel values we drew into PNG files (and Pillow's own
box resize), the CSV cells we wrote, and the zoo dataset itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import gradsense as gs


@pytest.fixture
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, 4, generator=g, dtype=torch.float64), torch.randint(0, 5, (6,), generator=g)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_zoo_data_is_the_zoo_dataset():
    for split in ("train", "test"):
        data, zoo = gs.load_data("zoo:digits", split=split), gs.zoo.dataset("digits", split=split)
        _same(data.inputs, zoo.inputs)
        _same(data.labels, zoo.labels)
        assert data.classes == zoo.classes
    bare = gs.load_data("breast-cancer", limit=7)  # a bare zoo name, as `--dataset breast-cancer`
    x, y = gs.zoo.dataset("breast-cancer")[:7]
    _same(bare.inputs, x)
    _same(bare.labels, y)
    assert bare.feature_names == gs.zoo.dataset("breast-cancer").feature_names
    masks = gs.load_data("zoo:block-digits").masks
    _same(masks, gs.zoo.dataset("block-digits").masks)


def test_npy_npz_safetensors_pt(tmp_path, xy):
    x, y = xy
    np.save(tmp_path / "x.npy", x.numpy())
    d = gs.load_data(tmp_path / "x.npy")
    _same(d.inputs, x)
    assert d.labels is None and d.kind == "tensors"

    np.savez(tmp_path / "d.npz", inputs=x.numpy(), labels=y.numpy())
    d = gs.load_data(tmp_path / "d.npz")
    _same(d.inputs, x)
    _same(d.labels, y)
    np.savez(tmp_path / "named.npz", feats=x.numpy(), cls=y.numpy(), other=np.zeros(2))
    d = gs.load_data(tmp_path / "named.npz", inputs_key="feats", labels_key="cls")
    _same(d.inputs, x)
    _same(d.labels, y)

    save_file({"x": x, "y": y}, str(tmp_path / "d.safetensors"))
    d = gs.load_data(tmp_path / "d.safetensors")
    _same(d.inputs, x)
    _same(d.labels, y)

    for obj in ((x, y), {"inputs": x, "labels": y}, [x, y]):
        torch.save(obj, tmp_path / "d.pt")
        d = gs.load_data(tmp_path / "d.pt")
        _same(d.inputs, x)
        _same(d.labels, y)
    torch.save(x, tmp_path / "only.pt")
    d = gs.load_data(tmp_path / "only.pt", limit=4)
    _same(d.inputs, x[:4])
    # batches as the analyses see them
    xs, ys = gs.load_data(tmp_path / "d.safetensors")[1:3]
    _same(xs, x[1:3])
    _same(ys, y[1:3])


def test_csv_header_label_column_and_class_names(tmp_path):
    rows = [["radius", "texture", "diagnosis", "area"], ["1.5", "-2", "malignant", "3e2"], ["0.25", "4.75", "benign", "7"],
            ["2", "0", "malignant", "-1.5"]]
    (tmp_path / "d.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
    d = gs.load_data(tmp_path / "d.csv", label_column="diagnosis")
    assert d.feature_names == ["radius", "texture", "area"] and d.classes == ["benign", "malignant"]
    _same(d.inputs, torch.tensor([[1.5, -2, 300], [0.25, 4.75, 7], [2, 0, -1.5]], dtype=torch.float32))
    _same(d.labels, torch.tensor([1, 0, 1]))
    by_index = gs.load_data(tmp_path / "d.csv", label_column=2)
    _same(by_index.inputs, d.inputs)
    (tmp_path / "int.csv").write_text("a,b,y\n1,2,0\n3,4,2\n")
    d = gs.load_data(tmp_path / "int.csv", label_column="y")
    _same(d.labels, torch.tensor([0, 2]))
    assert d.classes is None
    (tmp_path / "reg.csv").write_text("a,b,target\n1,2,0.5\n3,4,-1.25\n")
    _same(gs.load_data(tmp_path / "reg.csv", label_column="target").labels, torch.tensor([0.5, -1.25]))
    nolabel = gs.load_data(tmp_path / "int.csv")
    assert nolabel.labels is None and nolabel.inputs.shape == (2, 3)


def test_image_folder_one_subfolder_per_class(tmp_path):
    g = np.random.default_rng(0)
    pixels = {}
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            arr = g.integers(0, 256, (4, 6, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
            pixels[(cls, i)] = arr
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    d = gs.load_data(tmp_path)
    assert d.classes == ["cat", "dog"] and d.kind == "images"
    _same(d.labels, torch.tensor([0, 0, 1, 1]))
    expected = torch.stack([torch.from_numpy(pixels[k].astype(np.float32) / 255).permute(2, 0, 1)
                            for k in (("cat", 0), ("cat", 1), ("dog", 0), ("dog", 1))])
    _same(d.inputs, expected)
    # normalisation per channel, and a resize that equals Pillow's own box filter
    d = gs.load_data(tmp_path, input_shape="3,2,3", normalize="0.5,0.4,0.3;0.2,0.25,0.5", limit=1)
    resized = np.asarray(Image.fromarray(pixels[("cat", 0)]).resize((3, 2), Image.Resampling.BOX), dtype=np.float32)
    want = (torch.from_numpy(resized / 255).permute(2, 0, 1) - torch.tensor([0.5, 0.4, 0.3]).reshape(3, 1, 1)) \
        / torch.tensor([0.2, 0.25, 0.5]).reshape(3, 1, 1)
    torch.testing.assert_close(d.inputs[0], want, rtol=0, atol=1e-6)
    gray = gs.load_data(tmp_path, input_shape=(1, 4, 6), normalize=(0.5, 0.5))
    assert gray.inputs.shape == (4, 1, 4, 6) and float(gray.inputs.min()) >= -1 and float(gray.inputs.max()) <= 1


def test_text_and_jsonl(tmp_path):
    (tmp_path / "t.txt").write_text("first sentence\n\n  second one  \n")
    d = gs.load_data(tmp_path / "t.txt")
    assert d.texts == ["first sentence", "second one"] and d.inputs is None and d.labels is None
    lines = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}, {"text": "fine", "label": "pos"}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    d = gs.load_data(tmp_path / "t.jsonl")
    assert d.texts == ["good film", "bad film", "fine"] and d.classes == ["neg", "pos"]
    _same(d.labels, torch.tensor([1, 0, 1]))
    (tmp_path / "q.jsonl").write_text('{"q": "why", "y": 3}\n{"q": "how", "y": 1}\n')
    d = gs.load_data(tmp_path / "q.jsonl", text_key="q", labels_key="y")
    assert d.texts == ["why", "how"]
    _same(d.labels, torch.tensor([3, 1]))

    class Tok:  # a tokenizer stand-in: ids are word lengths, padded with 0
        def __call__(self, texts, **kw):
            ids = [[len(w) for w in t.split()] for t in texts]
            n = max(map(len, ids))
            return {"input_ids": torch.tensor([r + [0] * (n - len(r)) for r in ids])}

    tok = d.tokenize(Tok())
    _same(tok.inputs, torch.tensor([[3], [3]]))
    _same(tok.labels, d.labels)


@pytest.mark.parametrize(
    ("make", "options", "error", "match"),
    [
        (lambda p: np.savez(p / "d.npz", a=np.zeros(2), b=np.zeros(2)), {}, ValueError, "--inputs-key"),
        (lambda p: np.savez(p / "d.npz", inputs=np.zeros(2)), {"inputs_key": "x"}, ValueError, "has no inputs 'x'"),
        (lambda p: np.save(p / "d.npy", np.array([{"a": 1}], dtype=object)), {}, ValueError, "pickled objects"),
        (lambda p: np.savez(p / "d.npz", inputs=np.zeros((3, 2)), labels=np.zeros(2)), {}, ValueError,
         "3 inputs but 2"),
        (lambda p: (p / "d.csv").write_text("a,b\n1,\n"), {}, ValueError, "empty"),
        (lambda p: (p / "d.csv").write_text("a,b\n1,x\n"), {}, ValueError, "'x', not a number"),
        (lambda p: (p / "d.csv").write_text("a,b\n1,2\n"), {"label_column": "y"}, ValueError, "no column 'y'"),
        (lambda p: (p / "d.csv").write_text("a,b\n1,2\n"), {"normalize": "0,1"}, ValueError, "does not apply"),
        (lambda p: (p / "d.jsonl").write_text('{"body": "x"}\n'), {}, ValueError, "--text-key"),
        (lambda p: (p / "d.jsonl").write_text("not json\n"), {}, ValueError, "not JSON"),
        (lambda p: (p / "d.xyz").write_text("x"), {}, ValueError, "unknown form"),
        (lambda p: (p / "d").mkdir(), {}, ValueError, "holds no images"),
        (lambda p: None, {}, FileNotFoundError, "does not exist"),
    ],
)
def test_bad_data_is_one_clear_error(tmp_path, make, options, error, match):
    make(tmp_path)
    found = [p for p in tmp_path.iterdir() if p.name.startswith("d")]
    spec = found[0] if found else tmp_path / "missing.npz"
    with pytest.raises(error, match=match):
        gs.load_data(spec, **options)


def test_zoo_refuses_file_options_and_unknown_names():
    with pytest.raises(ValueError, match="does not apply to zoo data"):
        gs.load_data("zoo:digits", label_column="y")
    with pytest.raises(ValueError, match="unknown"):
        gs.load_data("zoo:nope")
    with pytest.raises(ValueError, match="split"):
        gs.load_data("zoo:digits", split="val")


def test_data_to_model_dtype_keeps_labels(xy):
    x, y = xy
    d = gs.io.Data(x, y, name="t").to(None, torch.float32)
    assert d.inputs.dtype == torch.float32 and torch.equal(d.labels, y)
    assert Path(str(d.source or "t")).name == "t"
