"""The run folder (readable while running, after kill -9, torn lines, compaction, resume), TensorBoard events read
back with tensorboard's own reader, the report section and the ``gradsense monitor`` command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import gradsense as gs
from gradsense.monitor import Monitor, MonitorResult
from gradsense.results.monitor import MonitorLog, read_monitor_log

SRC = str(Path(gs.__file__).resolve().parent.parent)


def small_run(log_dir, steps, *, compact_every=4, late_loss=True, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, opt, quantities=["loss", "grad_norm", "weight_norm", "update"], log_dir=log_dir, compact_every=compact_every, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if not late_loss:
            mon.log(loss=loss)
        loss.backward()
        opt.step()
        if late_loss:
            mon.log(loss=loss)
    return mon


def same(a, b):
    return torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0))


def test_readable_while_running_with_compaction_and_after_close(tmp_path):
    mon = small_run(tmp_path, 10, compact_every=4)
    # not closed: steps 0-9 are on disk (step 9 written when its optimizer step returned; its loss comes with the
    # next forward or with close)
    live = MonitorResult.read(tmp_path)
    assert live.steps.tolist() == list(range(10)) and live.meta["running"]
    assert len(list((tmp_path / "monitor").glob("shard-*.safetensors"))) == 2
    assert math.isnan(float(live.series("loss")[-1])) and math.isfinite(float(live.series("loss")[-2]))
    mon.close()
    final = MonitorResult.read(tmp_path)
    assert not final.meta["running"] and math.isfinite(float(final.series("loss")[-1]))
    assert same(final.tensors["values"], mon.result().tensors["values"])
    assert final.columns == mon.result().columns
    saved = gs.Result.load(tmp_path / "monitor")  # the final result saved next to the log
    assert isinstance(saved, MonitorResult) and same(saved.tensors["values"], final.tensors["values"])
    assert json.loads((tmp_path / "manifest.json").read_text())["results"][0]["type"] == "MonitorResult"


def test_torn_last_line_and_corrupt_lines(tmp_path):
    log = MonitorLog(tmp_path, {"layers": []}, compact_every=100)
    log.append(0, ["a"], np.array([1.0]))
    log.append(1, ["a", "b"], np.array([2.0, 3.0]))
    log.patch(1, ["a", "b", "c"], {"c": 4.0})
    seg = tmp_path / "monitor" / json.loads((tmp_path / "monitor" / "manifest.json").read_text())["segment"]
    with open(seg, "a") as fh:
        fh.write('{"s": 2, "v": [5.0, 6')  # a write cut short by a crash
    steps, cols, vals, _, _ = read_monitor_log(tmp_path)
    assert steps.tolist() == [0, 1] and cols == ["a", "b", "c"]
    np.testing.assert_array_equal(np.nan_to_num(vals, nan=-1), [[1.0, -1, -1], [2.0, 3.0, 4.0]])
    seg.write_text('{"columns": ["a"]}\nnot json\n{"s": 0, "v": [1.0]}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_monitor_log(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a monitor run folder"):
        MonitorResult.read(tmp_path / "elsewhere")


def test_kill_9_leaves_every_completed_step(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {SRC!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_monitor_writers import small_run
        import torch
        mon = small_run({str(tmp_path)!r}, 7, compact_every=3)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    res = MonitorResult.read(tmp_path)
    assert res.steps.tolist() == list(range(7)) and res.meta["running"]
    assert torch.isfinite(res.series("grad_norm")).all() and torch.isfinite(res.series("loss")[:6]).all()
    # the same steps in memory (a run in this process)
    ref = small_run(None, 7, compact_every=3).result()
    torch.testing.assert_close(res.series("grad_norm"), ref.series("grad_norm"), rtol=0, atol=0)


def test_resume_appends_after_the_last_step(tmp_path):
    small_run(tmp_path, 5).close()
    mon = small_run(tmp_path, 3, resume=True)
    assert mon.step == 8
    mon.close()
    res = MonitorResult.read(tmp_path)
    assert res.steps.tolist() == list(range(8))


def test_tensorboard_events_equal_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mon = small_run(tmp_path, 6, tensorboard=True)
    mon.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    res = mon.result()
    assert set(acc.Tags()["scalars"]) == {c for c in res.columns if torch.isfinite(res.series(c)).any()}
    for tag in ("grad_norm", "update_ratio/0", "loss"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(range(6))
        np.testing.assert_allclose([e.value for e in events], res.series(tag).numpy(), rtol=1e-6)


def test_report_section_and_cli(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, opt, quantities={"loss": 1, "grad_norm": 1, "update": 1, "gns": 1, "alarms": 1,
                                         "conflict": 1}, log_dir=tmp_path, alarm_warmup=3) as mon:
        for step in range(8):
            x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
            out = model(x)
            la, lb = F.cross_entropy(out[:8], y[:8]), F.cross_entropy(out[8:], y[8:])
            mon.objectives(first_half=la, second_half=lb)
            opt.zero_grad()
            (0.5 * (la + lb)).backward()
            if step == 6:
                opt.param_groups[0]["lr"] = 100.0  # an update spike
            opt.step()
            mon.log(loss=0.5 * (la + lb))
    runner = CliRunner()
    from gradsense.cli.main import cli

    out = runner.invoke(cli, ["monitor", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "update spike" in out.output and "gradient noise scale" in out.output
    assert max(len(line) for line in out.output.splitlines()) <= 100
    html = (tmp_path / "report.html").read_text()
    for part in ("Training monitor", "per-layer view", "gradient noise scale", "gradient conflict", "alarms"):
        assert part in html
    assert html.count("data:image/png;base64") >= 4
    bad = runner.invoke(cli, ["monitor", str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "not a monitor run folder" in bad.output
