"""Run folders: ``runs/NAME/{manifest.json, <result>/..., figures/*.png, report.html}``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from gradsense.core.distributed import is_main_process
from gradsense.results.base import Result, atomic_write_bytes, atomic_write_text, versions

__all__ = ["RunFolder"]


class RunFolder:
    """A folder collecting the results, figures and report of one run, with a manifest.

    Opening a folder that already has a manifest adds to it: results saved earlier stay listed, and a
    result saved again under the same name replaces its entry.

    Under torch.distributed only rank 0 writes (the folder, results, figures, manifest); on the other ranks
    every method returns as if it had.

    Args:
        path: The folder (created if missing).

    Raises:
        ValueError: If an existing ``manifest.json`` cannot be read.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if is_main_process():  # under torch.distributed rank 0 writes the folder, the other ranks nothing
            self.path.mkdir(parents=True, exist_ok=True)
        self.entries: list[dict[str, Any]] = []
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        manifest = self.path / "manifest.json"
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text(encoding="utf-8"))
                self.entries = [dict(e) for e in old["results"]]
                self.created = str(old.get("created", self.created))
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"cannot read {manifest}: {err}; delete it or use another folder.") from err

    def save_result(self, result: Result, name: str) -> Path:
        """Save ``result`` under ``NAME/`` and list it in the manifest (replacing an entry of that name).

        The result is saved all-or-nothing first (:meth:`Result.save`), then the manifest is replaced atomically:
        an interruption leaves the previous manifest, listing only results that are complete on disk.

        Raises:
            ValueError: ``name`` is not one plain folder name (empty, a path, ``.``/``..``, or hidden).
        """
        _check_name(name)
        out = result.save(self.path / name)
        entry = {"name": name, "type": type(result).__name__, "method": result.method, "path": name}
        self.entries = [e for e in self.entries if e.get("name") != name] + [entry]
        self._write_manifest()
        return out

    def save_figure(self, fig: Any, name: str, dpi: int = 110) -> Path:
        """Save a matplotlib Figure as ``figures/NAME.png`` (atomically).

        Raises:
            ValueError: ``name`` is not one plain file name.
        """
        import io

        _check_name(name)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        return atomic_write_bytes(self.path / "figures" / f"{name}.png", buf.getvalue())

    def _write_manifest(self) -> None:
        manifest = {"created": self.created, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "versions": versions(), "results": self.entries}
        atomic_write_text(self.path / "manifest.json", json.dumps(manifest, indent=2))


def _check_name(name: Any) -> str:
    """A result or figure name must stay inside the run folder: one plain, visible path component."""
    if not isinstance(name, str) or not name or name in (".", "..") or name.startswith(".") \
            or any(sep in name for sep in ("/", "\\", os.sep)) or "\x00" in name:
        raise ValueError(
            f"name must be one plain folder/file name inside the run folder (no '/', no leading '.'), got {name!r}."
        )
    return name
