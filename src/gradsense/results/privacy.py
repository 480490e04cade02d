"""Results of the gradient-leakage analyses: one reconstruction, and an audit table.

- :class:`ReconstructionResult`: what one attack recovered from one shared message: ``.inputs``, ``.labels``,
  the objective's trace, the number of model evaluations and, when the client's batch was given, PSNR, SSIM
  and label accuracy.
- :class:`AuditResult`: attack x defence x batch size -> PSNR, SSIM and label accuracy (mean and worst case),
  the accuracy cost of every defence measured by a fine-tune, epsilon where an accountant was installed, and
  the reconstructions of the first audited batch of every cell for the figures.

Figures are built with :class:`matplotlib.figure.Figure` (no pyplot state). Images are shown in their data
range (values outside it clipped), never rescaled per image: a noisy reconstruction must look noisy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradsense.results.base import Result

__all__ = ["AuditResult", "ReconstructionResult", "image_rows"]


def _fmt(x: Any, digits: int = 3, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if pct:
        return f"{100 * float(x):.0f}%"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{float(x):.{digits}g}" if not isinstance(x, str) else x


def _db(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return "inf" if math.isinf(float(x)) else f"{float(x):.1f}"


def _show(ax: Any, img: Tensor, bounds: tuple[float, float]) -> None:
    """Draw one input in its data range: grayscale for one channel, RGB for three, else the channel mean."""
    a = img.detach().to("cpu", torch.float64).numpy()
    lo, hi = bounds
    a = np.clip((a - lo) / (hi - lo), 0.0, 1.0)
    if a.ndim == 1:
        a = a[None, :]
    elif a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else (np.moveaxis(a, 0, -1) if a.shape[0] == 3 else a.mean(axis=0))
    ax.imshow(a, cmap=None if a.ndim == 3 else "gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def image_rows(rows: list[tuple[str, Tensor, list[str]]], bounds: tuple[float, float], title: str) -> Any:
    """A figure with one row of images per ``(row label, images (N, ...), captions)``, shown in ``bounds``."""
    from matplotlib.figure import Figure

    ncols = max(r[1].shape[0] for r in rows)
    side = 1.15 if ncols > 4 else 1.5
    fig = Figure(figsize=(1.6 + side * ncols, 0.35 + (side + 0.25) * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for i, (label, imgs, captions) in enumerate(rows):
        for j in range(ncols):
            ax = axes[i, j]
            if j < imgs.shape[0]:
                _show(ax, imgs[j], bounds)
                if j < len(captions) and captions[j]:
                    ax.set_title(captions[j].replace("$", r"\$"), fontsize=7)
            else:
                ax.set_axis_off()
        axes[i, 0].set_ylabel(label.replace("$", r"\$"), fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title.replace("$", r"\$"), fontsize=9)
    return fig


@dataclasses.dataclass(frozen=True, repr=False)
class ReconstructionResult(Result):
    """One attack on one shared message.

    Tensors: ``inputs`` (``(B, ...)``, absent for label-only attacks), ``labels`` (``(B,)``), ``loss_trace``
    (``(steps + 1, restarts)`` objective values), ``restart_values``; with the client's batch given,
    ``originals``, ``true_labels``, ``order`` (the reconstruction matched to each original), ``psnr`` and
    ``ssim`` per original.
    """

    kind = "privacy"

    @property
    def inputs(self) -> Tensor | None:
        """The reconstructed inputs ``(B, ...)`` (``None`` for ``"idlg"``)."""
        return self.tensors.get("inputs")

    @property
    def labels(self) -> Tensor | None:
        """The recovered (or given) labels ``(B,)``; from a gradient alone their order is unknown."""
        return self.tensors.get("labels")

    @property
    def loss_trace(self) -> Tensor:
        """The attack objective at every step, one column per restart."""
        return self.tensors.get("loss_trace", torch.zeros(0, 1))

    @property
    def n_evaluations(self) -> int:
        """Forward passes of the model on a candidate batch (each with its double backward)."""
        return int(self.meta.get("n_evaluations", 0))

    @property
    def relative_mismatch(self) -> float | None:
        """``||g(x_hat) - g|| / ||g||`` of the chosen reconstruction (optimisation attacks)."""
        v = self.meta.get("relative_mismatch")
        return None if v is None else float(v)

    @property
    def psnr(self) -> Tensor | None:
        """PSNR (dB) of every original against its matched reconstruction, when the batch was given."""
        return self.tensors.get("psnr")

    @property
    def ssim(self) -> Tensor | None:
        """SSIM of every original against its matched reconstruction, when the batch was given (images)."""
        return self.tensors.get("ssim")

    @property
    def label_accuracy(self) -> float | None:
        """Share of the true labels recovered (as multisets), when the batch was given."""
        v = self.meta.get("label_accuracy")
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    @property
    def title(self) -> str:
        return f"Reconstruction: {self.method}"

    def summary(self) -> list[tuple[str, str]]:
        rows: list[tuple[str, str]] = [("attack", f"{self.method} ({self.meta.get('reference', '')})"),
                                       ("shared", str(self.meta.get("shared", "")))]
        s = self.meta.get("settings") or {}
        for key in ("batch_size", "steps", "restarts", "distance", "tv", "lr", "labels"):
            if s.get(key) is not None:
                rows.append((key, str(s[key])))
        if self.labels is not None:
            rows.append(("recovered labels", ", ".join(str(int(v)) for v in self.labels[:32])))
        rows.append(("model evaluations", str(self.n_evaluations)))
        if self.relative_mismatch is not None:
            rows.append(("gradient mismatch", f"{self.relative_mismatch:.3g} (relative)"))
        if self.psnr is not None:
            rows.append(("PSNR", f"mean {_db(float(self.psnr.clamp(max=100).mean()))} dB, best "
                                 f"{_db(float(self.psnr.max()))} dB"))
        if self.ssim is not None:
            rows.append(("SSIM", f"mean {float(self.ssim.mean()):.3f}, best {float(self.ssim.max()):.3f}"))
        if self.label_accuracy is not None:
            rows.append(("label accuracy", f"{self.label_accuracy:.0%}"))
        for a in self.meta.get("assumptions", []):
            rows.append(("assumes", str(a)))
        if self.meta.get("wall_time_s") is not None:
            rows.append(("wall time", f"{self.meta['wall_time_s']:.2f} s"))
        return rows

    def plot(self, max_items: int = 8, **kwargs: Any) -> Any:
        """Originals (when given) above their matched reconstructions, with the PSNR of each.

        Raises:
            NotImplementedError: Label-only results have no images.
        """
        if self.inputs is None:
            raise NotImplementedError("a label-only reconstruction has no images")
        bounds = self.meta.get("settings", {}).get("bounds")
        rec = self.inputs
        if bounds is None:
            ref = self.tensors.get("originals", rec)
            bounds = (float(ref.min()), float(ref.max()) if float(ref.max()) > float(ref.min()) else float(ref.min()) + 1)
        rows = []
        n = min(max_items, rec.shape[0])
        if "originals" in self.tensors:
            order = self.tensors["order"].clamp(min=0)
            truth = self.tensors.get("true_labels")
            rows.append(("original", self.tensors["originals"][:n],
                         [f"label {int(truth[i])}" if truth is not None else "" for i in range(n)]))
            rows.append((self.method, rec[order][:n], [f"{_db(float(v))} dB" for v in self.psnr[:n]]))
        else:
            labels = self.labels
            rows.append((self.method, rec[:n], [f"label {int(labels[i])}" if labels is not None and i < labels.numel()
                                                 else "" for i in range(n)]))
        return image_rows(rows, tuple(bounds), f"{self.method}: {self.n_evaluations} model evaluations")


@dataclasses.dataclass(frozen=True, repr=False)
class AuditResult(Result):
    """A gradient-leakage audit: attack x defence x batch size.

    ``meta["rows"]`` holds one dict per cell (``attack``, ``defense``, ``batch_size``, ``psnr_mean``,
    ``psnr_worst``, ``ssim_mean``, ``ssim_worst``, ``label_acc_mean``, ``label_acc_worst``, ``evaluations``,
    ``seconds``, ``skipped``); the worst case is the most revealing image (PSNR, SSIM) or batch (labels).
    ``meta["finetune"]`` the measured accuracy of every defence; ``meta["epsilon"]`` the DP accounting.
    Tensors: ``originals/b{B}``, ``true_labels/b{B}``, ``recon/{attack}/{defence index}/b{B}`` (matched to the
    originals) and ``psnr/...`` for the first batch of every batch size.
    """

    kind = "privacy"

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The audit table, one dict per (attack, defence, batch size)."""
        return [dict(r) for r in self.meta.get("rows", [])]

    @property
    def defenses(self) -> list[str]:
        """The defences' labels, in order."""
        return [d["label"] for d in self.meta.get("defenses", [])]

    @property
    def title(self) -> str:
        return "Privacy audit: what a shared gradient gives away"

    def row(self, attack: str, defense: str, batch_size: int) -> dict[str, Any]:
        """The cell of one attack, defence (label) and batch size.

        Raises:
            KeyError: No such cell.
        """
        for r in self.rows:
            if r["attack"] == attack and r["defense"] == defense and r["batch_size"] == batch_size:
                return r
        raise KeyError(f"no audit cell ({attack!r}, {defense!r}, {batch_size}); defences: {self.defenses}.")

    def table(self) -> tuple[list[str], list[list[str]]]:
        """``(header, rows)`` of the leakage table as strings, each cell ``mean / worst`` (fits 80 columns)."""
        header = ["attack", "defence", "B", "PSNR dB", "SSIM", "labels"]

        def pair(a: Any, b: Any, f: Any) -> str:
            return "n/a" if a is None else f"{f(a)} / {f(b)}"

        def ssim2(x: float) -> str:
            text = f"{x:.2f}"
            return "0.00" if text == "-0.00" else text

        out = []
        for r in self.rows:
            if r.get("skipped"):
                out.append([r["attack"], r["defense"], str(r["batch_size"]), "skipped", "", ""])
                continue
            out.append([r["attack"], r["defense"], str(r["batch_size"]), pair(r["psnr_mean"], r["psnr_worst"], _db),
                        pair(r["ssim_mean"], r["ssim_worst"], ssim2),
                        pair(r["label_acc_mean"], r["label_acc_worst"], lambda v: _fmt(v, pct=True))])
        return header, out

    def cost_table(self) -> tuple[list[str], list[list[str]]] | None:
        """``(header, rows)``: held-out accuracy after the fine-tune with each defence, its cost against the same
        fine-tune without defence in percentage points (standard error of the paired difference), and epsilon for
        the fine-tune and for one batch's gradient (DP defences); ``None`` without ``heldout=``."""
        ft = self.meta.get("finetune")
        if not ft:
            return None
        eps = {e["defense"]: e for e in self.meta.get("epsilon", [])}
        header = ["defence", "accuracy", "cost (s.e.)", "ε fine-tune", "ε 1 batch"]
        out = []
        for d in ft["defenses"]:
            one = eps.get(d["defense"], {}).get("epsilon")
            se = d.get("cost_stderr")
            cost = f"{100 * d['accuracy_cost']:+.1f}" + ("" if se is None or math.isnan(se) else f" ({100 * se:.1f})")
            out.append([d["defense"], f"{100 * d['accuracy']:.1f}%", cost,
                        _fmt(d.get("epsilon"), 3) if "epsilon_setting" in d else "", _fmt(one, 3) if one else ""])
        return header, out

    def summary(self) -> list[tuple[str, str]]:
        s = self.meta.get("settings") or {}
        rows: list[tuple[str, str]] = [
            ("attacks", ", ".join(f"{a} ({self.meta.get('attack_references', {}).get(a, '')})" for a in s.get("attacks", []))),
            ("defences", "; ".join(f"{d['label']}: {d['description']}" for d in self.meta.get("defenses", []))),
            ("batch sizes", ", ".join(str(b) for b in s.get("batch_sizes", []))),
            ("batches per size", str(s.get("n_batches", 1))),
            ("model", str((self.meta.get("model") or {}).get("name", ""))),
        ]
        ft = self.meta.get("finetune")
        if ft:
            f = s.get("finetune", {})
            rows.append(("accuracy cost measured by", f"{f.get('steps')} rounds of federated SGD (lr {f.get('lr')}, "
                                                      f"batches of {f.get('batch_size')}) per defence; held-out "
                                                      f"accuracy before: {100 * ft['accuracy_before']:.1f}%"))
        for e in self.meta.get("epsilon", []):
            rows.append((f"epsilon, {e['defense']}", f"{_fmt(e['epsilon'], 3)} ({e['setting']}; {e['accountant']})"
                         if e["epsilon"] is not None else "no accountant installed (pip install opacus)"))
        for a in self.meta.get("assumptions", []):
            rows.append(("assumes", str(a)))
        if self.meta.get("wall_time_s") is not None:
            rows.append(("wall time", f"{self.meta['wall_time_s']:.1f} s"))
        return rows

    def _best_attack(self) -> str | None:
        scored = [r for r in self.rows if r.get("psnr_mean") is not None]
        if not scored:
            return None
        return max(scored, key=lambda r: r["psnr_mean"])["attack"]

    def plot(self, kind: str = "reconstructions", *, attack: str | None = None, batch_size: int | None = None,
             max_items: int = 8, **kwargs: Any) -> Any:
        """A figure of the audit.

        Args:
            kind: ``"reconstructions"``: originals above what ``attack`` recovered under every defence;
                ``"tradeoff"``: worst-case PSNR against the measured accuracy cost of every defence (without a
                fine-tune: worst-case PSNR per defence and batch size).
            attack: The attack to show (default: the one with the highest mean PSNR).
            batch_size: The batch size to show (default: every batch size, smallest first, up to ``max_items``).
            max_items: Images per row at most.

        Raises:
            ValueError: Unknown ``kind``.
            NotImplementedError: No attack reconstructed images (labels only).
        """
        if kind == "tradeoff":
            return self._plot_tradeoff(attack)
        if kind != "reconstructions":
            raise ValueError(f"kind must be 'reconstructions' or 'tradeoff', got {kind!r}.")
        attack = attack or self._best_attack()
        if attack is None:
            raise NotImplementedError("no attack in this audit reconstructs images")
        sizes = sorted((self.meta.get("settings") or {}).get("batch_sizes", [1]))
        if batch_size is not None:
            sizes = [batch_size]
        bounds = tuple((self.meta.get("settings") or {}).get("bounds") or (0.0, 1.0))
        take: list[tuple[int, int]] = []  # (batch size, images shown from its first batch)
        used = 0
        for b in sizes:
            k = min(b, max_items - used)
            if k > 0:
                take.append((b, k))
                used += k
        tag = (lambda b: f"B={b}: ") if len(take) > 1 else (lambda b: "")
        originals = torch.cat([self.tensors[f"originals/b{b}"][:k] for b, k in take])
        captions = [f"{tag(b)}label {int(v)}" for b, k in take for v in self.tensors[f"true_labels/b{b}"][:k]]
        rows = [("original", originals, captions)]
        for di, label in enumerate(self.defenses):
            if not all(f"recon/{attack}/{di}/b{b}" in self.tensors for b, _ in take):
                continue
            imgs = torch.cat([self.tensors[f"recon/{attack}/{di}/b{b}"][:k] for b, k in take])
            caps = [f"{tag(b)}{_db(float(v))} dB" for b, k in take for v in self.tensors[f"psnr/{attack}/{di}/b{b}"][:k]]
            rows.append((label, imgs, caps))
        sizes_text = ", ".join(str(b) for b, _ in take)
        return image_rows(rows, bounds, f"{attack}: originals and reconstructions per defence (first batch of "
                                        f"{sizes_text})")

    def _plot_tradeoff(self, attack: str | None) -> Any:
        from matplotlib.figure import Figure

        attack = attack or self._best_attack()
        rows = [r for r in self.rows if r["attack"] == attack and r.get("psnr_worst") is not None]
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = fig.subplots()
        ft = self.meta.get("finetune")
        sizes = sorted({r["batch_size"] for r in rows})
        if ft and rows:
            cost = {d["defense"]: 100 * d["accuracy_cost"] for d in ft["defenses"]}
            err = {d["defense"]: 100 * (d.get("cost_stderr") or 0.0) for d in ft["defenses"]}
            for b in sizes:
                pts = [(cost.get(r["defense"], math.nan), min(r["psnr_worst"], 60.0), r["defense"]) for r in rows
                       if r["batch_size"] == b]
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], xerr=[err.get(p[2], 0.0) for p in pts], fmt="o",
                            capsize=2, label=f"batch {b}")
                if b == sizes[0]:
                    for x, y, name in pts:
                        ax.annotate(name.replace("$", r"\$"), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel("accuracy cost of the defence (percentage points, measured by fine-tuning; bars: 1 s.e.)")
        else:
            labels = self.defenses
            for k, b in enumerate(sizes):
                vals = [next((min(r["psnr_worst"], 60.0) for r in rows if r["defense"] == d and r["batch_size"] == b),
                             math.nan) for d in labels]
                ax.bar(np.arange(len(labels)) + 0.8 * k / max(len(sizes), 1), vals, width=0.8 / max(len(sizes), 1),
                       label=f"batch {b}")
            ax.set_xticks(np.arange(len(labels)), labels=[lb.replace("$", r"\$") for lb in labels], fontsize=7)
            ax.set_xlabel("defence (no fine-tune measured: pass heldout= for the accuracy cost)")
        ax.axhline(20.0, color="0.4", ls="--", lw=0.8)
        ax.text(ax.get_xlim()[0], 20.3, "~20 dB: below, a photo is not recognisable", fontsize=7, color="0.3")
        ax.set_ylabel(f"worst-case PSNR of {attack} (dB)")
        ax.set_title("Privacy-accuracy trade-off", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return fig
