"""Results of the training-data analyses: gradient features, influence scores, data selection, alignment.

- :class:`GradientFeatures`: per-example loss gradients (optionally projected), one block per checkpoint,
  in memory or in a sharded run folder (:class:`~gradsense.results.shards.ShardStore`) read block by block.
- :class:`InfluenceResult`: ``(n_query, n_train)`` scores with ``.top(i, k)`` (proponents), ``.bottom(i, k)``
  (opponents) and a figure of each query next to its training examples.
- :class:`SelfInfluenceResult`: one score per training example (mislabel / outlier candidates first).
- :class:`SelectionResult`: LESS-style selection: the chosen pool examples and every example's cosine.
- :class:`AlignmentResult`: the ``G x G`` cosine matrix of groups' mean gradients (overall and per layer), the
  within-group coherence and the fraction of conflicting per-example pairs.
- :class:`CurvatureFactors`: fitted K-FAC / EK-FAC factors, saved once and reused.
- :class:`RetrainingResult` and :class:`LDSResult`: models retrained on random subsets, and the linear
  datamodeling score of a method against them.

Sign convention, the same for every method: **a positive score means the training example is a proponent of
the query - training on it (or upweighting it) lowers the query's loss; removing it would raise the loss.**
:data:`CONVENTIONS` states the scale of each method; the report and ``summary()`` repeat it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradsense.core.checks import check_positive_int
from gradsense.results.base import Result
from gradsense.results.shards import ShardStore, is_shard_store, load_sharded_result, save_sharded_result

__all__ = [
    "CONVENTIONS",
    "AlignmentResult",
    "CurvatureFactors",
    "GradientFeatures",
    "InfluenceResult",
    "LDSResult",
    "Ranked",
    "RetrainingResult",
    "SelectionResult",
    "SelfInfluenceResult",
]

SIGN = ("positive = proponent: training on (upweighting) the example lowers the query loss; negative = opponent: "
        "it raises it")

#: What each method's score is, in what units, normalised by what (positive = proponent everywhere).
CONVENTIONS: dict[str, str] = {
    "grad_dot": "g_q . g_z: the first-order decrease of the query loss per unit learning rate of one SGD step on "
                "z alone (loss units per lr unit; not normalised, so large-gradient examples dominate).",
    "grad_cos": "cos(g_q, g_z) in [-1, 1]: the direction of grad_dot without the gradients' norms (TracIn-cos; "
                "robust to high-loss outliers).",
    "tracin": "sum_c lr_c g_q(theta_c) . g_z(theta_c) (Pruthi et al. 2020): the query-loss decrease attributed to "
              "the SGD steps on z, summed over checkpoints weighted by their learning rates.",
    "influence": "g_q^T (H + lambda I)^-1 g_z = -I_up,loss of Koh & Liang (2017), H the curvature of the mean "
                 "training loss: the query-loss decrease per unit upweighting of z; removing z from n examples "
                 "raises the query loss by about score / n.",
    "ekfac": "g_q^T (G + lambda I)^-1 g_z with G the EK-FAC approximation of the Gauss-Newton/Fisher of the mean "
             "training loss (Grosse et al. 2023): same scale as 'influence' (removing z: about +score / n).",
    "trak": "phi_q^T (Phi^T Phi + lambda I)^-1 phi_z (1 - p_z) (TRAK, Park et al. 2023) with phi the projected "
            "gradient of the margin log p_y - log(1 - p_y): the increase of the query's margin attributed to "
            "including z (margin units; positive raises the query's correct-class margin).",
}


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


class Ranked(NamedTuple):
    """Training examples ranked for one query: their indices and scores (most extreme first)."""

    indices: Tensor
    scores: Tensor


# ----------------------------------------------------------------------------------------------- features
@dataclasses.dataclass(frozen=True, repr=False)
class GradientFeatures(Result):
    """Per-example gradient features of a dataset, one ``(n, dim)`` block per checkpoint.

    Tensors (in memory) or shards (in a run folder): ``features/<c>`` ``(n, dim)``; ``loss/<c>`` ``(n,)`` the
    per-example losses; ``prob/<c>`` ``(n,)`` the probability of the label (``target="margin"``, for TRAK).
    Meta: ``params`` (names), ``numel``, ``projection`` (how to regenerate it: kind, dim, seed, distribution),
    ``target`` (``"loss"`` or ``"margin"``), ``checkpoints`` (labels), ``lrs``, ``n``, ``dim``, ``store`` (the
    shard folder, when sharded).

    Reuse it across queries: pass it as ``train=`` to :func:`gradsense.influence.scores`.
    """

    kind = "influence"

    @property
    def n(self) -> int:
        """Number of examples."""
        return int(self.meta["n"])

    @property
    def dim(self) -> int:
        """Feature dimension (``proj_dim``, or the number of selected parameters unprojected)."""
        return int(self.meta["dim"])

    @property
    def n_checkpoints(self) -> int:
        """Number of checkpoints (blocks)."""
        return len(self.meta.get("checkpoints") or [None])

    @property
    def lrs(self) -> list[float] | None:
        """Learning rate of each checkpoint (TracIn weights), if given."""
        lrs = self.meta.get("lrs")
        return None if lrs is None else [float(v) for v in lrs]

    @property
    def target(self) -> str:
        """``"loss"`` (loss gradients) or ``"margin"`` (TRAK margin gradients)."""
        return str(self.meta.get("target", "loss"))

    @property
    def sharded(self) -> bool:
        """Whether the features live in a shard folder (read block by block)."""
        return not self.tensors and self.meta.get("store") is not None

    def _store(self) -> ShardStore:
        path = self.meta.get("store")
        if path is None or not is_shard_store(path):
            raise FileNotFoundError(
                f"the features of this result are in a shard folder that is not at {path!r} any more; open it with "
                "gradsense.influence.GradientFeatures.load(folder)."
            )
        return ShardStore.open(path)

    def _get(self, key: str) -> Tensor:
        if key in self.tensors:
            return self.tensors[key]
        if not self.sharded:
            raise KeyError(f"GradientFeatures has no {key!r}; it holds {sorted(self.tensors)}.")
        return self._store().read_all([key])[key]

    def features(self, checkpoint: int = 0) -> Tensor:
        """The ``(n, dim)`` features at ``checkpoint`` (read from the shards when sharded)."""
        return self._get(f"features/{self._check_c(checkpoint)}")

    def loss(self, checkpoint: int = 0) -> Tensor:
        """Per-example losses ``(n,)`` at ``checkpoint``."""
        return self._get(f"loss/{self._check_c(checkpoint)}")

    def prob(self, checkpoint: int = 0) -> Tensor:
        """Probability of each example's label ``(n,)`` (``target="margin"`` only)."""
        return self._get(f"prob/{self._check_c(checkpoint)}")

    def _check_c(self, c: int) -> int:
        if not 0 <= c < self.n_checkpoints:
            raise IndexError(f"checkpoint {c} out of range: these features have {self.n_checkpoints}.")
        return c

    def blocks(self, checkpoint: int = 0, *, keys: Sequence[str] = ("features",),
               rows: int = 4096) -> Iterator[tuple[slice, dict[str, Tensor]]]:
        """``(rows, {key: block})`` over the examples: shard by shard when sharded, else slices of ``rows``."""
        names = [f"{k}/{self._check_c(checkpoint)}" for k in keys]
        if self.sharded:
            for sl, t in self._store().iter_shards(names):
                yield sl, {k: t[f"{k}/{checkpoint}"] for k in keys}
            return
        for start in range(0, self.n, rows):
            sl = slice(start, min(start + rows, self.n))
            yield sl, {k: self.tensors[f"{k}/{checkpoint}"][sl] for k in keys}

    def norms(self, checkpoint: int = 0) -> Tensor:
        """Euclidean norm of every example's feature vector ``(n,)``."""
        parts = [b["features"].double().norm(dim=1) for _, b in self.blocks(checkpoint)]
        return torch.cat(parts)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> GradientFeatures:  # type: ignore[override]
        """Open features saved with ``save()`` or written to a run folder by ``features(..., out=)``.

        Raises:
            FileNotFoundError: Neither a result nor a shard folder.
            ValueError: An incomplete shard run (resume it first).
        """
        return load_sharded_result(cls, directory, resume_hint="features(..., out=folder, resume=True)")

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Save; sharded features saved into their own folder only add ``result.json`` (no copy)."""
        saved = save_sharded_result(self, directory)
        return saved if saved is not None else super().save(directory)

    @property
    def title(self) -> str:
        return f"Gradient features: {self.n} examples x {self.dim} dims"

    def summary(self) -> list[tuple[str, str]]:
        proj = self.meta.get("projection")
        rows: list[tuple[str, str]] = [
            ("examples", str(self.n)),
            ("dimension", f"{self.dim}" + ("" if proj else " (unprojected: one per selected parameter)")),
            ("gradient of", "the loss" if self.target == "loss" else "the margin log p_y - log(1 - p_y) (TRAK)"),
            ("parameters", f"{self.meta.get('numel')} in {len(self.meta.get('params', []))} tensors"),
            ("checkpoints", str(self.n_checkpoints)),
        ]
        if proj:
            rows.append(("projection", f"{proj.get('kind')} {proj.get('distribution')}, seed {proj.get('seed')}, "
                                       "regenerated from the seed (never stored)"))
        if self.sharded:
            rows.append(("stored in", str(self.meta["store"])))
        if self.meta.get("wall_time_s") is not None:
            rows.append(("wall time", f"{self.meta['wall_time_s']:.3f} s"))
        return rows

    def plot(self, **kwargs: Any) -> Any:
        """Histogram of the feature norms (large norms: high-loss or unusual examples)."""
        from matplotlib.figure import Figure

        norms = self.norms().numpy()
        fig = Figure(figsize=(6.0, 3.2), layout="constrained")
        ax = fig.subplots()
        ax.hist(norms, bins=min(50, max(5, self.n // 10)), color="#4c72b0")
        ax.set_xlabel("gradient feature norm")
        ax.set_ylabel("examples")
        ax.set_title(kwargs.get("title", f"Per-example gradient norms ({self.n} examples)"))
        return fig


# ----------------------------------------------------------------------------------------------- scores
def _image_like(x: Any) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point() and x.ndim == 3 and x.shape[0] in (1, 3) \
        and min(x.shape[1:]) >= 4


def _show(ax: Any, x: Tensor) -> None:
    img = x.detach().double().cpu()
    img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)
    ax.imshow(img.numpy(), cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


@dataclasses.dataclass(frozen=True, repr=False)
class InfluenceResult(Result):
    """Influence of every training example on every query: ``scores`` ``(n_query, n_train)``.

    Positive = proponent (training on the example lowers the query loss), negative = opponent; the scale of each
    method is in ``meta["convention"]`` (see :data:`CONVENTIONS`). Tensors: ``scores``, and when known
    ``train_labels``, ``query_labels``, ``query_loss``. Meta: ``method``, ``convention``, ``damping``, ``solver``
    (iterations, residuals, converged), ``checkpoints``, ``lrs``, ``projection``.

    Attributes:
        context: ``{"train": inputs, "query": inputs}`` of the run, for :meth:`plot` (not saved).
    """

    context: Any = dataclasses.field(default=None, compare=False)
    kind = "influence"

    @property
    def scores(self) -> Tensor:
        """``(n_query, n_train)`` scores."""
        return self.tensors["scores"]

    @property
    def n_query(self) -> int:
        return int(self.scores.shape[0])

    @property
    def n_train(self) -> int:
        return int(self.scores.shape[1])

    def _row(self, i: int) -> Tensor:
        if not -self.n_query <= i < self.n_query:
            raise IndexError(f"query {i} out of range: there are {self.n_query} queries (0..{self.n_query - 1}).")
        return self.scores[i]

    def top(self, i: int, k: int = 5) -> Ranked:
        """The ``k`` strongest proponents of query ``i`` (highest scores first)."""
        check_positive_int(k, "k")
        row = self._row(i)
        v, idx = torch.topk(row, min(k, row.numel()))
        return Ranked(idx, v)

    def bottom(self, i: int, k: int = 5) -> Ranked:
        """The ``k`` strongest opponents of query ``i`` (lowest scores first)."""
        check_positive_int(k, "k")
        row = self._row(i)
        v, idx = torch.topk(row, min(k, row.numel()), largest=False)
        return Ranked(idx, v)

    @property
    def title(self) -> str:
        return f"Influence ({self.method}): {self.n_query} queries x {self.n_train} training examples"

    def summary(self) -> list[tuple[str, str]]:
        rows: list[tuple[str, str]] = [("method", self.method), ("sign", SIGN),
                                       ("scale", str(self.meta.get("convention", CONVENTIONS.get(self.method, ""))))]
        for key in ("curvature", "damping", "solver_summary", "projection_summary", "checkpoint_summary"):
            if self.meta.get(key) is not None:
                rows.append((key.replace("_summary", ""), str(self.meta[key])))
        s = self.scores.double()
        rows.append(("scores", f"mean {float(s.mean()):+.3g}, min {float(s.min()):+.3g}, max {float(s.max()):+.3g}"))
        if self.meta.get("wall_time_s") is not None:
            rows.append(("wall time", f"{self.meta['wall_time_s']:.3f} s"))
        return rows

    def plot(self, queries: Sequence[int] | None = None, k: int = 4, *, train: Any = None, query: Any = None,
             decode: Any = None, **kwargs: Any) -> Any:
        """Each query next to its ``k`` top proponents (green) and opponents (red), with their scores.

        Images are shown as images; other inputs as their row text (``decode(x) -> str`` turns token ids into
        text). ``train``/``query`` are the input tensors (default: those of the run, when it was computed here).

        Returns:
            A matplotlib Figure.
        """
        from matplotlib.figure import Figure

        ctx = self.context or {}
        train = ctx.get("train") if train is None else train
        query = ctx.get("query") if query is None else query
        qs = list(range(min(4, self.n_query))) if queries is None else list(queries)
        tl = self.tensors.get("train_labels")
        ql = self.tensors.get("query_labels")
        images = train is not None and query is not None and _image_like(train[0]) and _image_like(query[0])
        ncols = 1 + 2 * k
        if images:
            fig = Figure(figsize=(1.25 * ncols, 1.45 * len(qs) + 0.5), layout="constrained")
            axes = fig.subplots(len(qs), ncols, squeeze=False)
            for r, i in enumerate(qs):
                _show(axes[r, 0], query[i])
                lab = f" (label {int(ql[i])})" if ql is not None else ""
                axes[r, 0].set_title(f"query {i}{lab}", fontsize=8)
                for j, (idx, val) in enumerate(zip(*self.top(i, k))):
                    ax = axes[r, 1 + j]
                    _show(ax, train[int(idx)])
                    lt = f" y={int(tl[int(idx)])}" if tl is not None else ""
                    ax.set_title(f"#{int(idx)}{lt}\n{float(val):+.2g}", fontsize=7, color="#1a7f37")
                for j, (idx, val) in enumerate(zip(*self.bottom(i, k))):
                    ax = axes[r, 1 + k + j]
                    _show(ax, train[int(idx)])
                    lt = f" y={int(tl[int(idx)])}" if tl is not None else ""
                    ax.set_title(f"#{int(idx)}{lt}\n{float(val):+.2g}", fontsize=7, color="#c0392b")
            fig.suptitle(kwargs.get("title", f"{self.method}: query | top {k} proponents (green) | top {k} opponents "
                                             "(red)"), fontsize=9)
            return fig
        fig = Figure(figsize=(7.5, 0.32 * (2 * k + 1) * len(qs) + 0.8), layout="constrained")
        axes = fig.subplots(len(qs), 1, squeeze=False)
        for r, i in enumerate(qs):
            ax = axes[r, 0]
            top, bot = self.top(i, k), self.bottom(i, k)
            idx = list(top.indices.tolist()) + list(reversed(bot.indices.tolist()))
            vals = list(top.scores.tolist()) + list(reversed(bot.scores.tolist()))

            def label(j: int) -> str:
                text = f"#{j}"
                if decode is not None and train is not None:
                    text += " " + str(decode(train[j]))[:40]
                return text

            pos = list(range(len(idx)))
            ax.barh(pos, vals, color=["#1a7f37" if v >= 0 else "#c0392b" for v in vals])
            ax.set_yticks(pos, labels=[label(j).replace("$", r"\$") for j in idx], fontsize=7)
            ax.invert_yaxis()
            qtext = f"query {i}"
            if decode is not None and query is not None:
                qtext += ": " + str(decode(query[i]))[:60]
            ax.set_title(qtext.replace("$", r"\$"), fontsize=8)
            ax.axvline(0, color="0.3", lw=0.8)
        axes[-1, 0].set_xlabel(f"{self.method} score (positive = proponent)")
        return fig


@dataclasses.dataclass(frozen=True, repr=False)
class SelfInfluenceResult(Result):
    """Self-influence ``score(z, z)`` of every example: large = the model needed z to fit z (mislabels, outliers).

    Tensors: ``scores`` ``(n,)``, ``labels`` when known. Meta: ``method``, ``convention``.
    """

    kind = "influence"

    @property
    def scores(self) -> Tensor:
        """``(n,)`` self-influence scores."""
        return self.tensors["scores"]

    def ranked(self) -> Tensor:
        """Example indices from the most to the least self-influential."""
        return torch.argsort(self.scores, descending=True)

    def top(self, k: int = 10) -> Ranked:
        """The ``k`` most self-influential examples (the first to inspect for label errors)."""
        check_positive_int(k, "k")
        v, idx = torch.topk(self.scores, min(k, self.scores.numel()))
        return Ranked(idx, v)

    def fraction_found(self, flagged: Tensor, fraction: float = 0.1) -> float:
        """Share of the ``flagged`` examples (bool mask or indices) among the top ``fraction`` by self-influence."""
        mask = flagged if flagged.dtype == torch.bool else torch.zeros(self.scores.numel(), dtype=torch.bool).index_fill_(
            0, flagged.long(), True)
        if int(mask.sum()) == 0:
            raise ValueError("fraction_found: no example is flagged.")
        k = max(1, round(fraction * self.scores.numel()))
        top = self.ranked()[:k]
        return float(mask[top].sum()) / float(mask.sum())

    @property
    def title(self) -> str:
        return f"Self-influence ({self.method}): {self.scores.numel()} examples"

    def summary(self) -> list[tuple[str, str]]:
        rows: list[tuple[str, str]] = [("method", self.method), ("scale", str(self.meta.get("convention", ""))),
                                       ("reading", "high = the example is hard to fit from the others (label "
                                                   "errors, outliers, rare cases): inspect the top first")]
        top = self.top(5)
        rows.append(("top 5", ", ".join(f"#{int(i)} ({float(v):.3g})" for i, v in zip(*top))))
        if self.meta.get("found") is not None:
            rows.append(("flagged examples found", str(self.meta["found"])))
        return rows

    def plot(self, inputs: Any = None, labels: Any = None, k: int = 12, **kwargs: Any) -> Any:
        """The ``k`` most self-influential examples as images (when ``inputs`` are images), with their labels and
        scores (flagged ones in red); otherwise every example's self-influence, sorted."""
        from matplotlib.figure import Figure

        flagged = self.tensors.get("flagged")
        labels = self.tensors.get("labels") if labels is None else labels
        if inputs is not None and _image_like(inputs[0]):
            top = self.top(k)
            cols = min(6, len(top.indices))
            rows = -(-len(top.indices) // cols)
            fig = Figure(figsize=(1.5 * cols, 1.7 * rows + 0.4), layout="constrained")
            axes = fig.subplots(rows, cols, squeeze=False)
            for ax in axes.flat:
                ax.set_axis_off()
            for j, (i, v) in enumerate(zip(*top)):
                ax = axes.flat[j]
                _show(ax, inputs[int(i)])
                ax.set_axis_on()
                bad = flagged is not None and bool(flagged[int(i)])
                lab = f" y={int(labels[int(i)])}" if labels is not None else ""
                ax.set_title(f"#{int(i)}{lab}\n{float(v):.3g}" + (" flipped" if bad else ""), fontsize=7,
                             color="#c0392b" if bad else "black")
            fig.suptitle(kwargs.get("title", f"Most self-influential examples ({self.method})"), fontsize=9)
            return fig
        order = self.ranked()
        fig = Figure(figsize=(6.4, 3.0), layout="constrained")
        ax = fig.subplots()
        s = self.scores[order].double().numpy()
        colors = None if flagged is None else ["#c0392b" if bool(flagged[int(i)]) else "#4c72b0" for i in order]
        ax.bar(range(len(s)), s, color=colors or "#4c72b0", width=1.0)
        ax.set_yscale("symlog", linthresh=max(float(abs(s).max()) * 1e-3, 1e-12))
        ax.set_xlabel("examples, most self-influential first")
        ax.set_ylabel("self-influence")
        ax.set_title(kwargs.get("title", f"Self-influence ({self.method})" + ("" if flagged is None else
                                                                              ": flagged examples in red")))
        return fig


@dataclasses.dataclass(frozen=True, repr=False)
class SelectionResult(Result):
    """Pool examples whose gradients align best with a target set's (LESS, Xia et al. 2024).

    Tensors: ``scores`` ``(n_pool,)`` (each example's cosine with the target, aggregated as ``meta["aggregate"]``),
    ``selected`` ``(k,)`` indices, best first.
    """

    kind = "influence"

    @property
    def scores(self) -> Tensor:
        return self.tensors["scores"]

    @property
    def selected(self) -> Tensor:
        return self.tensors["selected"]

    @property
    def title(self) -> str:
        return f"Data selection: {self.selected.numel()} of {self.scores.numel()} pool examples"

    def summary(self) -> list[tuple[str, str]]:
        s = self.scores.double()
        chosen = s[self.selected]
        return [("method", self.method), ("score", str(self.meta.get("convention", ""))),
                ("selected", f"{self.selected.numel()} of {s.numel()}"),
                ("cosine of the selected", f"{float(chosen.min()):+.3f} .. {float(chosen.max()):+.3f}"),
                ("cosine of the pool", f"mean {float(s.mean()):+.3f}, min {float(s.min()):+.3f}")]

    def plot(self, **kwargs: Any) -> Any:
        """Histogram of the pool's cosines with the selection threshold."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.0, 3.0), layout="constrained")
        ax = fig.subplots()
        s = self.scores.double().numpy()
        ax.hist(s, bins=40, color="#4c72b0")
        ax.axvline(float(self.scores[self.selected].min()), color="#c0392b", label="selection threshold")
        ax.set_xlabel("cosine with the target gradients")
        ax.set_ylabel("pool examples")
        ax.set_title(kwargs.get("title", f"Pool examples by alignment with the target: {self.selected.numel()} "
                                         "selected (right of the line)"), fontsize=9)
        ax.legend(fontsize=8)
        return fig


# ----------------------------------------------------------------------------------------------- alignment
@dataclasses.dataclass(frozen=True, repr=False)
class AlignmentResult(Result):
    """Gradient alignment between groups (tasks, domains, classes, objectives).

    Tensors: ``cosine`` ``(G, G)``: cosine of the groups' mean gradients; ``cosine/<layer>`` the same per layer
    (``per="layer"``); ``coherence`` ``(G,)``: mean pairwise cosine of the per-example gradients inside each group
    (1 = all examples pull the same way); ``conflict`` ``(G, G)``: fraction of per-example pairs (one from each
    group; distinct examples within a group) whose gradients conflict (cosine < 0); ``norm`` ``(G,)``: norm of
    each group's mean gradient. Meta: ``groups``, ``layers``, ``n_examples``.
    """

    kind = "influence"

    @property
    def groups(self) -> list[str]:
        return list(self.meta.get("groups", []))

    @property
    def cosine(self) -> Tensor:
        return self.tensors["cosine"]

    @property
    def layers(self) -> list[str]:
        return list(self.meta.get("layers", []))

    def layer_cosine(self, layer: str) -> Tensor:
        """``(G, G)`` cosine matrix of one layer."""
        key = f"cosine/{layer}"
        if key not in self.tensors:
            raise KeyError(f"no layer {layer!r}; layers: {self.layers[:8]} (per='layer' computes them).")
        return self.tensors[key]

    def table(self) -> tuple[list[str], list[list[str]]]:
        """``(header, rows)``: one row per pair of groups: cosine, conflicting pairs, most conflicting layer."""
        header = ["group A", "group B", "cosine", "conflicting pairs", "lowest-cosine layer"]
        rows = []
        g = self.groups
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                worst = ""
                if self.layers:
                    vals = [(float(self.layer_cosine(layer)[i, j]), layer) for layer in self.layers]
                    v, name = min(vals)
                    worst = f"{name} ({v:+.2f})"
                rows.append([g[i], g[j], f"{float(self.cosine[i, j]):+.3f}", f"{float(self.tensors['conflict'][i, j]):.0%}",
                             worst])
        return header, rows

    @property
    def title(self) -> str:
        return f"Gradient alignment of {len(self.groups)} groups"

    def summary(self) -> list[tuple[str, str]]:
        rows: list[tuple[str, str]] = [("groups", ", ".join(self.groups)),
                                       ("cosine", "of the groups' mean loss gradients: +1 aligned, 0 orthogonal, "
                                                  "-1 opposed (a step for one undoes the other)")]
        coh = self.tensors["coherence"]
        for i, name in enumerate(self.groups):
            rows.append((f"coherence of {name}", f"{float(coh[i]):+.3f} (mean pairwise cosine of its examples)"))
        for a, b, cos, conf, worst in self.table()[1][:6]:
            rows.append((f"{a} vs {b}", f"cosine {cos}, {conf} of example pairs conflict" + (f", lowest {worst}"
                                                                                          if worst else "")))
        return rows

    def plot(self, **kwargs: Any) -> Any:
        """Heatmap of the cosine matrix (and, with layers, the per-layer cosines of every pair)."""
        from matplotlib.figure import Figure

        g = self.groups
        n_pairs = len(g) * (len(g) - 1) // 2
        with_layers = bool(self.layers) and n_pairs > 0
        fig = Figure(figsize=(4.2 + (4.8 if with_layers else 0), 3.8), layout="constrained")
        axes = fig.subplots(1, 2 if with_layers else 1, squeeze=False)[0]
        ax = axes[0]
        m = self.cosine.double().numpy()
        im = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(range(len(g)), labels=g, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(g)), labels=g, fontsize=8)
        for i in range(len(g)):
            for j in range(len(g)):
                ax.text(j, i, f"{m[i, j]:+.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(m[i, j]) > 0.6 else "black")
        ax.set_title("cosine of mean gradients", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        if with_layers:
            ax2 = axes[1]
            pairs = [(i, j) for i in range(len(g)) for j in range(i + 1, len(g))]
            data = torch.stack([torch.stack([self.layer_cosine(layer)[i, j] for i, j in pairs])
                                for layer in self.layers]).double().numpy()
            im2 = ax2.imshow(data, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
            ax2.set_yticks(range(len(self.layers)), labels=self.layers, fontsize=7)
            ax2.set_xticks(range(len(pairs)), labels=[f"{g[i]}|{g[j]}" for i, j in pairs], rotation=45, ha="right",
                           fontsize=7)
            ax2.set_title("per layer", fontsize=9)
            fig.colorbar(im2, ax=ax2, fraction=0.046, pad=0.04)
        return fig


# ----------------------------------------------------------------------------------------------- factors
@dataclasses.dataclass(frozen=True, repr=False)
class CurvatureFactors(Result):
    """K-FAC / EK-FAC factors of a model's Gauss-Newton/Fisher, fitted once on training data and reused.

    Tensors per layer ``l``: ``A_vecs/l``, ``A_vals/l`` (eigenpairs of the input covariance; Embedding layers
    keep the diagonal ``A_diag/l`` only), ``S_vecs/l``, ``S_vals/l`` (output-gradient covariance) and, for
    EK-FAC, ``lambda/l`` (``out x in``: the Fisher's diagonal in the Kronecker eigenbasis, George et al. 2018).
    Meta: ``layers`` (``{name: {kind, shape, weight, bias}}``), ``strategy`` (``"kfac"``/``"ekfac"``),
    ``fisher`` (``"empirical"``/``"sampled"``), ``n_examples``.
    """

    kind = "influence"

    @property
    def strategy(self) -> str:
        return str(self.meta.get("strategy", "ekfac"))

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        return dict(self.meta.get("layers", {}))

    def eigenvalues(self, layer: str) -> Tensor:
        """The ``(out, in)`` eigenvalues of the layer's approximate curvature (EK-FAC: corrected)."""
        if f"lambda/{layer}" in self.tensors:
            return self.tensors[f"lambda/{layer}"]
        a = self.tensors.get(f"A_vals/{layer}", self.tensors.get(f"A_diag/{layer}"))
        return torch.outer(self.tensors[f"S_vals/{layer}"], a)

    @property
    def title(self) -> str:
        return f"{self.strategy.upper()} factors of {len(self.layers)} layers"

    def summary(self) -> list[tuple[str, str]]:
        rows: list[tuple[str, str]] = [("strategy", self.strategy), ("Fisher", str(self.meta.get("fisher"))),
                                       ("fitted on", f"{self.meta.get('n_examples')} examples")]
        for name, info in list(self.layers.items())[:12]:
            ev = self.eigenvalues(name).double()
            rows.append((name, f"{info['kind']} {info['shape'][0]}x{info['shape'][1]}, eigenvalues "
                               f"{float(ev.max()):.3g} .. {float(ev.min()):.3g} (mean {float(ev.mean()):.3g})"))
        return rows

    def plot(self, **kwargs: Any) -> Any:
        """Sorted eigenvalues of each layer's approximate curvature (log scale)."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 3.6), layout="constrained")
        ax = fig.subplots()
        for name in self.layers:
            ev = self.eigenvalues(name).double().reshape(-1).sort(descending=True).values
            ev = ev[ev > 0]
            if ev.numel():
                ax.plot(range(1, ev.numel() + 1), ev.numpy(), label=name, lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rank")
        ax.set_ylabel("eigenvalue")
        ax.legend(fontsize=6, ncol=2)
        ax.set_title(f"{self.strategy.upper()} eigenvalues per layer", fontsize=9)
        return fig


# ----------------------------------------------------------------------------------------------- LDS
@dataclasses.dataclass(frozen=True, repr=False)
class RetrainingResult(Result):
    """Models retrained on random subsets of the training set, and their query losses (LDS ground truth).

    Tensors: ``masks`` ``(M, n_train)`` bool (the subsets), ``losses`` ``(M, n_query)`` (query losses of the
    model trained on each subset, averaged over ``meta["seeds"]`` training seeds).
    """

    kind = "influence"

    @property
    def masks(self) -> Tensor:
        return self.tensors["masks"]

    @property
    def losses(self) -> Tensor:
        return self.tensors["losses"]

    @property
    def title(self) -> str:
        return f"Retrained models: {self.masks.shape[0]} subsets of {self.masks.shape[1]} examples"

    def summary(self) -> list[tuple[str, str]]:
        return [("subsets", str(self.masks.shape[0])), ("fraction", str(self.meta.get("fraction"))),
                ("seeds per subset", str(self.meta.get("seeds"))), ("queries", str(self.losses.shape[1])),
                ("query loss", f"mean {float(self.losses.double().mean()):.4g}, spread across subsets "
                               f"{float(self.losses.double().std(0).mean()):.3g}")]


@dataclasses.dataclass(frozen=True, repr=False)
class LDSResult(Result):
    """Linear datamodeling score (Park et al. 2023): how well summed scores rank the retrained query losses.

    Tensors: ``per_query`` ``(n_query,)`` Spearman correlations between the predicted and actual query losses over
    the subsets; ``predicted`` ``(M, n_query)`` (``-sum_{z in S} score(q, z)``, since positive = lowers the loss).
    Meta: ``lds`` (mean over queries), ``stderr`` (standard error of that mean over queries), ``subsets``.
    """

    kind = "influence"

    @property
    def value(self) -> float:
        return float(self.meta["lds"])

    @property
    def stderr(self) -> float:
        return float(self.meta["stderr"])

    @property
    def title(self) -> str:
        return f"LDS of {self.method}: {self.value:.3f} +- {self.stderr:.3f}"

    def summary(self) -> list[tuple[str, str]]:
        return [("method", self.method), ("LDS", f"{self.value:.4f} +- {self.stderr:.4f} (s.e. over queries)"),
                ("subsets", str(self.meta.get("subsets"))), ("queries", str(self.tensors["per_query"].numel())),
                ("reading", "Spearman correlation between -sum of the subset's scores and the loss of a model retrained "
                            "on that subset, averaged over queries; 1 = perfect ranking, 0 = none")]

    def plot(self, **kwargs: Any) -> Any:
        """Histogram of the per-query Spearman correlations."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5.6, 3.0), layout="constrained")
        ax = fig.subplots()
        ax.hist(self.tensors["per_query"].double().numpy(), bins=20, range=(-1, 1), color="#4c72b0")
        ax.axvline(self.value, color="#c0392b", label=f"LDS {self.value:.3f}")
        ax.set_xlabel("Spearman correlation per query")
        ax.set_ylabel("queries")
        ax.set_title(kwargs.get("title", f"LDS of {self.method}: {self.value:.3f} +- {self.stderr:.3f}"), fontsize=9)
        ax.legend(fontsize=8)
        return fig
