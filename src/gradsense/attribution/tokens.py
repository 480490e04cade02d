"""Token attribution for transformer text models: gradients at the embedding layer, one score per token.

The model's word-embedding layer is found (``model.embeddings_layer``, ``get_input_embeddings()`` or
the first ``nn.Embedding``) and its output is replaced, inside a scoped forward hook, by the
embeddings we differentiate. Methods:

- ``"gradient"``: per-token L2 norm of ``d target / d e_t`` (Li et al. 2016, "Visualizing and
  Understanding Neural Models in NLP").
- ``"input_x_gradient"``: ``sum_d e_td * d target / d e_td`` (Shrikumar et al. 2016).
- ``"integrated_gradients"``: IG in embedding space (Sundararajan et al. 2017) from a baseline of
  ``[PAD]`` embeddings that keeps special tokens (``baseline="pad"``) or zeros, summed over the
  embedding dimension; ``.delta`` is the completeness gap per example.

Targets are the usual ones; for sentence encoders, "why are these two sentences similar" is
``target=gs.targets.CosineSimilarity(model.encode([other]))`` (see :func:`similarity_target`), and
"why A rather than B" is ``gs.targets.Contrastive(a, b)`` (as in GrAInS, contrastive token attribution).
Path steps are a batch dimension (rows = steps x sentences), chunked under the memory budget.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradsense.attribution.path import quadrature
from gradsense.core.batching import chunk_size_for, chunks, estimate_example_bytes, parse_memory
from gradsense.core.checks import check_positive_int, suggest
from gradsense.core.functional import check_model, model_fingerprint, preserve_model
from gradsense.core.grad import input_gradients
from gradsense.core.hooks import replace_output
from gradsense.core.targets import Batch, Continuation, CosineSimilarity, Target, TargetLike, as_target
from gradsense.results.base import Result

__all__ = [
    "TokenAttribution",
    "TokenAttributionResult",
    "attribute_tokens",
    "find_embedding_layer",
    "similarity_target",
]

TOKEN_METHODS = ("gradient", "input_x_gradient", "integrated_gradients")


def find_embedding_layer(model: nn.Module) -> nn.Module:
    """The word-embedding module of a text model.

    Raises:
        ValueError: If the model has no ``nn.Embedding``.
    """
    layer = getattr(model, "embeddings_layer", None)
    if isinstance(layer, nn.Module):
        return layer
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        layer = get()
        if isinstance(layer, nn.Module):
            return layer
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m
    raise ValueError(
        f"{type(model).__name__} has no nn.Embedding layer, so token attribution does not apply; "
        "for image or tabular models use gs.attribute(model, x, method=...)."
    )


def similarity_target(model: nn.Module, other: str | Sequence[str]) -> CosineSimilarity:
    """Target = cosine similarity of each sentence's embedding to ``other``'s (fixed) embedding.

    Args:
        model: A sentence encoder with ``encode(sentences)`` (e.g. ``gs.zoo.load("minilm")``).
        other: One sentence for all, or one per example.
    """
    encode = getattr(model, "encode", None)
    if not callable(encode):
        raise ValueError("similarity_target needs a sentence encoder with .encode(sentences).")
    ref = encode([other] if isinstance(other, str) else list(other), normalize=True)
    return CosineSimilarity(ref[0] if isinstance(other, str) else ref)


@dataclasses.dataclass(frozen=True, repr=False)
class TokenAttributionResult(Result):
    """Per-token scores. Tensors: ``scores`` (N, T) with padding at 0, ``input_ids``, ``attention_mask``,
    ``target_scores`` (N,), ``delta`` (N,) for IG, and ``token_scores`` (N, C, T) for a continuation
    target with ``per_token=True``. ``meta['tokens']``: the tokens of each example."""

    kind = "token_attribution"

    @property
    def scores(self) -> Tensor:
        """Score of every token, ``(N, T)`` (0 at padding)."""
        return self.tensors["scores"]

    @property
    def delta(self) -> Tensor | None:
        """Completeness gap of IG per example."""
        return self.tensors.get("delta")

    @property
    def token_scores(self) -> Tensor | None:
        """With ``gs.targets.Continuation(..., per_token=True)``: ``(N, C, T)``, the attribution of each
        continuation token's log-probability to every input token (they sum to :attr:`scores` for
        gradient x input and IG). The last ``C`` input positions are the continuation itself."""
        return self.tensors.get("token_scores")

    @property
    def tokens(self) -> list[list[str]]:
        """Tokens of each example, without padding."""
        return self.meta.get("tokens", [])

    @property
    def title(self) -> str:
        return f"Token attribution: {self.method}"

    def summary(self) -> list[tuple[str, str]]:
        rows = super().summary()
        rows.insert(1, ("target", str(self.meta.get("target", ""))))
        for i in range(min(3, len(self.tokens))):
            top = self.top_tokens(i, k=5)
            rows.append((f"example {i} top tokens", ", ".join(f"{t} ({s:+.3g})" for t, s in top)))
        if self.delta is not None:
            rows.append(("max |delta|", f"{self.delta.abs().max().item():.3g}"))
        return rows

    def top_tokens(self, i: int = 0, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` tokens of example ``i`` with the largest |score|."""
        toks = self.tokens[i]
        s = self.scores[i, : len(toks)]
        order = s.abs().argsort(descending=True)[:k]
        return [(toks[j], float(s[j])) for j in order.tolist()]

    def plot(self, i: int = 0, **kwargs: Any) -> Any:
        """Coloured tokens of example ``i``."""
        from gradsense.viz.figures import token_heatmap

        toks = self.tokens[i]
        signed = self.method != "gradient"
        return token_heatmap(toks, self.scores[i, : len(toks)].float(), title=self.meta.get("texts", [None] * (i + 1))[i],
                             signed=signed, **kwargs)


class TokenAttribution:
    """Attribute a text model's output to its input tokens.

    Args:
        model: A text model called as ``model(input_ids=..., attention_mask=...)`` (Hugging Face
            models, ``gs.zoo.load("minilm")``), never modified.
        method: ``"integrated_gradients"`` (default), ``"input_x_gradient"`` or ``"gradient"``.
        steps: IG path points.
        rule: IG quadrature rule (see :func:`gradsense.attribution.path.quadrature`).
        baseline: IG baseline: ``"pad"`` (``[PAD]`` embeddings, special tokens kept) or ``"zeros"``.
        tokenizer: Tokenizer for string inputs (default ``model.tokenizer``).
        embedding_layer: The embedding module (default: found automatically).
        chunk_size: Rows (steps x sentences) per forward/backward.
        max_memory: Memory budget.
        show_progress: Progress bar.

    Example:
        >>> enc = gs.zoo.load("minilm")  # doctest: +SKIP
        >>> tgt = similarity_target(enc, "A man is playing a guitar.")  # doctest: +SKIP
        >>> r = TokenAttribution(enc).attribute(["A person plays music."], target=tgt)  # doctest: +SKIP
        >>> r.top_tokens(0)  # doctest: +SKIP
    """

    name = "token_attribution"

    def __init__(
        self,
        model: nn.Module,
        *,
        method: str = "integrated_gradients",
        steps: int = 32,
        rule: str = "gausslegendre",
        baseline: str = "pad",
        tokenizer: Any = None,
        embedding_layer: nn.Module | None = None,
        chunk_size: int | None = None,
        max_memory: int | str | None = None,
        show_progress: bool | None = False,
    ) -> None:
        self.model = check_model(model)
        if method not in TOKEN_METHODS:
            raise ValueError(f"token attribution method must be one of {TOKEN_METHODS}, got {method!r}.{suggest(method, TOKEN_METHODS)}")
        check_positive_int(steps, "steps")
        quadrature(rule, steps)
        if baseline not in ("pad", "zeros"):
            raise ValueError(f"baseline must be 'pad' or 'zeros', got {baseline!r}.")
        if max_memory is not None:
            parse_memory(max_memory)
        self.method, self.steps, self.rule, self.baseline = method, steps, rule, baseline
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.embedding = embedding_layer if embedding_layer is not None else find_embedding_layer(model)
        self.chunk_size, self.max_memory, self.show_progress = chunk_size, max_memory, show_progress

    # ------------------------------------------------------------------------------ inputs
    def _encode(self, inputs: Any) -> tuple[dict[str, Tensor], list[str] | None]:
        texts = None
        if isinstance(inputs, str):
            inputs = [inputs]
        if isinstance(inputs, (list, tuple)):
            if not inputs:
                raise ValueError(
                    f"inputs is an empty {type(inputs).__name__}: give at least one sentence (a str or a list of str), "
                    "token ids (N, T) or a tokenizer output dict."
                )
            bad = [i for i, s in enumerate(inputs) if not isinstance(s, str)]
            if bad:
                raise TypeError(
                    f"inputs as a {type(inputs).__name__} must hold sentences (str); item {bad[0]} is a "
                    f"{type(inputs[bad[0]]).__name__}. Pass token ids as a tensor (N, T) instead."
                )
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(s, str) for s in inputs):
            if self.tokenizer is None:
                raise ValueError("text inputs need a tokenizer: pass tokenizer= or use a model with .tokenizer.")
            texts = list(inputs)
            enc = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
            inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if isinstance(inputs, Tensor):
            inputs = {"input_ids": inputs}
        if not isinstance(inputs, dict) or "input_ids" not in inputs:
            raise TypeError(
                "inputs must be sentences (str or list of str), a tensor of token ids (N, T), or a dict with "
                f"'input_ids' (and 'attention_mask'); got {type(inputs).__name__}."
            )
        ids = inputs["input_ids"]
        if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.is_floating_point():
            raise ValueError(
                "input_ids must be an integer tensor (N, T); got "
                f"{type(ids).__name__}{tuple(ids.shape) if isinstance(ids, Tensor) else ''}."
            )
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"input_ids of shape {tuple(ids.shape)} hold no tokens: give at least one non-empty input.")
        weight = getattr(self.embedding, "weight", None)
        device = weight.device if isinstance(weight, Tensor) else ids.device
        out = {k: v.to(device) for k, v in inputs.items()}
        out.setdefault("attention_mask", torch.ones_like(out["input_ids"]))
        vocab = getattr(self.embedding, "num_embeddings", None)
        if vocab is not None and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            raise ValueError(f"token ids out of range for an embedding of {vocab} entries.")
        return out, texts

    def _tokens(self, ids: Tensor, mask: Tensor) -> list[list[str]]:
        rows = []
        for i in range(ids.shape[0]):
            keep = ids[i][mask[i].bool()].tolist()
            if self.tokenizer is not None and hasattr(self.tokenizer, "convert_ids_to_tokens"):
                rows.append([str(t) for t in self.tokenizer.convert_ids_to_tokens(keep)])
            else:
                rows.append([str(t) for t in keep])
        return rows

    def _baseline_ids(self, ids: Tensor) -> Tensor:
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        if pad is None:
            raise ValueError("baseline='pad' needs a tokenizer with pad_token_id; use baseline='zeros'.")
        special = set(getattr(tok, "all_special_ids", []) or [])
        keep = torch.zeros_like(ids, dtype=torch.bool)
        for s in special:
            keep |= ids == s
        return torch.where(keep, ids, torch.full_like(ids, pad))

    # ------------------------------------------------------------------------------ the verb
    def attribute(self, inputs: Any, target: TargetLike | None = None) -> TokenAttributionResult:
        """Score every token of every input.

        Args:
            inputs: Sentences, a ``(N, T)`` tensor of token ids, or a tokenizer output dict.
            target: What to explain (see :mod:`gradsense.core.targets`); for sentence encoders
                typically :func:`similarity_target`.

        Returns:
            A :class:`TokenAttributionResult`.

        Raises:
            TypeError, ValueError: Bad inputs or target, before any work is done.
        """
        enc, texts = self._encode(inputs)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        n = ids.shape[0]
        model, emb_layer = self.model, self.embedding
        if target is None:
            as_target(target, n)  # raises: the target is required (said before anything else is checked)
        use_pad = self.method == "integrated_gradients" and self.baseline == "pad"
        base_ids = self._baseline_ids(ids) if use_pad else None  # checked before any forward
        t0 = time.perf_counter()

        def row_forward(rows: Tensor, idx: Tensor) -> Any:
            with replace_output(emb_layer, lambda _out: rows):
                kw = {k: v[idx] for k, v in extra.items()}
                return model(input_ids=ids[idx], attention_mask=mask[idx], **kw)

        def plain_forward() -> Any:
            return model(input_ids=ids, attention_mask=mask, **extra)

        with preserve_model(model):
            resolved = as_target(target, n, predict=plain_forward)
            with torch.no_grad():
                resolved.validate(plain_forward(), n)
                e = emb_layer(ids).detach()
                if base_ids is not None:
                    e0 = emb_layer(base_ids).detach()
                else:
                    e0 = torch.zeros_like(e)
            if isinstance(resolved, Continuation):  # the answer is given: only the prompt moves along the path
                e0 = e0.clone()
                e0[:, -resolved.length :] = e[:, -resolved.length :]
            index = torch.arange(n, device=ids.device)
            scores, target_scores, delta = self._scores(resolved, e, e0, index, row_forward)
            token_scores = None
            if isinstance(resolved, Continuation) and resolved.per_token and resolved.token is None:
                parts = [self._scores(resolved.for_token(j), e, e0, index, row_forward, delta=False)[0]
                         for j in range(resolved.length)]
                token_scores = torch.stack(parts, dim=1) * mask[:, None].to(scores.dtype)  # (N, C, T)
        scores = scores * mask.to(scores.dtype)
        tensors = {"scores": scores.detach(), "input_ids": ids, "attention_mask": mask,
                   "target_scores": target_scores.detach()}
        if delta is not None:
            tensors["delta"] = delta.detach()
        if token_scores is not None:
            tensors["token_scores"] = token_scores.detach()
        return TokenAttributionResult.build(
            tensors,
            method=self.method,
            settings={"steps": self.steps if self.method == "integrated_gradients" else None,
                      "rule": self.rule if self.method == "integrated_gradients" else None,
                      "baseline": self.baseline if self.method == "integrated_gradients" else None},
            model=model_fingerprint(model),
            wall_time_s=time.perf_counter() - t0,
            target=resolved.describe(),
            tokens=self._tokens(ids, mask),
            texts=texts,
            continuation_length=resolved.length if isinstance(resolved, Continuation) else None,
        )

    def _row_chunk(self, e: Tensor, index: Tensor, row_forward: Any) -> int:
        """Rows (path points x examples) per forward/backward: ``chunk_size``, else from the budget."""
        total = e.shape[0] * (self.steps if self.method == "integrated_gradients" else 1)
        if self.chunk_size is not None:
            return chunk_size_for(1, chunk_size=self.chunk_size, total=total)
        per_row = estimate_example_bytes(self.model, e[:1], forward=lambda r: row_forward(r, index[:1]))
        per_row += 2 * e[0].numel() * e.element_size()  # the row itself and its gradient
        return chunk_size_for(per_row, max_memory=self.max_memory, total=total, device=e.device)

    def _scores(self, resolved: Target, e: Tensor, e0: Tensor, index: Tensor, row_forward: Any,
                delta: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-token scores, target values and (IG) completeness gaps for one target.

        IG goes through the path a group of steps at a time, each group of ``rows // n`` steps (or one
        step in chunks of examples), accumulating the weighted gradients: no (steps x examples x tokens x
        hidden) tensor is ever made.
        """
        n = e.shape[0]
        rows = self._row_chunk(e, index, row_forward)
        opts = {"chunk_size": rows, "n_examples": n, "show_progress": self.show_progress, "row_forward": row_forward}
        if self.method != "integrated_gradients":
            g, target_scores = input_gradients(self.model, e, resolved, index=index, desc="token gradients", **opts)
            scores = g.norm(dim=-1) if self.method == "gradient" else (e * g).sum(-1)
            return scores, target_scores, None
        a_np, w_np = quadrature(self.rule, self.steps)
        alphas = torch.as_tensor(a_np, dtype=e.dtype, device=e.device)
        weights = torch.as_tensor(w_np, dtype=e.dtype, device=e.device)
        diff = e - e0
        avg = torch.zeros_like(e)
        per_group = max(1, rows // n)
        for start in range(0, alphas.numel(), per_group):
            a = alphas[start : start + per_group]
            k = a.numel()
            points = (e0[None] + a.reshape(k, 1, 1, 1) * diff[None]).reshape(k * n, *e.shape[1:])
            g, _ = input_gradients(self.model, points, resolved, index=index.repeat(k), desc="token IG", **opts)
            avg += torch.einsum("s,s...->...", weights[start : start + k], g.reshape(k, n, *e.shape[1:]))
            del points, g
        per_elem = diff * avg
        with torch.no_grad():
            f_x = torch.cat([resolved(row_forward(e[sl], index[sl]), Batch(e[sl], index[sl]))
                             for sl in chunks(n, rows)])
            gap = None
            if delta:
                f_b = torch.cat([resolved(row_forward(e0[sl], index[sl]), Batch(e0[sl], index[sl]))
                                 for sl in chunks(n, rows)])
                gap = per_elem.reshape(n, -1).sum(1) - (f_x - f_b)
        return per_elem.sum(-1), f_x, gap


def attribute_tokens(
    model: nn.Module, inputs: Any, *, target: TargetLike | None = None, method: str = "integrated_gradients",
    **options: Any,
) -> TokenAttributionResult:
    """Functional form of :class:`TokenAttribution`: ``attribute_tokens(model, texts, target=..., method=...)``.

    Args:
        model: A text model (``model(input_ids=..., attention_mask=...)``).
        inputs: Sentences, token ids ``(N, T)`` or a tokenizer output dict.
        target: What to explain (required; checked after the inputs).
        method: ``"integrated_gradients"``, ``"input_x_gradient"`` or ``"gradient"``.
        **options: Further :class:`TokenAttribution` settings.

    Returns:
        A :class:`TokenAttributionResult`.

    Raises:
        TypeError, ValueError: Empty or malformed inputs, a missing or bad target, before any work.
    """
    return TokenAttribution(model, method=method, **options).attribute(inputs, target)
