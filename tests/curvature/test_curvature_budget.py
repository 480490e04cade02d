"""Budget-split batches give the same curvature and importance as whole batches (chunked == unchunked)."""

from __future__ import annotations

import torch

import gradsense as gs
from gradsense.core.batching import split_batch
from gradsense.curvature.engine import operator


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double().eval()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)


def test_split_batch_pieces_cover_the_batch_once():
    x, y = _data()
    pieces = split_batch(x, y, 7)
    assert [p[0].shape[0] for p in pieces] == [7, 7, 7, 7, 7, 5]
    torch.testing.assert_close(torch.cat([p[0] for p in pieces]), x, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([p[1] for p in pieces]), y, rtol=0, atol=0)
    assert split_batch(x, torch.tensor(1), 7)[0][0] is x  # labels that are not per-example: kept whole


def test_operator_split_by_budget_equals_the_dense_hessian():
    model, (x, y) = _net(), _data()
    tiny = operator(model, gs.losses.cross_entropy, (x, y), max_memory=64 * 1024)
    assert tiny.max_rows is not None and tiny.max_rows < 40
    full = operator(model, gs.losses.cross_entropy, (x, y))
    assert full.max_rows is None
    params = dict(model.named_parameters())
    names = list(params)
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss(v: torch.Tensor) -> torch.Tensor:
        chunks, i = {}, 0
        for n in names:
            k = params[n].numel()
            chunks[n] = v[i : i + k].reshape(params[n].shape)
            i += k
        return gs.losses.cross_entropy(torch.func.functional_call(model, chunks, (x,)), y)

    dense = torch.autograd.functional.hessian(loss, flat)
    v = torch.randn(flat.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(tiny.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(full.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)


def test_eigs_and_importance_same_under_a_small_budget():
    model, (x, y) = _net(), _data()
    a = gs.hessian_eigs(model, gs.losses.cross_entropy, (x, y), k=1, seed=0, tol=1e-8, max_memory=64 * 1024)
    b = gs.hessian_eigs(model, gs.losses.cross_entropy, (x, y), k=1, seed=0, tol=1e-8)
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-8, atol=1e-10)
    for method in ("taylor", "wanda"):
        s1 = gs.importance(model, gs.losses.cross_entropy, (x, y), method=method, max_memory=32 * 1024)
        s2 = gs.importance(model, gs.losses.cross_entropy, (x, y), method=method)
        for k in s2.scores:
            torch.testing.assert_close(s1.scores[k], s2.scores[k], rtol=1e-10, atol=1e-12)
