"""Causal-LM continuation target: the explicit log-softmax loop, the per-token breakdown, the inputs_embeds
path of a truncated sequence, and captum's LLMGradientAttribution."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import gradsense as gs  # noqa: E402
from gradsense.core.targets import Batch, Continuation  # noqa: E402

VOCAB, PROMPT, CONT = 40, 6, 3


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (2, PROMPT + CONT), generator=g)


def _loop_log_prob(model, ids, cont_len):
    """sum_j log p(c_j | prefix) with one forward per continuation token on the truncated prefix."""
    totals = []
    for row in ids:
        total = 0.0
        for j in range(cont_len):
            pos = row.shape[0] - cont_len + j
            with torch.no_grad():
                logits = model(input_ids=row[None, :pos]).logits[0, -1]
            total += float(torch.log_softmax(logits, dim=0)[row[pos]])
        totals.append(total)
    return torch.tensor(totals, dtype=torch.float64)


def test_target_equals_explicit_log_softmax_loop(gpt2, ids):
    expected = _loop_log_prob(gpt2, ids, CONT)
    t = Continuation(ids[:, -CONT:])
    with torch.no_grad():
        out = gpt2(input_ids=ids)
    got = t(out, Batch(ids, torch.arange(2)))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # one continuation for all examples (1-D ids), and the single-token form
    t1 = Continuation(ids[0, -CONT:])
    torch.testing.assert_close(t1(out, Batch(ids, torch.arange(2)))[0], expected[0], rtol=1e-10, atol=1e-10)
    per = sum(Continuation(ids[:, -CONT:], token=j)(out, Batch(ids, torch.arange(2))) for j in range(CONT))
    torch.testing.assert_close(per, expected, rtol=1e-10, atol=1e-10)
    r = gs.attribute_tokens(gpt2, ids, target=t, method="input_x_gradient")
    torch.testing.assert_close(r.tensors["target_scores"], expected, rtol=1e-10, atol=1e-10)


def _embeds_grad_x_input(model, row, cont_len, j):
    """Gradient x input of log p(c_j | prefix) at every token of the truncated prefix (inputs_embeds path)."""
    pos = row.shape[0] - cont_len + j
    emb = model.get_input_embeddings()(row[None, :pos]).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb).logits[0, -1]
    (g,) = torch.autograd.grad(torch.log_softmax(logits, dim=0)[row[pos]], emb)
    return (emb * g).sum(-1)[0].detach()


def test_per_token_breakdown_matches_truncated_inputs_embeds(gpt2, ids):
    r = gs.attribute_tokens(gpt2, ids, target=Continuation(ids[:, -CONT:], per_token=True), method="input_x_gradient")
    ts = r.token_scores
    assert ts.shape == (2, CONT, PROMPT + CONT)
    for i in range(2):
        for j in range(CONT):
            pos = PROMPT + j
            expected = _embeds_grad_x_input(gpt2, ids[i], CONT, j)
            torch.testing.assert_close(ts[i, j, :pos], expected, rtol=1e-9, atol=1e-12)
            # causality: nothing at or after the predicted token
            assert float(ts[i, j, pos:].abs().max()) == 0.0


@pytest.mark.parametrize("method", ["input_x_gradient", "integrated_gradients"])
def test_breakdown_sums_to_total(gpt2, ids, method):
    total = gs.attribute_tokens(gpt2, ids, target=Continuation(ids[:, -CONT:]), method=method, baseline="zeros",
                                steps=16)
    split = gs.attribute_tokens(gpt2, ids, target=Continuation(ids[:, -CONT:], per_token=True), method=method,
                                baseline="zeros", steps=16)
    assert total.token_scores is None
    torch.testing.assert_close(split.token_scores.sum(1), total.scores, rtol=1e-9, atol=1e-12)
    if method == "integrated_gradients":  # completeness of the continuation's log-probability
        assert float(total.delta.abs().max()) < 1e-3 * float(total.tensors["target_scores"].abs().max())


def test_ig_chunked_equals_unchunked(gpt2, ids):
    t = Continuation(ids[:, -CONT:])
    a = gs.attribute_tokens(gpt2, ids, target=t, method="integrated_gradients", baseline="zeros", steps=8, chunk_size=3)
    b = gs.attribute_tokens(gpt2, ids, target=t, method="integrated_gradients", baseline="zeros", steps=8,
                            chunk_size=64)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-12, atol=1e-14)


class _IdTokenizer:
    """Text is token ids separated by spaces; enough of a tokenizer for captum's TextTokenInput."""

    pad_token_id = 0
    all_special_ids = ()

    def encode(self, text, return_tensors=None, add_special_tokens=True):
        ids = [int(t) for t in text.split()]
        return torch.tensor([ids]) if return_tensors == "pt" else ids

    def decode(self, ids):
        return " ".join(str(int(i)) for i in torch.as_tensor(ids).reshape(-1))

    def convert_ids_to_tokens(self, ids):
        return [str(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens):
        return [int(t) for t in tokens]

    def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True, **_):
        ids, offsets, pos = [], [], 0
        for t in text.split():
            start = text.index(t, pos)
            ids.append(int(t))
            offsets.append((start, start + len(t)))
            pos = start + len(t)
        return {"input_ids": ids, "offset_mapping": offsets}


@pytest.mark.parametrize("method", ["input_x_gradient", "integrated_gradients"])
def test_matches_captum_llm_gradient_attribution(gpt2, ids, method):
    captum = pytest.importorskip("captum.attr")
    row = ids[0]
    tok = _IdTokenizer()
    emb = gpt2.get_input_embeddings()
    if method == "input_x_gradient":
        inner = captum.LayerGradientXActivation(gpt2, emb)
        kwargs = {}
    else:
        inner = captum.LayerIntegratedGradients(gpt2, emb)
        kwargs = {"n_steps": 16}
    llm = captum.LLMGradientAttribution(inner, tok)
    inp = captum.TextTokenInput(tok.decode(row[:PROMPT]), tok)
    theirs = llm.attribute(inp, target=row[PROMPT:], **kwargs)
    # captum's baseline is token id 0 at every prompt position, the continuation kept: ours with pad id 0
    ours = gs.attribute_tokens(gpt2, row[None], target=Continuation(row[PROMPT:], per_token=True), method=method,
                               baseline="pad", steps=16, tokenizer=tok)
    torch.testing.assert_close(ours.token_scores[0, :, :PROMPT], theirs.token_attr.to(torch.float64), rtol=1e-6,
                               atol=1e-9)
    torch.testing.assert_close(ours.scores[0, :PROMPT], theirs.seq_attr.to(torch.float64), rtol=1e-6, atol=1e-9)


def test_bad_continuation_is_refused_before_work(gpt2, ids):
    with pytest.raises(ValueError, match="continuation has"):
        gs.attribute_tokens(gpt2, ids[:, :2], target=Continuation(ids[:, -CONT:]), method="input_x_gradient")
    with pytest.raises(ValueError, match="out of range"):
        gs.attribute_tokens(gpt2, ids, target=Continuation(torch.tensor([VOCAB + 1])), method="input_x_gradient")
    with pytest.raises(TypeError, match="integers"):
        Continuation(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="token must be"):
        Continuation(torch.tensor([1, 2]), token=2)
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)).eval()
    with pytest.raises(ValueError, match="causal LM"):
        gs.attribute_tokens(bert, ids, target=Continuation(ids[:, -CONT:]), method="input_x_gradient")
