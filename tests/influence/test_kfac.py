"""K-FAC / EK-FAC factors against explicit per-example loops, and exactness where the Kronecker model is exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from influence_cases import CE, loop_grads
from torch import nn

import gradsense as gs
from gradsense.influence.kfac import precondition
from gradsense.results import Result
from helpers import assert_model_unchanged


def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()


def test_mlp_factors_equal_closed_form_loops():
    """A, S by hand-derived backprop (CE: delta_out = softmax - onehot), Lambda from autograd per-example grads."""
    model = _mlp()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (12,), generator=g)
    with assert_model_unchanged(model):
        f = gs.influence.fit_factors(model, CE, (x, y), strategy="ekfac", chunk_size=5)
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    one = torch.ones(12, 1, dtype=torch.float64)
    a1 = torch.cat([x, one], 1)
    h = torch.tanh(x @ w1.T + b1)
    a2 = torch.cat([h, one], 1)
    p = torch.softmax(h @ w2.T + b2, 1)
    d2 = p - F.one_hot(y, 2).double()
    d1 = (d2 @ w2) * (1 - h**2)
    expected = {"0": (a1.T @ a1 / 12, d1.T @ d1 / 12), "2": (a2.T @ a2 / 12, d2.T @ d2 / 12)}
    grads = loop_grads(model, CE, x, y)
    per = {"0": torch.cat([grads[:, :12].reshape(12, 4, 3), grads[:, 12:16].reshape(12, 4, 1)], 2),
           "2": torch.cat([grads[:, 16:24].reshape(12, 2, 4), grads[:, 24:].reshape(12, 2, 1)], 2)}
    for k, (a, s) in expected.items():
        qa, qs = f.tensors[f"A_vecs/{k}"], f.tensors[f"S_vecs/{k}"]
        torch.testing.assert_close(qa @ torch.diag(f.tensors[f"A_vals/{k}"]) @ qa.T, a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(qs @ torch.diag(f.tensors[f"S_vals/{k}"]) @ qs.T, s, rtol=1e-10, atol=1e-12)
        lam = ((qs.T @ per[k] @ qa) ** 2).mean(0)
        torch.testing.assert_close(f.tensors[f"lambda/{k}"], lam, rtol=1e-10, atol=1e-14)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.fc = nn.Linear(3 * 3 * 3, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class EmbedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 3, padding_idx=0)
        self.fc = nn.Linear(3, 2)

    def forward(self, t):
        return self.fc(torch.tanh(self.emb(t)).mean(1))


def _out_grads(model, layer, x, y):
    """Per-example (input, output gradient) of ``layer`` by a loop: hook the output, autograd w.r.t. it."""
    ins, outs, grads = [], [], []
    for i in range(x.shape[0]):
        store: dict = {}
        h = layer.register_forward_hook(lambda m, a, o, store=store: store.update(a=a[0].detach(), o=o))
        try:
            loss = CE(model(x[i:i + 1]), y[i:i + 1])
        finally:
            h.remove()
        (g,) = torch.autograd.grad(loss, store["o"])
        ins.append(store["a"])
        outs.append(store["o"].detach())
        grads.append(g)
    return torch.cat(ins), torch.cat(grads)


def test_conv_factors_equal_explicit_patch_loops():
    torch.manual_seed(4)
    model = ConvNet().double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (5,), generator=g)
    f = gs.influence.fit_factors(model, CE, (x, y), params=["conv"])
    assert list(f.layers) == ["conv"]
    inputs, dout = _out_grads(model, model.conv, x, y)
    padded = F.pad(inputs, (1, 1, 1, 1))
    patches = []  # explicit im2col: every output position of the stride-2 3x3 kernel, (C, kh, kw) order
    for n in range(5):
        for i in range(3):
            for j in range(3):
                patch = padded[n, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3].reshape(-1)
                patches.append(torch.cat([patch, torch.ones(1, dtype=torch.float64)]))
    a = torch.stack(patches)
    d = dout.permute(0, 2, 3, 1).reshape(-1, 3)
    qa, qs = f.tensors["A_vecs/conv"], f.tensors["S_vecs/conv"]
    torch.testing.assert_close(qa @ torch.diag(f.tensors["A_vals/conv"]) @ qa.T, a.T @ a / 45, rtol=1e-10, atol=1e-12)
    # S: summed over the positions of an example, averaged over examples
    torch.testing.assert_close(qs @ torch.diag(f.tensors["S_vals/conv"]) @ qs.T, d.T @ d / 5, rtol=1e-10, atol=1e-12)
    grads = loop_grads(model, CE, x, y, names=["conv.weight", "conv.bias"])
    per = torch.cat([grads[:, :54].reshape(5, 3, 18), grads[:, 54:].reshape(5, 3, 1)], 2)
    torch.testing.assert_close(f.tensors["lambda/conv"], ((qs.T @ per @ qa) ** 2).mean(0), rtol=1e-10, atol=1e-14)


def test_embedding_factors_equal_explicit_loops():
    torch.manual_seed(5)
    model = EmbedNet().double().eval()
    g = torch.Generator().manual_seed(2)
    t = torch.randint(0, 7, (6, 4), generator=g)
    t[0, 3] = 0  # a padding token
    y = torch.randint(0, 2, (6,), generator=g)
    f = gs.influence.fit_factors(model, CE, (t, y))
    assert f.layers["emb"]["kind"] == "embedding" and f.layers["emb"]["shape"] == [3, 7]
    counts = torch.bincount(t[t != 0].reshape(-1), minlength=7).double()
    torch.testing.assert_close(f.tensors["A_diag/emb"], counts / t.numel(), rtol=1e-12, atol=0)
    _, dout = _out_grads(model, model.emb, t, y)
    d = dout.reshape(-1, 3)
    qs = f.tensors["S_vecs/emb"]
    torch.testing.assert_close(qs @ torch.diag(f.tensors["S_vals/emb"]) @ qs.T, d.T @ d / 6, rtol=1e-10, atol=1e-12)
    grads = loop_grads(model, CE, t, y, names=["emb.weight"]).reshape(6, 7, 3).transpose(1, 2)  # G = W.grad^T
    assert float(grads[:, :, 0].abs().max()) == 0.0  # padding_idx gets no gradient
    torch.testing.assert_close(f.tensors["lambda/emb"], ((qs.T @ grads) ** 2).mean(0), rtol=1e-10, atol=1e-14)


def _factorial_problem():
    """One Linear layer, MSE, data = every (input, residual) pair: the empirical Fisher is exactly S kron A."""
    torch.manual_seed(6)
    lin = nn.Linear(3, 2).double().eval()
    g = torch.Generator().manual_seed(3)
    inputs = torch.randn(5, 3, generator=g, dtype=torch.float64)
    resid = torch.randn(4, 2, generator=g, dtype=torch.float64)
    xs, ys = [], []
    with torch.no_grad():
        for a in inputs:
            for e in resid:
                xs.append(a)
                ys.append(lin(a[None])[0] - e)
    return lin, torch.stack(xs), torch.stack(ys)


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_single_linear_layer_with_known_covariances_is_exact(strategy):
    lin, x, y = _factorial_problem()
    mse = gs.losses.mse
    grads = loop_grads(lin, mse, x, y)  # (20, 8): weight (2x3) then bias (2)
    fisher = grads.T @ grads / 20
    lam = 0.05
    f = gs.influence.fit_factors(lin, mse, (x, y), strategy=strategy)
    # K-FAC's product of the factors is the Fisher itself here (row-major vec(G) = delta kron a)
    qa, qs = f.tensors["A_vecs/(root)"], f.tensors["S_vecs/(root)"]
    a = qa @ torch.diag(f.tensors["A_vals/(root)"]) @ qa.T
    s = qs @ torch.diag(f.tensors["S_vals/(root)"]) @ qs.T
    perm = torch.cat([torch.arange(6).reshape(2, 3), torch.arange(6, 8).reshape(2, 1)], 1).reshape(-1)
    torch.testing.assert_close(torch.kron(s, a), fisher[perm][:, perm], rtol=1e-10, atol=1e-12)
    # the damped inverse applied to query gradients equals the dense one
    gq = grads[:3]
    mats = torch.cat([gq[:, :6].reshape(3, 2, 3), gq[:, 6:].reshape(3, 2, 1)], 2)
    pre = precondition(f, {"(root)": mats}, damping=lam)["(root)"]
    dense = torch.linalg.solve(fisher + lam * torch.eye(8, dtype=torch.float64), gq.T).T
    torch.testing.assert_close(torch.cat([pre[:, :, :3].reshape(3, 6), pre[:, :, 3]], 1), dense, rtol=1e-9,
                               atol=1e-12)
    # and so do the ekfac scores of the whole pipeline
    res = gs.influence.scores(lin, mse, (x, y), (x[:3], y[:3]), method="ekfac", damping=lam, factors=f)
    torch.testing.assert_close(res.scores, dense @ grads.T, rtol=1e-9, atol=1e-12)


def test_factors_saved_once_and_reused(tmp_path):
    model = _mlp()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (30,), generator=g)
    f = gs.influence.fit_factors(model, CE, (x, y))
    f.save(tmp_path / "factors")
    loaded = Result.load(tmp_path / "factors")
    assert type(loaded).__name__ == "CurvatureFactors"
    in_memory = gs.influence.scores(model, CE, (x, y), (x[:4], y[:4]), method="ekfac", factors=f)
    reused = gs.influence.scores(model, CE, (x, y), (x[:4], y[:4]), method="ekfac", factors=tmp_path / "factors")
    torch.testing.assert_close(reused.scores, in_memory.scores, rtol=0, atol=0)  # safetensors round trip: bitwise
    fitted_inline = gs.influence.scores(model, CE, (x, y), (x[:4], y[:4]), method="ekfac")
    torch.testing.assert_close(fitted_inline.scores, reused.scores, rtol=1e-12, atol=1e-14)
    # default damping: kronfluence's 0.1 x mean eigenvalue, per layer
    damp = reused.meta["damping"]
    assert damp["0"] == pytest.approx(0.1 * float(f.tensors["lambda/0"].mean()), rel=1e-12)


def test_sampled_fisher_is_seeded():
    model = _mlp()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (16,))
    a = gs.influence.fit_factors(model, CE, (x, y), fisher="sampled", seed=1)
    b = gs.influence.fit_factors(model, CE, (x, y), fisher="sampled", seed=1)
    c = gs.influence.fit_factors(model, CE, (x, y), fisher="sampled", seed=2)
    torch.testing.assert_close(a.tensors["lambda/2"], b.tensors["lambda/2"], rtol=0, atol=0)
    assert not torch.equal(a.tensors["lambda/2"], c.tensors["lambda/2"])
    lin, xs, ys = _factorial_problem()
    with pytest.raises(ValueError, match="classification logits"):
        gs.influence.fit_factors(lin, gs.losses.mse, (xs, ys), fisher="sampled")
