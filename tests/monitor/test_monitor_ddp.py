"""DistributedDataParallel with 2 ranks (gloo, CPU) gives the same scalars as 1 rank on the same global batch.

float64, so that what is compared is the reduction logic, not float32 summation order (derived statistics such as
the noise scale's standard error difference nearly equal numbers).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from gradsense.monitor import Monitor

STEPS, GLOBAL_BATCH = 3, 16
QUANTITIES = {"loss": 1, "grad_norm": 1, "weight_norm": 1, "update": 1, "gns": 1, "attention": 1, "rotation": 1,
              "conflict": 1}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h, _ = self.attn(h, h, h)
        return self.out(h.mean(1))


def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g))
            for _ in range(STEPS)]


def _worker(rank, world, tmp, ret_path):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(Net().double())
        mon = train_logged(model, rank, world, f"{tmp}/run")
        if rank == 0:
            res = mon.result()
            torch.save({"columns": res.columns, "values": res.tensors["values"]}, ret_path)
    finally:
        dist.destroy_process_group()


def train_logged(model, rank, world, log_dir):
    """As train(), with the loss logged before the optimizer step (all ranks take part in averaging it)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon = Monitor(model, opt, quantities=QUANTITIES, log_dir=log_dir)
    per = GLOBAL_BATCH // world
    for x, y in data():
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        out = model(xs)
        la, lb = F.cross_entropy(out[::2], ys[::2]), F.cross_entropy(out[1::2], ys[1::2])
        mon.objectives(even=la, odd=lb)
        loss = 0.5 * (la + lb)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
        mon.log(loss=loss.detach())
        opt.step()
    mon.close()
    return mon


@pytest.mark.timeout(300)
def test_two_ranks_equal_one_rank(tmp_path):
    ret = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, str(tmp_path), str(ret)), nprocs=2, join=True)
    got = torch.load(ret, weights_only=True)
    torch.manual_seed(0)
    ref = train_logged(Net().double(), 0, 1, None).result()
    # the two-batch estimator (gns2) exists only with two ranks: its small batches are the ranks' halves
    assert [c for c in got["columns"] if not c.startswith("gns2")] == ref.columns
    checked = 0
    for j, name in enumerate(got["columns"]):
        if name.startswith("gns2"):
            continue
        a, b = got["values"][:, j], ref.series(name)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")
        checked += int(torch.isfinite(b).any())
    assert checked > 40
    for name in ("gns/trace", "attn_entropy/attn/h0", "cos/even|odd", "loss"):
        assert name in ref.columns and torch.isfinite(ref.series(name)).all()
    assert (tmp_path / "run" / "monitor" / "manifest.json").is_file()
