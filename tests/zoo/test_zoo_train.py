"""Training: deterministic given a seed, leaves global torch state alone, writes loadable files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from gradsense.zoo.registry import MODELS
from gradsense.zoo.train import random_shift, save_weights, train


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    ("name", "epochs"), [("breast-cancer-mlp", 3), ("digits-cnn", 1), ("digits-vit", 1), ("block-digits-cnn", 1)]
)
def test_training_is_deterministic_given_the_seed(name, epochs):
    m1, acc1 = train(name, seed=0, epochs=epochs)
    torch.randn(10)  # perturb the global RNG between runs: it must not matter
    m2, acc2 = train(name, seed=0, epochs=epochs)
    _assert_same_state(m1, m2)
    assert acc1 == acc2
    assert not m1.training


def test_different_seeds_give_different_weights():
    m0, _ = train("breast-cancer-mlp", seed=0, epochs=2)
    m1, _ = train("breast-cancer-mlp", seed=1, epochs=2)
    assert not torch.equal(m0.net[0].weight, m1.net[0].weight)


def test_short_training_learns_something():
    _, acc = train("breast-cancer-mlp", seed=0, epochs=5)
    assert acc > 0.9


def test_training_restores_global_torch_state():
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    train("breast-cancer-mlp", seed=0, epochs=1, num_threads=1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == det


def test_training_restores_state_when_it_fails(monkeypatch):
    import gradsense.zoo.train as train_mod

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(train_mod, "_fit", boom)
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"):
        train_mod.train("breast-cancer-mlp", seed=0, epochs=1)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == det
    assert torch.equal(torch.get_rng_state(), rng)


def test_train_rejects_bad_arguments():
    with pytest.raises(ValueError, match="trainable"):
        train("minilm")
    with pytest.raises(ValueError, match="epochs"):
        train("digits-cnn", epochs=0)


def test_random_shift_is_a_zero_filled_translation():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5) + 1
    assert torch.equal(random_shift(x, 0, gen), x)
    out = random_shift(x, 1, gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):
        candidates = [padded[i, :, dy : dy + 5, dx : dx + 5] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], c) for c in candidates)


def test_save_weights_round_trip(tmp_path):
    model, acc = train("breast-cancer-mlp", seed=0, epochs=1)
    weights, meta_path = save_weights(
        model, "zoo:breast-cancer-mlp", test_accuracy=acc, seed=0, epochs=1, directory=tmp_path
    )
    assert weights == tmp_path / "breast-cancer-mlp.safetensors"
    meta = json.loads(meta_path.read_text())
    assert meta["test_accuracy"] == acc
    assert meta["epochs"] == 1
    assert meta["seed"] == 0
    assert meta["torch_version"] == torch.__version__
    rebuilt = MODELS["breast-cancer-mlp"].cls(**meta["arch"])
    rebuilt.load_state_dict(load_file(str(weights)), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)


@pytest.mark.parametrize(
    ("name", "threshold"),
    [
        ("breast-cancer-mlp", 0.95),
        pytest.param("digits-cnn", 0.97, marks=pytest.mark.slow),
        pytest.param("digits-vit", 0.90, marks=pytest.mark.slow),
        pytest.param("block-digits-cnn", 0.97, marks=pytest.mark.slow),
    ],
)
def test_full_recipe_reaches_threshold(name, threshold):
    _, acc = train(name, seed=0)
    assert acc >= threshold
