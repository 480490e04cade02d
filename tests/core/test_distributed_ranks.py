"""Two CPU ranks (gloo) give what one process gives: Hessian trace, top eigenvalues, density, importance, loss
surface, sharpness; only rank 0 writes; a seed left to chance is rank 0's on every rank.

The data is uneven on purpose: 9 examples in batches of 2 are 5 batches, so rank 0 gets 3 batches (5 examples)
and rank 1 gets 2 (4 examples); a wrong weighting of the ranks' means shows. The model is float64, so what is
compared is the reduction, not the order of float32 sums (1e-6 relative, as one process against two).
Independent oracles on top: the dense Hessian of the whole data (``torch.autograd.functional.hessian``) for the
trace and top eigenvalue, and the full-batch autograd gradient for the Taylor scores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradsense as gs
from gradsense.core.distributed import world
from gradsense.results import RunFolder

N, BATCH = 9, 2  # 5 batches: 3 on rank 0, 2 on rank 1
METHODS = ("taylor", "fisher", "wanda", "gblm", "pqi", "ecoflap", "serene")
OPTIONS = {"serene": {"granularity": "channel"}}
MEASURED = (
    "loss_before",
    "loss_after",
    "metric_before",
    "metric_after",
    "predicted_first_order",
    "predicted_second_order",
)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g)


def _flat(prefix: str, result: Any, out: dict[str, torch.Tensor]) -> None:
    for k, v in result.tensors.items():
        out[f"{prefix}/{k}"] = v.detach().clone()


def compute(tmp: Path, seeds: dict[str, int] | None = None) -> dict[str, Any]:
    """Every analysis of the test on this process's share of the data (the whole data with world size 1).

    ``seeds``: the seed to use where the two-rank run was given ``seed=None`` (then the rank's global RNG is
    seeded differently on purpose, and rank 0's draw must win).
    """
    rank, _ = world()
    model, (x, y) = make_model(), make_data()
    loss = gs.losses.cross_entropy
    out: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}

    tr = gs.hessian_trace(model, loss, (x, y), batch_size=BATCH, rtol=1e-3, seed=0)
    _flat("trace", tr, out)
    torch.manual_seed(1000 + rank)  # the ranks' global RNGs differ: a drawn seed must still agree
    drawn = None if seeds is None else seeds["trace_none"]
    tr_none = gs.hessian_trace(model, loss, (x, y), batch_size=BATCH, rtol=1e-3, seed=drawn)
    _flat("trace_none", tr_none, out)
    meta["trace_none_seed"] = int(tr_none.meta["seed"])
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    _flat("trace_loader", gs.hessian_trace(model, loss, loader, rtol=1e-3, seed=0), out)

    eigs = gs.hessian_eigs(model, loss, (x, y), batch_size=BATCH, k=2, tol=1e-8, seed=0)
    out["eigs/eigenvalues"] = eigs.eigenvalues.clone()
    out["eigs/residuals"] = eigs.residuals.clone()
    dens = gs.spectral_density(model, loss, (x, y), batch_size=BATCH, steps=8, probes=2, seed=0)
    out["density/ritz_values"] = dens.ritz_values.clone()
    out["density/weights"] = dens.tensors["weights"].clone()

    for method in METHODS:
        res = gs.importance.importance(
            model, loss, (x, y), method=method, batch_size=BATCH, **OPTIONS.get(method, {})
        )
        _flat(f"importance-{method}", res, out)
        meta[f"importance-{method}-examples"] = int(res.meta["n_examples"])
    # pruned and measured on held-out data: loss, accuracy (a metric of all outputs), predicted change
    res = gs.importance.importance(model, loss, (x, y), method="taylor", heldout=(x, y), batch_size=BATCH)
    measured = res.prune(sparsity=0.5).meta["measured"]
    out["measured/values"] = torch.tensor([measured[k] for k in MEASURED], dtype=torch.float64)

    surf = gs.loss_surface(model, loss, (x, y), steps=5, span=0.5, batch_size=BATCH, seed=0)
    out["surface/losses"] = surf.losses.clone()
    meta["surface-examples"] = int(surf.meta["settings"]["examples"])
    for kind in ("sam", "average"):
        sh = gs.sharpness(model, loss, (x, y), rho=0.05, kind=kind, n_samples=4, batch_size=BATCH, seed=0)
        out[f"sharpness-{kind}/value"] = torch.tensor(sh.value, dtype=torch.float64)

    tr.save(tmp / f"saved-rank{rank}")
    RunFolder(tmp / f"folder-rank{rank}").save_result(tr, "trace")
    try:  # 3 examples in batches of 4: one batch for two ranks
        gs.hessian_trace(model, loss, (x[:3], y[:3]), batch_size=4, seed=0)
        meta["too_few"] = ""
    except ValueError as err:
        meta["too_few"] = str(err)
    return {"tensors": out, "meta": meta}


def _worker(rank: int, world_size: int, tmp: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size)
    try:
        got = compute(Path(tmp))
        torch.save(got, Path(tmp) / f"result-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    two = tmp_path_factory.mktemp("two-ranks")
    mp.spawn(_worker, args=(2, str(two)), nprocs=2, join=True)
    ranks = [torch.load(two / f"result-rank{r}.pt", weights_only=True) for r in range(2)]
    one = tmp_path_factory.mktemp("one-process")
    ref = compute(one, seeds={"trace_none": ranks[0]["meta"]["trace_none_seed"]})
    return {"ranks": ranks, "one": ref, "dir": two}


def test_ranks_agree_bitwise(runs):
    a, b = runs["ranks"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        torch.testing.assert_close(
            a["tensors"][k], b["tensors"][k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}"
        )
    assert a["meta"] == b["meta"]


@pytest.mark.parametrize(
    "prefix",
    [
        "trace/",
        "trace_none/",
        "trace_loader/",
        "eigs/",
        "density/",
        "surface/",
        "sharpness-",
        "measured/",
        *(f"importance-{m}/" for m in METHODS),
    ],
)
def test_two_ranks_equal_one_process(runs, prefix):
    two, one = runs["ranks"][0]["tensors"], runs["one"]["tensors"]
    keys = [k for k in one if k.startswith(prefix)]
    assert keys and [k for k in two if k.startswith(prefix)] == keys
    for k in keys:
        torch.testing.assert_close(two[k], one[k], rtol=1e-6, atol=1e-10, msg=lambda m, k=k: f"{k}: {m}")


def test_counts_are_global(runs):
    meta = runs["ranks"][0]["meta"]
    assert meta["surface-examples"] == N
    assert all(meta[f"importance-{m}-examples"] == N for m in METHODS)


def test_drawn_seed_is_rank_zeros(runs):
    # the ranks' global RNGs were seeded differently; both used one seed, and it gave one process's result
    a, b = runs["ranks"]
    assert a["meta"]["trace_none_seed"] == b["meta"]["trace_none_seed"]
    torch.manual_seed(1000)
    assert a["meta"]["trace_none_seed"] == int(torch.randint(0, 2**62, (1,)).item())  # rank 0's draw


def test_against_dense_hessian_and_full_gradient(runs):
    """Independent oracles: the dense Hessian and the autograd gradient of the loss over all 9 examples."""
    model, (x, y) = make_model(), make_data()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def full_loss(flat: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        return F.cross_entropy(torch.func.functional_call(model, parts, (x,)), y)

    H = torch.autograd.functional.hessian(full_loss, flat0)
    two = runs["ranks"][0]["tensors"]
    torch.testing.assert_close(two["trace/trace"], torch.trace(H), rtol=1e-6, atol=1e-10)
    top = torch.linalg.eigvalsh(H).flip(0)[:2]
    torch.testing.assert_close(two["eigs/eigenvalues"], top, rtol=1e-6, atol=1e-10)
    flat = flat0.clone().requires_grad_(True)
    grad = torch.autograd.grad(full_loss(flat), flat)[0]
    i, checked = 0, 0
    for n, s in zip(names, shapes):
        want = (grad[i : i + s.numel()].reshape(s) * flat0[i : i + s.numel()].reshape(s)).abs()
        i += s.numel()
        if f"importance-taylor/score/{n}" in two:  # the weights (biases are not scored by default)
            torch.testing.assert_close(two[f"importance-taylor/score/{n}"], want, rtol=1e-6, atol=1e-12)
            checked += 1
    assert checked == 2
    center = runs["ranks"][0]["tensors"]["surface/losses"][2, 2]
    torch.testing.assert_close(center, full_loss(flat0).detach(), rtol=1e-12, atol=1e-12)


def test_only_rank_zero_writes(runs):
    d = runs["dir"]
    assert (d / "saved-rank0" / "result.json").is_file()
    assert (d / "folder-rank0" / "manifest.json").is_file()
    assert not (d / "saved-rank1").exists()
    assert not (d / "folder-rank1").exists()
    saved = gs.Result.load(d / "saved-rank0")
    torch.testing.assert_close(
        saved.tensors["trace"], runs["ranks"][0]["tensors"]["trace/trace"], rtol=0, atol=0
    )


def test_fewer_batches_than_ranks_is_one_clear_error_on_every_rank(runs):
    a, b = (r["meta"]["too_few"] for r in runs["ranks"])
    assert a == b and "1 batch" in a and "2 ranks" in a and "--batch-size 1" in a
    assert runs["one"]["meta"]["too_few"] == ""  # one process: nothing to share
