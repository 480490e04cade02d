"""attribute_dataset: resumable shards over a dataset, aggregates from the shards, 1 process == 2 processes.

Oracles: an uninterrupted run (for a run killed with SIGKILL and resumed, for corrupted and partial shards), an
explicit loop of per-example ``gs.attribute`` calls (maps and aggregates), ``gs.attribute`` on a shard's rows
with that shard's seed (SmoothGrad's noise), and the one-process run (for two gloo processes).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradsense as gs
from gradsense.core.ranges import shard_seed
from gradsense.results.attribution import DatasetAttribution
from gradsense.results.shards import MANIFEST
from helpers import assert_model_unchanged

SRC = str(Path(__file__).resolve().parents[2] / "src")
N, D, C = 29, 5, 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)).double().eval()


def make_data(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, D, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g)


def _equal(a: DatasetAttribution, b: DatasetAttribution) -> None:
    """Bitwise: every per-example tensor and every aggregate."""
    assert a.keys() == b.keys()
    for k in a.keys():
        assert torch.equal(a.maps(key=k), b.maps(key=k)), k
    for k in ("sum_abs", "sum_abs_class", "count_class"):
        assert torch.equal(a.aggregates()[k], b.aggregates()[k]), k
    assert torch.equal(a.mean_abs_per_class(), b.mean_abs_per_class())


# ------------------------------------------------------------------------------------------ the oracles
@pytest.mark.parametrize("method,options", [("saliency", {}), ("integrated_gradients", {"steps": 8}),
                                            ("input_x_gradient", {})])
def test_maps_and_aggregates_equal_a_loop_of_per_example_attribute(method, options, tmp_path):
    model, (x, y) = make_model(), make_data()
    with assert_model_unchanged(model):
        res = gs.attribute_dataset(model, (x, y), method=method, out=tmp_path / "run", shard_size=6, **options)
    assert res.sharded and res.n == N
    loop = torch.cat([gs.attribute(model, x[i:i + 1], target=y[i:i + 1], method=method, **options).attributions
                      for i in range(N)])
    torch.testing.assert_close(res.attributions, loop, rtol=1e-12, atol=1e-14)
    a = loop.abs()
    torch.testing.assert_close(res.mean_abs_per_feature(), a.mean(0), rtol=1e-12, atol=0)
    for c in range(C):
        mine = a[y == c]
        torch.testing.assert_close(res.mean_abs_per_class_feature()[c], mine.mean(0), rtol=1e-12, atol=0)
        torch.testing.assert_close(res.mean_abs_per_class()[c], mine.mean(), rtol=1e-12, atol=0)
    assert res.class_counts().tolist() == torch.bincount(y, minlength=C).tolist()
    logits = model(x).detach()
    torch.testing.assert_close(res.scores, logits.gather(1, y[:, None])[:, 0], rtol=1e-12, atol=1e-14)
    # lazily read ranges across shard borders, and single examples
    torch.testing.assert_close(res.maps(slice(4, 19)), loop[4:19], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(res.maps(-1), loop[-1], rtol=1e-12, atol=1e-14)


def test_predicted_and_class_targets_group_by_the_explained_class():
    model, (x, _) = make_model(), make_data()
    pred = model(x).argmax(1)
    res = gs.attribute_dataset(model, x, method="saliency", target="predicted", shard_size=7)
    loop = torch.cat([gs.attribute(model, x[i:i + 1], target="predicted", method="saliency").attributions
                      for i in range(N)])
    torch.testing.assert_close(res.attributions, loop, rtol=1e-12, atol=1e-14)
    assert torch.equal(res.classes, pred)
    two = gs.attribute_dataset(model, x, method="saliency", target=2, shard_size=7)
    assert two.class_counts().tolist() == [0, 0, N]
    assert torch.isnan(two.mean_abs_per_class()[:2]).all()
    torch.testing.assert_close(two.attributions, gs.attribute(model, x, target=2).attributions, rtol=1e-12, atol=0)


def test_smoothgrad_shard_uses_its_own_seed():
    model, (x, y) = make_model(), make_data()
    res = gs.attribute_dataset(model, (x, y), method="smoothgrad", n_samples=6, seed=5, shard_size=10)
    for i, rows in enumerate([slice(0, 10), slice(10, 20), slice(20, N)]):
        ref = gs.attribute(model, x[rows], target=y[rows], method="smoothgrad", n_samples=6, seed=shard_seed(5, i))
        assert torch.equal(res.maps(rows), ref.attributions)
    assert shard_seed(5, 0) != shard_seed(5, 1) != shard_seed(6, 1)


def test_in_memory_sharded_and_reloaded_results_agree(tmp_path):
    model, (x, y) = make_model(), make_data()
    mem = gs.attribute_dataset(model, (x, y), method="smoothgrad", n_samples=3, shard_size=4)
    disk = gs.attribute_dataset(model, (x, y), method="smoothgrad", n_samples=3, shard_size=4, out=tmp_path / "a")
    assert not mem.sharded and disk.sharded
    _equal(mem, disk)
    mem.save(tmp_path / "saved")
    _equal(DatasetAttribution.load(tmp_path / "saved"), disk)
    disk.save(tmp_path / "copy")  # a sharded result saved elsewhere: a plain result with every tensor
    _equal(gs.Result.load(tmp_path / "copy"), disk)
    again = gs.attribute_dataset(model, (x, y), method="smoothgrad", n_samples=3, out=tmp_path / "a", resume=True)
    _equal(again, disk)  # a finished run: reused, nothing recomputed
    assert again.meta["wall_time_s"] == disk.meta["wall_time_s"]


@pytest.mark.parametrize("form", ["dataset", "dataloader"])
def test_dataset_and_dataloader_forms(form):
    model, (x, y) = make_model(), make_data()
    data = TensorDataset(x, y) if form == "dataset" else DataLoader(TensorDataset(x, y), batch_size=5)
    got = gs.attribute_dataset(model, data, method="saliency", shard_size=8)
    ref = gs.attribute_dataset(model, (x, y), method="saliency", shard_size=8)
    _equal(got, ref)


# ------------------------------------------------------------------------------------------ resume
def test_corrupted_truncated_and_partial_shards(tmp_path):
    model, (x, y) = make_model(), make_data()
    opts = {"method": "smoothgrad", "n_samples": 3, "shard_size": 4}
    clean = gs.attribute_dataset(model, (x, y), out=tmp_path / "clean", **opts)
    run = tmp_path / "run"
    # a run that stops after 5 shards (an exception inside shard 5)
    import gradsense.attribution.dataset as mod

    real = mod.ShardStore.run

    def stop_at_5(self, compute, **kw):
        def limited(i, rows):
            if i == 5:
                raise KeyboardInterrupt
            return compute(i, rows)
        return real(self, limited, **kw)

    mod.ShardStore.run = stop_at_5
    try:
        with pytest.raises(KeyboardInterrupt):
            gs.attribute_dataset(model, (x, y), out=run, **opts)
    finally:
        mod.ShardStore.run = real
    manifest = json.loads((run / MANIFEST).read_text())
    assert [e["index"] for e in manifest["shards"]] == [0, 1, 2, 3, 4] and not manifest["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        DatasetAttribution.load(run)
    last = run / "shard-000004.safetensors"
    data = bytearray(last.read_bytes())
    data[-2] ^= 0xFF  # the last shard corrupted
    last.write_bytes(bytes(data))
    (run / "shard-000002.safetensors").write_bytes((run / "shard-000002.safetensors").read_bytes()[:-7])  # cut short
    (run / ".shard-000005.safetensors.1a2b.tmp").write_bytes(b"a write cut short")  # partial, never listed
    (run / "shard-000006.safetensors").write_bytes(b"not listed in the manifest")  # renamed, manifest not updated
    with pytest.warns(RuntimeWarning, match=r"\[2, 4\]"):
        resumed = gs.attribute_dataset(model, (x, y), out=run, resume=True, **opts)
    assert not list(run.glob(".*.tmp"))
    _equal(resumed, clean)
    assert resumed.meta["resumed_shards"] == 3


@pytest.mark.parametrize("change,match", [
    ({"method": "vargrad"}, "method"),
    ({"n_samples": 4}, "n_samples"),
    ({"seed": 1}, "seed"),
    ({"target": "predicted"}, "target"),
    ({"shard_size": 5}, "shard_rows"),
    ({"model": "other weights"}, "model"),
    ({"data": "other values"}, "data"),
    ({"data": "fewer examples"}, "rows"),
])
def test_other_settings_are_refused(change, match, tmp_path):
    model, (x, y) = make_model(), make_data()
    opts = {"method": "smoothgrad", "n_samples": 3, "shard_size": 4, "seed": 0, "target": "label"}
    gs.attribute_dataset(model, (x, y), out=tmp_path, **opts)
    new = {**opts, **{k: v for k, v in change.items() if k not in ("model", "data")}}
    if change.get("model"):
        with torch.no_grad():
            model[0].bias[0] += 1e-9
    if change.get("data") == "other values":
        x = x.clone()
        x[N // 2, 0] += 1.0
    elif change.get("data"):
        x, y = x[:-1], y[:-1]
    with pytest.raises(ValueError, match=f"cannot be resumed with these settings.*{match}"):
        gs.attribute_dataset(model, (x, y), out=tmp_path, resume=True, **new)


def test_bad_input_is_one_clear_error_before_any_file(tmp_path):
    model, (x, y) = make_model(), make_data()
    out = tmp_path / "run"
    cases = [
        (lambda: gs.attribute_dataset(model, (x[:0], y[:0]), out=out), ValueError, "empty"),
        (lambda: gs.attribute_dataset(model, x, out=out), ValueError, "needs labelled data"),
        (lambda: gs.attribute_dataset(model, (x, y), target="loss", out=out), ValueError, "loss_fn"),
        (lambda: gs.attribute_dataset(model, DataLoader(TensorDataset(x, y), shuffle=True), out=out), ValueError,
         "shuffles"),
        (lambda: gs.attribute_dataset(model, (x, y), resume=True), ValueError, "needs out="),
        (lambda: gs.attribute_dataset(model, (x, y), method="nope", out=out), ValueError, "unknown attribution"),
        (lambda: gs.attribute_dataset(model, (x, y), steps=3, out=out), ValueError, "does not take"),
        (lambda: gs.attribute_dataset(model, (x, y), target=torch.zeros(3, dtype=torch.long), out=out), ValueError,
         "one class index per example"),
        (lambda: gs.attribute_dataset(model, (x[:, :3], y), out=out), ValueError, "shape"),
        (lambda: gs.attribute_dataset(model, (x, y), shard_size=0, out=out), ValueError, "shard_size"),
    ]
    for call, kind, match in cases:
        with assert_model_unchanged(model), pytest.raises(kind, match=match):
            call()
        assert not out.exists(), match
    gs.attribute_dataset(model, (x, y), out=out)
    with pytest.raises(ValueError, match="resume=True"):
        gs.attribute_dataset(model, (x, y), out=out)


def test_loss_target_is_the_per_example_loss_gradient():
    model, (x, y) = make_model(), make_data()
    res = gs.attribute_dataset(model, (x, y), target="loss", loss_fn=gs.losses.cross_entropy, shard_size=5)
    xi = x.clone().requires_grad_(True)
    losses = nn.functional.cross_entropy(model(xi), y, reduction="none")
    (g,) = torch.autograd.grad(losses.sum(), xi)
    torch.testing.assert_close(res.attributions, g, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(res.scores, losses.detach(), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------ kill -9
JOB = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    import gradsense as gs
    from torch import nn

    class Slow(nn.Module):
        def __init__(self, delay):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
            self.delay = delay

        def forward(self, x):
            time.sleep(self.delay)
            return self.net(x)

    def job(out, delay):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (64,), generator=g)
        return gs.attribute_dataset(Slow(delay).eval(), (x, y), method="smoothgrad", n_samples=4, seed=3,
                                    out=out, resume=True, shard_size=4)
""")


def run_child(script: Path, out: Path, kill_after: int) -> int:
    """Run ``script out`` and SIGKILL it once the manifest lists ``kill_after`` shards; the shards done then."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "GRADSENSE_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
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
            raise AssertionError("the child finished before it could be killed: " + proc.stderr.read().decode()[-2000:])
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("timeout")


def test_killed_with_sigkill_at_a_random_shard_then_resumed_equals_uninterrupted(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(JOB + "\njob(sys.argv[1], 0.02)\n")
    kill_at = int(torch.randint(1, 14, (1,), generator=torch.Generator().manual_seed(int(time.time()))))
    done = run_child(script, tmp_path / "killed", kill_after=kill_at)
    manifest = json.loads((tmp_path / "killed" / MANIFEST).read_text())
    assert done >= kill_at and not manifest["complete"] and len(manifest["shards"]) < 16, (kill_at, done)
    namespace: dict = {}
    exec(JOB, namespace)  # the same job here: resume the killed run, and run it uninterrupted
    resumed = namespace["job"](tmp_path / "killed", 0.0)
    clean = namespace["job"](tmp_path / "clean", 0.0)
    assert resumed.meta["resumed_shards"] == len(manifest["shards"])
    _equal(resumed, clean)


# ------------------------------------------------------------------------------------------ torch.distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, y = make_data()
        res = gs.attribute_dataset(make_model(), (x, y), method="smoothgrad", n_samples=4, seed=2, out=out,
                                   shard_size=4, show_progress=False)
        assert res.n == N
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_gloo_processes_equal_one_process_bitwise(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    x, y = make_data()
    one = gs.attribute_dataset(make_model(), (x, y), method="smoothgrad", n_samples=4, seed=2, shard_size=4,
                               out=tmp_path / "one")
    _equal(DatasetAttribution.load(tmp_path / "two"), one)
    shards = json.loads((tmp_path / "two" / MANIFEST).read_text())["shards"]
    assert [e["index"] for e in shards] == list(range(8))  # every shard once, none lost or duplicated


def test_resume_keeps_the_chunk_size_fixed_at_the_start(tmp_path, monkeypatch):
    """Rows per forward/backward come from the free memory at the start; a resume with other free memory must not
    change them (nor refuse the run): the chunk size is kept in the manifest."""
    import gradsense.attribution.dataset as mod

    model, (x, y) = make_model(), make_data()
    monkeypatch.setattr(mod, "chunk_size_for", lambda *a, **k: 7)
    first = gs.attribute_dataset(model, (x, y), method="smoothgrad", n_samples=3, shard_size=10, out=tmp_path)
    assert first.meta["settings"]["chunk_size"] == 7
    monkeypatch.setattr(mod, "chunk_size_for", lambda *a, **k: 1000)
    again = gs.attribute_dataset(model, (x, y), method="smoothgrad", n_samples=3, out=tmp_path, resume=True)
    _equal(again, first)
    fresh = gs.attribute_dataset(model, (x, y), method="smoothgrad", n_samples=3, shard_size=10)
    assert fresh.meta["settings"]["chunk_size"] == 1000
