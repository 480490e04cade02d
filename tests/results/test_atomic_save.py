"""Regression: a result folder is all-or-nothing, and a broken one is one clear error.

``Result.save`` used to replace ``tensors.safetensors`` and then ``result.json``: a crash between the two renames
left new tensors next to old metadata, and ``Result.load`` returned the mix. Now both files carry one save id and
``result.json`` commits the save; the oracle injects a crash before each file operation of a save (and kills a
saving process at random moments) and requires the folder to load as exactly the old result or exactly the new
one - never a mix - or to raise a clear error.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from gradsense.results import AttributionResult, ImportanceResult, Result, RunFolder
from gradsense.results import base as results_base
from gradsense.results.base import META_FILE, PREVIOUS_FILE, TENSORS_FILE, ResultFileError, atomic_write_text


class SaveTestResult(Result):
    """Two tensors and a meta field that must agree: ``a == b == meta['value']``."""

    required_tensors = ("a", "b")


def _result(value: float, n: int = 1000) -> SaveTestResult:
    return SaveTestResult.build({"a": torch.full((n,), value), "b": torch.full((3,), value)}, method="toy",
                                settings={"value": value})


def _value(folder: Path) -> float:
    """The loaded result's value, after checking its tensors and metadata belong together."""
    r = Result.load(folder)
    v = r.meta["settings"]["value"]
    assert torch.equal(r.tensors["a"], torch.full_like(r.tensors["a"], v)), "tensors from another save"
    assert torch.equal(r.tensors["b"], torch.full_like(r.tensors["b"], v)), "tensors from another save"
    return v


class _Crash(Exception):
    pass


OPERATIONS = [("os", "replace"), ("os", "link"), ("os", "unlink"), ("os", "fsync"), ("os", "chmod"),
              ("", "save_file")]


def _count_and_crash(monkeypatch, crash_at: int | None) -> list[str]:
    """Patch every file operation ``save`` makes; raise before operation number ``crash_at``."""
    done: list[str] = []
    for owner, name in OPERATIONS:
        target = results_base.os if owner == "os" else results_base
        real = getattr(target, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            if crash_at is not None and len(done) == crash_at:
                raise _Crash(f"crash before {_name}")
            done.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(target, name, wrapper)
    return done


def test_a_crash_before_any_file_operation_leaves_the_old_or_the_new_result(tmp_path, monkeypatch):
    folder = tmp_path / "r"
    _result(1.0).save(folder)
    with monkeypatch.context() as m:
        done = _count_and_crash(m, None)
        _result(3.0).save(folder)
        total = len(done)
    assert total >= 6  # save_file, fsyncs, chmods, link, two replaces, unlink
    assert "replace" in done and "link" in done and "save_file" in done
    outcomes = set()
    for k in range(total):
        _result(1.0).save(folder)
        with monkeypatch.context() as m:
            _count_and_crash(m, k)
            with pytest.raises(_Crash):
                _result(2.0).save(folder)
        value = _value(folder)  # never a mix: _value checks the tensors against the metadata
        assert value in (1.0, 2.0)
        outcomes.add(value)
        _result(4.0).save(folder)  # the next save completes, and clears what the crash left behind
        assert _value(folder) == 4.0
        assert sorted(p.name for p in folder.iterdir()) == [META_FILE, TENSORS_FILE]
    assert outcomes == {1.0, 2.0}  # the crash points cover both sides of the commit


def test_the_crash_between_the_two_renames_keeps_the_previous_result(tmp_path, monkeypatch):
    folder = tmp_path / "r"
    _result(1.0).save(folder)
    real = results_base.os.replace
    calls = []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if Path(dst).name == META_FILE:
            raise _Crash("crash between the renames")
        return real(src, dst)

    monkeypatch.setattr(results_base.os, "replace", replace)
    with pytest.raises(_Crash):
        _result(2.0).save(folder)
    monkeypatch.undo()
    assert calls == [TENSORS_FILE, META_FILE]
    # the new tensors are in place, the old metadata too: the previous tensors are what belongs with it
    assert safetensors.safe_open(str(folder / TENSORS_FILE), "pt").metadata()["save_id"] != \
        json.loads((folder / META_FILE).read_text())["save_id"]
    assert (folder / PREVIOUS_FILE).is_file()
    assert _value(folder) == 1.0


def test_without_a_previous_copy_the_mixed_folder_is_a_clear_error(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _result(1.0).save(a)
    _result(2.0).save(b)
    (a / TENSORS_FILE).write_bytes((b / TENSORS_FILE).read_bytes())  # tensors of one save next to another's JSON
    with pytest.raises(ResultFileError, match=rf"{a}: {TENSORS_FILE} \(save \w+\) does not belong with {META_FILE}"):
        Result.load(a)


def _saver(folder: Path) -> None:
    """The child: save ever new results into ``folder`` until killed."""
    i = 0
    while True:
        i += 1
        _result(float(i), n=300_000).save(folder)


@pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"), reason="needs fork and SIGKILL")
def test_a_process_killed_mid_save_leaves_a_loadable_result(tmp_path):
    folder = tmp_path / "r"
    _result(0.0, n=300_000).save(folder)
    seen = set()
    for delay in (0.01, 0.03, 0.05, 0.08, 0.13, 0.21):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            try:
                _saver(folder)
            finally:
                os._exit(0)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)  # mid-save, most likely: a save is all the child does
        os.waitpid(pid, 0)
        seen.add(_value(folder))  # whole, whichever save it is
    assert len(seen) >= 2  # the child got through saves between the kills


# ------------------------------------------------------------------------------------------ broken folders
@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "res"
    AttributionResult.build({"attributions": torch.ones(2, 3), "inputs": torch.zeros(2, 3), "scores": torch.ones(2)},
                            method="saliency").save(folder)
    return folder


def _edit_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / META_FILE).read_text())
    meta.update(changes)
    for k, v in changes.items():
        if v is _DROP:
            del meta[k]
    atomic_write_text(folder / META_FILE, json.dumps(meta))


_DROP = object()


def test_a_truncated_tensor_file_names_the_folder(saved):
    raw = (saved / TENSORS_FILE).read_bytes()
    (saved / TENSORS_FILE).write_bytes(raw[: len(raw) - 7])
    with pytest.raises(ResultFileError, match=rf"^{saved}: {TENSORS_FILE} cannot be read .*truncated"):
        Result.load(saved)
    (saved / TENSORS_FILE).write_bytes(raw[:5])
    with pytest.raises(ResultFileError, match=rf"^{saved}: {TENSORS_FILE} cannot be read"):
        Result.load(saved)


@pytest.mark.parametrize("text", ['{"type": "AttributionResult", ', "", "\x00\xff", "[1, 2]", "null"])
def test_invalid_json_names_the_folder(saved, text):
    (saved / META_FILE).write_bytes(text.encode("latin-1"))
    with pytest.raises(ResultFileError, match=rf"^{saved}: {META_FILE} (is not valid JSON|is not UTF-8|is not a gradsense)"):
        Result.load(saved)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"method": 3}, r"field 'method' should be a string, got int 3"),
        ({"settings": [1, 2]}, r"field 'settings' should be an object, got list"),
        ({"seed": "seven"}, r"field 'seed' should be an integer or null"),
        ({"wall_time_s": "fast"}, r"field 'wall_time_s' should be a number or null"),
        ({"type": 7}, r"field 'type' should be a string"),
        ({"format_version": 99}, r"written by a newer gradsense \(format 99"),
    ],
    ids=["method", "settings", "seed", "wall-time", "type", "format"],
)
def test_fields_of_the_wrong_type_name_the_field(saved, changes, match):
    _edit_meta(saved, **changes)
    with pytest.raises(ResultFileError, match=rf"^{saved}: .*{match}"):
        Result.load(saved)


def test_tensors_the_type_needs_are_named(saved, tmp_path):
    tensors = safetensors.torch.load_file(str(saved / TENSORS_FILE))
    save_id = json.loads((saved / META_FILE).read_text())["save_id"]
    del tensors["scores"]
    safetensors.torch.save_file(tensors, str(saved / TENSORS_FILE), metadata={"save_id": save_id})
    with pytest.raises(ResultFileError, match=r"lacks the tensor\(s\) \['scores'\] that a AttributionResult needs"):
        Result.load(saved)


def test_an_importance_result_without_its_score_tensors_is_refused(tmp_path):
    res = ImportanceResult.build({"score/fc.weight": torch.ones(2, 2)}, method="magnitude", keys=["fc.weight"],
                                 param_names=["fc.weight"], param_shapes=[[2, 2]], granularity="weight")
    res.save(tmp_path / "imp")
    _edit_meta(tmp_path / "imp", keys=["fc.weight", "conv.weight"])
    with pytest.raises(ResultFileError, match=rf"{TENSORS_FILE} has no tensor 'score/conv.weight', which a "
                                              "ImportanceResult needs"):
        Result.load(tmp_path / "imp")
    _edit_meta(tmp_path / "imp", keys="fc.weight")
    with pytest.raises(ResultFileError, match="field 'keys' should be a list of strings"):
        Result.load(tmp_path / "imp")


def test_missing_files_are_one_error_type_that_is_also_file_not_found(saved, tmp_path):
    with pytest.raises(ResultFileError, match="not found") as info:
        Result.load(tmp_path / "nowhere")
    assert isinstance(info.value, FileNotFoundError)
    (saved / TENSORS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"{TENSORS_FILE} not found"):
        Result.load(saved)


def test_a_save_that_cannot_be_written_writes_nothing(tmp_path):
    bad = Result.build({"t": torch.zeros(2)}, method="m")
    bad.meta["extra"] = object()  # not JSON
    with pytest.raises(TypeError):
        bad.save(tmp_path / "new")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------ run folders, report
def test_run_folder_names_must_stay_inside_the_folder(tmp_path):
    run = RunFolder(tmp_path / "run")
    for name in ("../escape", "a/b", "", ".hidden", "..", "/abs"):
        with pytest.raises(ValueError, match="one plain folder/file name"):
            run.save_result(_result(1.0), name)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []
    assert not (tmp_path / "escape").exists()


def test_an_interrupted_manifest_write_keeps_the_previous_manifest(tmp_path, monkeypatch):
    run = RunFolder(tmp_path)
    run.save_result(_result(1.0), "a")
    before = (tmp_path / "manifest.json").read_text()
    real = results_base.os.replace

    def replace(src, dst):
        if Path(dst).name == "manifest.json":
            raise _Crash("crash")
        return real(src, dst)

    monkeypatch.setattr(results_base.os, "replace", replace)
    with pytest.raises(_Crash):
        run.save_result(_result(2.0), "b")
    monkeypatch.undo()
    assert (tmp_path / "manifest.json").read_text() == before
    assert [e["name"] for e in json.loads(before)["results"]] == ["a"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("data_uri", "javascript:alert(1)"),
        ("data_uri", "http://example.com/x.png"),
        ("data_uri", 'data:image/png;base64,AAAA"><script>alert(1)</script>'),
        ("data_uri", "data:text/html;base64,PHNjcmlwdD4="),
        ("data_uri", "data:image/png;base64,AAAAAAAAAAAAAAAAAAAAAAAA"),  # base64, but not a PNG
        ("width", '100" onerror="alert(1)'),
    ],
    ids=["javascript", "http", "attribute-breakout", "html", "not-png", "width"],
)
def test_report_extend_takes_only_embedded_pngs_from_report_json(tmp_path, field, value):
    from gradsense.viz import Report
    from gradsense.viz.figures import bar_chart

    path = tmp_path / "report.html"
    report = Report("r", source="one")
    report.add_section("A", figures=[bar_chart(["a"], [1.0])])
    report.write(path)
    store = path.with_suffix(".json")
    data = json.loads(store.read_text())
    data["sections"][0]["images"][0][field] = value
    store.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"cannot read the report's stored sections in .*report\.json"):
        Report.extend(path, "r", source="two")


@pytest.mark.parametrize(
    ("field", "value"), [("anchor", 'x" onmouseover="alert(1)'), ("level", 9), ("level", "2><script>")],
    ids=["anchor", "level", "level-text"],
)
def test_report_extend_refuses_anchors_and_levels_it_would_not_write(tmp_path, field, value):
    from gradsense.viz import Report

    path = tmp_path / "report.html"
    report = Report("r", source="one")
    report.add_section("A", text="hello")
    report.write(path)
    store = path.with_suffix(".json")
    data = json.loads(store.read_text())
    data["sections"][0][field] = value
    store.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="cannot read the report's stored sections"):
        Report.extend(path, "r", source="two")


def test_report_extend_escapes_stored_text(tmp_path):
    from gradsense.viz import Report

    path = tmp_path / "report.html"
    report = Report("r", source="one")
    report.add_section("A", text="hello")
    report.write(path)
    store = path.with_suffix(".json")
    data = json.loads(store.read_text())
    data["sections"][0]["title"] = '"><script>alert(1)</script>'
    data["sections"][0]["paragraphs"] = ["<img src=x onerror=alert(1)>"]
    store.write_text(json.dumps(data))
    html = Report.extend(path, "r", source="two").render()
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;" in html
