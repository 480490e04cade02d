"""Bundled datasets: fixed disjoint splits, shapes and dtypes, indexing, standardisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader

import gradsense.zoo as zoo


def _split_indices(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The documented recipe, applied to example indices (an independent re-derivation)."""
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.3, random_state=0, stratify=y)
    return tr, te


def test_dataset_names():
    assert zoo.datasets() == ["block-digits", "breast-cancer", "digits", "photos"]


@pytest.mark.parametrize("split", ["train", "test"])
def test_digits_shapes_dtypes_and_range(split):
    data = zoo.dataset("digits", split)
    n = {"train": 1257, "test": 540}[split]
    assert data.inputs.shape == (n, 1, 8, 8)
    assert data.inputs.dtype == torch.float32
    assert data.labels.shape == (n,)
    assert data.labels.dtype == torch.int64
    assert len(data) == n
    assert float(data.inputs.min()) == 0.0
    assert float(data.inputs.max()) == 1.0
    assert data.classes == [str(i) for i in range(10)]
    assert data.feature_names is None
    assert data.name == "digits"
    assert data.split == split
    assert set(data.labels.tolist()) == set(range(10))


def test_digits_split_is_the_documented_fixed_disjoint_split():
    bunch = load_digits()
    tr, te = _split_indices(bunch.target)
    assert set(tr).isdisjoint(te)
    assert len(tr) + len(te) == len(bunch.target)
    expected = {"train": tr, "test": te}
    for split, idx in expected.items():
        data = zoo.dataset("digits", split)
        want = torch.from_numpy(bunch.images[idx] / 16.0).to(torch.float32).unsqueeze(1)
        torch.testing.assert_close(data.inputs, want, rtol=0, atol=0)
        assert torch.equal(data.labels, torch.from_numpy(bunch.target[idx]).to(torch.int64))


def test_split_is_the_same_on_every_call():
    a, b = zoo.dataset("digits", "test"), zoo.dataset("zoo:digits", "test")
    assert torch.equal(a.inputs, b.inputs)
    assert torch.equal(a.labels, b.labels)


def test_datasets_are_fresh_copies():
    a = zoo.dataset("digits", "test")
    a.inputs.zero_()
    a.labels.zero_()
    b = zoo.dataset("digits", "test")
    assert float(b.inputs.sum()) > 0
    assert int(b.labels.sum()) > 0


def test_breast_cancer_split_and_standardisation_use_train_statistics():
    bunch = load_breast_cancer()
    tr, te = _split_indices(bunch.target)
    assert set(tr).isdisjoint(te)
    train, test = zoo.dataset("breast-cancer", "train"), zoo.dataset("breast-cancer", "test")
    assert train.inputs.shape == (len(tr), 30)
    assert test.inputs.shape == (len(te), 30)
    assert train.inputs.dtype == test.inputs.dtype == torch.float32
    assert train.labels.dtype == torch.int64
    assert train.classes == test.classes == ["malignant", "benign"]
    assert train.feature_names == [str(f) for f in bunch.feature_names]
    assert len(train.feature_names) == 30

    # train split is standardised: mean 0, (population) std 1 per feature
    torch.testing.assert_close(
        train.inputs.double().mean(0), torch.zeros(30, dtype=torch.float64), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        train.inputs.double().std(0, unbiased=False), torch.ones(30, dtype=torch.float64), atol=1e-5, rtol=0
    )
    # the stored statistics are the train split's, on both splits, and they reproduce the raw data
    raw_tr, raw_te = bunch.data[tr], bunch.data[te]
    for data in (train, test):
        torch.testing.assert_close(data.mean.double(), torch.from_numpy(raw_tr.mean(0)), rtol=1e-6, atol=0)
        torch.testing.assert_close(data.std.double(), torch.from_numpy(raw_tr.std(0)), rtol=1e-6, atol=0)
    want_te = (raw_te - raw_tr.mean(0)) / raw_tr.std(0)
    torch.testing.assert_close(test.inputs.double(), torch.from_numpy(want_te), rtol=0, atol=1e-5)
    assert torch.equal(test.labels, torch.from_numpy(bunch.target[te]).to(torch.int64))
    # test statistics are not used: the test split is not exactly standardised
    assert float(test.inputs.double().mean(0).abs().max()) > 1e-3


def test_digits_has_no_standardisation_statistics():
    data = zoo.dataset("digits", "train")
    assert data.mean is None
    assert data.std is None


def test_indexing_int_slice_list_tensor():
    data = zoo.dataset("digits", "test")
    x, y = data[:16]
    assert x.shape == (16, 1, 8, 8)
    assert y.shape == (16,)
    assert torch.equal(x, data.inputs[:16])

    x0, y0 = data[3]
    assert x0.shape == (1, 8, 8)
    assert y0.shape == ()
    assert torch.equal(x0, data.inputs[3])
    assert int(y0) == int(data.labels[3])

    xn, yn = data[np.int64(-1)]
    assert torch.equal(xn, data.inputs[-1])
    assert torch.equal(yn, data.labels[-1])

    xl, yl = data[[5, 1, 7]]
    assert torch.equal(xl, data.inputs[[5, 1, 7]])
    assert torch.equal(yl, data.labels[[5, 1, 7]])

    idx = torch.tensor([0, 9])
    xt, yt = data[idx]
    assert torch.equal(xt, data.inputs[idx])
    assert torch.equal(yt, data.labels[idx])

    mask = data.labels == 3
    xm, ym = data[mask]
    assert bool((ym == 3).all())
    assert xm.shape[0] == int(mask.sum())

    with pytest.raises(TypeError, match="indices"):
        data["a"]


def test_dataloader_batches():
    data = zoo.dataset("breast-cancer", "test")
    xb, yb = next(iter(DataLoader(data, batch_size=8, shuffle=False)))
    assert torch.equal(xb, data.inputs[:8])
    assert torch.equal(yb, data.labels[:8])


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match=r"breast-cancer.*digits"):
        zoo.dataset("mnist")


def test_unknown_split_names_choices():
    with pytest.raises(ValueError, match=r"'train', 'test'.*'val'"):
        zoo.dataset("digits", split="val")


def test_repr():
    assert "digits" in repr(zoo.dataset("digits"))


# ------------------------------------------------------------------------------------------- block-digits
@pytest.mark.parametrize("split", ["train", "test"])
def test_block_digits_puts_the_digit_in_the_masked_block_and_the_pattern_in_the_other(split):
    digits, block = zoo.dataset("digits", split), zoo.dataset("block-digits", split)
    n = len(digits)
    assert block.inputs.shape == (n, 1, 8, 16) and block.masks.shape == (n, 1, 8, 16)
    assert torch.equal(block.labels, digits.labels)
    pattern = torch.zeros(8, 8)
    pattern[1:7, 1:7] = 1.0
    pattern[2:6, 2:6] = 0.0  # a square ring, written out independently of the library
    for i in range(n):
        side = int(block.sides[i])
        digit_cols = slice(8 * side, 8 * side + 8)
        other_cols = slice(8 - 8 * side, 16 - 8 * side)
        assert torch.equal(block.inputs[i, 0, :, digit_cols], digits.inputs[i, 0])
        assert torch.equal(block.inputs[i, 0, :, other_cols], pattern)
        assert bool((block.masks[i, 0, :, digit_cols] == 1).all())
        assert bool((block.masks[i, 0, :, other_cols] == 0).all())


def test_block_digits_sides_are_random_balanced_and_fixed():
    a, b = zoo.dataset("block-digits", "test"), zoo.dataset("zoo:block-digits", "test")
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.sides, b.sides)
    frac = a.sides.double().mean().item()
    assert 0.4 < frac < 0.6  # a fair coin over 540 examples: 4.6 standard deviations either side
    # the side carries no label information: each class appears on both sides
    for c in range(10):
        assert set(a.sides[a.labels == c].tolist()) == {0, 1}
    train = zoo.dataset("block-digits", "train")
    assert not torch.equal(train.sides[: len(a)], a.sides)  # the splits draw their sides independently


def test_other_datasets_have_no_mask():
    assert zoo.dataset("digits").masks is None
    assert zoo.dataset("breast-cancer").sides is None
