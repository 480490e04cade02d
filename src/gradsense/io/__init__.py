"""Naming a model, its weights, data and a loss: the forms every CLI command and ``gs.load_*`` accept.

Models (:func:`load_model`): ``zoo:NAME``, ``path/to/file.py:factory``, ``package.module:factory``,
``hf:DIR`` (a local Hugging Face folder); weights from ``.safetensors`` or ``.pt``/``.pth`` state dicts read
with ``torch.load(weights_only=True)`` (never full pickle; a checkpoint dict with ``state_dict``/``model``
is understood). Data (:func:`load_data`): ``zoo:NAME``, ``.npy``/``.npz``/``.safetensors``/``.pt`` tensors,
``.csv`` with a header, an image folder (one subfolder per class), ``.txt``/``.jsonl`` text. Losses
(:func:`load_loss`): ``cross_entropy``, ``mse``, ``bce`` or ``path/to/file.py:fn``.

Example:
    >>> import gradsense as gs
    >>> model = gs.load_model("zoo:digits-cnn")
    >>> x, y = gs.load_data("zoo:digits", split="test")[:16]
"""

from __future__ import annotations

from gradsense.io.data import Data, load_data, load_images, parse_shape
from gradsense.io.losses import LOSSES, load_loss
from gradsense.io.models import HFModel, load_hf, load_model
from gradsense.io.weights import load_into, read_state_dict, read_torch_file

__all__ = [
    "LOSSES",
    "Data",
    "HFModel",
    "load_data",
    "load_hf",
    "load_images",
    "load_into",
    "load_loss",
    "load_model",
    "parse_shape",
    "read_state_dict",
    "read_torch_file",
]
