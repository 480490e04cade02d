"""Masks: exact sparsity, global vs per-layer scope, the per-layer floor, exact N:M patterns, structurally valid
channel and head masks (the pruned copy computes what removing the unit computes), compact copies, ECoFLaP
layer allocation."""

from __future__ import annotations

import pytest
import torch
from importance_cases import CE, conv_chain, tiny_vit

from gradsense.importance import apply, importance
from gradsense.importance.masks import exact_counts, nm_masks, unstructured_masks
from helpers import assert_model_unchanged


def _removed(masks) -> int:
    return sum(int((~m).sum()) for m in masks.values())


def test_exact_sparsity_global_and_per_layer():
    case = conv_chain()
    res = importance(case.model, CE, (case.x, case.y), method="magnitude")
    sizes = {k: v.numel() for k, v in res.scores.items()}  # 36, 216, 162: 414 weights
    for s in (0.0, 0.1, 0.5, 0.9):
        glob = res.prune(s)
        assert _removed(glob) == round(s * 414) == int(s * 414 + 0.5)
        lay = res.prune(s, scope="layer")
        for k, m in lay.items():
            assert int((~m).sum()) == int(s * sizes[k] + 0.5), (s, k)
    # the removed weights are exactly the lowest-scored ones
    glob = res.prune(0.5)
    flat = torch.cat([res.scores[k].reshape(-1) for k in sizes])
    kept = torch.cat([glob[k].reshape(-1) for k in sizes])
    assert float(flat[~kept].max()) <= float(flat[kept].min())


def test_global_and_layer_scope_differ_as_specified():
    scores = {"big": torch.arange(1.0, 11.0) * 100, "small": torch.arange(1.0, 11.0)}
    glob = unstructured_masks(scores, 0.5, "global")
    assert int((~glob["small"]).sum()) == 10 and int((~glob["big"]).sum()) == 0  # one ranking: small goes first
    lay = unstructured_masks(scores, 0.5, "layer")
    assert int((~lay["small"]).sum()) == 5 and int((~lay["big"]).sum()) == 5  # each tensor on its own
    assert torch.equal(lay["big"], torch.arange(10) >= 5)
    floor = unstructured_masks(scores, 0.5, "global", floor=3)  # every tensor keeps >= 3: small keeps its top 3
    assert int(floor["small"].sum()) == 3 and _removed(floor) == 10
    assert torch.equal(floor["small"], torch.arange(10) >= 7)
    frac = unstructured_masks(scores, 0.5, "global", floor=0.4)
    assert int(frac["small"].sum()) == 4
    with pytest.raises(ValueError, match="floor"):
        unstructured_masks(scores, 0.9, "global", floor=5)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 3)])
def test_nm_pattern_is_exact(n, m):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 24, generator=g)
    conv = torch.randn(4, 2, 3, 4, generator=g)  # input dim 2*3*4 = 24
    masks = nm_masks({"lin": w.abs(), "conv": conv.abs(), "bias": torch.ones(6)}, n, m)
    assert masks["bias"].all()
    for k, s in (("lin", w.abs()), ("conv", conv.abs())):
        groups = masks[k].reshape(s.shape[0], -1, m)
        assert bool((groups.sum(-1) == n).all())
        sg = s.reshape(s.shape[0], -1, m)
        kept_min = torch.where(groups, sg, torch.inf).amin(-1)
        dropped_max = torch.where(~groups, sg, -torch.inf).amax(-1)
        assert bool((kept_min >= dropped_max).all())  # the N largest of each group


def test_nm_from_a_result_and_its_errors():
    case = conv_chain()
    res = importance(case.model, CE, (case.x, case.y), method="taylor", params=["3.weight"])
    masks = res.prune(structure="2:4")
    assert masks.meta["achieved"] == 0.5 and res.prune(0.5, structure="2:4").meta["achieved"] == 0.5
    with pytest.raises(ValueError, match=r"'3.weight'.*|M=8 does not divide"):
        res.prune(structure="4:8")  # 3.weight has input dimension 4*3*3 = 36
    with pytest.raises(ValueError, match="contradicts"):
        res.prune(0.3, structure="2:4")
    with pytest.raises(ValueError, match="0 < N < M"):
        res.prune(structure="4:2")


def test_channel_masks_remove_channels_and_the_compact_copy_is_smaller_and_equal():
    case = conv_chain()
    m = case.model
    res = importance(m, CE, (case.x, case.y), method="taylor", granularity="channel")
    assert set(res.scores) == {"0", "3"}  # the last Linear (class logits) is not a channel candidate
    with assert_model_unchanged(m):
        masks = res.prune(0.5, structure="channel")
        pruned = apply(m, masks)
        small = apply(m, masks, compact=True)
    assert masks.meta["achieved"] == 0.5 and masks.meta["candidates"] == 10
    kept0 = masks.meta["units_kept"]["0"]
    removed = [c for c in range(4) if not bool(masks["0.weight"][c].any())]
    assert len(removed) == 4 - kept0 and all(not bool(masks["1.weight"][c]) for c in removed)  # BatchNorm too

    # oracle: zero the removed channels' outputs after the BatchNorm with a hook on the original model
    def hook(_mod, _inp, out):
        out = out.clone()
        out[:, removed] = 0
        return out

    h = m[1].register_forward_hook(hook)
    removed3 = [c for c in range(6) if not bool(masks["3.weight"][c].any())]
    h3 = m[3].register_forward_hook(lambda _m, _i, out: out.index_fill(1, torch.tensor(removed3, dtype=torch.long), 0.0)
                                    if removed3 else out)
    try:
        with torch.no_grad():
            expected = m(case.x)
    finally:
        h.remove()
        h3.remove()
    with torch.no_grad():
        torch.testing.assert_close(pruned(case.x), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(small(case.x), expected, rtol=1e-12, atol=1e-12)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in m.parameters())
    assert small[0].out_channels == kept0 and small[3].in_channels == kept0
    assert small[6].in_features == (6 - len(removed3)) * 9


def test_head_masks_equal_removing_the_head_by_a_hook():
    case = tiny_vit()
    m = case.model
    res = importance(m, CE, (case.x, case.y), method="taylor", granularity="head")
    masks = res.prune(0.5, structure="head")
    kept_rows = masks["blocks.0.attn.qkv.weight"].any(1).reshape(3, 2, 4)
    gone = [h for h in range(2) if not bool(kept_rows[:, h].any())]
    assert len(gone) == 1
    # oracle: zero that head's attention probabilities, so its output (attn @ v) is zero
    hk = m.blocks[0].attn.attn_map.register_forward_hook(
        lambda _m, _i, a: a.index_fill(1, torch.tensor(gone, dtype=torch.long), 0.0))
    try:
        with torch.no_grad():
            expected = m(case.x)
    finally:
        hk.remove()
    with torch.no_grad():
        torch.testing.assert_close(apply(m, masks)(case.x), expected, rtol=1e-12, atol=1e-12)


def test_structure_must_match_the_granularity_and_layers_keep_a_unit():
    case = conv_chain()
    weights = importance(case.model, CE, (case.x, case.y), method="magnitude")
    with pytest.raises(ValueError, match="channel-level scores"):
        weights.prune(0.5, structure="channel")
    chans = importance(case.model, CE, (case.x, case.y), method="magnitude", granularity="channel")
    with pytest.raises(ValueError, match="weight-level scores"):
        chans.prune(0.5)
    glob = chans.prune(0.9, structure="channel")  # 9 of 10 requested, but each layer keeps one: 8 go
    assert all(v >= 1 for v in glob.meta["units_kept"].values())
    with pytest.raises(ValueError, match="remove all"):
        chans.prune(0.9, structure="channel", scope="layer")


def test_ecoflap_layer_sparsities_are_exact_and_bounded(mlp_case):
    res = importance(mlp_case.model, CE, (mlp_case.x, mlp_case.y), method="ecoflap", probes=16, lam=0.1)
    masks = res.prune(0.5, scope="layer")
    total = sum(v.numel() for v in res.scores.values())
    assert _removed(masks) == round(0.5 * total)
    for k, s in masks.meta["per_tensor"].items():
        assert 0.4 - 1e-9 <= s <= 0.6 + 1e-9, (k, s)
    counts = exact_counts({"a": 10, "b": 30}, {"a": 0.9, "b": 0.1}, 20, {"a": 0.3, "b": 0.3}, {"a": 0.7, "b": 0.7})
    assert sum(counts.values()) == 20 and counts["a"] <= 7 and counts["b"] >= 9
