"""``gradsense monitor RUN_DIR``: the report of a monitored training run, also while it is still running."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import click

from gradsense.cli.common import console, friendly_errors


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else "n/a"


def _print(result: Any, run_dir: str) -> None:
    from rich.table import Table

    rows = Table(title=f"Training monitor: {run_dir}", title_justify="left", show_header=False)
    rows.add_column(style="bold", overflow="fold")
    rows.add_column(overflow="fold")
    for k, v in result.summary():
        if not k.startswith("alarm at step"):
            rows.add_row(k, v)
    console.print(rows)
    alarms = result.alarms
    if alarms:
        table = Table(title=f"Alarms ({len(alarms)})", title_justify="left")
        for col, just in (("step", "right"), ("kind", "left"), ("layer", "left"), ("value", "right"), ("z", "right"),
                          ("moved first", "left")):
            table.add_column(col, justify=just, overflow="fold")
        for a in alarms[:20]:
            table.add_row(str(a.step), a.kind.replace("_", " "), a.layer or "-", _fmt(a.value), _fmt(a.zscore),
                          ", ".join(a.layers[:2]) or "-")
        console.print(table)
        if len(alarms) > 20:
            console.print(f"... and {len(alarms) - 20} more (all of them are in the report)")


def render(run_dir: str | Path, quiet: bool = False) -> tuple[Path, Any]:
    """Read the run's monitor log, write ``RUN_DIR/report.html``; return its path and the result."""
    from gradsense.results.monitor import MonitorResult
    from gradsense.viz.report import Report

    result = MonitorResult.read(run_dir)
    if not quiet:
        _print(result, str(run_dir))
    report = Report.extend(Path(run_dir) / "report.html", f"gradsense monitor: {run_dir}", source="monitor")
    state = "still running" if result.meta.get("running") else "finished"
    result.report_section(report, text=(
        f"A monitored training run ({state}; log updated {result.meta.get('updated')}). Gradient norms are read at the "
        "end of each backward pass (before clipping) and again as the optimizer uses them (after clipping)."))
    return report.write(Path(run_dir) / "report.html"), result


@click.command("monitor", short_help="Report of a monitored training run (also while it runs).")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--watch", type=float, default=None, metavar="SECONDS",
              help="refresh the report every SECONDS until the run finishes (Ctrl-C stops).")
@friendly_errors
def monitor_cmd(run_dir: str, watch: float | None) -> None:
    """Render (or refresh) RUN_DIR/report.html from a monitored run's log.

    RUN_DIR is the log_dir given to gs.monitor.Monitor (or to the HF/Lightning callback). The log is readable
    while training runs and after a crash: every completed step is shown.

    \b
    Examples:
      gradsense monitor runs/train
      gradsense monitor runs/train --watch 30
    """
    if watch is not None and not watch > 0:
        raise ValueError(f"--watch must be a positive number of seconds, got {watch}.")
    path, result = render(run_dir)
    console.print(f"wrote {path}")
    if watch is None:
        return
    try:
        while result.meta.get("running"):
            time.sleep(watch)
            path, result = render(run_dir, quiet=True)
            steps = result.steps
            last = int(steps[-1]) if steps.numel() else -1
            console.print(f"{time.strftime('%H:%M:%S')}  step {last}, {len(result.alarms)} alarms: refreshed {path}")
        console.print("the run has finished.")
    except KeyboardInterrupt:
        console.print("stopped watching.")
