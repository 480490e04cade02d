"""Sharded run stores: a long computation over a dataset, written as it goes, that resumes after a crash.

A :class:`ShardStore` is a folder::

    shards.json                  the manifest: the run's config, the shard size, the completed shards
    shard-000000.safetensors     rows [0, shard_rows) of every output tensor
    shard-000001.safetensors     ...

How it stays consistent, whatever kills the process and when:

- a shard is written to a temporary name, flushed and ``fsync``-ed, then renamed over its final name
  (``os.replace``, atomic), and the folder is ``fsync``-ed;
- only then is the shard entered in the manifest, with the SHA-256 of its bytes; the manifest is itself
  replaced atomically, so it lists only shards whose bytes were complete on disk;
- on resume every listed shard is read back and hashed: a shard whose bytes differ (a disk error, a copy cut
  short) is recomputed, files not in the manifest (a crash between rename and manifest) are overwritten and
  temporary files are deleted;
- a run is only resumed with the same config (method, model fingerprint, data size, seed, chunk size, ...):
  anything else is one clear error, never a mix of two runs.

Each shard's rows are computed from the data alone (never from a running state), with the chunk size
recorded in the config, so a resumed run is bitwise the uninterrupted one. Reading concatenates the shards in
order. Under ``torch.distributed`` the pending shards are dealt out to the ranks in turn, each computed shard
is sent to all ranks (as safetensors bytes: no pickle), and only rank 0
(:func:`~gradsense.core.distributed.is_main_process`) writes.

Example:
    >>> import tempfile, torch
    >>> store = ShardStore(tempfile.mkdtemp(), total=10, shard_rows=4, config={"what": "squares"})
    >>> store.run(lambda i, rows: {"x": torch.arange(rows.start, rows.stop) ** 2})
    >>> store.read_all()["x"].tolist()
    [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from gradsense.core.batching import progress
from gradsense.core.distributed import is_main_process, world
from gradsense.results.base import Result, _fsync_dir, atomic_write_bytes, atomic_write_text, versions

__all__ = ["MANIFEST", "ShardStore", "is_shard_store", "previous_run"]

MANIFEST = "shards.json"
FORMAT = "gradsense-shards"
FORMAT_VERSION = 1


def is_shard_store(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder with a shard manifest."""
    return (Path(path) / MANIFEST).is_file()


def previous_run(path: str | os.PathLike[str] | None, resume: bool) -> dict[str, Any] | None:
    """The manifest of the run to be resumed in ``path`` (``None``: not resuming, or nothing there yet).

    Lets a run inherit the sizes it was started with (rows per shard, chunk size) when the caller does not
    give them again, so that ``resume=True`` alone continues the same run. An unreadable manifest gives
    ``None`` here; opening the store names the problem.
    """
    if path is None or not resume or not is_shard_store(path):
        return None
    try:
        old = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) and old.get("format") == FORMAT else None


def _normalise(config: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(config), sort_keys=True))
    except (TypeError, ValueError) as err:
        raise TypeError(f"ShardStore config must be JSON-serialisable: {err}") from err


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '<missing>')!r} -> {new.get(k, '<missing>')!r}" for k in keys if old.get(k) != new.get(k)]


class ShardStore:
    """A folder of safetensors shards plus a manifest of the completed ones (see the module docstring).

    Args:
        path: The folder (created on the main process if missing).
        total: Number of rows (examples) of the whole run.
        shard_rows: Rows per shard (the last shard may be shorter).
        config: JSON-serialisable description of the run; resuming needs the same one.
        resume: Continue a run already in the folder. ``False`` with a manifest there is an error (nothing is
            overwritten silently).
        what: Name of the run, for messages.
        verify: On resume, read every completed shard back and check its hash (else only its size; reading
            checks the hash anyway).

    Raises:
        ValueError: Bad sizes; the folder holds a run and ``resume`` is False; the folder holds a different run
            (the differing settings are named); an unreadable manifest.
    """

    def __init__(self, path: str | os.PathLike[str], *, total: int, shard_rows: int, config: Mapping[str, Any],
                 resume: bool = False, what: str = "run", verify: bool = True) -> None:
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"{what}: total must be a positive number of rows, got {total!r}.")
        if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
            raise ValueError(f"{what}: shard_rows must be a positive int, got {shard_rows!r}.")
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{what}: {self.path} exists and is not a folder.")
        self.total, self.shard_rows, self.what = total, shard_rows, what
        self.config = _normalise(config)
        self.meta: dict[str, Any] = {}
        self.entries: dict[int, dict[str, Any]] = {}
        self.complete = False
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.recomputed: list[int] = []
        self._verify_hash = verify
        manifest = self.path / MANIFEST
        if manifest.is_file():
            old = self._read_manifest()
            if not resume:
                raise ValueError(
                    f"{self.path} already holds a {old.get('what', 'run')} ({len(old.get('shards', []))} of "
                    f"{old.get('n_shards', '?')} shards done). Pass resume=True (CLI: --resume) to continue or reuse "
                    "it, or choose another folder."
                )
            self._adopt(old)
        self._barrier()

    # ------------------------------------------------------------------------------------------ manifest
    def _read_manifest(self) -> dict[str, Any]:
        manifest = self.path / MANIFEST
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))
            if not isinstance(old, dict) or old.get("format") != FORMAT:
                raise ValueError("not a gradsense shard manifest")
            return old
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {manifest}: {err}. Delete the folder or choose another one.") from err

    def _adopt(self, old: dict[str, Any]) -> None:
        changes = _diff(old.get("config", {}), self.config)
        if old.get("total") != self.total:
            changes.append(f"rows: {old.get('total')} -> {self.total}")
        if old.get("shard_rows") != self.shard_rows:
            changes.append(f"shard_rows: {old.get('shard_rows')} -> {self.shard_rows}")
        if changes:
            raise ValueError(
                f"{self.path} holds a different {old.get('what', 'run')}, so it cannot be resumed with these settings "
                f"({'; '.join(changes[:6])}). Use the same settings, or another folder."
            )
        self.created = str(old.get("created", self.created))
        self.meta = dict(old.get("meta") or {})
        for e in old.get("shards", []):
            i = int(e["index"])
            if self._verify(e):
                self.entries[i] = dict(e)
            else:
                self.recomputed.append(i)
        if self.recomputed:
            warnings.warn(f"{self.path}: shards {self.recomputed[:8]} are missing or corrupted and will be recomputed.",
                          RuntimeWarning, stacklevel=3)
        self.complete = bool(old.get("complete")) and len(self.entries) == self.n_shards

    def _verify(self, entry: Mapping[str, Any]) -> bool:
        f = self.path / str(entry.get("file", ""))
        try:
            if not self._verify_hash:
                return f.stat().st_size == entry.get("bytes")
            data = f.read_bytes()
        except OSError:
            return False
        return hashlib.sha256(data).hexdigest() == entry.get("sha256")

    def _write_manifest(self) -> None:
        doc = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "what": self.what, "created": self.created,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(), "config": self.config,
            "total": self.total, "shard_rows": self.shard_rows, "n_shards": self.n_shards,
            "complete": self.complete, "meta": self.meta,
            "shards": [self.entries[i] for i in sorted(self.entries)],
        }
        atomic_write_text(self.path / MANIFEST, json.dumps(doc, indent=1))

    # ------------------------------------------------------------------------------------------ geometry
    @property
    def n_shards(self) -> int:
        """Number of shards of the whole run."""
        return -(-self.total // self.shard_rows)

    def rows(self, index: int) -> slice:
        """The rows ``[start, stop)`` of shard ``index``."""
        if not 0 <= index < self.n_shards:
            raise IndexError(f"shard {index} is outside 0..{self.n_shards - 1}.")
        start = index * self.shard_rows
        return slice(start, min(start + self.shard_rows, self.total))

    @property
    def done(self) -> list[int]:
        """Indices of the completed shards."""
        return sorted(self.entries)

    @property
    def pending(self) -> list[int]:
        """Indices of the shards still to compute."""
        return [i for i in range(self.n_shards) if i not in self.entries]

    # ------------------------------------------------------------------------------------------ writing
    def write(self, index: int, tensors: Mapping[str, Tensor]) -> None:
        """Write shard ``index`` (main process only; other ranks return at once).

        Every tensor's first dimension must be the shard's number of rows.

        Raises:
            ValueError: No tensors, or a tensor with the wrong number of rows.
        """
        rows = self.rows(index)
        n = rows.stop - rows.start
        if not tensors:
            raise ValueError(f"{self.what}: shard {index} has no tensors.")
        bad = {k: tuple(v.shape) for k, v in tensors.items() if v.ndim == 0 or v.shape[0] != n}
        if bad:
            raise ValueError(f"{self.what}: shard {index} must have {n} rows in every tensor, got {bad}.")
        if not is_main_process():
            return
        payload = st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                          metadata={"index": str(index), "rows": f"{rows.start}:{rows.stop}"})
        self._store(index, payload)

    def _store(self, index: int, payload: bytes) -> None:
        name = f"shard-{index:06d}.safetensors"
        atomic_write_bytes(self.path / name, payload)
        _fsync_dir(self.path)
        rows = self.rows(index)
        self.entries[index] = {"index": index, "file": name, "start": rows.start, "stop": rows.stop,
                               "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        self._write_manifest()

    def finish(self, meta: Mapping[str, Any] | None = None) -> None:
        """Mark the run complete (all shards written) and store ``meta`` (JSON) in the manifest.

        Raises:
            ValueError: Shards are still missing.
        """
        if self.pending:
            raise ValueError(f"{self.what}: {len(self.pending)} shards are still missing; cannot finish.")
        self.meta.update(_normalise(meta or {}))
        self.complete = True
        if is_main_process():
            self._write_manifest()
        self._barrier()

    def run(self, compute: Callable[[int, slice], Mapping[str, Tensor]], *, desc: str = "",
            show_progress: bool | None = None, collective: bool = False) -> None:
        """Compute and write every pending shard: ``compute(index, rows) -> {name: tensor}``.

        Completed shards are skipped. Under ``torch.distributed`` the pending shards are dealt to the ranks in
        turn and rank 0 writes them all; with ``collective=True`` every rank computes every shard together (a
        computation that itself splits the data over the ranks and reduces, such as a Hessian-vector product
        over a dataset) and rank 0 writes it. A progress bar with an ETA shows on a TTY (``show_progress``).
        """
        if is_main_process():
            self.path.mkdir(parents=True, exist_ok=True)
            for tmp in self.path.glob(".*.tmp"):  # a write cut short by a crash
                try:
                    tmp.unlink()
                except OSError:
                    pass
        self._barrier()
        pending = self.pending
        rank, size = world()
        label = desc or self.what
        if self.done:
            label = f"{label} (resuming: {len(self.done)}/{self.n_shards} shards done)"
        if size == 1 or collective:
            shown = show_progress if is_main_process() else False
            for i in progress(pending, total=len(pending), desc=label, enabled=shown):
                self.write(i, compute(i, self.rows(i)))
                if not is_main_process():
                    rows = self.rows(i)
                    self.entries[i] = {"index": i, "start": rows.start, "stop": rows.stop}
            self._barrier()
            return
        rounds = [pending[j:j + size] for j in range(0, len(pending), size)]
        for group in progress(rounds, total=len(rounds), desc=label, enabled=show_progress):
            mine = group[rank] if rank < len(group) else None
            payload = None
            if mine is not None:
                tensors = compute(mine, self.rows(mine))
                payload = st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
            for src, index in enumerate(group):
                data = _broadcast_bytes(payload if src == rank else None, src)
                if is_main_process():
                    self._store(index, data)
                else:
                    rows = self.rows(index)
                    self.entries[index] = {"index": index, "start": rows.start, "stop": rows.stop}
        self._barrier()

    # ------------------------------------------------------------------------------------------ reading
    def read(self, index: int, keys: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Shard ``index`` (hash checked).

        Raises:
            ValueError: The shard is not complete, or its bytes do not match the manifest.
        """
        entry = self.entries.get(index)
        if entry is None or "file" not in entry:
            if entry is not None:  # a non-main rank: reread the manifest rank 0 wrote
                self._refresh()
                entry = self.entries.get(index)
            if entry is None or "file" not in entry:
                raise ValueError(f"{self.what}: shard {index} is not complete.")
        data = (self.path / entry["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"{self.path / entry['file']} is corrupted (hash differs from the manifest); "
                             "resume the run to recompute it.")
        tensors = st_load(data)
        return tensors if keys is None else {k: tensors[k] for k in keys}

    def _refresh(self) -> None:
        old = self._read_manifest()
        self.entries = {int(e["index"]): dict(e) for e in old.get("shards", [])}
        self.meta = dict(old.get("meta") or {})
        self.complete = bool(old.get("complete"))

    def iter_shards(self, keys: Sequence[str] | None = None) -> Iterator[tuple[slice, dict[str, Tensor]]]:
        """``(rows, tensors)`` of every shard in order (one shard in memory at a time).

        Raises:
            ValueError: The run is not complete.
        """
        if self.pending:
            raise ValueError(f"{self.what} in {self.path} is incomplete ({len(self.done)}/{self.n_shards} shards); "
                             "resume it first.")
        for i in range(self.n_shards):
            yield self.rows(i), self.read(i, keys)

    def read_all(self, keys: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Every shard concatenated along the first dimension, in order."""
        parts: dict[str, list[Tensor]] = {}
        for _, tensors in self.iter_shards(keys):
            for k, v in tensors.items():
                parts.setdefault(k, []).append(v)
        return {k: torch.cat(v) for k, v in parts.items()}

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ShardStore:
        """Open an existing store for reading (its own config; nothing is recomputed).

        Raises:
            FileNotFoundError: No manifest in ``path``.
        """
        manifest = Path(path) / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} not found: {path} is not a sharded run folder.")
        old = json.loads(manifest.read_text(encoding="utf-8"))
        return cls(path, total=int(old["total"]), shard_rows=int(old["shard_rows"]), config=old.get("config", {}),
                   resume=True, what=str(old.get("what", "run")), verify=False)

    def _barrier(self) -> None:
        if world()[1] > 1:
            torch.distributed.barrier()


def load_sharded_result(cls: type[Result], directory: str | os.PathLike[str], *, resume_hint: str) -> Any:
    """Open a result of type ``cls`` saved with ``save()`` or written as shards to ``directory``.

    Args:
        cls: The sharded result type (its tensors are read lazily from the folder's shards).
        directory: A saved result's folder, or a shard folder written with ``out=``.
        resume_hint: The call that resumes an incomplete run, for the error message.

    Raises:
        FileNotFoundError: Neither a result nor a shard folder.
        ValueError: An incomplete shard run, or a result of another type.
    """
    directory = Path(directory)
    if is_shard_store(directory):
        store = ShardStore.open(directory)
        if store.pending or "result" not in store.meta:
            raise ValueError(f"{directory} holds an incomplete run ({len(store.done)}/{store.n_shards} shards); "
                             f"resume it with {resume_hint}.")
        meta = dict(store.meta["result"])
        meta["store"] = str(directory.resolve())
        return cls(tensors={}, meta=meta)
    res = Result.load(directory)
    if not isinstance(res, cls):
        raise ValueError(f"{directory} holds a {type(res).__name__}, not a {cls.__name__}.")
    return res


def save_sharded_result(result: Any, directory: str | os.PathLike[str], **fields: Any) -> Path | None:
    """Save a sharded result: into its own shard folder only ``result.json`` is added (no copy of the tensors);
    elsewhere the shards are read and saved as an ordinary result (``fields`` replaced as well). Returns ``None``
    for a result that is not sharded (save it the ordinary way)."""
    if not result.sharded:
        return None
    directory = Path(directory)
    if directory.resolve() == Path(str(result.meta["store"])).resolve():
        meta = dict(result.meta)
        meta.setdefault("type", type(result).__name__)
        atomic_write_text(directory / "result.json", json.dumps(meta, indent=2, sort_keys=True))
        return directory
    tensors = result._store().read_all()
    meta = {k: v for k, v in result.meta.items() if k != "store"}
    return Result.save(dataclasses.replace(result, tensors=tensors, meta=meta, **fields), directory)


def _broadcast_bytes(payload: bytes | None, src: int) -> bytes:
    dist = torch.distributed
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    size = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    if payload is not None:
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buf, src)
    return payload if payload is not None else bytes(buf.cpu().numpy().tobytes())
