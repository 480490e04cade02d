"""core.batching: memory strings, chunk sizes, chunk coverage, progress and the per-example estimate."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradsense.core.batching import (
    chunk_size_for,
    chunks,
    default_budget,
    estimate_example_bytes,
    parse_memory,
    progress,
)
from helpers import hooks_on

KB, MB, GB = 1024, 1024**2, 1024**3


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1000, 1000),
        (2.9, 2),
        ("1000", 1000),
        ("512MB", 512 * MB),
        ("512mb", 512 * MB),
        ("2 GiB", 2 * GB),
        (" 3 kb ", 3 * KB),
        ("1.5K", 1536),
        (".5GB", GB // 2),
        ("7B", 7),
        ("1T", 1024**4),
    ],
)
def test_parse_memory_forms(value, expected):
    assert parse_memory(value) == expected


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("lots", "not understood"),
        ("12 parsecs", "not understood"),
        ("-5MB", "not understood"),
        (0, "must be positive"),
        (-1, "must be positive"),
        ("0MB", "must be positive"),
        (0.5, "must be positive"),
        (True, "size string"),
        (None, "size string"),
        ([1], "size string"),
    ],
)
def test_parse_memory_errors(value, match):
    with pytest.raises(ValueError, match=match):
        parse_memory(value)


# Regression (fixed): parse_memory(float('inf')) raises OverflowError from int(), not the documented
#   ValueError
def test_parse_memory_infinite_is_a_value_error():
    with pytest.raises(ValueError):
        parse_memory(float("inf"))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"bytes_per_item": 100, "max_memory": 1000}, 10),
        ({"bytes_per_item": 100, "max_memory": 1099}, 10),  # floor
        ({"bytes_per_item": 100, "max_memory": "1KB"}, 10),
        ({"bytes_per_item": 100, "max_memory": 1000, "total": 4}, 4),  # never more than there is
        ({"bytes_per_item": 5000, "max_memory": 1000}, 1),  # at least one
        ({"bytes_per_item": 0, "max_memory": 1000}, 1000),  # zero bytes counts as one
        ({"bytes_per_item": 10**12, "chunk_size": 7}, 7),  # explicit wins over the budget
        ({"bytes_per_item": 1, "chunk_size": 7, "total": 3}, 3),
        ({"bytes_per_item": 1, "chunk_size": 7, "total": 0}, 1),
    ],
)
def test_chunk_size_for(kwargs, expected):
    b = kwargs.pop("bytes_per_item")
    assert chunk_size_for(b, **kwargs) == expected


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
def test_chunk_size_for_rejects_bad_explicit_sizes(bad):
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        chunk_size_for(1, chunk_size=bad)


def test_default_budget_follows_the_environment(monkeypatch):
    monkeypatch.setenv("GRADSENSE_MAX_MEMORY", "3MB")
    assert default_budget() == 3 * MB
    assert chunk_size_for(1000) == 3 * MB // 1000
    monkeypatch.setenv("GRADSENSE_MAX_MEMORY", "nonsense")
    with pytest.raises(ValueError, match="not understood"):
        default_budget()
    monkeypatch.delenv("GRADSENSE_MAX_MEMORY")
    assert default_budget() >= 64 * MB


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), size=st.integers(1, 64))
def test_chunks_cover_the_range_exactly_once(n, size):
    parts = list(chunks(n, size))
    covered = [i for sl in parts for i in range(n)[sl]]
    assert covered == list(range(n))
    assert all(sl.stop - sl.start == size for sl in parts[:-1])
    assert all(0 < sl.stop - sl.start <= size for sl in parts)
    assert len(parts) == -(-n // size)


@pytest.mark.parametrize("enabled", [True, False, None])
def test_progress_yields_every_item_in_order(enabled):
    items = [object() for _ in range(7)]
    assert list(progress(items, total=7, desc="test", enabled=enabled)) == items
    assert list(progress(iter(items), enabled=enabled)) == items  # generators, no total


def test_progress_is_off_with_the_environment_switch(monkeypatch):
    from gradsense.core import batching

    monkeypatch.setenv("GRADSENSE_PROGRESS", "0")
    assert batching._progress_enabled(None) is False
    assert batching._progress_enabled(True) is True
    assert list(progress(range(3))) == [0, 1, 2]


def test_estimate_example_bytes_closed_form():
    # input 4 + outputs 5 (Linear) + 5 (Tanh) + 3 (Linear) = 17 float64 values = 136 bytes; x3
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    assert estimate_example_bytes(net, x) == 3 * 136
    assert estimate_example_bytes(net, x, factor=1.0) == 136
    assert estimate_example_bytes(net.float(), x.float(), factor=1.0) == 68
    assert hooks_on(net) == {}


def test_estimate_example_bytes_leaves_no_hooks_even_when_the_forward_raises():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    net = nn.Sequential(nn.Linear(4, 5), Boom())
    with pytest.raises(RuntimeError, match="boom"):
        estimate_example_bytes(net, torch.randn(1, 4))
    assert hooks_on(net) == {}


def test_estimate_example_bytes_with_a_custom_forward():
    net = nn.Linear(4, 2).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    assert estimate_example_bytes(net, x, forward=lambda z: net(z), factor=1.0) == (4 + 2) * 8
    assert hooks_on(net) == {}
