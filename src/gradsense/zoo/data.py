"""Bundled datasets: small scikit-learn datasets with a fixed train/test split, as tensors.

The data ship inside scikit-learn, so nothing is downloaded. The split is always
``train_test_split(test_size=0.3, random_state=0, stratify=y)``, so every run, test and figure
sees the same examples.

``block-digits`` is a ground-truth testbed after Shah, Jain & Netrapalli 2021 ("Do Input Gradients
Highlight Discriminative Features?", their BlockMNIST): each ``1 x 8 x 16`` image holds a digit from
``digits`` in one 8x8 block and a fixed, uninformative pattern (:data:`BLOCK_PATTERN`) in the other,
the side drawn at random (seeded per split). ``masks`` marks the digit block, the only part that
carries the label.

``photos`` holds natural images: 32x32 RGB crops (values in [0, 1]) of the two photos that ship with
scikit-learn (``load_sample_images``), labelled by photo and quadrant (8 classes), with a spatial split
(test crops come from tiles no train crop touches) instead of the random one.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["BLOCK_PATTERN", "SPLITS", "ZooDataset", "block_pattern", "dataset", "datasets"]

SPLITS: tuple[str, ...] = ("train", "test")
TEST_SIZE = 0.3
SPLIT_SEED = 0


class ZooDataset(Dataset):
    """A small in-memory dataset of ``(input, label)`` pairs.

    Attributes:
        inputs: float32 tensor, one row per example (``(N, 1, 8, 8)`` for digits,
            ``(N, 30)`` for breast-cancer).
        labels: int64 tensor of shape ``(N,)``.
        classes: class names, indexed by label.
        feature_names: names of the input features for tabular data, else ``None``.
        name: the dataset name, e.g. ``"digits"``.
        split: ``"train"`` or ``"test"``.
        mean, std: the statistics used to standardise the inputs (train split), or ``None``
            when the inputs are not standardised.
        masks: ground-truth masks shaped like ``inputs`` (1 where the label lives), or ``None``
            for datasets without one (``block-digits`` has them).
        sides: for ``block-digits``, the block (0 left, 1 right) holding the digit; else ``None``.

    Indexing with an int gives one ``(x, y)`` pair; indexing with a slice, a list or a tensor
    gives the batched pair ``(inputs[index], labels[index])``, so ``x, y = data[:16]`` works.
    """

    def __init__(
        self,
        inputs: Tensor,
        labels: Tensor,
        *,
        classes: Sequence[str],
        name: str,
        split: str,
        feature_names: Sequence[str] | None = None,
        mean: Tensor | None = None,
        std: Tensor | None = None,
        masks: Tensor | None = None,
        sides: Tensor | None = None,
    ) -> None:
        if inputs.shape[0] != labels.shape[0]:
            raise ValueError(
                f"inputs and labels must have the same length, got {inputs.shape[0]} and {labels.shape[0]}"
            )
        self.inputs = inputs
        self.labels = labels
        self.classes = list(classes)
        self.feature_names = None if feature_names is None else list(feature_names)
        self.name = name
        self.split = split
        self.mean = mean
        self.std = std
        if masks is not None and masks.shape != inputs.shape:
            raise ValueError(f"masks must be shaped like the inputs {tuple(inputs.shape)}, got {tuple(masks.shape)}")
        self.masks = masks
        self.sides = sides

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: Any) -> tuple[Tensor, Tensor]:
        if isinstance(index, (slice, Tensor, list, tuple, np.ndarray)):
            if isinstance(index, (list, tuple, np.ndarray)):
                index = torch.as_tensor(np.asarray(index))
            return self.inputs[index], self.labels[index]
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(
                f"ZooDataset indices must be int, slice, list or tensor, got {type(index).__name__}"
            ) from None
        return self.inputs[i], self.labels[i]

    def __repr__(self) -> str:
        return (
            f"ZooDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"input_shape={tuple(self.inputs.shape[1:])}, classes={len(self.classes)})"
        )


@functools.cache
def _digits_arrays() -> dict[str, Any]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y)
    return {
        "train": (x_tr, y_tr),
        "test": (x_te, y_te),
        "classes": [str(c) for c in bunch.target_names],
        "feature_names": None,
        "mean": None,
        "std": None,
    }


@functools.cache
def _breast_cancer_arrays() -> dict[str, Any]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    bunch = load_breast_cancer()
    x = bunch.data.astype(np.float64)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y)
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    return {
        "train": (((x_tr - mean) / std).astype(np.float32), y_tr),
        "test": (((x_te - mean) / std).astype(np.float32), y_te),
        "classes": [str(c) for c in bunch.target_names],
        "feature_names": [str(f) for f in bunch.feature_names],
        "mean": mean.astype(np.float32),
        "std": std.astype(np.float32),
    }


BLOCK_SEEDS = {"train": 1, "test": 2}


def block_pattern() -> np.ndarray:
    """The uninformative block of ``block-digits``: an 8x8 square ring (value 1 on the border of the
    central 6x6 square, 0 elsewhere), the same in every image."""
    p = np.zeros((8, 8), dtype=np.float32)
    p[1:7, 1:7] = 1.0
    p[2:6, 2:6] = 0.0
    return p


BLOCK_PATTERN = block_pattern()


@functools.cache
def _block_digits_arrays() -> dict[str, Any]:
    base = _digits_arrays()
    out: dict[str, Any] = {k: base[k] for k in ("classes", "feature_names", "mean", "std")}
    for split in SPLITS:
        x, y = base[split]
        n = x.shape[0]
        sides = np.random.default_rng(BLOCK_SEEDS[split]).integers(0, 2, size=n)
        images = np.empty((n, 1, 8, 16), dtype=np.float32)
        masks = np.zeros((n, 1, 8, 16), dtype=np.float32)
        for side in (0, 1):
            rows = sides == side
            digit, other = slice(8 * side, 8 * side + 8), slice(8 - 8 * side, 16 - 8 * side)
            images[rows, :, :, digit] = x[rows]
            images[rows, :, :, other] = BLOCK_PATTERN
            masks[rows, :, :, digit] = 1.0
        out[split] = (images, y)
        out[f"{split}_masks"] = masks
        out[f"{split}_sides"] = sides.astype(np.int64)
    return out


PHOTO_CROP, PHOTO_STRIDE, PHOTO_TILES = 32, 4, (2, 4)
PHOTO_TEST_TILES = ((0, 1), (1, 3))
PHOTO_QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")


@functools.cache
def _photos_arrays() -> dict[str, Any]:
    """32x32 RGB crops of scikit-learn's two sample photos (china.jpg, flower.jpg), 8 location classes.

    Each photo is halved by 2x2 averaging (427x640 -> 213x320, last row dropped: 212x320) and split into four
    106x160 quadrants; the label is (photo, quadrant). Every quadrant is cut into 2x4 tiles of 53x40 pixels;
    crops lie inside one tile, on a stride-4 grid (18 per tile). Two tiles of every quadrant (row, column
    (0, 1) and (1, 3)) give the test crops, the other six the train crops, so no test crop shares a pixel with
    a train crop and both splits cover every quadrant.
    """
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    names = [str(f).replace("\\", "/").rsplit("/", 1)[-1].removesuffix(".jpg") for f in bunch.filenames]
    xs: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    ys: dict[str, list[int]] = {"train": [], "test": []}
    c, s = PHOTO_CROP, PHOTO_STRIDE
    for p, img in enumerate(bunch.images):
        a = img[:426, :640].astype(np.float64) / 255.0
        half = a.reshape(213, 2, 320, 2, 3).mean(axis=(1, 3))[:212].transpose(2, 0, 1).astype(np.float32)
        qh, qw = half.shape[1] // 2, half.shape[2] // 2
        th, tw = qh // PHOTO_TILES[0], qw // PHOTO_TILES[1]
        for q in range(4):
            for ti in range(PHOTO_TILES[0]):
                for tj in range(PHOTO_TILES[1]):
                    split = "test" if (ti, tj) in PHOTO_TEST_TILES else "train"
                    top, left = (q // 2) * qh + ti * th, (q % 2) * qw + tj * tw
                    for r in range(0, th - c + 1, s):
                        for col in range(0, tw - c + 1, s):
                            xs[split].append(half[:, top + r : top + r + c, left + col : left + col + c])
                            ys[split].append(4 * p + q)
    out: dict[str, Any] = {split: (np.stack(xs[split]), np.asarray(ys[split], dtype=np.int64)) for split in SPLITS}
    out.update(classes=[f"{n}/{q}" for n in names for q in PHOTO_QUADRANTS], feature_names=None, mean=None, std=None)
    return out


_LOADERS = {
    "block-digits": _block_digits_arrays,
    "breast-cancer": _breast_cancer_arrays,
    "digits": _digits_arrays,
    "photos": _photos_arrays,
}


def datasets() -> list[str]:
    """Names of the bundled datasets.

    Returns:
        The sorted dataset names, e.g. ``["breast-cancer", "digits"]``.
    """
    return sorted(_LOADERS)


def _tensor(a: np.ndarray | None) -> Tensor | None:
    # copy so that callers can modify their tensors without touching the cache
    return None if a is None else torch.from_numpy(np.array(a, copy=True))


def dataset(name: str, split: str = "test") -> ZooDataset:
    """Load a bundled dataset split.

    Args:
        name: a name from :func:`datasets` (``"digits"``, ``"block-digits"`` or
            ``"breast-cancer"``), with or without a ``"zoo:"`` prefix.
        split: ``"train"`` or ``"test"``; the split is fixed (``test_size=0.3``,
            ``random_state=0``, stratified).

    Returns:
        A fresh :class:`ZooDataset` whose tensors the caller may modify freely.

    Raises:
        TypeError: if ``name`` is not a string (e.g. a list of names).
        ValueError: if ``name`` or ``split`` is unknown; the message lists the choices.

    Example:
        >>> data = dataset("digits", split="test")
        >>> x, y = data[:16]
        >>> tuple(x.shape), y.dtype
        ((16, 1, 8, 8), torch.int64)
    """
    if not isinstance(name, str):
        one = f" (one dataset at a time: dataset({name[0]!r}))" if isinstance(name, (list, tuple)) and name else ""
        raise TypeError(
            f"dataset name must be a str such as 'digits', got {type(name).__name__} {name!r}{one}; "
            f"available datasets: {datasets()}."
        )
    key = name.removeprefix("zoo:")
    if key not in _LOADERS:
        raise ValueError(f"unknown zoo dataset {name!r}; available datasets: {datasets()}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    arrays = _LOADERS[key]()
    x, y = arrays[split]
    return ZooDataset(
        _tensor(x),
        _tensor(y),
        classes=arrays["classes"],
        feature_names=arrays["feature_names"],
        name=key,
        split=split,
        mean=_tensor(arrays["mean"]),
        std=_tensor(arrays["std"]),
        masks=_tensor(arrays.get(f"{split}_masks")),
        sides=_tensor(arrays.get(f"{split}_sides")),
    )
