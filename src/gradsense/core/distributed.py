"""All dataset iteration goes through here, so runs can be sharded over torch.distributed ranks.

With world size 1 (the default, and whenever torch.distributed is not initialised) every function
is the plain single-process path. Under a process group (``torchrun``, or your own
``torch.distributed.init_process_group``):

- :func:`iterate` gives each rank every ``world_size``-th batch (batch ``i`` to rank ``i % world_size``), so
  the ranks share the passes over the data; shards may be uneven (an odd number of batches);
- the analyses weight each batch by its number of examples and sum with :func:`all_reduce_sum`, so every
  rank gets the same dataset mean as one process would (up to the order of the floating-point sums);
- random draws come from seeded generators, and a seed left to chance (``seed=None``) is drawn on rank 0
  and broadcast (:func:`broadcast_seed`), so every rank draws the same probes and directions;
- only rank 0 writes files and prints (:func:`is_main_process`).

:func:`process_group` joins the group ``torchrun`` describes in the environment (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo for CPU tensors and NCCL for CUDA tensors; the
``gradsense`` command does this itself. ``data=`` may be

- a tensor of inputs (no labels),
- an ``(inputs, labels)`` pair of tensors,
- a ``torch.utils.data.Dataset`` whose items are ``(x, y)`` or ``x``, or
- a ``torch.utils.data.DataLoader`` (iterated as it is).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "all_gather_cat",
    "all_reduce_sum",
    "broadcast_seed",
    "is_main_process",
    "iterate",
    "launched",
    "materialize",
    "num_examples",
    "process_group",
    "world",
]

DataLike = Any


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` unless torch.distributed is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (the process that writes files)."""
    return world()[0] == 0


def _collective_device(tensor: Tensor) -> torch.device | None:
    """Where ``tensor`` must go for a collective: ``None`` when the backend takes it where it is.

    A process group with NCCL alone (``init_process_group("nccl")``) cannot reduce CPU tensors (the counts of
    examples live on the CPU): they travel through the current CUDA device.
    """
    backend = str(torch.distributed.get_backend())
    if tensor.device.type == "cpu" and backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum a tensor over ranks (in place); a no-op with world size 1.

    Every rank must call it with a tensor of the same shape and dtype, at the same point of the run. CPU
    tensors work under an NCCL-only process group too (they are reduced on the current CUDA device).

    Args:
        tensor: This rank's part (replaced by the sum over all ranks).

    Returns:
        ``tensor``, now holding the sum.
    """
    if world()[1] > 1:
        device = _collective_device(tensor)
        if device is None:
            torch.distributed.all_reduce(tensor)
        else:
            moved = tensor.to(device)
            torch.distributed.all_reduce(moved)
            tensor.copy_(moved)
    return tensor


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` concatenated along the first dimension, in rank order (``tensor`` with world size 1).

    The ranks' first dimensions may differ (uneven shards); the other dimensions and the dtype must agree. For
    what cannot be summed over ranks, such as a metric of all outputs and labels together.

    Args:
        tensor: This rank's rows.

    Returns:
        All ranks' rows, rank 0's first.
    """
    if world()[1] == 1:
        return tensor
    size = world()[1]
    device = _collective_device(tensor)
    local = tensor if device is None else tensor.to(device)
    n = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
    counts = [torch.zeros_like(n) for _ in range(size)]
    torch.distributed.all_gather(counts, n)
    rows = [int(c.item()) for c in counts]
    padded = torch.zeros((max(rows), *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(size)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:r] for p, r in zip(parts, rows)]).to(tensor.device)


def broadcast_seed(seed: int) -> int:
    """Rank 0's ``seed`` on every rank (``seed`` itself with world size 1).

    Used where a seed is drawn from torch's global RNG (``seed=None``): the ranks' global RNGs need not agree,
    but their probes, start vectors and directions must.
    """
    if world()[1] == 1:
        return seed
    t = torch.tensor([seed], dtype=torch.int64)
    device = _collective_device(t)
    moved = t if device is None else t.to(device)
    torch.distributed.broadcast(moved, src=0)
    return int(moved.item())


def launched() -> bool:
    """True when this process was started by ``torchrun`` (or another launcher) as one of several ranks.

    Read from the environment torchrun sets: ``WORLD_SIZE`` above 1, with ``RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``.
    """
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return False
    return size > 1 and all(k in os.environ for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"))


def _default_backend() -> str:
    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        return "cpu:gloo,cuda:nccl"  # counts and CPU results through gloo, CUDA tensors through NCCL
    return "gloo"


@contextlib.contextmanager
def process_group(backend: str | None = None, *, timeout_s: float | None = None) -> Iterator[tuple[int, int]]:
    """Join the process group that ``torchrun`` describes in the environment, and leave it at the end.

    Nothing happens (and ``(0, 1)`` or the existing group's ``(rank, world_size)`` is yielded) when the process
    was not launched as one of several ranks (:func:`launched`) or a group is already initialised (yours:
    it is left as it is). On a machine with CUDA, each rank's current device becomes ``cuda:LOCAL_RANK``, so
    ``--device cuda`` means one GPU per rank.

    Args:
        backend: torch.distributed backend; default ``"cpu:gloo,cuda:nccl"`` where CUDA and NCCL are
            available (NCCL for GPU tensors, gloo for CPU ones), else ``"gloo"``.
        timeout_s: Timeout of collectives in seconds (default torch's).

    Yields:
        ``(rank, world_size)``.

    Raises:
        RuntimeError: torch.distributed is not available in this build of torch, or the rendezvous fails.
    """
    if not launched() or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        yield world()
        return
    if not torch.distributed.is_available():
        raise RuntimeError(
            "this process was launched as one of several ranks (WORLD_SIZE > 1), but this build "
            "of torch has no torch.distributed; run a single process."
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and local < torch.cuda.device_count():
        torch.cuda.set_device(local)
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    torch.distributed.init_process_group(backend=backend or _default_backend(), **kwargs)
    try:
        yield world()
    finally:
        torch.distributed.destroy_process_group()


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
            that holds them); under torch.distributed also when there are fewer batches than ranks (raised on
            every rank alike, before any batch).
        TypeError: If ``data`` has an unsupported type.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    n = num_examples(data)
    if n == 0:
        raise ValueError("data is empty: need at least one example.")
    rank, size = world()
    if size > 1:
        _check_shards(data, n, batch_size, size)
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


def _check_shards(data: DataLike, n: int, batch_size: int, size: int) -> None:
    """Every rank needs at least one batch (the same check, with the same answer, on every rank)."""
    if isinstance(data, DataLoader):
        try:
            n_batches = len(data)
        except TypeError:  # an iterable-style dataset: its length is unknown, nothing to check
            return
        bs = data.batch_size
    else:
        n_batches, bs = -(-n // batch_size), batch_size
    if n_batches < size:
        fit = max(1, n // size)
        raise ValueError(
            f"data has {n_batches} batch{'es' if n_batches != 1 else ''} ({n} examples, batch size {bs}) for "
            f"{size} ranks: every rank needs at least one batch. Use a batch size of at most {fit} "
            f"(--batch-size {fit}), more data, or fewer ranks."
        )


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
