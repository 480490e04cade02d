"""Bundled datasets: small scikit-learn datasets with a fixed train/test split, as tensors.

Both datasets ship inside scikit-learn, so nothing is downloaded. The split is always
``train_test_split(test_size=0.3, random_state=0, stratify=y)``, so every run, test and figure
sees the same examples.
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

__all__ = ["SPLITS", "ZooDataset", "dataset", "datasets"]

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


_LOADERS = {
    "breast-cancer": _breast_cancer_arrays,
    "digits": _digits_arrays,
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
        name: a name from :func:`datasets` (``"digits"`` or ``"breast-cancer"``), with or
            without a ``"zoo:"`` prefix.
        split: ``"train"`` or ``"test"``; the split is fixed (``test_size=0.3``,
            ``random_state=0``, stratified).

    Returns:
        A fresh :class:`ZooDataset` whose tensors the caller may modify freely.

    Raises:
        ValueError: if ``name`` or ``split`` is unknown; the message lists the choices.

    Example:
        >>> data = dataset("digits", split="test")
        >>> x, y = data[:16]
        >>> tuple(x.shape), y.dtype
        ((16, 1, 8, 8), torch.int64)
    """
    key = name.removeprefix("zoo:") if isinstance(name, str) else name
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
    )
