"""The measured loss/metric change of a mask or bit allocation, next to the change the Taylor expansion predicts.

For new parameters ``theta + delta`` (``delta = -w`` on pruned weights, ``Q(w) - w`` for quantised ones):

- **measured**: the mean loss (and a metric, accuracy by default) on held-out data before and after, through
  ``torch.func.functional_call`` on the changed values - the caller's model is not touched;
- **predicted, first order**: ``g . delta`` with ``g`` the mean loss gradient on the calibration data;
- **predicted, second order**: ``g . delta + 1/2 delta^T H delta``, with one Hessian-vector product ``H delta``
  (forward-over-reverse, :func:`gradsense.core.hvp.hvp`) over the calibration data - the exact quadratic
  term, not a diagonal approximation.

:class:`Measurer` caches what does not depend on the change (the held-out baseline, the gradient), so a sweep over
masks pays one pass over held-out data and one Hessian-vector product per mask.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad

from gradsense.core.checks import check_eval_mode, check_loss_batch
from gradsense.core.distributed import DataLike, all_gather_cat, all_reduce_sum, iterate
from gradsense.core.functional import check_model, functional, model_fingerprint, preserve_model
from gradsense.core.hvp import hvp
from gradsense.importance.apply import as_change, new_values

__all__ = ["Measurer", "accuracy", "measure"]

Metric = Callable[[Tensor, Tensor], float]


def accuracy(outputs: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of ``(N, C)`` logits against ``(N,)`` class labels."""
    return float((outputs.argmax(-1) == labels).double().mean())


def _auto_metric(out: Any, y: Any) -> Metric | None:
    if isinstance(out, Tensor) and isinstance(y, Tensor) and out.ndim == 2 and y.ndim == 1 and not y.is_floating_point():
        return accuracy
    return None


class Measurer:
    """Measures changes of one model's parameters on held-out data and predicts them on calibration data.

    The baseline loss and the calibration gradient are cached between calls, for the model as it is: when its
    weights or buffers change between two calls, the caches are rebuilt (and the functional copy of its buffers
    taken again). BatchNorm/Dropout must be in eval mode at every call.

    Args:
        model: The caller's module (never modified).
        loss_fn: ``(output, labels) -> scalar`` batch-mean loss.
        heldout: Data on which the change is measured.
        calibration: Data on which it is predicted (default: ``heldout``).
        metric: ``"auto"`` (accuracy for class logits and integer labels, else none), ``None``, or a callable
            ``(all outputs, all labels) -> float`` over the whole held-out set.
        batch_size: Batch size for tensors and Datasets.
        second_order: Also predict with the Hessian term (one HVP per change).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], heldout: DataLike, *,
                 calibration: DataLike | None = None, metric: str | Metric | None = "auto", batch_size: int = 256,
                 second_order: bool = True) -> None:
        check_model(model)
        if metric is not None and metric != "auto" and not callable(metric):
            raise TypeError(f"metric must be 'auto', None or a callable (outputs, labels) -> float, got {metric!r}.")
        self.model, self.loss_fn, self.batch_size, self.second_order = model, loss_fn, batch_size, second_order
        self.heldout = list(iterate(heldout, batch_size=batch_size))
        self.calibration = self.heldout if calibration is None else list(iterate(calibration, batch_size=batch_size))
        self._checked = False
        self.metric_arg = metric
        self._fm: Any = None
        self._names: tuple[str, ...] = ()
        self._base: tuple[float, float | None] | None = None
        self._grad: dict[str, Tensor] | None = None
        self._state: str | None = None  # hash of the model's weights and buffers the caches were made from

    def check(self) -> None:
        """The shared first-batch checks on the held-out and calibration data, before any work (once).

        Raises:
            ValueError, TypeError: Inputs that do not fit the model, labels missing or out of range for the
                output width, a loss that is not a scalar (see :func:`gradsense.core.checks.check_loss_batch`).
        """
        if self._checked:
            return
        sets = [("held-out data", self.heldout)]
        if self.calibration is not self.heldout:
            sets.append(("calibration data", self.calibration))
        with preserve_model(self.model):
            for what, batches in sets:
                x, y = batches[0]
                check_loss_batch(self.model, self.loss_fn, x, y, what=f"importance measurement ({what})",
                                 model=self.model, more_labels=[b[1] for b in batches[1:]])
        self._checked = True

    def _functional(self, names: list[str]) -> Any:
        if self._fm is None or not set(names) <= set(self._names):
            all_names = sorted(set(names) | set(self._names), key=list(dict(self.model.named_parameters())).index)
            self._fm, self._names, self._grad = functional(self.model, all_names), tuple(all_names), None
        return self._fm

    def _evaluate(self, fm: Any, params: Mapping[str, Tensor]) -> tuple[float, float | None]:
        total, seen = 0.0, 0
        outs, labels = [], []
        metric = None if self.metric_arg is None else (None if self.metric_arg == "auto" else self.metric_arg)
        with torch.no_grad():
            for x, y in self.heldout:
                out = fm(params, x)
                total += float(self.loss_fn(out, y)) * x.shape[0]
                seen += x.shape[0]
                if self.metric_arg is not None:
                    outs.append(out.detach() if isinstance(out, Tensor) else out)
                    labels.append(y)
        if self.metric_arg is not None and outs and all(isinstance(o, Tensor) for o in outs) and \
                all(isinstance(t, Tensor) for t in labels):
            # the metric sees every rank's outputs and labels (in rank order) under torch.distributed
            outs, labels = [all_gather_cat(torch.cat(outs))], [all_gather_cat(torch.cat(labels))]
        if self.metric_arg == "auto" and outs:
            metric = _auto_metric(outs[0], labels[0])
        value = None
        if metric is not None and outs:
            value = float(metric(torch.cat(outs), torch.cat(labels)))
        loss = float(all_reduce_sum(torch.tensor(total, dtype=torch.float64))) / float(
            all_reduce_sum(torch.tensor(float(seen), dtype=torch.float64)))
        return loss, value

    def _gradient(self, fm: Any) -> dict[str, Tensor]:
        if self._grad is None:
            g_fn = grad(lambda p, x, y: self.loss_fn(fm(p, x), y))
            acc = {k: torch.zeros_like(v) for k, v in fm.params.items()}
            seen = 0.0
            for x, y in self.calibration:
                g = g_fn(fm.params, x, y)
                for k in acc:
                    acc[k].add_(g[k].detach(), alpha=float(x.shape[0]))
                seen += x.shape[0]
            total = float(all_reduce_sum(torch.tensor(seen, dtype=torch.float64)))  # all ranks' examples
            self._grad = {k: all_reduce_sum(v) / total for k, v in acc.items()}
        return self._grad

    def _curvature(self, fm: Any, delta: dict[str, Tensor]) -> float:
        full = {k: delta.get(k, torch.zeros_like(v)) for k, v in fm.params.items()}
        acc = 0.0
        seen = 0.0
        for x, y in self.calibration:
            hv = hvp(lambda p, x=x, y=y: self.loss_fn(fm(p, x), y), fm.params, full)
            acc += float(sum((hv[k] * full[k]).sum() for k in full)) * x.shape[0]
            seen += x.shape[0]
        both = all_reduce_sum(torch.tensor([acc, seen], dtype=torch.float64))  # all ranks' sums
        return float(both[0] / both[1])

    def __call__(self, change: Any, *, state: str | None = None) -> dict[str, Any]:
        """Measure and predict the effect of ``change`` (masks or bit widths).

        Args:
            change: Masks or bit widths (a ``PruneResult``/``BitsResult`` or a plain dict).
            state: The model's weight hash (``model_fingerprint(model)["sha256"]``) when the caller has just
                computed it; otherwise it is computed here, to tell whether the caches still hold.

        Returns:
            ``{"loss_before", "loss_after", "loss_change", "metric_before", "metric_after", "metric_change",
            "metric_name", "predicted_first_order", "predicted_second_order", "changed", "sparsity"}`` (metric
            entries ``None`` without a metric; ``metric_name`` is ``"accuracy"`` for the automatic metric;
            ``sparsity`` is the fraction of the changed tensors' weights that are zero).
        """
        check_eval_mode(self.model, "importance measurement", hint=" (or measure=False)")
        self.check()
        state = model_fingerprint(self.model)["sha256"] if state is None else state
        if state != self._state:  # the model changed since the last call: nothing cached from then holds
            self._fm, self._names, self._base, self._grad, self._state = None, (), None, None, state
        kind, values = as_change(self.model, change)
        fm = self._functional(list(values))
        if self._base is None:
            self._base = self._evaluate(fm, fm.params)
        new = new_values(kind, values, fm.params)
        params = {**fm.params, **new}
        loss, metric = self._evaluate(fm, params)
        delta = {k: new[k] - fm.params[k] for k in new}
        g = self._gradient(fm)
        first = float(sum(float((g[k] * delta[k]).sum()) for k in delta))
        second = first + 0.5 * self._curvature(fm, delta) if self.second_order else None
        base_loss, base_metric = self._base
        metric_name = None
        if metric is not None:
            metric_name = "accuracy" if self.metric_arg == "auto" else getattr(self.metric_arg, "__name__", "metric")
        numel = sum(v.numel() for v in new.values())
        zeros = sum(int((v == 0).sum()) for v in new.values())
        return {
            "loss_before": base_loss,
            "loss_after": loss,
            "loss_change": loss - base_loss,
            "metric_before": base_metric,
            "metric_after": metric,
            "metric_change": None if metric is None or base_metric is None else metric - base_metric,
            "metric_name": metric_name,
            "predicted_first_order": first,
            "predicted_second_order": second,
            "changed": kind,
            "sparsity": zeros / max(numel, 1),
        }


def measure(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], data: DataLike, change: Any, *,
            calibration: DataLike | None = None, metric: str | Metric | None = "auto",
            batch_size: int = 256) -> dict[str, Any]:
    """Measured change of the loss (and accuracy) on ``data`` from ``change``, and the Taylor predictions.

    Args:
        model: The module (never modified).
        loss_fn: ``(output, labels) -> scalar`` batch-mean loss.
        data: Held-out data to measure on.
        change: Masks or bit widths (a ``PruneResult``/``BitsResult`` or a plain dict).
        calibration: Data for the predictions (default: ``data``).
        metric: ``"auto"``, ``None`` or ``(outputs, labels) -> float``.
        batch_size: Batch size for tensors and Datasets.

    Returns:
        See :meth:`Measurer.__call__`.

    Raises:
        TypeError, ValueError: A bad ``change`` or ``metric``; BatchNorm/Dropout in train mode; data that does not
            fit the model or the loss (before any work).
    """
    return Measurer(model, loss_fn, data, calibration=calibration, metric=metric, batch_size=batch_size)(change)
