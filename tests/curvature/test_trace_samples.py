"""trace_samples: Hutchinson samples in resumable shards.

Oracles: ``v^T H v`` with the exact Hessian of a tiny float64 net (``torch.autograd.functional.hessian``) for the
same probes, the exact trace within 4 standard errors, an uninterrupted run (after an interruption, a corrupted
shard), and one process (for two gloo processes, whose products are reduced over the ranks).
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.func import functional_call

import gradsense as gs
import gradsense.curvature.samples as samples_mod
from gradsense.core.ranges import shard_seed
from gradsense.curvature.samples import rademacher
from gradsense.results.shards import MANIFEST


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def make_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)


def exact_hessian(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)
    sizes = [params[k].numel() for k in names]

    def f(v):
        ps = {k: t.reshape(params[k].shape) for k, t in zip(names, torch.split(v, sizes))}
        return nn.functional.cross_entropy(functional_call(model, ps, (x,)), y)

    return torch.autograd.functional.hessian(f, torch.cat([params[k].reshape(-1) for k in names])), sizes


def test_samples_are_vHv_of_the_exact_hessian_and_the_mean_is_the_trace():
    model, (x, y) = make_model(), make_data()
    H, sizes = exact_hessian(model, x, y)
    res = gs.curvature.trace_samples(model, gs.losses.cross_entropy, (x, y), samples=300, shard_size=7, per="layer",
                                     seed=3, rtol=1.0)
    v = torch.cat([rademacher(min(7, 300 - 7 * i), H.shape[0], shard_seed(3, i), torch.float64)
                   for i in range(-(-300 // 7))])
    hv = v @ H
    torch.testing.assert_close(res.tensors["samples"], (v * hv).sum(1), rtol=1e-10, atol=1e-12)
    bounds = torch.tensor([0, *sizes]).cumsum(0)
    layer0 = slice(int(bounds[0]), int(bounds[2]))  # weight and bias of the first Linear
    torch.testing.assert_close(res.tensors["group_samples"][:, 0], (v[:, layer0] * hv[:, layer0]).sum(1),
                               rtol=1e-10, atol=1e-12)
    exact = float(H.trace())
    assert abs(res.value - exact) < 4 * res.stderr, (res.value, exact, res.stderr)
    assert res.per_group["0"]["numel"] == 30
    assert abs(res.per_group["0"]["trace"] - float(H[layer0, layer0].trace())) < 4 * res.per_group["0"]["stderr"]


def test_interrupted_and_corrupted_runs_resume_bitwise(tmp_path, monkeypatch):
    model, (x, y) = make_model(), make_data()
    opts = {"samples": 40, "shard_size": 6, "per": "layer", "seed": 1, "rtol": 1.0}
    clean = gs.curvature.trace_samples(model, gs.losses.cross_entropy, (x, y), out=tmp_path / "clean", **opts)
    real = samples_mod.ShardStore.run

    def stop_at_4(self, compute, **kw):
        def limited(i, rows):
            if i == 4:
                raise KeyboardInterrupt
            return compute(i, rows)
        return real(self, limited, **kw)

    monkeypatch.setattr(samples_mod.ShardStore, "run", stop_at_4)
    with pytest.raises(KeyboardInterrupt):
        gs.curvature.trace_samples(model, gs.losses.cross_entropy, (x, y), out=tmp_path / "run", **opts)
    monkeypatch.setattr(samples_mod.ShardStore, "run", real)
    assert len(json.loads((tmp_path / "run" / MANIFEST).read_text())["shards"]) == 4
    last = tmp_path / "run" / "shard-000003.safetensors"
    last.write_bytes(last.read_bytes()[:-5])
    with pytest.warns(RuntimeWarning, match=r"\[3\]"):
        resumed = gs.curvature.trace_samples(model, gs.losses.cross_entropy, (x, y), out=tmp_path / "run",
                                             resume=True, **opts)
    for k in ("samples", "group_samples", "trace", "stderr", "group_trace", "group_stderr", "running"):
        assert torch.equal(resumed.tensors[k], clean.tensors[k]), k
    mem = gs.curvature.trace_samples(model, gs.losses.cross_entropy, (x, y), **opts)
    assert torch.equal(mem.tensors["samples"], clean.tensors["samples"])
    for change, match in (({"seed": 2}, "seed"), ({"samples": 41}, "rows"), ({"per": None}, "groups")):
        with pytest.raises(ValueError, match=f"cannot be resumed.*{match}"):
            gs.curvature.trace_samples(model, gs.losses.cross_entropy, (x, y), out=tmp_path / "run", resume=True,
                                       **{**opts, **change})


def test_bad_arguments_before_any_product(tmp_path):
    model, (x, y) = make_model(), make_data()
    with pytest.raises(ValueError, match="samples"):
        gs.curvature.trace_samples(model, gs.losses.cross_entropy, (x, y), samples=0)
    with pytest.raises(ValueError, match="needs out="):
        gs.curvature.trace_samples(model, gs.losses.cross_entropy, (x, y), resume=True)
    with pytest.raises(ValueError, match="empty"):
        gs.curvature.trace_samples(model, gs.losses.cross_entropy, (x[:0], y[:0]), out=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        gs.curvature.trace_samples(make_model(), gs.losses.cross_entropy, make_data(), samples=12, shard_size=5,
                                   seed=4, out=out, per="layer", rtol=1.0, show_progress=False, batch_size=10)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_gloo_processes_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    one = gs.curvature.trace_samples(make_model(), gs.losses.cross_entropy, make_data(), samples=12, shard_size=5,
                                     seed=4, per="layer", rtol=1.0, batch_size=10)
    from gradsense.results.shards import ShardStore

    two = ShardStore.open(tmp_path / "two").read_all()
    torch.testing.assert_close(two["samples"], one.tensors["samples"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(two["group_samples"], one.tensors["group_samples"], rtol=1e-6, atol=1e-9)
