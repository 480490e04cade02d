"""What every importance score shares: checked set-up, the gradient statistics, activation norms, aggregation.

:class:`Context` holds the model as a pure function of the selected parameters and computes, once each and only
when a score asks for it:

- the mean loss gradient ``g = (1/N) sum_n grad l_n`` (one forward+backward per data batch, ``torch.func.grad``);
- per-example statistics from ``vmap(grad(...))`` in chunks under a memory budget: the same mean and the
  empirical Fisher diagonal ``F = (1/N) sum_n (grad l_n)^2`` (falls back to one example at a time, with a
  warning, for models whose forward does not vmap - Hugging Face attention masks);
- activation norms ``||X_j|| = sqrt((1/N) sum_{n, positions} x_j^2)`` of each selected ``Linear``/``Conv``
  weight's input feature ``j`` (a ``Conv``'s features are its unfolded patches), from forward pre-hooks that are
  removed on exit.

Data goes through :func:`gradsense.core.distributed.iterate`; the caller's module is used through
``torch.func.functional_call`` and is never changed.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from gradsense.core.batching import chunk_size_for, chunks, estimate_example_bytes
from gradsense.core.checks import check_eval_mode, check_loss_batch
from gradsense.core.distributed import DataLike, all_reduce_sum, iterate, num_examples
from gradsense.core.functional import FunctionalModel, ParamSpec, check_model, functional, select_parameters
from gradsense.core.zeroth import vmap_failure
from gradsense.importance.structures import LINEAR_TYPES, UnitGroup, layer_of, unit_scores

__all__ = [
    "GRANULARITIES",
    "Context",
    "LossFn",
    "MethodOutput",
    "aggregate",
    "check_train_mode",
    "default_params",
    "resolve_params",
]

LossFn = Callable[[Any, Any], Tensor]
GRANULARITIES = ("weight", "channel", "head", "layer")


@dataclasses.dataclass
class MethodOutput:
    """What a score function returns: final scores at the granularity, plus extra tensors and metadata."""

    scores: dict[str, Tensor]
    tensors: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def default_params(name: str, p: Tensor, owner: dict[str, nn.Module]) -> bool:
    """The default selection: weights (2+ dims) of ``Linear``/``Conv`` layers."""
    return isinstance(owner.get(layer_of(name)), LINEAR_TYPES) and name.endswith("weight") and p.ndim >= 2


def resolve_params(model: nn.Module, params: ParamSpec) -> dict[str, Tensor]:
    """Selected parameters (``None``: every ``Linear``/``Conv`` weight).

    Raises:
        ValueError: If the selection is empty, with what the model has.
    """
    if params is None:
        modules = dict(model.named_modules())
        chosen = {n: p for n, p in model.named_parameters() if default_params(n, p, modules)}
        if not chosen:
            names = [n for n, _ in model.named_parameters()][:6]
            raise ValueError(
                f"{type(model).__name__} has no Linear/Conv weight to score (parameters: {names}). "
                "Pass params= (a regex, names, a module type or a callable) to choose parameters."
            )
        return chosen
    try:
        chosen = select_parameters(model, params)
    except ValueError as err:
        raise ValueError(f"importance: {err} Parameters of the model: "
                         f"{[n for n, _ in model.named_parameters()][:8]}.") from err
    bad = [n for n, p in chosen.items() if not p.is_floating_point()]
    if bad:
        raise ValueError(f"importance: the selected parameters must be floating point; not so: {bad[:4]}.")
    return chosen


def check_train_mode(model: nn.Module) -> None:
    """Refuse BatchNorm/Dropout in train mode anywhere in the model (its scores would depend on the batch and chance)."""
    check_eval_mode(model, "importance")


class Context:
    """The model, loss and calibration data of one importance run, with lazily computed statistics.

    Args:
        model: The caller's module (never modified).
        loss_fn: ``(output, labels) -> scalar`` batch-mean loss.
        data: Calibration data (tensor, ``(inputs, labels)``, Dataset or DataLoader).
        names: The selected parameter names.
        batch_size: Batch size for tensors and Datasets.
        max_memory: Memory budget of one vmap call (bytes or e.g. ``"1GB"``).
        chunk_size: Examples per vmap call (default from the budget).

    Attributes:
        fm: The functional model over the selected parameters.
        n_grad_batches: Batch gradient passes made (for cost accounting).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: DataLike, names: list[str], *, batch_size: int = 256,
                 max_memory: int | str | None = None, chunk_size: int | None = None) -> None:
        check_model(model)
        self.model, self.loss_fn, self.data, self.names = model, loss_fn, data, list(names)
        self.batch_size, self.max_memory, self.chunk_size = batch_size, max_memory, chunk_size
        self.fm: FunctionalModel = functional(model, self.names)
        self.params = self.fm.params
        self._batches: list[tuple[Tensor, Any]] | None = None
        self._grad: dict[str, Tensor] | None = None
        self._stats: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None
        self._norms: dict[str, Tensor] | None = None
        self.n_grad_batches = 0
        self.n_example_grads = 0
        self.n_forward_batches = 0

    # ------------------------------------------------------------------------------------------- data
    def batches(self) -> list[tuple[Tensor, Any]]:
        """The calibration batches ``(inputs, labels)`` (read once through ``iterate``, then cached)."""
        if self._batches is None:
            self._batches = list(iterate(self.data, batch_size=self.batch_size))
        return self._batches

    @property
    def n_examples(self) -> int:
        """Calibration examples over all ranks (a collective under torch.distributed: every rank reads it)."""
        return int(self._total(float(sum(int(x.shape[0]) for x, _ in self.batches()))))

    def _total(self, seen: float) -> float:
        return float(all_reduce_sum(torch.tensor(seen, dtype=torch.float64)))

    def loss(self, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """Mean loss over the calibration data at ``params`` (default: the model's)."""
        p = self.params if params is None else dict(params)
        total = None
        seen = 0.0
        with torch.no_grad():
            for x, y in self.batches():
                v = self.loss_fn(self.fm(p, x), y).detach() * x.shape[0]
                total = v if total is None else total + v
                seen += x.shape[0]
                self.n_forward_batches += 1
        assert total is not None
        return all_reduce_sum(total) / self._total(seen)

    def check_loss(self) -> None:
        """The shared first-batch check (:func:`gradsense.core.checks.check_loss_batch`): inputs that fit the model,
        labels the loss can take (every cached batch's, against the output width), a floating-point scalar loss."""
        batches = self.batches()
        x, y = batches[0]
        check_loss_batch(lambda r: self.fm(self.params, r), self.loss_fn, x, y, what="importance", model=self.model,
                         more_labels=[b[1] for b in batches[1:]])

    # ------------------------------------------------------------------------------------------- gradients
    def mean_grad(self) -> dict[str, Tensor]:
        """``g = (1/N) sum_n grad l_n`` of the selected parameters (batch gradients weighted by batch size)."""
        if self._grad is not None:
            return self._grad
        if self._stats is not None:
            self._grad = self._stats[0]
            return self._grad
        fm, loss_fn = self.fm, self.loss_fn

        def batch_loss(p: dict[str, Tensor], x: Tensor, y: Any) -> Tensor:
            return loss_fn(fm(p, x), y)

        g_fn = grad(batch_loss)
        acc = {k: torch.zeros_like(v) for k, v in self.params.items()}
        seen = 0.0
        for x, y in self.batches():
            g = g_fn(self.params, x, y)
            for k in acc:
                acc[k].add_(g[k].detach(), alpha=float(x.shape[0]))
            seen += x.shape[0]
            self.n_grad_batches += 1
        total = self._total(seen)
        self._grad = {k: all_reduce_sum(v) / total for k, v in acc.items()}
        return self._grad

    def _example_chunk(self, x: Tensor) -> int:
        if self.chunk_size is not None:
            return chunk_size_for(1, chunk_size=self.chunk_size, total=x.shape[0])
        try:
            per = estimate_example_bytes(self.model, x[:1], forward=lambda r: self.fm(self.params, r))
        except Exception:  # an estimate only
            per = 16 * 1024**2
        item = next(iter(self.params.values())).element_size()
        per += 3 * item * self.fm.numel
        return chunk_size_for(per, max_memory=self.max_memory, total=x.shape[0], device=x.device)

    def per_example_stats(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(mean gradient, empirical Fisher diagonal)`` from per-example gradients ``vmap(grad(l_n))``.

        ``F = (1/N) sum_n (d l_n / d theta)^2`` with ``l_n = loss_fn(model(x_n), y_n)`` on a batch of one.
        """
        if self._stats is not None:
            return self._stats
        fm, loss_fn = self.fm, self.loss_fn

        def example_loss(p: dict[str, Tensor], x: Tensor, y: Any) -> Tensor:
            return loss_fn(fm(p, x.unsqueeze(0)), None if y is None else y.unsqueeze(0)).reshape(())

        g1 = {k: torch.zeros_like(v) for k, v in self.params.items()}
        g2 = {k: torch.zeros_like(v) for k, v in self.params.items()}
        seen = 0.0
        use_vmap = True
        single = grad(example_loss)
        for x, y in self.batches():
            size = self._example_chunk(x)
            fn = vmap(single, in_dims=(None, 0, None if y is None else 0))
            for sl in chunks(x.shape[0], size):
                ys = None if y is None else y[sl]
                if use_vmap:
                    try:
                        g = fn(self.params, x[sl], ys)
                    except (RuntimeError, NotImplementedError) as err:
                        if not vmap_failure(err):
                            raise
                        warnings.warn(
                            f"per-example gradients under vmap failed ({type(err).__name__}: {str(err)[:100]}); "
                            "computing one example at a time.",
                            RuntimeWarning,
                            stacklevel=3,
                        )
                        use_vmap = False
                if not use_vmap:
                    rows = [single(self.params, x[i], None if y is None else y[i]) for i in range(sl.start, sl.stop)]
                    g = {k: torch.stack([r[k] for r in rows]) for k in g1}
                for k in g1:
                    gk = g[k].detach()
                    g1[k].add_(gk.sum(0))
                    g2[k].add_((gk * gk).sum(0))
                self.n_example_grads += sl.stop - sl.start
            seen += x.shape[0]
        total = self._total(seen)
        mean = {k: all_reduce_sum(v) / total for k, v in g1.items()}
        fisher = {k: all_reduce_sum(v) / total for k, v in g2.items()}
        self._stats = (mean, fisher)
        return self._stats

    # ------------------------------------------------------------------------------------------- activations
    def input_norms(self) -> dict[str, Tensor]:
        """``{weight name: ||X_j||}`` shaped to broadcast against the weight (``(1, in)`` or ``(1, C, k, k)``).

        ``||X_j|| = sqrt((1/N) sum_n sum_positions x_{n, position, j}^2)``: the RMS over examples of the l2 norm
        of input feature ``j`` over the example's tokens/positions (a conv's features are its unfolded patches).

        Raises:
            ValueError: A selected parameter that is not the weight of a ``Linear``/``Conv1d``/``Conv2d`` layer
                (dilated and strided convs are fine; grouped convs are not).
        """
        if self._norms is not None:
            return self._norms
        modules = dict(self.model.named_modules())
        owners: dict[str, nn.Module] = {}
        for n in self.names:
            m = modules.get(layer_of(n))
            if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) or not n.endswith("weight") or (
                isinstance(m, nn.modules.conv._ConvNd) and (m.groups != 1 or m.padding_mode != "zeros")
            ):
                raise ValueError(
                    f"activation-norm scores (gblm, wanda, ecoflap) need weights of Linear/Conv1d/Conv2d layers "
                    f"(no groups, zero padding); {n!r} is not one. Pass params= to select such weights only."
                )
            owners[n] = m
        sums: dict[str, Tensor] = {}

        def make_hook(name: str, m: nn.Module) -> Callable[..., None]:
            def hook(_mod: nn.Module, inputs: tuple[Any, ...]) -> None:
                x = inputs[0].detach()
                if isinstance(m, nn.Linear):
                    s = (x * x).reshape(-1, x.shape[-1]).sum(0).reshape(1, -1)
                else:
                    if isinstance(m, nn.Conv1d):
                        x = x.unsqueeze(2)
                        k, d, p, st = (1, m.kernel_size[0]), (1, m.dilation[0]), (0, m.padding[0]), (1, m.stride[0])
                    else:
                        k, d, p, st = m.kernel_size, m.dilation, m.padding, m.stride
                    if isinstance(p, str):
                        raise ValueError(f"{name}: padding={p!r} is not supported for activation norms; use ints.")
                    cols = F.unfold(x, kernel_size=k, dilation=d, padding=p, stride=st)  # (N, C*k*k, L)
                    s = (cols * cols).sum((0, 2)).reshape(1, *m.weight.shape[1:])
                sums[name] = s if name not in sums else sums[name] + s

            return hook

        handles = []
        try:
            for n, m in owners.items():
                handles.append(m.register_forward_pre_hook(make_hook(n, m)))
            seen = 0.0
            with torch.no_grad():
                for x, _y in self.batches():
                    self.fm(self.params, x)
                    seen += x.shape[0]
                    self.n_forward_batches += 1
        finally:
            for h in handles:
                h.remove()
        total = self._total(seen)
        out = {}
        for n in owners:
            s = sums.get(n)
            if s is None:  # the layer never ran: its inputs are (as far as the data shows) zero
                s = torch.zeros((1, *self.params[n].shape[1:]), dtype=self.params[n].dtype, device=self.params[n].device)
            out[n] = torch.sqrt(all_reduce_sum(s) / total)
        self._norms = out
        return out


def aggregate(elements: Mapping[str, Tensor], granularity: str, groups: list[UnitGroup]) -> dict[str, Tensor]:
    """Element scores -> scores at ``granularity``: as they are, summed per unit, or summed per layer."""
    if granularity == "weight":
        return {k: v.detach() for k, v in elements.items()}
    if granularity in ("channel", "head"):
        return unit_scores(groups, elements)
    out: dict[str, Tensor] = {}
    for k, v in elements.items():
        layer = layer_of(k)
        out[layer] = out[layer] + v.sum() if layer in out else v.sum()
    return out


def data_size(data: DataLike) -> int:
    """Number of examples (raises the engine's clear errors for bad ``data``)."""
    n = num_examples(data)
    if n == 0:
        raise ValueError("data is empty: need at least one example.")
    return n
