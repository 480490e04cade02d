"""Scheduled quantities against independent computations: attention entropy (MultiheadAttention's own per-head
weights, the zoo ViT's attention maps), layer rotation (1 - cos to the initial weights), curvature (the curvature
package on an eval-mode copy at the same weights, same seed)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradsense as gs
from gradsense.monitor import Monitor


def entropy(p):
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_entropy_equals_its_own_weights_with_padding(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, dropout=0.1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x, pad):
            h = x if batch_first else x.transpose(0, 1)
            out, _ = self.attn(h, h, h, key_padding_mask=pad)
            return out.sum()

    net = Net()
    x, pad = torch.randn(3, 5, 8), torch.zeros(3, 5, dtype=torch.bool)
    pad[0, -2:] = True
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with Monitor(net, opt, quantities={"attention": 1}) as mon:
        net(x, pad).backward()
        opt.step()
    s = mon.result().scalars
    net.eval()
    with torch.no_grad():
        h = x if batch_first else x.transpose(0, 1)
        _, w = mha(h, h, h, key_padding_mask=pad, average_attn_weights=False)  # (B, H, T, T)
    ent = entropy(w)  # (B, H, T)
    valid = (~pad).float().unsqueeze(1)
    expected = (ent * valid).sum((0, 2)) / valid.sum((0, 2))
    for h_ in range(2):
        assert float(s[f"attn_entropy/attn/h{h_}"][0]) == pytest.approx(float(expected[h_]), rel=1e-5)


def test_vit_attention_maps_and_rotation():
    torch.manual_seed(0)
    vit = gs.zoo.load("digits-vit").train()
    x, y = gs.zoo.dataset("digits", split="test")[:8]
    opt = torch.optim.SGD(vit.parameters(), lr=0.05)
    init = {n: p.detach().clone() for n, p in vit.named_parameters()}
    maps = []
    handles = [m.attn_map.register_forward_hook(lambda _m, _i, out: maps.append(out.detach()))
               for m in vit.modules() if hasattr(m, "attn_map")]
    with Monitor(vit, opt, quantities={"attention": 2, "rotation": 1}) as mon:
        for _ in range(3):
            maps.clear()
            opt.zero_grad()
            F.cross_entropy(vit(x), y).backward()
            opt.step()
    for h in handles:
        h.remove()
    s = mon.result().scalars
    names = [n for n, m in vit.named_modules() if hasattr(m, "attn_map")]
    assert float(s[f"attn_entropy/{names[0]}/h0"][2]) == pytest.approx(float(entropy(maps[0])[:, 0].mean()), rel=1e-5)
    assert math.isnan(float(s[f"attn_entropy/{names[0]}/h0"][1]))  # every 2 steps
    layer = "head"
    now = torch.cat([p.detach().reshape(-1) for n, p in vit.named_parameters() if n.startswith(layer + ".")])
    then = torch.cat([init[n].reshape(-1) for n, p in vit.named_parameters() if n.startswith(layer + ".")])
    expected = 1 - float(F.cosine_similarity(now.double(), then.double(), dim=0))  # float64: no cancellation
    assert float(s[f"rotation/{layer}"][2]) == pytest.approx(expected, rel=1e-4)


def test_curvature_equals_the_curvature_package_on_an_eval_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3)).train()
    held = (torch.randn(32, 6), torch.randint(0, 3, (32,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snaps = {}
    with Monitor(model, opt, quantities={"curvature": 2}, held_out=held, loss_fn=F.cross_entropy, seed=3) as mon:
        for step in range(3):
            opt.zero_grad()
            F.cross_entropy(model(torch.randn(16, 6)), torch.randint(0, 3, (16,))).backward()
            opt.step()
            snaps[step] = copy.deepcopy(model).eval()
            assert model.training and model[3].training  # still training after the measurement
    s = mon.result().scalars
    for step in (0, 2):
        seed = (3 * 1_000_003 + step) % (2**62)
        eig = gs.hessian_eigs(snaps[step], F.cross_entropy, held, k=1, tol=1e-2, seed=seed, return_vectors=False,
                              overlap=False, max_hvp=100)
        assert float(s["curvature/top_eig"][step]) == pytest.approx(float(eig.eigenvalues[0]), rel=1e-6)
        # and the exact top eigenvalue of the dense Hessian (tiny model): within the reported residual
        params = dict(snaps[step].named_parameters())
        flat = torch.cat([p.detach().reshape(-1) for p in params.values()])

        def loss_of(v, model=snaps[step], params=params):
            chunks, i = {}, 0
            for n, p in params.items():
                chunks[n] = v[i:i + p.numel()].reshape(p.shape)
                i += p.numel()
            return F.cross_entropy(torch.func.functional_call(model, chunks, (held[0],)), held[1])

        top = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat.double().float()))[-1])
        assert abs(float(s["curvature/top_eig"][step]) - top) <= 1.01 * float(s["curvature/top_eig_residual"][step]) + 1e-4
    assert math.isnan(float(s["curvature/trace"][1]))
