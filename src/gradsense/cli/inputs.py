"""Reading inputs for the CLI: image files (Pillow), tensor files (.safetensors, .npy, .pt refused)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["load_images", "load_tensor_file"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TENSOR_SUFFIXES = {".safetensors", ".npy"}


def load_images(paths: Sequence[str | Path], shape: Sequence[int], *, invert: bool | None = None) -> Tensor:
    """Load images and bring them to the model's input shape ``(C, H, W)`` with values in [0, 1].

    Grayscale for C=1, RGB for C=3; resized with a box filter (anti-aliased) to ``(H, W)``. With
    ``invert=None`` a grayscale image whose border is brighter than its centre (dark digit on white
    paper) is inverted to match models trained on bright strokes on black (the digits data).

    Raises:
        FileNotFoundError: A missing file.
        ValueError: A file Pillow cannot read, or a shape that is not (C, H, W) with C in {1, 3}.
    """
    from PIL import Image, UnidentifiedImageError

    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"image inputs need a model taking (C, H, W) with C = 1 or 3; it takes {tuple(shape)}.")
    c, h, w = (int(s) for s in shape)
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"input file {path} does not exist.")
        try:
            with Image.open(path) as im:
                im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.Resampling.BOX)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except UnidentifiedImageError as err:
            raise ValueError(f"{path} is not an image Pillow can read.") from err
        t = torch.from_numpy(arr.copy())
        t = t[None] if c == 1 else t.permute(2, 0, 1)
        if c == 1:
            flip = invert
            if flip is None:
                border = torch.cat([t[0, 0], t[0, -1], t[0, :, 0], t[0, :, -1]]).mean()
                flip = bool(border > t[0, h // 4 : h - h // 4, w // 4 : w - w // 4].mean())
            if flip:
                t = 1.0 - t
        out.append(t)
    return torch.stack(out)


def load_tensor_file(path: str | Path, key: str | None = None) -> Tensor:
    """Read inputs from ``.safetensors`` (tensor ``key``, ``inputs``, or the only one) or ``.npy`` (no pickle).

    Raises:
        FileNotFoundError: A missing file.
        ValueError: An unsupported suffix, or an ambiguous/missing key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist.")
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False)).float()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if key is None:
            key = "inputs" if "inputs" in tensors else (next(iter(tensors)) if len(tensors) == 1 else None)
        if key is None or key not in tensors:
            raise ValueError(f"{path} holds {sorted(tensors)}; name the inputs with --key.")
        return tensors[key].float()
    raise ValueError(f"{path}: tensor inputs must be .safetensors or .npy (pickled .pt files are not loaded).")
