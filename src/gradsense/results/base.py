"""The Result base class: tensors + meta, saved as safetensors + JSON with no pickle.

Every analysis returns a subclass of :class:`Result`. A result is a frozen dataclass holding

- ``tensors``: a flat ``dict[str, Tensor]`` (saved to ``tensors.safetensors``), and
- ``meta``: a JSON-serialisable dict (saved to ``result.json``) with at least ``method``,
  ``settings``, ``model`` (a fingerprint), ``seed``, ``versions`` and ``wall_time_s``.

``save(dir)`` is all-or-nothing: both files are written in full to temporary names first, then renamed
into place, and the two are tied by a save id written into both (``result.json``'s ``save_id`` and the
safetensors header). Until the new ``result.json`` is in place, the previous tensors stay reachable (a
hard link, ``.tensors.previous.safetensors``), so a crash between any two file operations leaves the
previous result loadable, or the new one, never a mix. ``Result.load(dir)`` reads them back into the
right subclass, looked up by name in a registry that subclasses join automatically; every problem with
the folder (a missing or truncated file, invalid JSON, fields of the wrong type, tensors the type needs
but the file lacks, two files from different saves) is one :class:`ResultFileError` naming the folder
and what is wrong. ``plot()`` returns a matplotlib Figure; ``_repr_html_`` shows a summary table and
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
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gradsense.core.checks import check_out_dir
from gradsense.core.distributed import is_main_process

__all__ = ["Result", "ResultFileError", "Stopwatch", "atomic_write_bytes", "atomic_write_text", "versions"]

_REGISTRY: dict[str, type[Result]] = {}
TENSORS_FILE = "tensors.safetensors"
META_FILE = "result.json"
PREVIOUS_FILE = ".tensors.previous.safetensors"  # the previous save's tensors while a save is under way
FORMAT_VERSION = 1


class ResultFileError(ValueError):
    """A result folder that cannot be loaded; the message names the folder and what is wrong with it."""


class ResultFileMissing(ResultFileError, FileNotFoundError):
    """A result folder, or one of its two files, does not exist (also a ``FileNotFoundError``)."""

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

    A reader never sees a half-written file, and an interrupted write leaves the old file intact. Under
    torch.distributed only rank 0 writes; the other ranks return ``path`` without touching the disk.
    """
    path = Path(path)
    if not is_main_process():
        return path
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
        """Write ``tensors.safetensors`` and ``result.json`` into ``directory``, all or nothing.

        Both files are written in full under temporary names, then renamed into place; ``result.json`` goes
        last and commits the save. Until it does, the previous save's tensors stay reachable, so an
        interruption at any point leaves the previous result (or the new one) loadable, never a mix of the
        two. Other files in the folder are left alone.

        Args:
            directory: Folder to write into (created if needed). An earlier result there is replaced.

        Under torch.distributed only rank 0 writes (the other ranks return the folder at once, without waiting
        for rank 0: call ``torch.distributed.barrier()`` before they read it).

        Returns:
            The folder as a ``Path``.

        Raises:
            TypeError: ``meta`` holds something JSON cannot represent (nothing is written then).
            RuntimeError: safetensors refuses the tensors, e.g. two that share memory (nothing is written).
        """
        directory = check_out_dir(directory, "directory")
        if not is_main_process():
            return directory
        save_id = uuid.uuid4().hex
        meta = dict(self.meta)
        meta.setdefault("type", type(self).__name__)
        meta["save_id"] = save_id
        text = json.dumps(meta, indent=2, sort_keys=True)  # fails here, before any file is touched
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        directory.mkdir(parents=True, exist_ok=True)
        tensor_path, meta_path, previous = directory / TENSORS_FILE, directory / META_FILE, directory / PREVIOUS_FILE
        for stale in [*directory.glob(".tensors.*.tmp"), *directory.glob(".result.*.tmp")]:
            stale.unlink(missing_ok=True)  # left by an interrupted save (saving into one folder from two processes
            # at once is not supported)
        temps: list[str] = []
        try:
            for prefix in (".tensors.", ".result."):
                fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
                os.close(fd)
                temps.append(tmp)
            tmp_tensors, tmp_meta = temps
            save_file(tensors, tmp_tensors, metadata={"type": type(self).__name__, "save_id": save_id})
            _fsync_file(tmp_tensors)
            with open(tmp_meta, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            for tmp in temps:
                os.chmod(tmp, _umask_mode())
            backed_up = False
            if tensor_path.is_file() and meta_path.is_file():
                # keep the previous tensors reachable until the new result.json commits this save
                if previous.exists():
                    os.unlink(previous)
                try:
                    os.link(tensor_path, previous)
                    backed_up = True
                except OSError:  # no hard links here: an interruption now gives a clear error instead
                    pass
            os.replace(tmp_tensors, tensor_path)
            os.replace(tmp_meta, meta_path)
            _fsync_dir(directory)
            if backed_up or previous.exists():
                os.unlink(previous)
        finally:
            for tmp in temps:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Result:
        """Read a result written by :meth:`save` (no pickle is involved), checking it as it goes.

        Args:
            directory: Folder holding ``result.json`` and ``tensors.safetensors``.

        Returns:
            An instance of the subclass named in ``result.json`` (or ``cls`` if that name is unknown).

        Raises:
            ResultFileError: Anything wrong with the folder, naming it and the problem: ``result.json`` that is
                not valid JSON or not a gradsense result, fields of the wrong type, a truncated or unreadable
                ``tensors.safetensors``, tensors or fields the result type needs but the files lack, two files
                from different saves. A missing folder or file raises its subclass ``ResultFileMissing``, which
                is also a ``FileNotFoundError``.
        """
        directory = Path(directory)
        meta_path, tensor_path = directory / META_FILE, directory / TENSORS_FILE
        if meta_path.is_file() and not tensor_path.is_file():
            from gradsense.results.shards import is_shard_store

            if is_shard_store(directory):  # a sharded result (its tensors are the shards): its type opens it
                klass = _REGISTRY.get(str(_read_meta(directory).get("type")), cls)
                if getattr(klass.load, "__func__", None) is not Result.load.__func__:  # type: ignore[attr-defined]
                    return klass.load(directory)
        for p in (meta_path, tensor_path):
            if not p.is_file():
                raise ResultFileMissing(
                    f"{p} not found: expected a folder written by Result.save() with {META_FILE} and {TENSORS_FILE}."
                )
        meta = _read_meta(directory)
        save_id = meta.pop("save_id", None)
        header = _read_header(directory, tensor_path)
        if header.get("save_id") != save_id:
            tensor_path = _previous_tensors(directory, save_id, header.get("save_id"))
        try:
            tensors = load_file(str(tensor_path))
        except Exception as err:  # safetensors' errors are not one type
            raise ResultFileError(
                f"{directory}: {tensor_path.name} cannot be read ({_short(err)}): the file is truncated or not a "
                "safetensors file. Save the result again."
            ) from err
        klass = _REGISTRY.get(meta["type"], cls)
        klass._check_loaded(directory, tensors, meta)
        return klass(tensors=tensors, meta=meta)

    #: Tensors a result of this type cannot do without (checked by :meth:`load`).
    required_tensors: ClassVar[tuple[str, ...]] = ()
    #: ``(field, kind)`` pairs of ``meta`` fields this type needs, kinds as in :data:`_KINDS` (``"?"``: may be null).
    required_meta: ClassVar[tuple[tuple[str, str], ...]] = ()

    @classmethod
    def _check_loaded(cls, directory: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Raise :class:`ResultFileError` unless ``tensors`` and ``meta`` make a working result of this type.

        Checks the common fields' types, the type's :attr:`required_tensors` and :attr:`required_meta`, and
        that its summary and title can be built (which reads every entry they use).
        """
        for key, kind in {**_COMMON_META, **dict(cls.required_meta)}.items():
            optional = key in _COMMON_META and key != "type"
            if key not in meta:
                if optional:
                    continue
                raise ResultFileError(f"{directory}: {META_FILE} has no {key!r} field, which a {cls.__name__} needs.")
            if not _is_kind(meta[key], kind):
                raise ResultFileError(
                    f"{directory}: {META_FILE} field {key!r} should be {_describe_kind(kind)}, got "
                    f"{type(meta[key]).__name__} {_short(meta[key])}."
                )
        missing = [k for k in cls.required_tensors if k not in tensors]
        if missing:
            raise ResultFileError(
                f"{directory}: {TENSORS_FILE} lacks the tensor(s) {missing} that a {cls.__name__} needs "
                f"(it has {sorted(tensors)[:8]})."
            )
        probe = cls(tensors=_Tracked("tensor", TENSORS_FILE, tensors), meta=_Tracked("field", META_FILE, meta))
        try:
            probe.summary()
            _ = probe.title
        except _MissingEntry as err:
            raise ResultFileError(f"{directory}: {err.args[0]}, which a {cls.__name__} needs.") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as err:
            raise ResultFileError(
                f"{directory}: the files do not make a working {cls.__name__} ({type(err).__name__}: {_short(err)}); "
                f"a field of {META_FILE} or a tensor has the wrong type or shape."
            ) from err

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


# --------------------------------------------------------------------------------------------- loading checks
_COMMON_META: dict[str, str] = {
    "type": "str",
    "method": "str",
    "settings": "dict",
    "model": "dict",
    "seed": "int?",
    "versions": "dict",
    "wall_time_s": "number?",
    "format_version": "int",
}

_KINDS: dict[str, Any] = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "list[number]": lambda v: isinstance(v, list) and all(_KINDS["number"](x) for x in v),
    "list[shape]": lambda v: isinstance(v, list) and all(
        isinstance(x, list) and all(_KINDS["int"](d) and d >= 0 for d in x) for x in v),
    "dict[str, int]": lambda v: isinstance(v, dict) and all(_KINDS["int"](x) for x in v.values()),
}


def _is_kind(value: Any, kind: str) -> bool:
    if kind.endswith("?"):
        return value is None or _KINDS[kind[:-1]](value)
    return bool(_KINDS[kind](value))


def _describe_kind(kind: str) -> str:
    base = kind.rstrip("?")
    words = {"str": "a string", "int": "an integer", "number": "a number", "bool": "true or false",
             "dict": "an object", "list": "a list", "list[str]": "a list of strings",
             "list[number]": "a list of numbers", "list[shape]": "a list of shapes (lists of integers)",
             "dict[str, int]": "an object of integers"}[base]
    return words + (" or null" if kind.endswith("?") else "")


def _short(value: Any, limit: int = 80) -> str:
    text = str(value) if isinstance(value, BaseException) else json.dumps(value) if _jsonable_ok(value) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable_ok(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


class _MissingEntry(KeyError):
    """A tensor or meta field a result type reads but the files lack (raised during the load check only)."""


class _Tracked(dict):  # type: ignore[type-arg]
    """A dict whose missing keys raise :class:`_MissingEntry` naming the file, for :meth:`Result._check_loaded`."""

    def __init__(self, what: str, file: str, data: Mapping[str, Any]) -> None:
        super().__init__(data)
        self._what, self._file = what, file

    def __missing__(self, key: str) -> Any:
        raise _MissingEntry(f"{self._file} has no {self._what} {key!r}")


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ResultFileError(f"{directory}: {META_FILE} is not UTF-8 text ({err.reason}); it is damaged.") from err
    except ValueError as err:
        raise ResultFileError(
            f"{directory}: {META_FILE} is not valid JSON ({err}); the file is damaged or was cut short."
        ) from err
    if not isinstance(meta, dict):
        raise ResultFileError(f"{directory}: {META_FILE} is not a gradsense result (a JSON {type(meta).__name__}, "
                              "not an object).")
    if "type" not in meta:
        raise ResultFileError(f"{directory}: {META_FILE} is not a gradsense result (no 'type' field).")
    version = meta.get("format_version", FORMAT_VERSION)
    if _KINDS["int"](version) and version > FORMAT_VERSION:
        raise ResultFileError(
            f"{directory}: written by a newer gradsense (format {version}; this one reads up to {FORMAT_VERSION}). "
            "Upgrade gradsense to read it."
        )
    if "save_id" in meta and not isinstance(meta["save_id"], str):
        raise ResultFileError(f"{directory}: {META_FILE} field 'save_id' should be a string.")
    return meta


def _read_header(directory: Path, path: Path) -> dict[str, str]:
    """The metadata of a safetensors file's header (reads the header only)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as err:  # safetensors' errors are not one type
        raise ResultFileError(
            f"{directory}: {path.name} cannot be read ({_short(err)}): the file is truncated or not a safetensors "
            "file. Save the result again."
        ) from err


def _previous_tensors(directory: Path, save_id: str | None, found: str | None) -> Path:
    """The tensors that belong with ``result.json`` when ``tensors.safetensors`` is from another save."""
    previous = directory / PREVIOUS_FILE
    if previous.is_file():
        try:
            header = _read_header(directory, previous)
        except ResultFileError:
            header = {"save_id": "<unreadable>"}
        if header.get("save_id") == save_id:
            return previous  # a save was interrupted before its result.json: the previous result is intact
    raise ResultFileError(
        f"{directory}: {TENSORS_FILE} (save {found or 'without id'}) does not belong with {META_FILE} (save "
        f"{save_id or 'without id'}): the folder holds parts of two different saves, e.g. from an interrupted save "
        "or files copied in by hand. Save the result again."
    )


def _fsync_file(path: str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
