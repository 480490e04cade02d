"""Seeded projections: Johnson-Lindenstrauss bounds, reproducibility without storage, blockwise == dense."""

from __future__ import annotations

import math

import pytest
import torch
from influence_cases import CE, loop_grads, mlp_problem

import gradsense as gs
from gradsense.core.projection import (
    KroneckerProjection,
    RandomProjection,
    jl_failure_probability,
    split_dim,
    tile_columns,
)


def test_same_seed_same_projection_whatever_the_cache_and_other_blocks():
    sizes = {"a": 700, "w": 2500}
    p1 = RandomProjection(sizes, 2048, seed=7)
    p2 = RandomProjection(sizes, 2048, seed=7, cache="1GB")
    d1 = p1.dense()
    torch.testing.assert_close(d1, p2.dense(), rtol=0, atol=0)
    torch.testing.assert_close(d1, p2.dense(), rtol=0, atol=0)  # from the cache now
    tiles = 1 + math.ceil(2500 / tile_columns(2048))
    assert p1._cache == {} and p1.tiles_generated == tiles  # nothing kept without a cache budget
    assert p2.tiles_generated == tiles  # the second call came from the cache
    only_w = RandomProjection({"w": 2500}, 2048, seed=7).dense()
    torch.testing.assert_close(only_w, d1[:, 700:], rtol=0, atol=0)  # a block's columns depend on its name only
    assert not torch.equal(RandomProjection(sizes, 2048, seed=8).dense(), d1)
    assert set(torch.unique(p1.tile("w", 0)).tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_blockwise_equals_dense(distribution):
    sizes = {"conv": 3000, "bias": 5, "fc": 1100}
    proj = RandomProjection(sizes, 4096, seed=1, distribution=distribution)
    assert tile_columns(4096) == 1024  # several tiles per block
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, sum(sizes.values()), generator=g, dtype=torch.float64)
    dense = proj.dense().double()
    torch.testing.assert_close(proj.project_flat(rows), rows @ dense.T, rtol=1e-10, atol=1e-10)
    blocks = {"conv": rows[:, :3000].reshape(6, 30, 100), "bias": rows[:, 3000:3005], "fc": rows[:, 3005:]}
    torch.testing.assert_close(proj.project(blocks), rows @ dense.T, rtol=1e-10, atol=1e-10)


def test_johnson_lindenstrauss_bounds():
    k, d, n = 1024, 5000, 30
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, d, dtype=torch.float64)
    px = RandomProjection({"x": d}, k, seed=11).project_flat(x)
    eps = 0.2
    ratio = px.norm(dim=1) ** 2 / x.norm(dim=1) ** 2
    assert jl_failure_probability(k, eps) < 1e-3
    assert float((ratio - 1).abs().max()) < eps
    # inner products: the error of each pair within 5 standard deviations of the Rademacher variance formula
    ip, pip = x @ x.T, px @ px.T
    sq = (x * x) @ (x * x).T
    var = (torch.outer(x.norm(dim=1) ** 2, x.norm(dim=1) ** 2) + ip**2 - 2 * sq) / k
    z = (pip - ip) / var.sqrt()
    off = ~torch.eye(n, dtype=torch.bool)
    assert float(z[off].abs().max()) < 5


def test_projection_is_unbiased_over_seeds():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 40, generator=g, dtype=torch.float64)
    vals = []
    for s in range(400):
        p = RandomProjection({"v": 40}, 8, seed=s).dense().double()
        vals.append(float((p @ a) @ (p @ b)))
    v = torch.tensor(vals)
    assert abs(float(v.mean()) - float(a @ b)) < 4 * float(v.std()) / math.sqrt(len(vals))


def test_kronecker_projection_equals_kron_of_factors_and_is_unbiased():
    shapes = {"l1": (5, 7), "l2": (3, 4)}
    dims = {"l1": (2, 3), "l2": (3, 2)}
    proj = KroneckerProjection(shapes, dims, seed=4)
    g = torch.Generator().manual_seed(1)
    gm = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(proj.project_matrix("l1", gm), gm.reshape(3, -1) @ proj.dense("l1").double().T,
                               rtol=1e-12, atol=1e-12)
    delta, act = torch.randn(3, 6, 5, generator=g, dtype=torch.float64), torch.randn(3, 6, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(proj.project_outer("l1", delta, act),
                               proj.project_matrix("l1", torch.einsum("nto,nti->noi", delta, act)), rtol=1e-12, atol=1e-12)
    a, b = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    vals = [float((KroneckerProjection({"l": (3, 4)}, {"l": (2, 2)}, seed=s).project_matrix("l", a[None])
                   * KroneckerProjection({"l": (3, 4)}, {"l": (2, 2)}, seed=s).project_matrix("l", b[None])).sum())
            for s in range(400)]
    v = torch.tensor(vals)
    assert abs(float(v.mean()) - float((a * b).sum())) < 4 * float(v.std()) / math.sqrt(400)


def test_split_dim():
    out = split_dim(100, {"a": (64, 64), "b": (3, 2), "c": (10, 500)})
    assert out["b"] == (3, 2)  # smaller than its share: kept whole
    assert all(1 <= ko <= s[0] and 1 <= ki <= s[1] for (ko, ki), s in zip(out.values(), [(64, 64), (3, 2), (10, 500)]))
    assert sum(a * b for a, b in out.values()) <= 100
    with pytest.raises(ValueError, match="at least 3"):
        split_dim(2, {"a": (4, 4), "b": (4, 4), "c": (4, 4)})


def test_memory_budget_sets_the_chunks():
    model, train, _ = mlp_problem()
    small = gs.influence.features(model, CE, train, proj_dim=32, max_memory=40_000)
    large = gs.influence.features(model, CE, train, proj_dim=32, max_memory="1GB")
    assert small.meta["settings"]["chunk_size"] < large.meta["settings"]["chunk_size"]
    torch.testing.assert_close(small.features(), large.features(), rtol=1e-12, atol=1e-14)
    exact = loop_grads(model, CE, *train)
    sizes = {k: p.numel() for k, p in model.named_parameters()}
    torch.testing.assert_close(large.features(), exact @ RandomProjection(sizes, 32).dense().double().T,
                               rtol=1e-10, atol=1e-12)


def test_kronecker_features_equal_projected_loop_gradients():
    """LoGra features from layer inputs/output gradients == P_out G P_in^T of per-example loop gradients,
    for Linear, Conv2d and Embedding layers; the model is untouched and no hook survives (also on error)."""
    from test_kfac import ConvNet, EmbedNet

    from gradsense.core.layergrads import find_layers
    from gradsense.influence import FeatureMap
    from helpers import assert_model_unchanged

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cases = [(ConvNet().double().eval(), torch.randn(6, 2, 5, 5, generator=g, dtype=torch.float64)),
             (EmbedNet().double().eval(), torch.randint(0, 7, (6, 4), generator=g))]
    for model, x in cases:
        y = torch.randint(0, 2, (6,), generator=g)
        with assert_model_unchanged(model):
            f = gs.influence.features(model, CE, (x, y), proj_dim=12, projection="kronecker", seed=2)
        layers = find_layers(model)
        fmap = FeatureMap(model, None, 12, "kronecker", 2)
        expected = []
        for name, layer in layers.items():
            grads = loop_grads(model, CE, x, y, names=layer.params)
            parts, pos = {}, 0
            for p in layer.params:
                size = dict(model.named_parameters())[p].numel()
                parts[p] = grads[:, pos:pos + size].reshape(6, *dict(model.named_parameters())[p].shape)
                pos += size
            mats = layer.from_params(parts)
            expected.append(mats.reshape(6, -1) @ fmap.proj.dense(name).T)
        torch.testing.assert_close(f.features(), torch.cat(expected, 1), rtol=1e-9, atol=1e-12)

    def bad_loss(out, labels):
        return out.sum(1)  # not a scalar

    model = cases[0][0]
    with assert_model_unchanged(model), pytest.raises(ValueError, match="scalar"):
        gs.influence.features(model, bad_loss, (cases[0][1], y), proj_dim=12, projection="kronecker")


class PositionNet(torch.nn.Module):
    """Token + position embeddings (positions indexed by a (1, T) tensor, broadcast over the batch) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(9, 3)
        self.pos = torch.nn.Embedding(4, 3)
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, t):
        h = self.tok(t) + self.pos(torch.arange(t.shape[1])[None])
        return self.fc(torch.tanh(h).mean(1))


def test_layers_shared_by_the_batch_are_left_out_or_refused():
    torch.manual_seed(0)
    model = PositionNet().double().eval()
    t = torch.randint(0, 9, (5, 4))
    y = torch.randint(0, 2, (5,))
    f = gs.influence.features(model, CE, (t, y), proj_dim=8, projection="kronecker")
    assert f.meta["excluded_layers"] == ["pos"] and "pos.weight" not in f.meta["params"]
    factors = gs.influence.fit_factors(model, CE, (t, y))
    assert "pos" not in factors.layers and factors.meta["excluded_layers"] == ["pos"]
    with pytest.raises(ValueError, match="shared by all examples"):
        gs.influence.features(model, CE, (t, y), proj_dim=8, projection="kronecker", params=["pos", "fc"])
