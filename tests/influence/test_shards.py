"""The sharded run store: resume after a crash or ``kill -9`` gives bitwise the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gradsense.results.shards import MANIFEST, ShardStore

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _rows(i: int, rows: slice) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    n = rows.stop - rows.start
    return {"x": torch.randn(n, 3, generator=g), "i": torch.arange(rows.start, rows.stop)}


def test_run_read_resume_and_skip(tmp_path):
    calls: list[int] = []

    def crash_at_3(i, rows):
        if i == 3:
            raise RuntimeError("boom")
        calls.append(i)
        return _rows(i, rows)

    store = ShardStore(tmp_path, total=23, shard_rows=5, config={"a": 1})
    with pytest.raises(RuntimeError, match="boom"):
        store.run(crash_at_3)
    assert calls == [0, 1, 2]
    with pytest.raises(ValueError, match="incomplete"):
        store.read_all()
    with pytest.raises(ValueError, match="resume=True"):
        ShardStore(tmp_path, total=23, shard_rows=5, config={"a": 1})
    with pytest.raises(ValueError, match="a: 1 -> 2"):
        ShardStore(tmp_path, total=23, shard_rows=5, config={"a": 2}, resume=True)
    with pytest.raises(ValueError, match="shard_rows"):
        ShardStore(tmp_path, total=23, shard_rows=4, config={"a": 1}, resume=True)
    calls.clear()
    resumed = ShardStore(tmp_path, total=23, shard_rows=5, config={"a": 1}, resume=True)
    assert resumed.done == [0, 1, 2] and resumed.pending == [3, 4]
    resumed.run(lambda i, rows: (calls.append(i), _rows(i, rows))[1])
    assert calls == [3, 4]
    resumed.finish({"note": "done"})
    out = ShardStore.open(tmp_path).read_all()
    assert out["i"].tolist() == list(range(23))
    fresh = {k: torch.cat([_rows(i, slice(5 * i, min(5 * i + 5, 23)))[k] for i in range(5)]) for k in ("x", "i")}
    assert torch.equal(out["x"], fresh["x"])
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["complete"] and manifest["meta"] == {"note": "done"} and len(manifest["shards"]) == 5


def test_corrupted_or_unlisted_shards_are_recomputed(tmp_path):
    store = ShardStore(tmp_path, total=12, shard_rows=4, config={})
    store.run(_rows)
    expected = store.read_all()
    last = tmp_path / "shard-000002.safetensors"
    data = bytearray(last.read_bytes())
    data[-3] ^= 0xFF  # a flipped byte
    last.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        ShardStore.open(tmp_path).read(2)
    (tmp_path / ".shard-000003.safetensors.abc.tmp").write_bytes(b"partial write")
    with pytest.warns(RuntimeWarning, match=r"\[2\]"):
        again = ShardStore(tmp_path, total=12, shard_rows=4, config={}, resume=True)
    assert again.pending == [2]
    again.run(_rows)
    assert not list(tmp_path.glob(".*.tmp"))
    got = again.read_all()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_bad_shards_refused(tmp_path):
    store = ShardStore(tmp_path, total=4, shard_rows=2, config={})
    with pytest.raises(ValueError, match="2 rows"):
        store.write(0, {"x": torch.zeros(3)})
    with pytest.raises(TypeError, match="JSON"):
        ShardStore(tmp_path / "b", total=4, shard_rows=2, config={"f": object()})
    with pytest.raises(ValueError, match="positive"):
        ShardStore(tmp_path / "c", total=0, shard_rows=2, config={})


JOB = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    import gradsense as gs

    class Slow(torch.nn.Module):
        def __init__(self, delay):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
            self.delay = delay

        def forward(self, x):
            time.sleep(self.delay)
            return self.net(x)

    def job(out, delay):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (64,), generator=g)
        return gs.influence.features(Slow(delay).eval(), gs.losses.cross_entropy, (x, y), proj_dim=16, out=out,
                                     resume=True, chunk_size=4, shard_size=4)
""")
CHILD = JOB + "\njob(sys.argv[1], 0.03)\n"


def _run_child(script: Path, out: Path, kill_after: int | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "GRADSENSE_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    if kill_after is None:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
        return 0
    deadline = time.time() + 300
    while time.time() < deadline:
        manifest = out / MANIFEST
        try:
            done = len(json.loads(manifest.read_text())["shards"]) if manifest.is_file() else 0
        except (ValueError, OSError):
            done = 0  # being replaced right now
        if done >= kill_after:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return done
        if proc.poll() is not None:
            raise AssertionError("the child finished before it could be killed")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("timeout")


def test_features_killed_with_sigkill_then_resumed_equal_uninterrupted(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    kill_at = int(torch.randint(2, 13, (1,), generator=torch.Generator().manual_seed(int(time.time()))))
    done = _run_child(script, tmp_path / "killed", kill_after=kill_at)
    assert done >= kill_at
    manifest = json.loads((tmp_path / "killed" / MANIFEST).read_text())
    assert not manifest["complete"] and len(manifest["shards"]) < 16
    namespace: dict = {}
    exec(JOB, namespace)  # the same job in this process: resume the killed run, and run it uninterrupted
    namespace["job"](tmp_path / "killed", 0.0)
    namespace["job"](tmp_path / "clean", 0.0)
    a = ShardStore.open(tmp_path / "killed").read_all()
    b = ShardStore.open(tmp_path / "clean").read_all()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise
    from gradsense.influence import GradientFeatures

    feats = GradientFeatures.load(tmp_path / "killed")
    assert feats.sharded and feats.features().shape == (64, 16)
    assert torch.equal(feats.features(), b["features/0"])
