"""The zoo's model registry: which architecture, with which arguments, trained how, on what."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from gradsense.zoo.models import ConvNetPool, DigitsCNN, LeNetZhu, TabularMLP, TinyViT

__all__ = ["HF_MODELS", "MODELS", "WEIGHTS_DIR", "ModelSpec", "TrainConfig", "normalize_name", "spec"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
HF_MODELS: tuple[str, ...] = ("minilm",)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How a small zoo model is trained (AdamW, linear warm-up then cosine decay per step).

    Attributes:
        epochs: passes over the train split.
        batch_size: examples per step.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: epochs of linear learning-rate warm-up.
        shift: random image translation of up to this many pixels (0: no augmentation).
        label_smoothing: cross-entropy label smoothing.
        noise: standard deviation of Gaussian noise added to the inputs (0: none).
    """

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_epochs: int = 0
    shift: int = 0
    label_smoothing: float = 0.0
    noise: float = 0.0


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A trainable zoo model: architecture class, its keyword arguments, dataset and recipe."""

    name: str
    cls: type[nn.Module]
    kwargs: dict[str, Any]
    dataset: str
    train: TrainConfig

    def build(self, **overrides: Any) -> nn.Module:
        """A freshly initialised model (the global torch RNG draws the initial weights)."""
        return self.cls(**{**self.kwargs, **overrides})


MODELS: dict[str, ModelSpec] = {
    # the ground-truth testbed of issue 5 (Shah et al. 2021): digit in one 8x8 block, a fixed pattern in the
    # other; no shift augmentation, so the digit never leaves its block and the mask stays exact
    "block-digits-cnn": ModelSpec(
        name="block-digits-cnn",
        cls=DigitsCNN,
        kwargs={"in_channels": 1, "channels": [16, 32, 64], "num_classes": 10},
        dataset="block-digits",
        train=TrainConfig(epochs=40, batch_size=64, lr=3e-3, weight_decay=1e-2, warmup_epochs=2),
    ),
    "breast-cancer-mlp": ModelSpec(
        name="breast-cancer-mlp",
        cls=TabularMLP,
        kwargs={"in_features": 30, "hidden": [32, 16], "num_classes": 2},
        dataset="breast-cancer",
        train=TrainConfig(epochs=60, batch_size=32, lr=3e-3, weight_decay=1e-2, warmup_epochs=2),
    ),
    "digits-cnn": ModelSpec(
        name="digits-cnn",
        cls=DigitsCNN,
        kwargs={"in_channels": 1, "channels": [16, 32, 64], "num_classes": 10},
        dataset="digits",
        train=TrainConfig(epochs=40, batch_size=64, lr=3e-3, weight_decay=1e-2, warmup_epochs=2, shift=1),
    ),
    "digits-vit": ModelSpec(
        name="digits-vit",
        cls=TinyViT,
        kwargs={
            "image_size": 8,
            "patch_size": 2,
            "in_channels": 1,
            "num_classes": 10,
            "dim": 48,
            "depth": 3,
            "heads": 4,
            "mlp_ratio": 2.0,
        },
        dataset="digits",
        train=TrainConfig(
            epochs=100,
            batch_size=64,
            lr=3e-3,
            weight_decay=5e-2,
            warmup_epochs=5,
            shift=1,
            label_smoothing=0.1,
        ),
    ),
    # photo crops (issue 14): the DLG paper's sigmoid LeNet and a ReLU CNN with pooling
    "photos-lenet": ModelSpec(name="photos-lenet", cls=LeNetZhu, kwargs={"in_channels": 3, "num_classes": 8},
                              dataset="photos", train=TrainConfig(epochs=60, batch_size=32, lr=3e-3, warmup_epochs=2)),
    "photos-cnn": ModelSpec(name="photos-cnn", cls=ConvNetPool, kwargs={"in_channels": 3, "num_classes": 8},
                            dataset="photos", train=TrainConfig(epochs=40, batch_size=32, lr=3e-3, weight_decay=1e-2,
                                                                warmup_epochs=2, shift=2)),
}


def normalize_name(name: str) -> str:
    """Strip an optional ``"zoo:"`` prefix.

    Args:
        name: e.g. ``"zoo:digits-cnn"`` or ``"digits-cnn"``.

    Returns:
        The bare name.

    Raises:
        TypeError: if ``name`` is not a string.
    """
    if not isinstance(name, str):
        one = f" (one model at a time: load({name[0]!r}))" if isinstance(name, (list, tuple)) and name else ""
        raise TypeError(f"model name must be a str such as 'digits-cnn', got {type(name).__name__} {name!r}{one}.")
    return name.removeprefix("zoo:")


def spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a trainable zoo model.

    Args:
        name: a small-model name, with or without ``"zoo:"``.

    Returns:
        Its spec.

    Raises:
        ValueError: if ``name`` is not a trainable zoo model; the message lists them.
    """
    key = normalize_name(name)
    if key not in MODELS:
        raise ValueError(f"unknown trainable zoo model {name!r}; trainable models: {sorted(MODELS)}")
    return MODELS[key]
