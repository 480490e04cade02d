"""The training monitor's result and its run-folder log.

:class:`MonitorResult` holds the scalars recorded over training steps (``steps``, ``scalars``) and the alarms
raised. It saves and loads like every result, and :meth:`MonitorResult.read` reads the log a monitor writes
*while training runs*:

``LOG_DIR/monitor/``

- ``manifest.json`` - replaced atomically: the run's metadata, the completed shards, the live segment's name;
- ``shard-NNNNNN.safetensors`` - compacted steps: ``steps`` ``(T,)`` and ``values`` ``(T, C)`` float64, the
  column names and alarms in the file's metadata; written to a temporary name and renamed;
- ``live-NNNNNN.jsonl`` - append-only, one JSON line per completed step (``{"s": step, "v": [...]}``, alarms in
  ``"a"``; a ``{"columns": [...]}`` line names the values of the lines after it; ``{"s": step, "p": {name:
  value}}`` adds values to the step before it, such as a loss logged after ``optimizer.step()``). A line is
  written whole with one ``write`` and flushed when its step completes, so a process killed at any moment
  (``kill -9``) leaves every completed step readable; a torn last line is ignored. Non-finite values are
  written as the ``NaN`` / ``Infinity`` literals of Python's ``json``.

Compaction writes a shard, then a manifest naming the shard and a new live segment, then deletes the old
segment: a crash in between leaves the old manifest, whose segment still holds those steps. No file that is
growing is ever rewritten.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from gradsense.results.base import Result, _umask_mode, atomic_write_text, versions

__all__ = ["Alarm", "MonitorLog", "MonitorResult", "read_monitor_log"]

LOG_FOLDER = "monitor"
MANIFEST = "manifest.json"
LOG_FORMAT = "gradsense-monitor-log"


@dataclasses.dataclass(frozen=True)
class Alarm:
    """One alarm raised by the monitor.

    Attributes:
        step: Training step (optimizer steps, from 0).
        kind: ``"grad_spike"``, ``"update_spike"``, ``"loss_spike"`` or ``"nonfinite_grad"``.
        layer: The layer (module) or parameter it concerns (``""`` for the loss).
        value: The value that raised it (NaN/inf for non-finite gradients).
        threshold: The z-score threshold it crossed (NaN where no threshold applies).
        zscore: Its z-score against the running statistics (NaN where not applicable).
        layers: For a loss spike, the layers whose gradient or update norms moved first (earliest first).
    """

    step: int
    kind: str
    layer: str
    value: float
    threshold: float = math.nan
    zscore: float = math.nan
    layers: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Alarm:
        """Rebuild from :meth:`to_json`."""
        return cls(step=int(d["step"]), kind=str(d["kind"]), layer=str(d["layer"]), value=float(d["value"]),
                   threshold=float(d.get("threshold", math.nan)), zscore=float(d.get("zscore", math.nan)),
                   layers=tuple(d.get("layers", ())))

    def describe(self) -> str:
        """One line for people."""
        where = f" in {self.layer}" if self.layer else ""
        z = f" (z = {self.zscore:.1f} > {self.threshold:g})" if math.isfinite(self.zscore) else ""
        first = f"; moved first: {', '.join(self.layers)}" if self.layers else ""
        return f"step {self.step}: {self.kind.replace('_', ' ')}{where}, value {self.value:.4g}{z}{first}"


# ------------------------------------------------------------------------------------------ the log
class MonitorLog:
    """Writes a monitor log folder as training goes (see the module docstring for the format).

    Args:
        directory: The run folder; the log goes to ``directory/monitor``.
        meta: JSON-serialisable metadata of the run (settings, layers, ...).
        compact_every: Completed steps per shard.
        resume: Keep an existing log and append to it (the next step must be larger than its last).

    Raises:
        ValueError: The folder already holds a log and ``resume`` is false, or its manifest cannot be read.
    """

    def __init__(self, directory: str | os.PathLike[str], meta: Mapping[str, Any], *, compact_every: int = 1000,
                 resume: bool = False) -> None:
        self.path = Path(directory) / LOG_FOLDER
        self.compact_every = int(compact_every)
        self.meta = dict(meta)
        self.shards: list[dict[str, Any]] = []
        self.alarms_compacted = 0
        self._rows_steps: list[int] = []
        self._rows: list[np.ndarray] = []
        self._row_alarms: list[dict[str, Any]] = []
        self._columns: list[str] = []
        self._written_columns = -1
        self._serial = 0
        self.last_step: int | None = None
        manifest = self.path / MANIFEST
        if manifest.is_file():
            if not resume:
                raise ValueError(
                    f"{self.path} already holds a monitor log; use another log_dir, delete it, or pass resume=True "
                    "to append to it."
                )
            old = _read_manifest(self.path)
            self.shards = list(old["shards"])
            self._serial = int(old.get("serial", len(self.shards)))
            steps, columns, values, alarms, _ = read_monitor_log(self.path.parent)
            # fold the old live segment into a shard so that this writer starts a fresh segment
            self.last_step = int(steps[-1]) if steps.size else None
            done = {int(s) for sh in self.shards for s in range(sh["first"], sh["last"] + 1)} if self.shards else set()
            live = [i for i, s in enumerate(steps) if int(s) not in done] if done else list(range(steps.size))
            self._columns = list(columns)
            for i in live:
                self._rows_steps.append(int(steps[i]))
                self._rows.append(values[i])
            self._row_alarms = [a for a in alarms if int(a["step"]) in {int(steps[i]) for i in live}]
            self.meta = {**old.get("meta", {}), **self.meta}
        self.path.mkdir(parents=True, exist_ok=True)
        self._segment = self._new_segment()
        self._fh = open(self.path / self._segment, "a", encoding="utf-8")
        self._write_manifest(closed=False)
        if self._rows:
            self.compact()

    def _new_segment(self) -> str:
        self._serial += 1
        self._written_columns = -1
        return f"live-{self._serial:06d}.jsonl"

    def append(self, step: int, columns: Sequence[str], values: np.ndarray,
               alarms: Sequence[Mapping[str, Any]] = ()) -> None:
        """Append one completed step.

        Args:
            step: The step number (increasing).
            columns: The names of all columns so far (a list that only grows; ``values`` follows its order and
                may be shorter).
            values: float values (NaN where not recorded).
            alarms: Alarm dicts (:meth:`Alarm.to_json`) raised at this step.
        """
        if self._fh is None:
            raise ValueError("the monitor log is closed.")
        if len(self._rows) >= self.compact_every:
            self.compact()  # before the new row: the last row may still receive a patch
        v = np.asarray(values, dtype=np.float64)
        rec: dict[str, Any] = {"s": int(step), "v": v.tolist()}
        if alarms:
            rec["a"] = [dict(a) for a in alarms]
        self._write(columns, rec)
        self._rows_steps.append(int(step))
        self._rows.append(v)
        self._row_alarms.extend(dict(a) for a in alarms)
        self.last_step = int(step)

    def patch(self, step: int, columns: Sequence[str], values: Mapping[str, float],
              alarms: Sequence[Mapping[str, Any]] = ()) -> None:
        """Add values (and alarms) to the last appended step, e.g. a loss logged after the optimizer step.

        Raises:
            ValueError: ``step`` is not the last appended step, or the log is closed.
        """
        if self._fh is None:
            raise ValueError("the monitor log is closed.")
        if not self._rows_steps or self._rows_steps[-1] != int(step):
            raise ValueError(f"patch: step {step} is not the last step appended to the log.")
        rec: dict[str, Any] = {"s": int(step), "p": {k: float(v) for k, v in values.items()}}
        if alarms:
            rec["a"] = [dict(a) for a in alarms]
        self._write(columns, rec)
        row = self._rows[-1]
        if row.size < len(self._columns):
            row = np.concatenate([row, np.full(len(self._columns) - row.size, np.nan)])
        for k, v in values.items():
            row[self._columns.index(k)] = float(v)
        self._rows[-1] = row
        self._row_alarms.extend(dict(a) for a in alarms)

    def _write(self, columns: Sequence[str], rec: Mapping[str, Any]) -> None:
        """One whole write of the line(s), flushed: a reader sees a step entirely or not at all."""
        assert self._fh is not None
        if len(columns) != len(self._columns):
            self._columns = list(columns)
        lines = []
        if self._written_columns != len(self._columns):
            lines.append(json.dumps({"columns": self._columns}))
            self._written_columns = len(self._columns)
        lines.append(json.dumps(rec))
        self._fh.write("\n".join(lines) + "\n")
        self._fh.flush()

    def compact(self) -> None:
        """Move the live steps into a new shard (shard, then manifest, then delete the old segment)."""
        if not self._rows:
            return
        c = len(self._columns)
        values = np.full((len(self._rows), c), np.nan)
        for i, r in enumerate(self._rows):
            values[i, : r.size] = r
        name = f"shard-{self._serial:06d}.safetensors"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.path)
        os.close(fd)
        try:
            save_file({"steps": torch.tensor(self._rows_steps, dtype=torch.int64),
                       "values": torch.from_numpy(values)}, tmp,
                      metadata={"columns": json.dumps(self._columns), "alarms": json.dumps(self._row_alarms)})
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, _umask_mode())
            os.replace(tmp, self.path / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.shards.append({"file": name, "first": self._rows_steps[0], "last": self._rows_steps[-1],
                            "rows": len(self._rows_steps)})
        old = self._segment
        if self._fh is not None:
            self._fh.close()
        self._segment = self._new_segment()
        self._fh = open(self.path / self._segment, "a", encoding="utf-8")
        self._write_manifest(closed=False)
        (self.path / old).unlink(missing_ok=True)
        self._rows_steps, self._rows, self._row_alarms = [], [], []

    def update_meta(self, **extra: Any) -> None:
        """Add metadata (written with the next manifest)."""
        self.meta.update(extra)

    def close(self, **meta: Any) -> None:
        """Compact what is left and mark the log closed."""
        if self._fh is None:
            return
        self.meta.update(meta)
        self.compact()
        self._fh.close()
        self._fh = None
        self._write_manifest(closed=True)
        (self.path / self._segment).unlink(missing_ok=True)

    def _write_manifest(self, *, closed: bool) -> None:
        manifest = {"format": LOG_FORMAT, "version": 1, "serial": self._serial, "segment": self._segment,
                    "shards": self.shards, "closed": closed, "meta": self.meta, "versions": versions(),
                    "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(self.path / MANIFEST, json.dumps(manifest, indent=1, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Tensor):
        return value.tolist()
    return str(value)


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{manifest} not found: {path.parent} is not a monitor run folder (gs.monitor.Monitor(..., log_dir=...) "
            "writes one)."
        )
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"cannot read {manifest}: {err}") from err
    if not isinstance(data, dict) or data.get("format") != LOG_FORMAT:
        raise ValueError(f"{manifest} is not a gradsense monitor log manifest.")
    return data


def read_monitor_log(directory: str | os.PathLike[str]
                     ) -> tuple[np.ndarray, list[str], np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    """Read a monitor log (also while it is being written, or after the writer was killed).

    Args:
        directory: The run folder (holding ``monitor/``) or the ``monitor`` folder itself.

    Returns:
        ``(steps, columns, values, alarms, manifest)``: ``(T,)`` int64 steps, ``C`` column names, ``(T, C)``
        float64 values (NaN where not recorded), alarm dicts, and the manifest.

    Raises:
        FileNotFoundError: No manifest.
        ValueError: A manifest or file that cannot be read (named in the message).
    """
    path = Path(directory)
    if (path / LOG_FOLDER / MANIFEST).is_file() or not (path / MANIFEST).is_file():
        path = path / LOG_FOLDER
    # the writer may compact between our reading the manifest and the segment: retry on a vanished segment
    for _attempt in range(5):
        manifest = _read_manifest(path)
        try:
            return _read(path, manifest)
        except FileNotFoundError:
            time.sleep(0.05)
    return _read(path, _read_manifest(path))


def _read(path: Path, manifest: dict[str, Any]
          ) -> tuple[np.ndarray, list[str], np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    blocks: list[tuple[list[int], list[str], np.ndarray]] = []
    alarms: list[dict[str, Any]] = []
    for shard in manifest["shards"]:
        file = path / shard["file"]
        try:
            tensors = load_file(str(file))
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as fh:
                md = fh.metadata() or {}
            columns = json.loads(md["columns"])
            alarms.extend(json.loads(md.get("alarms", "[]")))
        except FileNotFoundError:
            raise
        except Exception as err:
            raise ValueError(f"cannot read monitor shard {file}: {err}") from err
        blocks.append((tensors["steps"].tolist(), columns, tensors["values"].numpy()))
    segment = path / manifest["segment"]
    if segment.is_file() or not manifest.get("closed"):
        seg_steps, seg_cols, seg_rows, seg_alarms = _read_segment(segment)
        if seg_steps:
            width = max(len(c) for c in seg_cols)
            vals = np.full((len(seg_rows), width), np.nan)
            for i, r in enumerate(seg_rows):
                vals[i, : len(r)] = r
            names = max(seg_cols, key=len)
            blocks.append((seg_steps, names, vals))
        alarms.extend(seg_alarms)
    columns: list[str] = []
    index: dict[str, int] = {}
    for _, cols, _ in blocks:
        for c in cols:
            if c not in index:
                index[c] = len(columns)
                columns.append(c)
    n = sum(len(s) for s, _, _ in blocks)
    steps = np.zeros(n, dtype=np.int64)
    values = np.full((n, len(columns)), np.nan)
    row = 0
    for s, cols, vals in blocks:
        k = len(s)
        steps[row: row + k] = s
        if cols:
            idx = [index[c] for c in cols]
            values[row: row + k, idx] = vals[:, : len(cols)]
        row += k
    order = np.argsort(steps, kind="stable")
    return steps[order], columns, values[order], alarms, manifest


def _read_segment(segment: Path) -> tuple[list[int], list[list[str]], list[list[float]], list[dict[str, Any]]]:
    if not segment.is_file():
        raise FileNotFoundError(str(segment))
    text = segment.read_text(encoding="utf-8")
    lines = text.split("\n")
    steps: list[int] = []
    rows: list[list[float]] = []
    cols_per_row: list[list[str]] = []
    alarms: list[dict[str, Any]] = []
    columns: list[str] = []
    complete = lines[:-1]  # the text after the last newline is a line still being written (or torn)
    for i, line in enumerate(complete):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{segment}, line {i + 1} is not valid JSON: {err}") from err
        if "columns" in rec:
            columns = list(rec["columns"])
            continue
        alarms.extend(rec.get("a", []))
        if "p" in rec:  # values added to the last step
            if not steps or steps[-1] != int(rec["s"]):
                raise ValueError(f"{segment}, line {i + 1}: a patch of step {rec['s']} that is not the last step.")
            row = rows[-1] + [math.nan] * (len(columns) - len(rows[-1]))
            for k, v in rec["p"].items():
                row[columns.index(k)] = float(v)
            rows[-1], cols_per_row[-1] = row, columns
            continue
        steps.append(int(rec["s"]))
        rows.append([math.nan if v is None else float(v) for v in rec["v"]])
        cols_per_row.append(columns)
    return steps, cols_per_row, rows, alarms


# ------------------------------------------------------------------------------------------ the result
@dataclasses.dataclass(frozen=True, repr=False)
class MonitorResult(Result):
    """Scalars recorded over training steps by :class:`gradsense.monitor.Monitor`, and its alarms.

    Tensors: ``steps`` ``(T,)`` int64 and ``values`` ``(T, C)`` float64 (NaN where a quantity was not recorded
    at a step); ``meta['columns']`` names the columns, ``meta['alarms']`` holds the alarms, ``meta['layers']`` the
    layer (module) names, ``meta['params']`` the parameter names.

    Scalar names: ``loss``; ``grad_norm`` (global, before clipping), ``grad_norm_clipped`` (what the optimizer
    used), ``clip_factor``, ``nonfinite_grads``; per layer ``grad_norm/<layer>``, ``weight_norm/<layer>``,
    ``update_norm/<layer>``, ``update_ratio/<layer>`` (and ``.../<parameter>`` with ``per`` parameters); noise
    scale ``gns`` (windowed ratio), ``gns_stderr``, per-step ``gns/grad_sq``, ``gns/trace``, and per layer
    ``snr/<layer>``, ``coherence/<layer>``; ``rotation/<layer>``; ``attn_entropy/<module>/h<k>``;
    ``curvature/top_eig``, ``curvature/trace``; ``cos/<a>|<b>`` (and ``cos/<a>|<b>/<layer>``).
    """

    kind = "monitor"

    @classmethod
    def read(cls, directory: str | os.PathLike[str]) -> MonitorResult:
        """The result of a (possibly still running, or killed) monitored run from its run folder.

        Args:
            directory: The ``log_dir`` given to the monitor.

        Raises:
            FileNotFoundError: No monitor log there.
            ValueError: A file of the log cannot be read.
        """
        steps, columns, values, alarms, manifest = read_monitor_log(directory)
        meta = dict(manifest.get("meta", {}))
        meta.update({"type": cls.__name__, "columns": columns, "alarms": alarms,
                     "running": not manifest.get("closed", False), "updated": manifest.get("updated")})
        meta.setdefault("method", "monitor")
        return cls(tensors={"steps": torch.from_numpy(steps), "values": torch.from_numpy(values)}, meta=meta)

    # ----------------------------------------------------------------------------- accessors
    @property
    def steps(self) -> Tensor:
        """``(T,)`` recorded step numbers."""
        return self.tensors["steps"]

    @property
    def columns(self) -> list[str]:
        """Scalar names, in column order."""
        return list(self.meta.get("columns", []))

    @property
    def scalars(self) -> dict[str, Tensor]:
        """``{name: (T,) tensor}`` of every recorded scalar (NaN at steps where it was not recorded)."""
        values = self.tensors["values"]
        return {c: values[:, j] for j, c in enumerate(self.columns)}

    def series(self, name: str) -> Tensor:
        """One scalar over the steps.

        Raises:
            KeyError: An unknown name (the message lists similar ones).
        """
        cols = self.columns
        if name not in cols:
            close = [c for c in cols if name.split("/")[0] in c][:8]
            raise KeyError(f"no scalar {name!r} in this run; some names: {close or cols[:8]}")
        return self.tensors["values"][:, cols.index(name)]

    @property
    def alarms(self) -> list[Alarm]:
        """The alarms, in step order."""
        return sorted((Alarm.from_json(a) for a in self.meta.get("alarms", [])), key=lambda a: (a.step, a.kind))

    @property
    def layers(self) -> list[str]:
        """Layer (module) names, in model order."""
        return list(self.meta.get("layers", []))

    def matrix(self, quantity: str = "grad_norm", layers: Sequence[str] | None = None) -> tuple[list[str], Tensor]:
        """``(names, (L, T) tensor)`` of a per-layer quantity (rows: layers in model order).

        Args:
            quantity: ``"grad_norm"``, ``"update_norm"``, ``"update_ratio"``, ``"weight_norm"``, ``"snr"``, ...
            layers: Which layers (default: all that have the quantity).
        """
        names = [layer for layer in (layers if layers is not None else self.layers)
                 if f"{quantity}/{layer}" in self.meta.get("columns", [])]
        if not names:
            return [], torch.zeros(0, self.steps.numel(), dtype=torch.float64)
        return names, torch.stack([self.series(f"{quantity}/{n}") for n in names])

    def noise_scale(self) -> tuple[float, float]:
        """The last windowed gradient noise scale ``B_simple`` and its standard error (NaN if not recorded)."""
        if "gns" not in self.columns:
            return math.nan, math.nan
        gns, se = self.series("gns").numpy(), self.series("gns_stderr").numpy()
        ok = np.flatnonzero(np.isfinite(gns))
        if ok.size == 0:
            return math.nan, math.nan
        return float(gns[ok[-1]]), float(se[ok[-1]])

    def conflict(self) -> dict[str, dict[str, float]]:
        """``{"a|b": {"mean_cos", "last_cos", "fraction_in_conflict", "steps"}}`` for each pair of objectives."""
        out = {}
        for c in self.columns:
            if c.startswith("cos/") and c.count("/") == 1:
                v = self.series(c).numpy()
                v = v[np.isfinite(v)]
                if v.size:
                    out[c[4:]] = {"mean_cos": float(v.mean()), "last_cos": float(v[-1]),
                                  "fraction_in_conflict": float((v < 0).mean()), "steps": int(v.size)}
        return out

    # ----------------------------------------------------------------------------- presentation
    @property
    def title(self) -> str:
        return "Training monitor"

    def summary(self) -> list[tuple[str, str]]:
        steps = self.steps
        rows: list[tuple[str, str]] = [("quantities", ", ".join(self.meta.get("quantities", [])) or "n/a")]
        if steps.numel():
            rows.append(("steps recorded", f"{steps.numel()} (steps {int(steps[0])}-{int(steps[-1])})"))
        else:
            rows.append(("steps recorded", "0"))
        if self.meta.get("running"):
            rows.append(("status", f"running (log updated {self.meta.get('updated')})"))
        for name, label in (("loss", "last loss"), ("grad_norm", "last gradient norm (before clipping)"),
                            ("clip_factor", "last clip factor")):
            if name in self.columns:
                v = _last(self.series(name))
                if math.isfinite(v):
                    rows.append((label, f"{v:.4g}"))
        gns, se = self.noise_scale()
        if math.isfinite(gns):
            rows.append(("gradient noise scale B_simple", f"{gns:.4g} ± {se:.2g}"))
        for pair, d in self.conflict().items():
            rows.append((f"conflict {pair.replace('|', ' vs ')}",
                         f"mean cos {d['mean_cos']:.3f}, {d['fraction_in_conflict']:.0%} of {d['steps']} steps < 0"))
        alarms = self.alarms
        rows.append(("alarms", str(len(alarms))))
        for a in alarms[:5]:
            rows.append((f"alarm at step {a.step}", a.describe().split(": ", 1)[1]))
        if self.meta.get("gns_excluded"):
            rows.append(("left out of per-example statistics", ", ".join(self.meta["gns_excluded"])[:200]))
        if self.meta.get("gns_coupled"):
            rows.append(("per-example statistics", "rows coupled by train-mode BatchNorm ("
                         + ", ".join(self.meta["gns_coupled"][:4]) + "): not independent examples' gradients"))
        if self.meta.get("disabled"):
            rows.append(("disabled after an error", "; ".join(f"{k}: {v}" for k, v in self.meta["disabled"].items())))
        return rows

    def plot(self, quantity: str = "grad_norm", **kwargs: Any) -> Any:
        """Heatmap of a per-layer quantity (layers x steps, log colour scale), alarms marked."""
        from gradsense.viz.monitor_figures import layer_heatmap

        names, mat = self.matrix(quantity)
        marks = [(a.step, a.layer) for a in self.alarms if a.layer in names]
        return layer_heatmap(mat, names, self.steps, marks=marks,
                             title=kwargs.pop("title", f"{quantity.replace('_', ' ')} per layer"), **kwargs)

    def report_section(self, report: Any, title: str | None = None, text: str | None = None) -> None:
        """Add the monitor's sections to a :class:`gradsense.viz.report.Report` (figures, alarm table)."""
        from gradsense.viz.monitor_figures import add_monitor_section

        add_monitor_section(report, self, title=title, text=text)


def _last(t: Tensor) -> float:
    v = t.numpy()
    ok = np.flatnonzero(np.isfinite(v))
    return float(v[ok[-1]]) if ok.size else math.nan
