"""All dataset iteration goes through here, so runs can be sharded over torch.distributed ranks.

With world size 1 (the default, and whenever torch.distributed is not initialised) every function
is the plain single-process path. ``data=`` may be

- a tensor of inputs (no labels),
- an ``(inputs, labels)`` pair of tensors,
- a ``torch.utils.data.Dataset`` whose items are ``(x, y)`` or ``x``, or
- a ``torch.utils.data.DataLoader`` (iterated as it is).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["all_reduce_sum", "is_main_process", "iterate", "materialize", "num_examples", "world"]

DataLike = Any


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` unless torch.distributed is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (the process that writes files)."""
    return world()[0] == 0


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum a tensor over ranks (in place); a no-op with world size 1."""
    if world()[1] > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def _check_pair(data: tuple | list) -> tuple[Tensor, Tensor | None]:
    if len(data) != 2 or not all(isinstance(t, Tensor) for t in data):
        raise TypeError(
            "data as a tuple must be (inputs, labels), two tensors; got "
            f"{len(data)} items of types {[type(t).__name__ for t in data]}."
        )
    x, y = data
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"data: {x.shape[0]} inputs but {y.shape[0]} labels.")
    return x, y


def num_examples(data: DataLike) -> int:
    """Number of examples in ``data`` (for a DataLoader, of its dataset)."""
    if isinstance(data, Tensor):
        return data.shape[0] if data.ndim else 0
    if isinstance(data, (tuple, list)):
        return _check_pair(data)[0].shape[0]
    if isinstance(data, DataLoader):
        return len(data.dataset)  # type: ignore[arg-type]
    if isinstance(data, Dataset):
        return len(data)  # type: ignore[arg-type]
    raise TypeError(
        "data must be a tensor, an (inputs, labels) pair, a Dataset or a DataLoader; "
        f"got {type(data).__name__}."
    )


def _split_item(item: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(item, Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0], item[1]
    if isinstance(item, (tuple, list)) and len(item) == 1:
        return item[0], None
    if isinstance(item, dict) and "inputs" in item:
        return item["inputs"], item.get("labels")
    raise TypeError(f"cannot read (inputs, labels) from a batch of type {type(item).__name__}.")


def iterate(data: DataLike, *, batch_size: int = 256) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(inputs, labels_or_None)`` batches of ``data``; this rank's share when distributed.

    Args:
        data: Tensor, (inputs, labels), Dataset or DataLoader.
        batch_size: Batch size used for tensors and Datasets (a DataLoader keeps its own).

    Raises:
        ValueError: If ``data`` is empty or a DataLoader yields no batch at all (e.g. ``drop_last=True`` with
            a batch larger than the dataset; raised when the iteration ends, before anything was yielded), or
            its inputs hold NaN/Inf (tensor data: before the first batch; a Dataset or DataLoader: at the batch
            that holds them).
        TypeError: If ``data`` has an unsupported type.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    n = num_examples(data)
    if n == 0:
        raise ValueError("data is empty: need at least one example.")
    rank, size = world()
    if isinstance(data, (Tensor, tuple, list)):
        x, y = (data, None) if isinstance(data, Tensor) else _check_pair(data)
        _check_finite(x, "data")
        for start in range(rank * batch_size, n, batch_size * size):
            stop = min(start + batch_size, n)
            yield x[start:stop], (None if y is None else y[start:stop])
        return
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=False)
    seen = 0
    for i, item in enumerate(loader):
        seen += 1
        if i % size == rank:
            x, y = _split_item(item)
            _check_finite(x, f"batch {i} of data")
            yield x, y
    if seen == 0:  # before any work: nothing was yielded
        raise ValueError(empty_loader_message(loader, n))


def empty_loader_message(loader: DataLoader, n: int) -> str:
    """Why a DataLoader over ``n`` examples yielded no batch, and what to do."""
    bs, drop = getattr(loader, "batch_size", None), getattr(loader, "drop_last", False)
    if drop and isinstance(bs, int) and bs > n:
        return (
            f"data yielded no batches: the DataLoader has {n} examples, batch_size={bs} and drop_last=True, so its "
            f"only batch is dropped. Use drop_last=False or a batch_size of at most {n}."
        )
    return (
        f"data yielded no batches although its dataset has {n} examples (its sampler or batch sampler produced "
        "nothing). Check the DataLoader's sampler, batch_size and drop_last."
    )


def _check_finite(x: Tensor, what: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what} holds {n_bad} NaN/Inf input values; clean or impute them first.")


def materialize(data: DataLike, *, batch_size: int = 256) -> tuple[Tensor, Tensor | None]:
    """All of ``data`` (this rank's share) as one ``(inputs, labels)`` pair of tensors."""
    xs, ys = [], []
    for x, y in iterate(data, batch_size=batch_size):
        xs.append(x)
        ys.append(y)
    labels = None if any(y is None for y in ys) else torch.cat(ys)  # type: ignore[arg-type]
    return torch.cat(xs), labels
