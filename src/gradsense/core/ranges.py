"""Examples ``[start, stop)`` of any data form, so a run over a dataset can be cut into shards and resumed.

:func:`take` reads a contiguous range of a tensor, an ``(inputs, labels)`` pair, a ``Dataset`` or a
``DataLoader`` (through its dataset and ``collate_fn``), always in the data's own order, so shard ``i`` holds
the same examples in every run. A ``DataLoader`` that shuffles has no reproducible order and is refused by
:func:`check_ordered`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler, Subset

from gradsense.core.distributed import DataLike, num_examples

__all__ = ["check_ordered", "data_probe", "shard_seed", "take"]


def check_ordered(data: DataLike, what: str = "data") -> int:
    """Number of examples of ``data``, after checking that it has a fixed order and at least one example.

    Raises:
        ValueError: A shuffling DataLoader, a DataLoader with a custom sampler, or empty data.
        TypeError: An unsupported data type.
    """
    if isinstance(data, DataLoader):
        sampler = data.sampler
        if isinstance(sampler, RandomSampler) or not isinstance(sampler, SequentialSampler):
            raise ValueError(
                f"{what}: the DataLoader shuffles or uses a custom sampler, so its examples have no fixed order "
                "and scores could not be matched to examples. Pass its dataset, or a DataLoader with shuffle=False."
            )
    n = num_examples(data)
    if n == 0:
        raise ValueError(f"{what} is empty: need at least one example.")
    return n


def _collate(items: list[Any]) -> tuple[Any, Tensor | None]:
    first = items[0]
    if isinstance(first, (tuple, list)) and len(first) >= 2:
        return (torch.stack([torch.as_tensor(it[0]) for it in items]),
                torch.stack([torch.as_tensor(it[1]) for it in items]))
    if isinstance(first, (tuple, list)):
        return torch.stack([torch.as_tensor(it[0]) for it in items]), None
    return torch.stack([torch.as_tensor(it) for it in items]), None


def take(data: DataLike, start: int, stop: int) -> tuple[Any, Tensor | None]:
    """Examples ``start..stop-1`` of ``data`` as ``(inputs, labels_or_None)``.

    Args:
        data: Tensor of inputs, ``(inputs, labels)``, Dataset (items ``(x, y)`` or ``x``) or DataLoader (its
            ``collate_fn`` is used on the range; batches must be ``(inputs, labels)`` or dicts with ``inputs``).
        start: First example.
        stop: One past the last example.

    Returns:
        ``(inputs, labels)``; labels ``None`` when the data has none.

    Raises:
        ValueError: An empty or out-of-range range.
    """
    n = num_examples(data)
    if not 0 <= start < stop <= n:
        raise ValueError(f"take: range [{start}, {stop}) is outside the data's {n} examples.")
    if isinstance(data, Tensor):
        return data[start:stop], None
    if isinstance(data, (tuple, list)):
        x, y = data
        return x[start:stop], y[start:stop]
    if isinstance(data, DataLoader):
        batch = data.collate_fn([data.dataset[i] for i in range(start, stop)])
        if isinstance(batch, dict):
            return batch.get("inputs"), batch.get("labels")
        if isinstance(batch, (tuple, list)):
            return (batch[0], batch[1]) if len(batch) >= 2 else (batch[0], None)
        return batch, None
    if isinstance(data, Dataset):
        getitem = getattr(data, "__getitem__", None)
        try:  # datasets that index with a slice (the zoo's) return batched tensors directly
            out = getitem(slice(start, stop)) if getitem is not None and not isinstance(data, Subset) else None
        except Exception:
            out = None
        if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, Tensor) for t in out) \
                and out[0].shape[0] == stop - start:
            return out[0], out[1]
        return _collate([data[i] for i in range(start, stop)])
    raise TypeError(f"take: unsupported data type {type(data).__name__}.")


def data_probe(data: DataLike, n: int) -> str:
    """A short hash of the first, middle and last examples (inputs and labels) of ``data``.

    Stored in a sharded run's config, so that resuming a run on other data of the same size is refused rather
    than mixed into the finished shards.
    """
    h = hashlib.sha256()
    for i in sorted({0, n // 2, n - 1}):
        x, y = take(data, i, i + 1)
        for t in (x, y):
            if isinstance(t, Tensor):
                h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def shard_seed(seed: int, index: int) -> int:
    """The seed of shard ``index`` of a run seeded with ``seed``: a fixed function of both (SHA-256, 62 bits).

    Every random draw of a shard (noise samples, random baselines, probes) takes this seed, so a shard
    recomputed after a crash draws exactly what it drew the first time, whichever process computes it.
    """
    digest = hashlib.sha256(f"gradsense-shard:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2
