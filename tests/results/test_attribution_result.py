"""AttributionResult persistence: safetensors + JSON round trip, atomic writes, no pickle, clear errors."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from torch import nn

import gradsense as gs
from gradsense.results import AttributionResult, Result
from gradsense.results.base import META_FILE, TENSORS_FILE, atomic_write_text


@pytest.fixture
def result():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    return gs.attribute(lin, x, target=[0, 2, 1, 1], titles=["a", "b", "c", "d"], feature_names=list("vwxyz"))


def _files(path):
    return sorted(p.name for p in path.iterdir())


def test_round_trip_keeps_tensors_meta_and_type(result, tmp_path):
    out = result.save(tmp_path / "run")
    assert out == tmp_path / "run"
    assert _files(out) == [META_FILE, TENSORS_FILE]
    back = Result.load(out)
    assert type(back) is AttributionResult
    assert back.meta == result.meta
    assert set(back.tensors) == set(result.tensors) == {"attributions", "inputs", "scores"}
    for k, v in result.tensors.items():
        assert back.tensors[k].dtype == v.dtype
        torch.testing.assert_close(back.tensors[k], v, rtol=0, atol=0)
    # loading through the subclass works the same way
    again = AttributionResult.load(out)
    assert type(again) is AttributionResult and again.meta == result.meta


def test_saved_files_are_json_and_safetensors_not_pickle(result, tmp_path):
    result.save(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text(encoding="utf-8"))
    assert meta["type"] == "AttributionResult"
    assert meta["method"] == "saliency"
    assert meta["format_version"] == 1
    assert set(meta["versions"]) == {"gradsense", "torch", "python"}
    raw = (tmp_path / TENSORS_FILE).read_bytes()
    assert not raw.startswith(b"\x80")  # pickle protocol marker
    assert not raw.startswith(b"PK")  # torch.save's zip container
    (header_len,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header length, then a JSON header
    header = json.loads(raw[8 : 8 + header_len])
    # the header names the type and the save that wrote it, as result.json does: the two files belong together
    assert header["__metadata__"] == {"type": "AttributionResult", "save_id": meta["save_id"]}
    assert len(meta["save_id"]) == 32
    assert header["attributions"]["dtype"] == "F64" and header["attributions"]["shape"] == [4, 5]
    with safe_open(str(tmp_path / TENSORS_FILE), framework="pt") as fh:
        torch.testing.assert_close(fh.get_tensor("scores"), result.scores, rtol=0, atol=0)


def test_save_leaves_no_temporary_files_and_replaces_old_ones(result, tmp_path):
    result.save(tmp_path)
    result.save(tmp_path)  # overwrite in place
    assert _files(tmp_path) == [META_FILE, TENSORS_FILE]
    smaller = AttributionResult.build(
        {"attributions": torch.zeros(1, 2), "inputs": torch.ones(1, 2), "scores": torch.zeros(1)},
        method="saliency",
    )
    smaller.save(tmp_path)
    assert _files(tmp_path) == [META_FILE, TENSORS_FILE]
    torch.testing.assert_close(Result.load(tmp_path).inputs, torch.ones(1, 2), rtol=0, atol=0)


def test_a_failed_save_leaves_no_temporary_file(tmp_path):
    shared = torch.zeros(4)
    bad = AttributionResult.build(
        {"attributions": shared, "inputs": shared[:2], "scores": shared}, method="x"
    )
    with pytest.raises(RuntimeError):  # safetensors refuses tensors that share memory
        bad.save(tmp_path)
    assert not [p for p in _files(tmp_path) if p.endswith(".tmp")]


def test_views_and_non_contiguous_tensors_are_saved_by_value(tmp_path):
    big = torch.randn(10, 6, dtype=torch.float64)
    r = AttributionResult.build(
        {"attributions": big[2:5], "inputs": big[:, ::2][5:8].clone(), "scores": big[:3, 0]}, method="x"
    )
    r.save(tmp_path)
    back = Result.load(tmp_path)
    torch.testing.assert_close(back.attributions, big[2:5], rtol=0, atol=0)
    torch.testing.assert_close(back.scores, big[:3, 0], rtol=0, atol=0)


def test_properties_and_helpers(result):
    torch.testing.assert_close(
        result.sum_per_example(), result.attributions.reshape(4, -1).sum(1), rtol=0, atol=0
    )
    assert result.delta is None
    f32 = result.to(torch.float32)
    assert f32.attributions.dtype == torch.float32 and f32.meta == result.meta
    rows = dict(result.summary())
    assert rows["method"] == "saliency" and rows["examples"] == "4" and rows["abs"] == "false"
    assert result.title == "Attribution: saliency"
    assert "attributions=(4, 5)" in repr(result)


def test_build_converts_settings_to_json():
    r = Result.build(
        {"t": torch.zeros(1)},
        method="m",
        settings={
            "steps": 3,
            "baseline": torch.tensor([1.0, 2.0]),
            "big": torch.zeros(100),
            "dtype": torch.float64,
            "fn": len,
        },
        seed=7,
    )
    assert r.meta["settings"] == {
        "steps": 3,
        "baseline": [1.0, 2.0],
        "big": "tensor(shape=[100], dtype=torch.float32)",
        "dtype": "torch.float64",
        "fn": "len",
    }
    json.dumps(r.meta)  # all of it is JSON
    assert r.meta["seed"] == 7


def test_load_errors(result, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{META_FILE} not found"):
        Result.load(tmp_path / "nowhere")
    result.save(tmp_path)
    (tmp_path / TENSORS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"{TENSORS_FILE} not found"):
        Result.load(tmp_path)
    result.save(tmp_path)
    (tmp_path / META_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"{META_FILE} not found"):
        Result.load(tmp_path)
    result.save(tmp_path)
    atomic_write_text(tmp_path / META_FILE, json.dumps(["not", "a", "result"]))
    with pytest.raises(ValueError, match="not a gradsense result"):
        Result.load(tmp_path)
    atomic_write_text(tmp_path / META_FILE, json.dumps({"method": "x"}))
    with pytest.raises(ValueError, match="no 'type' field"):
        Result.load(tmp_path)


def test_unknown_type_loads_as_the_calling_class(tmp_path):
    r = Result.build({"t": torch.arange(3)}, method="m")
    r.save(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["type"] = "SomethingFromTheFuture"
    atomic_write_text(tmp_path / META_FILE, json.dumps(meta))
    back = Result.load(tmp_path)
    assert type(back) is Result
    torch.testing.assert_close(back.tensors["t"], torch.arange(3), rtol=0, atol=0)


def test_atomic_write_text_creates_folders_and_leaves_no_temp_file(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "b.txt", "héllo")
    assert path.read_text(encoding="utf-8") == "héllo"
    assert _files(tmp_path / "a") == ["b.txt"]


def test_repr_html_shows_escaped_summary_and_an_embedded_plot():
    import base64

    import gradsense as gs

    lin = torch.nn.Linear(4, 2)
    res = gs.attribute(lin, torch.randn(2, 4), target=lambda out, batch: out[:, 1])
    html = res._repr_html_()
    assert "<table>" in html and "saliency" in html
    uri = html.split("src='data:image/png;base64,")[1].split("'")[0]
    assert base64.b64decode(uri)[:8] == b"\x89PNG\r\n\x1a\n"
    # the target's description is "<lambda>": shown escaped, never as markup
    assert "&lt;lambda&gt;" in html and "<lambda>" not in html
