"""The Result base class: tensors + meta, saved as safetensors + JSON with no pickle.

Every analysis returns a subclass of :class:`Result`. A result is a frozen dataclass holding

- ``tensors``: a flat ``dict[str, Tensor]`` (saved to ``tensors.safetensors``), and
- ``meta``: a JSON-serialisable dict (saved to ``result.json``) with at least ``method``,
  ``settings``, ``model`` (a fingerprint), ``seed``, ``versions`` and ``wall_time_s``.

``save(dir)`` writes both files atomically (temp file + ``os.replace``); ``Result.load(dir)`` reads
them back into the right subclass, looked up by name in a registry that subclasses join
automatically. ``plot()`` returns a matplotlib Figure; ``_repr_html_`` shows a summary table and
the figure in notebooks.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os
import platform
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_file, save_file

__all__ = ["Result", "Stopwatch", "atomic_write_bytes", "atomic_write_text", "versions"]

_REGISTRY: dict[str, type[Result]] = {}
TENSORS_FILE = "tensors.safetensors"
META_FILE = "result.json"
FORMAT_VERSION = 1

R = TypeVar("R", bound="Result")


def versions() -> dict[str, str]:
    """Versions of the software that produced a result (gradsense, torch, python)."""
    from gradsense import __version__

    return {"gradsense": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _umask_mode() -> int:
    """File mode an ordinary ``open()`` would give (0o666 minus the umask); mkstemp uses 0o600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    A reader never sees a half-written file, and an interrupted write leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


class Stopwatch:
    """Measures wall time of a block: ``with Stopwatch() as sw: ...; sw.seconds``."""

    def __enter__(self) -> Stopwatch:
        self._t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0


def _jsonable(value: Any) -> Any:
    """Convert settings values to JSON: tensors to lists (small) or a shape summary, others to str."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        if value.numel() <= 64:
            return value.detach().cpu().tolist()
        return f"tensor(shape={list(value.shape)}, dtype={value.dtype})"
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if callable(value):
        return getattr(value, "__qualname__", None) or type(value).__name__
    return str(value)


@dataclasses.dataclass(frozen=True)
class Result:
    """Base of every gradsense result: named tensors plus JSON metadata.

    Subclasses add properties that read from ``tensors``/``meta`` and override :meth:`plot`,
    :meth:`summary` and (optionally) :attr:`title`. They register themselves by class name so
    :meth:`Result.load` can rebuild the right type.

    Args:
        tensors: Named tensors of the result; saved to safetensors (CPU, contiguous).
        meta: JSON-serialisable metadata (method, settings, model fingerprint, seed, versions,
            wall time, ...).
    """

    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    kind: ClassVar[str] = "result"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def build(
        cls: type[R],
        tensors: Mapping[str, torch.Tensor],
        *,
        method: str,
        settings: Mapping[str, Any] | None = None,
        model: Mapping[str, Any] | None = None,
        seed: int | None = None,
        wall_time_s: float | None = None,
        **extra: Any,
    ) -> R:
        """Create a result with the standard meta fields filled in."""
        meta: dict[str, Any] = {
            "type": cls.__name__,
            "format_version": FORMAT_VERSION,
            "method": method,
            "settings": _jsonable(dict(settings or {})),
            "model": _jsonable(dict(model or {})),
            "seed": seed,
            "versions": versions(),
            "wall_time_s": wall_time_s,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        meta.update({k: _jsonable(v) for k, v in extra.items()})
        return cls(tensors={k: v.detach() for k, v in tensors.items()}, meta=meta)

    # ----------------------------------------------------------------------------- descriptors
    @property
    def method(self) -> str:
        """Name of the method that produced this result."""
        return str(self.meta.get("method", ""))

    @property
    def title(self) -> str:
        """Human-readable title, used by the report and ``_repr_html_``."""
        return f"{type(self).__name__}: {self.method}"

    def summary(self) -> list[tuple[str, str]]:
        """Key/value rows describing the result (shown in the report and notebooks)."""
        rows: list[tuple[str, str]] = [("method", self.method)]
        for key, value in (self.meta.get("settings") or {}).items():
            if value is None:
                continue
            rows.append((str(key), json.dumps(value) if not isinstance(value, str) else value))
        model = self.meta.get("model") or {}
        if "name" in model:
            rows.append(("model", str(model["name"])))
        if self.meta.get("seed") is not None:
            rows.append(("seed", str(self.meta["seed"])))
        if self.meta.get("wall_time_s") is not None:
            rows.append(("wall time", f"{self.meta['wall_time_s']:.3f} s"))
        return rows

    def plot(self, **kwargs: Any) -> Any:
        """Return a matplotlib Figure of the result. Subclasses override this."""
        raise NotImplementedError(f"{type(self).__name__} has no plot()")

    # ----------------------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``tensors.safetensors`` and ``result.json`` into ``directory`` atomically.

        Args:
            directory: Folder to write into (created if needed). Existing files are replaced.

        Returns:
            The folder as a ``Path``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        # safetensors writes to a path: write to a temp name, then rename.
        fd, tmp = tempfile.mkstemp(prefix=".tensors.", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"type": type(self).__name__})
            os.chmod(tmp, _umask_mode())
            os.replace(tmp, directory / TENSORS_FILE)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        meta = dict(self.meta)
        meta.setdefault("type", type(self).__name__)
        atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Result:
        """Read a result written by :meth:`save` (no pickle is involved).

        Args:
            directory: Folder holding ``result.json`` and ``tensors.safetensors``.

        Returns:
            An instance of the subclass named in ``result.json`` (or ``cls`` if that name is unknown).

        Raises:
            FileNotFoundError: If either file is missing.
            ValueError: If ``result.json`` is not a gradsense result.
        """
        directory = Path(directory)
        meta_path, tensor_path = directory / META_FILE, directory / TENSORS_FILE
        for p in (meta_path, tensor_path):
            if not p.is_file():
                raise FileNotFoundError(
                    f"{p} not found: expected a folder written by Result.save() with "
                    f"{META_FILE} and {TENSORS_FILE}."
                )
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or "type" not in meta:
            raise ValueError(f"{meta_path} is not a gradsense result (no 'type' field).")
        klass = _REGISTRY.get(meta["type"], cls)
        return klass(tensors=load_file(str(tensor_path)), meta=meta)

    # ----------------------------------------------------------------------------- notebooks
    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
            for k, v in self.summary()
        )
        img = ""
        try:
            fig = self.plot()
        except NotImplementedError:
            fig = None
        if fig is not None:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
            import matplotlib.pyplot as plt

            plt.close(fig)
            img = f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'/>"
        return f"<div><h4>{html.escape(self.title)}</h4><table>{rows}</table>{img}</div>"

    def __repr__(self) -> str:
        parts = [f"method={self.method!r}", *(f"{k}={tuple(v.shape)}" for k, v in self.tensors.items())]
        return f"{type(self).__name__}({', '.join(parts)})"

