"""RunFolder: a second command writing into the same folder adds to its manifest instead of replacing it."""

from __future__ import annotations

import json

import pytest
import torch

from gradsense.results import Result, RunFolder


class RunTestResult(Result):
    """A minimal result."""


def _result(v: float) -> RunTestResult:
    return RunTestResult.build({"v": torch.tensor([v])}, method="toy")


def test_a_second_folder_object_adds_to_the_manifest_and_replaces_same_names(tmp_path):
    first = RunFolder(tmp_path)
    first.save_result(_result(1.0), "a")
    first.save_result(_result(2.0), "b")
    created = json.loads((tmp_path / "manifest.json").read_text())["created"]

    second = RunFolder(tmp_path)
    second.save_result(_result(3.0), "c")
    second.save_result(_result(4.0), "a")  # saved again: replaces its entry, and its files
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [e["name"] for e in manifest["results"]] == ["b", "c", "a"]
    assert manifest["created"] == created
    assert float(Result.load(tmp_path / "a").tensors["v"]) == 4.0
    assert float(Result.load(tmp_path / "b").tensors["v"]) == 2.0


def test_a_broken_manifest_is_one_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text("[1, 2", encoding="utf-8")
    with pytest.raises(ValueError, match=r"manifest\.json"):
        RunFolder(tmp_path)
