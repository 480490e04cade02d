"""Result of an input-attribution method."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from gradsense.results.base import Result

__all__ = ["AttributionResult"]


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
