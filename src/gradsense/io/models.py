"""Naming a model: ``zoo:NAME``, ``path/file.py:factory``, ``package.module:factory``, ``hf:DIR``.

A factory is a callable with no required arguments that returns an ``nn.Module`` (or the module itself).
``hf:DIR`` is a local Hugging Face model folder (``config.json`` + weights, and a tokenizer when it has one):
the ``AutoModel*`` class is chosen from ``config.architectures``, loaded with ``local_files_only=True`` and
never with remote code; base encoders become a :class:`gradsense.zoo.SentenceEncoder` (mean pooling, as
sentence-transformers), models with a head an :class:`HFModel` that returns the head's logits. Weights
(``weights=``) come from ``.safetensors`` or ``.pt``/``.pth`` state dicts read with ``weights_only=True``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradsense.io.weights import load_into, read_state_dict

__all__ = ["HFModel", "load_callable", "load_hf", "load_model"]

MODEL_FORMS = "'zoo:NAME', 'path/to/file.py:factory', 'package.module:factory' or 'hf:DIR'"

# transformers' model-name mappings -> the AutoModel class that loads them, most specific first
_AUTO_CLASSES: tuple[tuple[str, str], ...] = (
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "AutoModelForQuestionAnswering"),
    ("MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES", "AutoModelForMultipleChoice"),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification"),
    ("MODEL_FOR_PRETRAINING_MAPPING_NAMES", "AutoModelForPreTraining"),
    ("MODEL_MAPPING_NAMES", "AutoModel"),
)


class HFModel(nn.Module):
    """A Hugging Face model with a head, as a plain module: inputs in, the head's output tensor out.

    ``forward(x)`` passes a positional tensor as the model's main input (``input_ids`` for text,
    ``pixel_values`` for images); keyword arguments pass through. Without an ``attention_mask``, padding
    tokens (the tokenizer's ``pad_token_id``, when it differs from the end-of-sequence token) are masked.
    The output is ``logits`` (or the first tensor the model returns), so losses and analyses see a tensor.

    Args:
        transformer: The Hugging Face ``PreTrainedModel``.
        tokenizer: Its tokenizer, or ``None``.
    """

    def __init__(self, transformer: nn.Module, tokenizer: Any = None) -> None:
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer

    def get_input_embeddings(self) -> nn.Module:
        """The word-embedding layer (for token attribution)."""
        return self.transformer.get_input_embeddings()

    def _pad_id(self) -> int | None:
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        if pad is None:
            pad = getattr(getattr(self.transformer, "config", None), "pad_token_id", None)
        eos = getattr(tok, "eos_token_id", None) if tok is not None else None
        return None if pad is None or pad == eos else int(pad)

    def forward(self, *args: Tensor, **kwargs: Any) -> Tensor:
        """The head's output for the model's main input (positional) or keyword inputs."""
        if len(args) > 1:
            raise TypeError(f"{type(self.transformer).__name__} takes one positional input, got {len(args)}.")
        if args:
            kwargs[getattr(self.transformer, "main_input_name", "input_ids")] = args[0]
        ids = kwargs.get("input_ids")
        if isinstance(ids, Tensor) and kwargs.get("attention_mask") is None and kwargs.get("inputs_embeds") is None:
            pad = self._pad_id()
            if pad is not None:
                kwargs["attention_mask"] = (ids != pad).long()
        out = self.transformer(**kwargs)
        if isinstance(out, Tensor):
            return out
        logits = getattr(out, "logits", None)
        if isinstance(logits, Tensor):
            return logits
        values = out.values() if hasattr(out, "values") else out
        for v in values:
            if isinstance(v, Tensor):
                return v
        raise ValueError(f"{type(self.transformer).__name__} returned no tensor.")


def _auto_class(transformers: Any, architectures: list[str]) -> tuple[Any, str]:
    """The AutoModel class for the first architecture in the config (and its name)."""
    from transformers.models.auto import modeling_auto

    for arch in architectures:
        for mapping_name, auto_name in _AUTO_CLASSES:
            mapping = getattr(modeling_auto, mapping_name, {})
            names = {n for v in mapping.values() for n in ((v,) if isinstance(v, str) else v)}
            if arch in names and hasattr(transformers, auto_name):
                return getattr(transformers, auto_name), auto_name
    for arch in architectures:  # a class transformers knows, outside the mappings above
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls, arch
    if architectures:
        raise ValueError(
            f"config.architectures {architectures} names no model class of the installed transformers "
            f"{transformers.__version__}; gradsense never runs a model folder's own code (trust_remote_code)."
        )
    return transformers.AutoModel, "AutoModel"


def load_hf(directory: str | os.PathLike[str]) -> nn.Module:
    """Load a local Hugging Face model folder (no network, no remote code), with its tokenizer if it has one.

    Args:
        directory: A folder written by ``save_pretrained`` (``config.json`` and weights).

    Returns:
        A :class:`gradsense.zoo.SentenceEncoder` for a base encoder (``AutoModel``: mean-pooled embeddings,
        ``.encode()``), otherwise an :class:`HFModel` returning the head's output; float32, eval mode, eager
        attention (so double backward and forward-mode AD work).

    Raises:
        ImportError: ``transformers`` is not installed (``pip install gradsense[hf]``).
        FileNotFoundError: The folder or its ``config.json`` is missing.
        ValueError: The folder cannot be loaded (the first line of the reason is given).
    """
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"hf:{directory}: {path} is not a folder (expected a save_pretrained() folder).")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"hf:{directory}: {path} has no config.json; it is not a Hugging Face model folder.")
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as err:
        raise ImportError("hf:DIR models need transformers; install it with `pip install gradsense[hf]`.") from err
    hf_logging = transformers.utils.logging
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        try:
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"hf:{directory}: cannot read config.json: {str(err).splitlines()[0]}") from None
        auto, auto_name = _auto_class(transformers, list(getattr(config, "architectures", None) or []))
        try:
            transformer = auto.from_pretrained(str(path), local_files_only=True, trust_remote_code=False,
                                               attn_implementation="eager")
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise ValueError(f"hf:{directory}: {auto_name} cannot load it: {str(err).strip().splitlines()[0]}") from None
        tokenizer = None
        if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")):
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                                       trust_remote_code=False)
            except (OSError, ValueError, KeyError) as err:
                raise ValueError(f"hf:{directory}: its tokenizer cannot be loaded: {str(err).splitlines()[0]}") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    transformer = transformer.to(torch.float32).eval()
    model: nn.Module
    if auto_name == "AutoModel" and tokenizer is not None and hasattr(transformer.config, "hidden_size"):
        from gradsense.zoo.models import SentenceEncoder

        model = SentenceEncoder(transformer, tokenizer)
    else:
        model = HFModel(transformer, tokenizer)
    model.hf_auto_class = auto_name  # type: ignore[assignment]
    return model.eval()


def _from_file(path: Path, factory: str) -> object:
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist (from model spec '{path}:{factory}').")
    mod_name = f"_gradsense_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path} as a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[mod_name]
        raise ValueError(f"importing {path} failed: {type(err).__name__}: {err}") from err
    return module


def _callable_from(target: str, name: str, spec: str, what: str) -> Any:
    """``name`` from a ``file.py`` or an importable module (``target``), for model factories and loss functions."""
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _from_file(Path(target), name)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ValueError(f"cannot import module {target!r} from {what} spec {spec!r}: {err}") from err
    obj = getattr(module, name, None)
    if obj is None:
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ValueError(f"{target} has no attribute {name!r}; callables there: {public[:12]}.")
    if not callable(obj):
        raise ValueError(f"{target}:{name} is not callable.")
    return obj


def load_model(spec: str, *, weights: str | os.PathLike[str] | None = None) -> nn.Module:
    """Build a model from a spec string, optionally loading weights into it.

    Args:
        spec: ``zoo:NAME`` (a bundled model), ``path/to/file.py:factory``, ``package.module:factory`` or
            ``hf:DIR`` (a local Hugging Face folder; see :func:`load_hf`).
        weights: Optional ``.safetensors`` or ``.pt``/``.pth`` state dict (read with ``weights_only=True``;
            a checkpoint dict with a ``state_dict``/``model`` entry is understood), loaded with ``strict=True``.

    Returns:
        The model (zoo and hf models in eval mode; user models as the factory returns them).

    Raises:
        ValueError: A malformed spec, unknown zoo name, missing or non-callable factory, a factory that does
            not return an nn.Module, weights that do not fit or a file holding pickled objects.
        FileNotFoundError: A missing model or weights file.
        ImportError: ``hf:`` without transformers.

    Example:
        >>> import gradsense as gs
        >>> model = gs.load_model("zoo:digits-cnn")
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec must be a non-empty string like {MODEL_FORMS}; got {spec!r}.")
    if weights is not None and (isinstance(weights, bool) or not isinstance(weights, (str, os.PathLike))):
        raise TypeError(f"weights must be a file path (.safetensors, .pt or .pth), got {type(weights).__name__}.")
    spec = spec.strip()
    model: Any
    if spec.startswith("zoo:"):
        from gradsense import zoo

        model = zoo.load(spec[4:])
    elif spec.startswith("hf:"):
        if not spec[3:]:
            raise ValueError("hf: needs a folder, e.g. hf:./my-bert (a save_pretrained() folder).")
        model = load_hf(spec[3:])
    else:
        if ":" not in spec:
            raise ValueError(f"model spec {spec!r} not understood; use {MODEL_FORMS}.")
        target, factory_name = spec.rsplit(":", 1)
        factory = _callable_from(target, factory_name, spec, "model")
        if isinstance(factory, nn.Module):
            model = factory
        else:
            try:
                model = factory()
            except Exception as err:
                raise ValueError(
                    f"calling {target}:{factory_name}() failed ({type(err).__name__}: {err}); a factory must "
                    "build the model with no arguments."
                ) from err
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"{target}:{factory_name}() returned {type(model).__name__}, expected a torch.nn.Module."
            )
    if weights is not None:
        load_into(model, read_state_dict(weights), str(weights))
    return model


def load_callable(spec: str, what: str) -> Any:
    """A function named ``path/file.py:fn`` or ``package.module:fn`` (for ``--loss``)."""
    if ":" not in spec:
        raise ValueError(f"{what} {spec!r} not understood; use a name or 'path/to/file.py:function'.")
    target, name = spec.rsplit(":", 1)
    return _callable_from(target, name, spec, what)
