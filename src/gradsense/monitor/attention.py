"""Attention entropy per head, measured from the attention modules' own inputs without changing the forward.

Supported modules:

- ``nn.MultiheadAttention``: its inputs and masks are captured by a forward pre-hook and the per-head
  attention probabilities are recomputed with ``F.multi_head_attention_forward(..., need_weights=True,
  average_attn_weights=False, training=False)`` under ``no_grad`` (no dropout, no random numbers);
- BERT-style attention (a module with ``query``/``key`` or ``q_proj``/``k_proj`` Linear children of equal width and
  a ``num_attention_heads``/``num_heads`` attribute, called without rotary ``position_embeddings``): the projected
  queries and keys are captured from the Linear children's outputs, the mask from the module's
  ``attention_mask`` argument (additive float or boolean), and ``softmax(q k^T * scale + mask)`` recomputed;
- a module with an ``attn_map`` child whose output is the probabilities (``gradsense.zoo``'s TinyViT).

The entropy ``-sum_j p_ij log p_ij`` (nats) of each query's distribution is averaged over the examples and the
query positions that are not padding (padding known from the key mask of self-attention).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AttentionProbe", "find_attention_modules"]


def _heads(module: nn.Module) -> int | None:
    for attr in ("num_attention_heads", "num_heads", "n_heads"):
        v = getattr(module, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def find_attention_modules(model: nn.Module) -> dict[str, str]:
    """``{module name: kind}`` with kind ``"mha"``, ``"qk"`` or ``"map"`` for the supported attention modules."""
    found: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            found[name] = "mha"
            continue
        children = dict(m.named_children())
        if isinstance(children.get("attn_map"), nn.Module):
            found[name] = "map"
            continue
        for q, k in (("query", "key"), ("q_proj", "k_proj")):
            lq, lk = children.get(q), children.get(k)
            if isinstance(lq, nn.Linear) and isinstance(lk, nn.Linear) and _heads(m) \
                    and lq.out_features == lk.out_features and lq.out_features % _heads(m) == 0:
                found[name] = "qk"
                break
    return found


def _entropy(p: Tensor, valid_q: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(sum over examples and valid queries of the entropy per head, count)`` for probabilities ``(B, H, Tq, Tk)``."""
    p = p.to(torch.promote_types(p.dtype, torch.float32))
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # (B, H, Tq)
    if valid_q is not None:
        w = valid_q.to(ent.dtype).unsqueeze(1)  # (B, 1, Tq)
        return (ent * w).sum((0, 2)), w.sum().expand(ent.shape[1]).clone()
    return ent.sum((0, 2)), torch.full((ent.shape[1],), float(ent.shape[0] * ent.shape[2]), dtype=ent.dtype,
                                       device=ent.device)


class AttentionProbe:
    """Hooks that measure attention entropy per head during the forwards of one step.

    Args:
        model: The root module.
        modules: ``{name: kind}`` from :func:`find_attention_modules`.
        active: A callable that says whether a forward should be measured (grad-enabled training forwards).

    Attributes:
        sums: ``{module name: (sum of entropies per head, count per head)}`` accumulated since :meth:`reset`.
        failed: ``{module name: reason}`` for modules whose inputs could not be read.
    """

    def __init__(self, model: nn.Module, modules: dict[str, str], active: Callable[[], bool]) -> None:
        self.model = model
        self.kinds = modules
        self.named = dict(model.named_modules())
        self.active = active
        self.sums: dict[str, tuple[Tensor, Tensor]] = {}
        self.failed: dict[str, str] = {}
        self._handles: list[Any] = []
        self._qk: dict[str, dict[str, Any]] = {}

    def attach(self) -> None:
        """Register the hooks (idempotent)."""
        if self._handles:
            return
        for name, kind in self.kinds.items():
            m = self.named[name]
            if kind == "mha":
                self._handles.append(m.register_forward_pre_hook(self._mha_hook(name), with_kwargs=True))
            elif kind == "map":
                self._handles.append(m.attn_map.register_forward_hook(self._map_hook(name)))
            else:
                q, k = ("query", "key") if hasattr(m, "query") else ("q_proj", "k_proj")
                self._handles.append(m.register_forward_pre_hook(self._qk_pre(name), with_kwargs=True))
                self._handles.append(getattr(m, q).register_forward_hook(self._store(name, "q")))
                self._handles.append(getattr(m, k).register_forward_hook(self._store(name, "k")))
                self._handles.append(m.register_forward_hook(self._qk_post(name)))

    def detach(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._qk = {}

    def reset(self) -> None:
        """Forget the sums."""
        self.sums = {}

    def _add(self, name: str, total: Tensor, count: Tensor) -> None:
        prev = self.sums.get(name)
        self.sums[name] = (total, count) if prev is None else (prev[0] + total, prev[1] + count)

    def _fail(self, name: str, err: BaseException) -> None:
        self.failed.setdefault(name, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}")

    # ----------------------------------------------------------------------------- hooks
    def _map_hook(self, name: str) -> Any:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            if not self.active() or name in self.failed or not isinstance(out, Tensor) or out.ndim != 4:
                return
            with torch.no_grad():
                self._add(name, *_entropy(out.detach(), None))

        return hook

    def _mha_hook(self, name: str) -> Any:
        def hook(m: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
            if not self.active() or name in self.failed:
                return
            try:
                names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                         "average_attn_weights", "is_causal")
                call = dict(zip(names, args))
                call.update(kwargs)
                query, key, value = call["query"], call["key"], call["value"]
                kpm, attn_mask = call.get("key_padding_mask"), call.get("attn_mask")
                with torch.no_grad():
                    if m.batch_first:
                        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
                    _, w = F.multi_head_attention_forward(
                        query.detach(), key.detach(), value.detach(), m.embed_dim, m.num_heads, m.in_proj_weight,
                        m.in_proj_bias, m.bias_k, m.bias_v, m.add_zero_attn, 0.0, m.out_proj.weight, m.out_proj.bias,
                        training=False, key_padding_mask=kpm, need_weights=True, attn_mask=attn_mask,
                        use_separate_proj_weight=not m._qkv_same_embed_dim, q_proj_weight=m.q_proj_weight,
                        k_proj_weight=m.k_proj_weight, v_proj_weight=m.v_proj_weight, average_attn_weights=False,
                        is_causal=bool(call.get("is_causal", False)) and attn_mask is not None)
                    valid = None
                    if kpm is not None and query.shape[0] == key.shape[0]:
                        valid = ~kpm if kpm.dtype == torch.bool else kpm == 0
                    self._add(name, *_entropy(w, valid))
            except Exception as err:
                self._fail(name, err)

        return hook

    def _qk_pre(self, name: str) -> Any:
        def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.active() or name in self.failed:
                return
            if kwargs.get("position_embeddings") is not None:
                self._fail(name, ValueError("rotary position embeddings are not supported"))
                return
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            self._qk[name] = {"mask": mask}

        return hook

    def _store(self, name: str, which: str) -> Any:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            slot = self._qk.get(name)
            if slot is not None and isinstance(out, Tensor):
                slot[which] = out.detach()

        return hook

    def _qk_post(self, name: str) -> Any:
        def hook(m: nn.Module, _args: Any, _out: Any) -> None:
            slot = self._qk.pop(name, None)
            if slot is None or "q" not in slot or "k" not in slot:
                return
            try:
                heads = _heads(m)
                assert heads is not None
                q, k, mask = slot["q"], slot["k"], slot["mask"]
                b, tq, width = q.shape
                d = width // heads
                scale = getattr(m, "scaling", None)
                scale = float(scale) if isinstance(scale, (int, float)) else d**-0.5
                with torch.no_grad():
                    qh = q.reshape(b, tq, heads, d).transpose(1, 2).float()
                    kh = k.reshape(b, k.shape[1], heads, d).transpose(1, 2).float()
                    scores = qh @ kh.transpose(-1, -2) * scale
                    valid = None
                    if isinstance(mask, Tensor):
                        if mask.dtype == torch.bool:
                            scores = scores.masked_fill(~mask, -math.inf)
                            keys = mask[:, 0, -1, :] if mask.ndim == 4 else None
                        else:
                            scores = scores + mask.float()
                            keys = (mask[:, 0, -1, :] > torch.finfo(mask.dtype).min / 2) if mask.ndim == 4 else None
                        if keys is not None and keys.shape[-1] == tq and keys.shape[0] == b:
                            valid = keys
                    self._add(name, *_entropy(torch.softmax(scores, dim=-1), valid))
            except Exception as err:
                self._fail(name, err)

        return hook
