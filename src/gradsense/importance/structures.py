"""Structures that can be scored and removed together: output channels, attention heads, layers.

A structure family is a :class:`UnitGroup`: one layer's ``size`` units (channels or heads) and the slices of
parameters each unit owns (:class:`Part`: unit ``u`` covers indices ``offset + u*block ... offset +
(u+1)*block - 1`` along ``dim`` of ``param``). Scores of the elements add up to the unit's score; removing a
unit zeroes all of its slices, so the unit contributes nothing downstream:

- **channels** of a ``Linear``/``Conv`` layer: its weight's output row, its bias entry, and the weight and
  bias of a ``BatchNorm`` that directly follows it in the same ``nn.Sequential`` (else the normalised zero
  channel would come out as the BatchNorm's shift). The last ``Linear``/``Conv`` of the model is left out: its
  outputs are usually the model's outputs (class logits).
- **heads** of an attention module: Hugging Face BERT-style self-attention (``query``/``key``/``value``
  with ``num_attention_heads``; the parent's ``output.dense`` columns), gradsense's ``Attention``
  (``qkv``/``proj``, ``num_heads``) and ``torch.nn.MultiheadAttention`` (``in_proj_weight``/``out_proj``):
  the head's rows of the query, key and value projections (weights and biases) and its columns of the
  output projection.
- **layers**: the parameters owned by one module (``features.0`` = its weight and bias).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LINEAR_TYPES",
    "Part",
    "UnitGroup",
    "channel_groups",
    "head_groups",
    "layer_of",
    "unit_masks",
    "unit_scores",
]

LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclasses.dataclass(frozen=True)
class Part:
    """Slices of one parameter owned by the units of a group: unit ``u`` covers
    ``[offset + u * block, offset + (u + 1) * block)`` along ``dim``."""

    param: str
    dim: int
    block: int
    offset: int = 0

    def as_list(self) -> list[Any]:
        return [self.param, self.dim, self.block, self.offset]


@dataclasses.dataclass(frozen=True)
class UnitGroup:
    """``size`` removable units of one layer (channels or heads) and the parameter slices they own."""

    name: str
    kind: str
    size: int
    parts: tuple[Part, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "size": self.size, "parts": [p.as_list() for p in self.parts]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> UnitGroup:
        return cls(str(d["name"]), str(d["kind"]), int(d["size"]), tuple(Part(*p) for p in d["parts"]))


def layer_of(name: str) -> str:
    """The module that owns parameter ``name`` (``"features.0.weight" -> "features.0"``)."""
    return name.rsplit(".", 1)[0] if "." in name else "(root)"


def _sequential_successor(model: nn.Module, module_name: str) -> tuple[str, nn.Module] | None:
    """The module right after ``module_name`` in its parent ``nn.Sequential`` (or ``None``)."""
    if "." in module_name:
        parent_name, child = module_name.rsplit(".", 1)
    else:
        parent_name, child = "", module_name
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return None
    keys = list(parent._modules)
    if child not in keys or keys.index(child) + 1 >= len(keys):
        return None
    nxt = keys[keys.index(child) + 1]
    return (f"{parent_name}.{nxt}" if parent_name else nxt), parent._modules[nxt]  # type: ignore[return-value]


def channel_groups(model: nn.Module, names: Iterable[str]) -> list[UnitGroup]:
    """Output-channel groups of the selected ``Linear``/``Conv`` weights (the model's last such layer excluded).

    Raises:
        ValueError: If no selected parameter is the weight of a ``Linear``/``Conv`` layer other than the last.
    """
    selected = set(names)
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)]
    last = linear[-1][0] if linear else None
    params = dict(model.named_parameters())
    groups = []
    for mod_name, mod in linear:
        wname = f"{mod_name}.weight" if mod_name else "weight"
        if wname not in selected or mod_name == last or wname not in params:
            continue
        if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups != 1:
            continue  # grouped/depthwise convs: a channel is not a clean row of the next layer
        parts = [Part(wname, 0, 1)]
        if getattr(mod, "bias", None) is not None:
            parts.append(Part(f"{mod_name}.bias" if mod_name else "bias", 0, 1))
        nxt = _sequential_successor(model, mod_name) if mod_name else None
        if nxt is not None and isinstance(nxt[1], nn.modules.batchnorm._BatchNorm) and nxt[1].num_features == mod.weight.shape[0]:
            for pn in ("weight", "bias"):
                if getattr(nxt[1], pn, None) is not None:
                    parts.append(Part(f"{nxt[0]}.{pn}", 0, 1))
        groups.append(UnitGroup(mod_name or "(root)", "channel", int(mod.weight.shape[0]), tuple(parts)))
    if not groups:
        raise ValueError(
            "granularity/structure 'channel' needs the weight of at least one Linear/Conv layer other than the "
            f"model's last ({last!r}, whose outputs are the model's outputs) among the selected parameters; "
            f"selected: {sorted(selected)[:6]}."
        )
    return groups


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def head_groups(model: nn.Module, names: Iterable[str]) -> list[UnitGroup]:
    """Attention-head groups whose parameters intersect the selection.

    Raises:
        ValueError: If the model has no attention module this knows (or none among the selected parameters).
    """
    selected = set(names)
    params = dict(model.named_parameters())
    groups = []
    for mod_name, m in model.named_modules():
        parts: list[Part] = []
        if all(isinstance(getattr(m, a, None), nn.Linear) for a in ("query", "key", "value")) and hasattr(
            m, "num_attention_heads"
        ):
            heads = int(m.num_attention_heads)
            d = int(getattr(m, "attention_head_size", m.query.out_features // heads))
            for proj in ("query", "key", "value"):
                for pn in ("weight", "bias"):
                    full = _join(mod_name, f"{proj}.{pn}")
                    if full in params:
                        parts.append(Part(full, 0, d))
            parent = mod_name.rsplit(".", 1)[0] if "." in mod_name else ""
            out = _join(parent, "output.dense.weight")
            if out in params and params[out].shape[1] == heads * d:
                parts.append(Part(out, 1, d))
            group_name = parent or mod_name or "(root)"
        elif isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "proj", None), nn.Linear) and hasattr(m, "num_heads"):
            heads = int(m.num_heads)
            dim = m.proj.in_features
            d = dim // heads
            for j in range(3):
                for pn in ("weight", "bias"):
                    full = _join(mod_name, f"qkv.{pn}")
                    if full in params:
                        parts.append(Part(full, 0, d, j * dim))
            parts.append(Part(_join(mod_name, "proj.weight"), 1, d))
            group_name = mod_name or "(root)"
        elif isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim:
            heads = int(m.num_heads)
            dim = m.embed_dim
            d = dim // heads
            for j in range(3):
                parts.append(Part(_join(mod_name, "in_proj_weight"), 0, d, j * dim))
                if m.in_proj_bias is not None:
                    parts.append(Part(_join(mod_name, "in_proj_bias"), 0, d, j * dim))
            parts.append(Part(_join(mod_name, "out_proj.weight"), 1, d))
            group_name = mod_name or "(root)"
        else:
            continue
        if any(p.param in selected for p in parts):
            groups.append(UnitGroup(group_name, "head", heads, tuple(parts)))
    if not groups:
        raise ValueError(
            "granularity/structure 'head' found no attention module among the selected parameters: it knows "
            "Hugging Face BERT-style self-attention (query/key/value + num_attention_heads), gradsense's "
            "Attention (qkv/proj + num_heads) and torch.nn.MultiheadAttention."
        )
    return groups


def _unit_view(t: Tensor, part: Part, size: int) -> Tensor:
    """``(size, -1)`` view of the slices of ``t`` owned by each unit."""
    moved = t.movedim(part.dim, 0)
    sl = moved[part.offset : part.offset + size * part.block]
    return sl.reshape(size, part.block, -1).reshape(size, -1)


def unit_scores(groups: Sequence[UnitGroup], scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{group: (size,) unit scores}``: the sum of the element scores of each unit's slices (selected only)."""
    out = {}
    for g in groups:
        total = None
        for part in g.parts:
            if part.param not in scores:
                continue
            s = _unit_view(scores[part.param], part, g.size).sum(1)
            total = s if total is None else total + s
        if total is None:
            raise ValueError(f"structure {g.name!r} owns no selected parameter.")
        out[g.name] = total
    return out


def unit_index(groups: Sequence[UnitGroup], offsets: Mapping[str, tuple[int, int]],
               shapes: Mapping[str, torch.Size]) -> list[Tensor]:
    """Flat-vector coordinates (of the selected parameters) of every unit, groups in order, units in order."""
    out = []
    for g in groups:
        per_unit: list[list[Tensor]] = [[] for _ in range(g.size)]
        for part in g.parts:
            if part.param not in offsets:
                continue
            start, stop = offsets[part.param]
            idx = torch.arange(start, stop).reshape(shapes[part.param])
            view = _unit_view(idx, part, g.size)
            for u in range(g.size):
                per_unit[u].append(view[u])
        out.extend(torch.cat(parts) for parts in per_unit)
    return out


def unit_masks(groups: Sequence[UnitGroup], keep: Mapping[str, Tensor],
               shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """Parameter masks (``True`` = keep) from ``{group: (size,) bool keep}``: a removed unit's slices are zeroed."""
    masks: dict[str, Tensor] = {}
    for g in groups:
        k = keep[g.name]
        for part in g.parts:
            if part.param not in shapes:
                continue
            m = masks.setdefault(part.param, torch.ones(shapes[part.param], dtype=torch.bool))
            moved = m.movedim(part.dim, 0)  # a view: writing into it writes into m
            for u in torch.nonzero(~k).reshape(-1).tolist():
                moved[part.offset + u * part.block : part.offset + (u + 1) * part.block] = False
    return masks


def numel_of(shape: Sequence[int]) -> int:
    return int(math.prod(shape))
