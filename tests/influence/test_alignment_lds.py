"""Gradient alignment with known angles, and the linear datamodeling score against constructed ground truths."""

from __future__ import annotations

import math

import pytest
import torch
from influence_cases import CE, blobs, fit_lbfgs
from scipy.stats import spearmanr
from torch import nn

import gradsense as gs
from gradsense.influence.lds import spearman_columns
from helpers import assert_model_unchanged


class TwoHeads(nn.Module):
    """out = w1 . x[:, :2] + w2 . x[:, 2:]: two layers, each seeing its half of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 1, bias=False)
        self.b = nn.Linear(2, 1, bias=False)

    def forward(self, x):
        return self.a(x[:, :2]) + self.b(x[:, 2:])


def _unit(deg):
    r = math.radians(deg)
    return torch.tensor([math.cos(r), math.sin(r)], dtype=torch.float64)


def _group(u, v, n, scale_seed):
    """n examples with inputs [s u, s v] (s > 0), label 1: at w = 0 the MSE gradient is -2 s^2 [u, v]."""
    g = torch.Generator().manual_seed(scale_seed)
    s = 0.5 + torch.rand(n, 1, generator=g, dtype=torch.float64)
    x = torch.cat([s * u, s * v], dim=1)
    return x, torch.ones(n, 1, dtype=torch.float64)


def test_groups_with_known_angles_give_that_cosine_matrix():
    model = TwoHeads().double().eval()
    nn.init.zeros_(model.a.weight)
    nn.init.zeros_(model.b.weight)
    angles_a, angles_b = [0, 60, 180], [0, 90, 45]
    groups = {f"g{i}": _group(_unit(da), _unit(db), 5 + i, i) for i, (da, db) in enumerate(zip(angles_a, angles_b))}
    with assert_model_unchanged(model):
        res = gs.gradient_alignment(model, gs.losses.mse, groups, per="layer")
    cos_a = torch.tensor([[math.cos(math.radians(p - q)) for q in angles_a] for p in angles_a], dtype=torch.float64)
    cos_b = torch.tensor([[math.cos(math.radians(p - q)) for q in angles_b] for p in angles_b], dtype=torch.float64)
    torch.testing.assert_close(res.layer_cosine("a"), cos_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.layer_cosine("b"), cos_b, rtol=1e-10, atol=1e-12)
    # overall: [u_a, v_a] . [u_b, v_b] / 2 for unit halves of equal weight per group
    torch.testing.assert_close(res.cosine, (cos_a + cos_b) / 2, rtol=1e-10, atol=1e-12)
    # every example of a group points the same way: coherence 1, no conflict inside, conflict iff cos < 0
    torch.testing.assert_close(res.tensors["coherence"], torch.ones(3, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    expected_conflict = ((cos_a + cos_b) / 2 < 0).double().fill_diagonal_(0)
    torch.testing.assert_close(res.tensors["conflict"], expected_conflict, rtol=0, atol=1e-12)
    header, rows = res.table()
    assert len(rows) == 3 and header[2] == "cosine"


def test_coherence_and_conflict_closed_forms():
    model = TwoHeads().double().eval()
    nn.init.zeros_(model.a.weight)
    nn.init.zeros_(model.b.weight)
    # group: 3 examples along u and 1 along -u: unit gradients +-u, pairwise cosines +-1
    u, v = _unit(30), _unit(30)
    x = torch.cat([torch.cat([u, v])[None].repeat(3, 1), -torch.cat([u, v])[None]])
    y = torch.ones(4, 1, dtype=torch.float64)
    other = _group(_unit(120), _unit(120), 2, 0)
    res = gs.gradient_alignment(model, gs.losses.mse, {"mixed": (x, y), "other": other}, per=None)
    assert res.layers == []
    # (|sum u_i|^2 - n) / (n (n - 1)) = (4 - 4) / 12 = 0; conflicting ordered pairs: 6 of 12
    assert float(res.tensors["coherence"][0]) == pytest.approx(0.0, abs=1e-12)
    assert float(res.tensors["conflict"][0, 0]) == pytest.approx(0.5)
    # the other group is at 90 degrees to both +-u: no pair has cos < 0 up to rounding? cos(90) = 0, not < 0
    assert float(res.tensors["conflict"][0, 1]) <= 0.5


def test_objective_paired_with_itself_is_one():
    torch.manual_seed(0)
    x, y = blobs(20, 4, 3, 0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()

    def scaled(out, labels):
        return 3.0 * CE(out, labels)

    res = gs.gradient_alignment(model, None, {"ce": CE, "ce_again": CE, "scaled": scaled}, data=(x, y))
    torch.testing.assert_close(res.cosine, torch.ones(3, 3, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    assert float(res.tensors["conflict"][0, 1]) == 0.0
    assert res.meta["pairs"].startswith("same example")
    for layer in res.layers:
        torch.testing.assert_close(res.layer_cosine(layer), torch.ones(3, 3, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="data="):
        gs.gradient_alignment(model, None, {"a": CE, "b": CE})
    with pytest.raises(ValueError, match="at least two"):
        gs.gradient_alignment(model, CE, {"a": (x, y)})
    with pytest.raises(ValueError, match="not a mix"):
        gs.gradient_alignment(model, CE, {"a": (x, y), "b": CE}, data=(x, y))


def test_spearman_columns_equals_scipy():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 5, generator=g, dtype=torch.float64)
    b = a + torch.randn(30, 5, generator=g, dtype=torch.float64)
    b[:10, 2] = 1.0  # ties
    expected = torch.tensor([spearmanr(a[:, j].numpy(), b[:, j].numpy()).statistic for j in range(5)])
    torch.testing.assert_close(spearman_columns(a, b), expected.double(), rtol=1e-12, atol=1e-12)


class Lookup(nn.Module):
    """A 'model' whose loss on query q is a fixed linear function of the training subset: sum_{i in S} c[q, i]."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("values", values)

    def forward(self, x):
        return self.values[x.long().reshape(-1)].reshape(-1, 1)


def _own_loss(out, labels):
    return out.reshape(-1).mean()


def test_lds_is_one_for_a_linear_datamodel_and_resumes(tmp_path):
    g = torch.Generator().manual_seed(0)
    c = torch.randn(4, 30, generator=g, dtype=torch.float64)
    query = (torch.arange(4, dtype=torch.float64)[:, None], torch.zeros(4))
    calls = []

    def train_fn(indices, seed):
        calls.append(seed)
        if len(calls) == 7:
            raise RuntimeError("killed")
        return Lookup(c[:, indices].sum(1))

    with pytest.raises(RuntimeError, match="killed"):
        gs.influence.retrain(train_fn, 30, query, _own_loss, subsets=20, out=tmp_path / "truth")
    truth = gs.influence.retrain(train_fn, 30, query, _own_loss, subsets=20, out=tmp_path / "truth", resume=True)
    assert len(calls) == 7 + 14  # 6 done before the crash, the 7th failed, then the 14 remaining
    masks = gs.influence.subset_masks(30, 20, 0.5, 0)
    torch.testing.assert_close(truth.losses, (masks.double() @ c.T), rtol=1e-12, atol=1e-12)
    perfect = gs.influence.lds(-c, truth)  # positive score = lowers the loss, so the scores are -c
    assert perfect.value == pytest.approx(1.0)
    assert perfect.tensors["per_query"].shape == (4,)
    noise = gs.influence.lds(torch.randn(4, 30, generator=g, dtype=torch.float64), truth)
    assert abs(noise.value) < 0.5
    anti = gs.influence.lds(c, truth)
    assert anti.value == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="training examples"):
        gs.influence.lds(-c[:, :10], truth)


def test_lds_of_influence_on_logistic_regression():
    x, y = blobs(40, 3, 2, seed=3, spread=1.0)
    xq, yq = blobs(6, 3, 2, seed=4, spread=1.0)
    wd = 0.1

    def train_fn(indices, seed):
        torch.manual_seed(seed)
        m = nn.Linear(3, 2).double()
        w = torch.zeros(40, dtype=torch.float64)
        w[indices] = 1.0  # the objective of the full model with the excluded examples weighted 0
        return fit_lbfgs(m, x, y, wd, weights=w, iters=100)

    model = fit_lbfgs(nn.Linear(3, 2).double(), x, y, wd).eval()
    truth = gs.influence.retrain(train_fn, 40, (xq, yq), CE, subsets=40)
    inf = gs.influence.scores(model, CE, (x, y), (xq, yq), method="influence", curvature="hessian", damping=wd)
    res = gs.influence.lds(inf, truth)
    assert res.value > 0.8, res.value
    assert 0 < res.stderr < 0.2
    rnd = gs.influence.lds(torch.randn(6, 40, dtype=torch.float64), truth)
    assert res.value > rnd.value + 0.5
