"""Deterministic training of the small zoo models, and writing their weights.

``train(name, seed)`` draws the initial weights, the data order and the augmentation from
``seed`` alone, runs single-threaded with ``torch.use_deterministic_algorithms(True)``, and
restores the caller's RNG state, thread count and determinism flag afterwards.
``scripts/train_zoo.py`` calls :func:`train` and :func:`save_weights` for every model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from gradsense.zoo.data import dataset
from gradsense.zoo.registry import WEIGHTS_DIR, spec

__all__ = ["accuracy", "random_shift", "save_weights", "train"]


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by a random integer offset in ``[-max_shift, max_shift]`` (zero fill).

    Args:
        x: images ``(B, C, H, W)``.
        max_shift: largest shift in pixels along each axis.
        generator: source of the offsets.

    Returns:
        The shifted images, same shape as ``x``.
    """
    if max_shift <= 0:
        return x
    b, c, h, w = x.shape
    m = max_shift
    padded = F.pad(x, (m, m, m, m))
    oy = torch.randint(0, 2 * m + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * m + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(c)[None, :, None, None]
    return padded[bi, ci, rows, cols]


@torch.no_grad()
def accuracy(model: nn.Module, inputs: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Fraction of examples whose arg-max logit equals the label (the model is used as it is).

    Args:
        model: a classifier.
        inputs: model inputs.
        labels: int labels.
        batch_size: examples per forward pass.

    Returns:
        The accuracy in ``[0, 1]``.
    """
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(inputs[start : start + batch_size])
        correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    return correct / len(labels)


def _schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train(
    name: str,
    seed: int = 0,
    *,
    epochs: int | None = None,
    num_threads: int = 1,
    verbose: bool = False,
) -> tuple[nn.Module, float]:
    """Train a small zoo model from scratch, deterministically.

    Args:
        name: ``"digits-cnn"``, ``"digits-vit"`` or ``"breast-cancer-mlp"`` (``"zoo:"`` allowed).
        seed: seeds the initial weights, the data order and the augmentation.
        epochs: override the recipe's number of epochs (the schedule is stretched to fit).
        num_threads: torch intra-op threads during training (1 makes results independent of
            the machine's core count); the caller's setting is restored afterwards.
        verbose: print the loss and test accuracy every few epochs.

    Returns:
        ``(model, test_accuracy)`` with the model in eval mode.

    Raises:
        ValueError: if ``name`` is not a trainable zoo model or ``epochs`` is not positive.
    """
    model_spec = spec(name)
    cfg = model_spec.train
    n_epochs = cfg.epochs if epochs is None else epochs
    if n_epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {n_epochs}")
    train_data = dataset(model_spec.dataset, "train")
    test_data = dataset(model_spec.dataset, "test")

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.set_num_threads(num_threads)
        torch.use_deterministic_algorithms(True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_spec.build()
            generator = torch.Generator().manual_seed(seed)
            model = _fit(
                model, train_data.inputs, train_data.labels, test_data, cfg, n_epochs, generator, verbose
            )
            test_acc = accuracy(model, test_data.inputs, test_data.labels)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
    return model, test_acc


def _fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    test_data: Any,
    cfg: Any,
    epochs: int,
    generator: torch.Generator,
    verbose: bool,
) -> nn.Module:
    n = len(y)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = epochs * steps_per_epoch
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total // 2)
    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        # no weight decay on biases, norms, embeddings/tokens
        (no_decay if p.ndim <= 1 or pname.endswith(("pos_embed", "cls_token")) else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(warmup, total))
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        running = 0.0
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            xb, yb = x[idx], y[idx]
            if cfg.shift and xb.ndim == 4:
                xb = random_shift(xb, cfg.shift, generator)
            if cfg.noise:
                xb = xb + cfg.noise * torch.randn(xb.shape, generator=generator, dtype=xb.dtype)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.detach().item() * len(idx)
        if verbose and (epoch % 10 == 9 or epoch == epochs - 1):
            model.eval()
            acc = accuracy(model, test_data.inputs, test_data.labels)
            print(f"  epoch {epoch + 1:4d}  loss {running / n:.4f}  test acc {acc:.4f}", flush=True)
    return model.eval()


def save_weights(
    model: nn.Module,
    name: str,
    *,
    test_accuracy: float,
    seed: int,
    epochs: int | None = None,
    directory: str | Path | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``NAME.safetensors`` (the state dict) and ``NAME.json`` (how it was made).

    Args:
        model: the trained model.
        name: its zoo name.
        test_accuracy: accuracy on the test split.
        seed: the training seed.
        epochs: epochs trained (default: the recipe's).
        directory: target folder (default: the package's ``zoo/weights``).
        extra: more JSON-serialisable fields for the metadata file.

    Returns:
        The paths of the weights file and the metadata file.

    Raises:
        ValueError: if ``name`` is not a trainable zoo model.
    """
    model_spec = spec(name)
    out = Path(directory) if directory is not None else WEIGHTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    weights_path = out / f"{model_spec.name}.safetensors"
    meta_path = out / f"{model_spec.name}.json"
    save_file(state, str(weights_path), metadata={"name": model_spec.name, "format": "pt"})
    weights_path.chmod(0o644)  # package data: readable by everyone
    meta = {
        "name": model_spec.name,
        "class": model_spec.cls.__name__,
        "arch": model_spec.kwargs,
        "dataset": model_spec.dataset,
        "test_accuracy": test_accuracy,
        "epochs": model_spec.train.epochs if epochs is None else epochs,
        "seed": seed,
        "train_config": dataclasses.asdict(model_spec.train),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return weights_path, meta_path
