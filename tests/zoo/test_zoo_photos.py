"""The photos dataset (crops of scikit-learn's sample photos) and its two bundled networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_sample_images

import gradsense.zoo as zoo
from gradsense.zoo.train import train


def _half(img: np.ndarray) -> np.ndarray:
    """The documented 2x2 average, written as a loop over output pixels' four inputs (independent of reshape)."""
    a = img[:426, :640].astype(np.float64) / 255.0
    out = (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) / 4
    return out[:212]


def test_shapes_range_classes_and_sizes():
    tr, te = zoo.dataset("photos", "train"), zoo.dataset("photos", "test")
    assert tr.inputs.shape == (864, 3, 32, 32) and te.inputs.shape == (288, 3, 32, 32)
    assert tr.inputs.dtype == torch.float32 and tr.labels.dtype == torch.int64
    assert 0.0 <= float(tr.inputs.min()) and float(tr.inputs.max()) <= 1.0
    assert tr.labels.bincount().tolist() == [108] * 8 and te.labels.bincount().tolist() == [36] * 8
    assert tr.classes[0] == "china/top-left" and tr.classes[7] == "flower/bottom-right"


def test_first_crops_are_the_documented_pixels():
    imgs = load_sample_images().images
    tr, te = zoo.dataset("photos", "train"), zoo.dataset("photos", "test")
    china = _half(imgs[0])
    # train: quadrant 0, tile (0, 0), first crop; test: quadrant 0, tile (0, 1) (columns 40..), first crop
    np.testing.assert_allclose(tr.inputs[0].numpy(), china[:32, :32].transpose(2, 0, 1), atol=1e-6)
    np.testing.assert_allclose(te.inputs[0].numpy(), china[:32, 40:72].transpose(2, 0, 1), atol=1e-6)
    assert int(tr.labels[0]) == 0 and int(te.labels[0]) == 0


def test_no_test_crop_shares_pixels_with_a_train_crop():
    """Every textured crop is found at exactly one place in its photo; train and test footprints are disjoint.
    (Flat crops of sky fit several places and are skipped.)"""
    imgs = load_sample_images().images
    halves = [_half(im) for im in imgs]
    foot: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        data = zoo.dataset("photos", split)
        masks = [np.zeros(h.shape[:2], dtype=bool) for h in halves]
        for x, y in zip(data.inputs[::5], data.labels[::5]):  # every 5th crop: enough to cover each tile
            if float(x.std()) < 0.05:
                continue
            p = int(y) // 4
            target = x.numpy().transpose(1, 2, 0)
            h = halves[p]
            rows, cols = np.nonzero(np.abs(h[: h.shape[0] - 31, : h.shape[1] - 31, 0] - target[0, 0, 0]) < 1e-6)
            hits = [(r, c) for r, c in zip(rows, cols) if np.allclose(h[r:r + 32, c:c + 32], target, atol=1e-6)]
            assert len(hits) == 1
            r, c = hits[0]
            masks[p][r:r + 32, c:c + 32] = True
        foot[split] = np.stack([m for m in masks])
    assert not (foot["train"] & foot["test"]).any()


def test_photo_models_train_deterministically():
    a, acc_a = train("photos-lenet", seed=0, epochs=1)
    b, acc_b = train("photos-lenet", seed=0, epochs=1)
    assert acc_a == acc_b
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


@pytest.mark.slow
@pytest.mark.parametrize("name", ["photos-lenet", "photos-cnn"])
def test_full_recipe_reproduces_the_shipped_accuracy(name):
    _, acc = train(name, seed=0)
    assert abs(acc - zoo.info(name)["test_accuracy"]) <= 2 / 288
