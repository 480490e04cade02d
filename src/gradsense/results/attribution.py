"""Result of an input-attribution method."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradsense.results.base import Result

__all__ = ["AttributionResult", "DatasetAttribution"]


@dataclasses.dataclass(frozen=True, repr=False)
class AttributionResult(Result):
    """Attribution maps shaped like the inputs, plus the target value of each example.

    Tensors: ``attributions`` (like inputs), ``inputs``, ``scores`` (target value per example) and,
    for methods with a completeness gap, ``delta`` (per example).
    """

    kind = "attribution"

    required_tensors = ("attributions", "inputs", "scores")

    @property
    def attributions(self) -> Tensor:
        """Attribution map, same shape as the inputs."""
        return self.tensors["attributions"]

    @property
    def inputs(self) -> Tensor:
        """The inputs that were explained."""
        return self.tensors["inputs"]

    @property
    def scores(self) -> Tensor:
        """The target value of each example at its input."""
        return self.tensors["scores"]

    @property
    def delta(self) -> Tensor | None:
        """Completeness gap ``sum(attr) - (F(x) - F(baseline))`` per example, where defined."""
        return self.tensors.get("delta")

    @property
    def title(self) -> str:
        return f"Attribution: {self.method}"

    def summary(self) -> list[tuple[str, str]]:
        rows = super().summary()
        rows.insert(1, ("target", str(self.meta.get("target", ""))))
        rows.insert(2, ("examples", str(self.attributions.shape[0])))
        if self.delta is not None:
            rows.append(("max |delta|", f"{self.delta.abs().max().item():.3g}"))
        return rows

    def plot(self, max_items: int = 8, **kwargs: Any) -> Any:
        """Inputs next to their attribution maps (images), or per-feature bars (tabular)."""
        from gradsense.viz.figures import attribution_grid

        titles = self.meta.get("titles")
        signed = bool(self.meta.get("signed", True))
        feature_names = self.meta.get("feature_names")
        opts: dict[str, Any] = {"titles": titles, "signed": signed, "max_items": max_items}
        if feature_names:
            opts["feature_names"] = feature_names
        opts.update(kwargs)
        return attribution_grid(self.inputs.float(), self.attributions.detach().float(), **opts)

    def sum_per_example(self) -> Tensor:
        """Sum of the attribution over all input dimensions, per example."""
        return self.attributions.reshape(self.attributions.shape[0], -1).sum(1)

    def to(self, dtype: torch.dtype) -> AttributionResult:
        """A copy with floating tensors cast to ``dtype``."""
        return dataclasses.replace(
            self, tensors={k: v.to(dtype) if v.is_floating_point() else v for k, v in self.tensors.items()}
        )


# ----------------------------------------------------------------------------------------------- datasets
@dataclasses.dataclass(frozen=True, repr=False)
class DatasetAttribution(Result):
    """Attribution maps of every example of a dataset, in memory or in a sharded run folder, with aggregates.

    Made by :func:`gradsense.attribution.attribute_dataset`. Per example (read shard by shard, never all at once
    unless asked): ``attributions`` (like one input), ``scores`` (the target value), ``classes`` (the class each
    example is grouped under, ``-1`` for none) and, for methods with a completeness gap, ``delta``.

    The aggregates are computed from the shards in order, in float64 (so a resumed run aggregates bitwise as an
    uninterrupted one): :meth:`mean_abs_per_feature` (mean ``|attribution|`` of every input element over all
    examples), :meth:`mean_abs_per_class` (one number per class) and :meth:`mean_abs_per_class_feature`.

    Meta: ``n``, ``shard_rows``, ``input_shape``, ``n_classes``, ``target``, ``group_by``, ``feature_names``,
    ``store`` (the shard folder, when sharded).
    """

    kind = "attribution"

    cache: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    # ------------------------------------------------------------------------------------- reading
    @property
    def n(self) -> int:
        """Number of examples."""
        return int(self.meta["n"])

    @property
    def sharded(self) -> bool:
        """Whether the maps live in a shard folder (read shard by shard)."""
        return "attributions" not in self.tensors and self.meta.get("store") is not None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example's map."""
        return tuple(int(s) for s in self.meta["input_shape"])

    def _store(self) -> Any:
        from gradsense.results.shards import ShardStore, is_shard_store

        path = self.meta.get("store")
        if path is None or not is_shard_store(path):
            raise FileNotFoundError(f"the maps of this result are in a shard folder that is not at {path!r} any more; "
                                    "open it with gradsense.results.DatasetAttribution.load(folder).")
        return ShardStore.open(path)

    def blocks(self, keys: Sequence[str] = ("attributions",)) -> Iterator[tuple[slice, dict[str, Tensor]]]:
        """``(rows, {key: block})`` over the examples, one shard at a time, in order.

        Raises:
            KeyError: A key the result does not hold.
        """
        missing = [k for k in keys if k not in self.keys()]
        if missing:
            raise KeyError(f"DatasetAttribution has no {missing}; it holds {self.keys()}.")
        if self.sharded:
            yield from self._store().iter_shards(list(keys))
            return
        rows = int(self.meta["shard_rows"])
        for start in range(0, self.n, rows):
            sl = slice(start, min(start + rows, self.n))
            yield sl, {k: self.tensors[k][sl] for k in keys}

    def keys(self) -> list[str]:
        """The per-example tensors held (``attributions``, ``scores``, ``classes``, maybe ``delta``/``inputs``)."""
        return list(self.meta.get("keys") or sorted(self.tensors))

    def maps(self, index: int | slice | None = None, *, key: str = "attributions") -> Tensor:
        """The attribution maps of examples ``index`` (an int, a slice, or ``None`` for all), read lazily.

        Only the shards holding those examples are read.

        Raises:
            IndexError: An example outside ``0..n-1``.
        """
        if index is None:
            index = slice(0, self.n)
        if isinstance(index, int):
            if not -self.n <= index < self.n:
                raise IndexError(f"example {index} is outside 0..{self.n - 1}.")
            i = index % self.n
            return self.maps(slice(i, i + 1), key=key)[0]
        start, stop, step = index.indices(self.n)
        if not self.sharded:
            return self.tensors[key][start:stop:step]
        store = self._store()
        rows = store.shard_rows
        parts = []
        for s in range(start // rows, -(-stop // rows) if stop > start else start // rows):
            sl = store.rows(s)
            block = store.read(s, [key])[key]
            parts.append(block[max(start - sl.start, 0):max(min(stop, sl.stop) - sl.start, 0)])
        out = torch.cat(parts) if parts else torch.empty((0, *self.input_shape))
        return out[::step]

    @property
    def attributions(self) -> Tensor:
        """All maps ``(n, *input_shape)`` (read from every shard: mind the memory on big datasets)."""
        return self.maps()

    @property
    def scores(self) -> Tensor:
        """The target value of each example ``(n,)``."""
        return self.maps(key="scores")

    @property
    def classes(self) -> Tensor:
        """The class each example is grouped under ``(n,)`` (``-1``: none)."""
        return self.maps(key="classes")

    # ------------------------------------------------------------------------------------- aggregates
    def aggregates(self) -> dict[str, Tensor]:
        """Sums over the shards, in order, in float64 (computed once, then cached).

        Returns:
            ``sum_abs`` (``input_shape``: sum of ``|a|`` over all examples), ``sum_abs_class``
            (``(n_classes, *input_shape)``), ``count_class`` (``(n_classes,)`` examples per class), ``n``.
        """
        if "aggregates" not in self.cache:
            n_classes = int(self.meta.get("n_classes") or 0)
            total = torch.zeros(self.input_shape, dtype=torch.float64)
            per_class = torch.zeros((n_classes, *self.input_shape), dtype=torch.float64)
            counts = torch.zeros(n_classes, dtype=torch.int64)
            for _, b in self.blocks(("attributions", "classes")):
                a = b["attributions"].to(torch.float64).abs()
                total += a.sum(0)
                c = b["classes"].to(torch.int64)
                keep = (c >= 0) & (c < n_classes)
                if bool(keep.any()):
                    per_class.index_add_(0, c[keep], a[keep])
                    counts += torch.bincount(c[keep], minlength=n_classes)
            self.cache["aggregates"] = {"sum_abs": total, "sum_abs_class": per_class, "count_class": counts,
                                        "n": torch.tensor(self.n)}
        return self.cache["aggregates"]

    def mean_abs_per_feature(self) -> Tensor:
        """Mean ``|attribution|`` of every input element over all examples (``input_shape``, float64)."""
        return self.aggregates()["sum_abs"] / self.n

    def mean_abs_per_class_feature(self) -> Tensor:
        """Mean ``|attribution|`` of every input element over the examples of each class
        (``(n_classes, *input_shape)``, float64; NaN for a class without examples)."""
        agg = self.aggregates()
        counts = agg["count_class"].to(torch.float64).reshape(-1, *([1] * len(self.input_shape)))
        return agg["sum_abs_class"] / counts

    def mean_abs_per_class(self) -> Tensor:
        """Mean ``|attribution|`` over the examples of each class and all their input elements
        (``(n_classes,)``, float64; NaN for a class without examples)."""
        agg = self.aggregates()
        per = agg["sum_abs_class"].reshape(agg["sum_abs_class"].shape[0], -1).sum(1)
        numel = max(1, int(torch.Size(self.input_shape).numel()))
        return per / (agg["count_class"].to(torch.float64) * numel)

    def class_counts(self) -> Tensor:
        """Examples per class ``(n_classes,)``."""
        return self.aggregates()["count_class"]

    # ------------------------------------------------------------------------------------- display, files
    @property
    def title(self) -> str:
        return f"Attribution over a dataset: {self.method}, {self.n} examples"

    def summary(self) -> list[tuple[str, str]]:
        rows = super().summary()
        rows.insert(1, ("target", str(self.meta.get("target", ""))))
        rows.insert(2, ("examples", str(self.n)))
        rows.insert(3, ("shards", f"{-(-self.n // int(self.meta['shard_rows']))} ({self.meta['shard_rows']} examples each)"))
        if self.meta.get("resumed_shards"):
            rows.append(("resumed", f"{self.meta['resumed_shards']} shards were already done"))
        if self.sharded:
            rows.append(("stored in", str(self.meta["store"])))
        return rows

    def plot(self, max_items: int = 10, **kwargs: Any) -> Any:
        """Mean ``|attribution|`` per class (images: one map per class; tabular: bars of the top features)."""
        from gradsense.viz.figures import attribution_grid

        counts = self.class_counts()
        present = [c for c in range(counts.shape[0]) if int(counts[c]) > 0][:max_items]
        names = self.meta.get("class_names")
        if present:
            maps = self.mean_abs_per_class_feature()[present]
            titles = [f"class {names[c] if names and c < len(names) else c} (n={int(counts[c])})" for c in present]
        else:
            maps, titles = self.mean_abs_per_feature().unsqueeze(0), [f"all {self.n} examples"]
        opts: dict[str, Any] = {"titles": titles, "signed": False, "max_items": max_items,
                                "title": f"mean |attribution| ({self.method})"}
        if self.meta.get("feature_names"):
            opts["feature_names"] = self.meta["feature_names"]
        opts.update(kwargs)
        return attribution_grid(None, maps.float(), **opts)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> DatasetAttribution:  # type: ignore[override]
        """Open a result saved with ``save()`` or written to a folder by ``attribute_dataset(..., out=)``.

        Raises:
            FileNotFoundError: Neither a result nor a shard folder.
            ValueError: An incomplete shard run (resume it first).
        """
        from gradsense.results.shards import load_sharded_result

        return load_sharded_result(cls, directory, resume_hint="attribute_dataset(..., out=folder, resume=True)")

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Save; a sharded result saved into its own folder only adds ``result.json`` (no copy of the maps)."""
        from gradsense.results.shards import save_sharded_result

        saved = save_sharded_result(self, directory, cache={})
        return saved if saved is not None else super().save(directory)
