"""The landscape engine: a model's loss at many points in weight space, grid points as a batch dimension.

:class:`LossEvaluator` holds a model as a pure function (:func:`gradsense.core.functional.functional`)
and a dataset (its batches, cached). :meth:`LossEvaluator.evaluate` computes the dataset-average loss
(and accuracy, for class labels) at ``P`` points: a chunk of points is a stack of parameter sets, and
``torch.func.vmap`` runs :func:`torch.func.functional_call` over that stack with the inputs shared
(``in_dims=(0, None, None)``), so one pass evaluates the whole chunk. Chunk sizes come from the memory
budget (``chunk_size``/``max_memory``). When vmap cannot run the model, the engine warns and evaluates
the points one at a time with the same arithmetic. The caller's module is only a template: its
parameters, buffers, flags and hooks are never changed.

Parameters whose direction is zero everywhere (biases and BatchNorm parameters under filter
normalisation) stay unbatched, so their layers run as in an ordinary forward.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from gradsense.core.batching import chunk_size_for, chunks, estimate_example_bytes, progress
from gradsense.core.checks import check_eval_mode, check_loss_batch
from gradsense.core.distributed import DataLike, all_reduce_sum, iterate
from gradsense.core.functional import (
    ParamSpec,
    check_model,
    functional,
    training_stochastic_layers,
)
from gradsense.core.losses import model_output

__all__ = ["CPU_POINT_CHUNK_BYTES", "CPU_VMAP_MAX_BYTES", "LossEvaluator", "PointLosses", "has_stochastic_layers"]

Params = dict[str, Tensor]
LossFn = Callable[[Any, Any], Tensor]


#: On CPU, chunks of grid points are kept below this many bytes (activations of one data batch for every
#: point of the chunk, plus the stacked parameters): measured on 2 cores, per-point cost grows once a
#: chunk no longer fits the caches (bench/bench_landscape.py).
CPU_POINT_CHUNK_BYTES = 32 * 1024**2

#: With ``vectorize=None`` on CPU, points run under vmap only when one point's forward needs at most this
#: many bytes of activations. Measured on 2 cores (torch 2.13): below it, per-call overhead dominates and
#: vmap is up to 1.5x faster than a loop; above it, one point's forward already runs BLAS at full speed and
#: vmap's batched matmuls, broadcast adds and grouped convolutions make it 1.1-2x slower than a loop.
CPU_VMAP_MAX_BYTES = 2 * 1024**2


def has_stochastic_layers(model: nn.Module) -> bool:
    """True when some BatchNorm or Dropout module of ``model`` is in train mode (results depend on the batch)."""
    return bool(training_stochastic_layers(model))


def _logits(output: Any) -> Any:
    """The scores accuracy is read from: the tensor the gs.losses read (logits, first of a tuple), or ``None``."""
    try:
        return model_output(output)
    except TypeError:
        return None


@dataclasses.dataclass(frozen=True)
class PointLosses:
    """Losses at a set of points, with how they were computed.

    Attributes:
        losses: ``(P,)`` float64 dataset-average loss at each point (CPU).
        accuracy: ``(P,)`` float64 accuracy at each point, or ``None`` when the labels are not classes.
        vectorized: Whether the points ran through vmap (``False``: one at a time).
        chunk_size: Points per chunk.
        n_forward: Model calls made (a vmapped chunk over one data batch is one call).
    """

    losses: Tensor
    accuracy: Tensor | None
    vectorized: bool
    chunk_size: int
    n_forward: int


class LossEvaluator:
    """A model's dataset-average loss as a function of its (selected) parameters.

    Args:
        model: The module (used as a template through ``functional_call``, never modified).
        loss_fn: ``(output, labels) -> scalar``, the mean loss of a batch; it must work under
            ``torch.func.vmap`` for the vectorised path (``gs.losses.cross_entropy``/``mse`` do).
        data: Tensor, ``(inputs, labels)``, Dataset or DataLoader; batches are cached after the first pass.
        params: Which parameters move (see :data:`~gradsense.core.functional.ParamSpec`); the others
            and all buffers stay as they are.
        batch_size: Examples per model call for tensors and Datasets.
        allow_train_mode: Accept a train-mode model with BatchNorm/Dropout (evaluated one point at a time
            on copies of the buffers, with a forked RNG seeded by ``seed``).
        seed: Seed of the RNG fork used in train mode.
        what: Name of the calling analysis, for messages.

    Raises:
        TypeError: ``model`` is not a module or ``loss_fn`` is not callable.
        ValueError: Empty data, or a train-mode model with BatchNorm/Dropout without ``allow_train_mode``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: DataLike,
        *,
        params: ParamSpec = None,
        batch_size: int = 512,
        allow_train_mode: bool = False,
        seed: int = 0,
        what: str = "landscape",
    ) -> None:
        check_model(model)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (output, labels) -> scalar, got {type(loss_fn).__name__}.")
        self.train_mode = has_stochastic_layers(model)
        if not allow_train_mode:
            check_eval_mode(model, what, hint=" (or pass allow_train_mode=True to evaluate the train-mode function "
                                              "one point at a time)")
        self.model, self.loss_fn, self.what, self.seed = model, loss_fn, what, seed
        self.fm = functional(model, params)  # buffers are copies: a train-mode BatchNorm never moves the caller's
        self.batches = list(iterate(data, batch_size=batch_size))
        self._check_first_batch()
        local = torch.tensor(float(sum(int(x.shape[0]) for x, _ in self.batches)), dtype=torch.float64)
        self.n_examples = int(all_reduce_sum(local))  # over all ranks under torch.distributed
        self._has_accuracy: bool | None = None
        self._bytes_per_example: int | None = None
        self._vmap_failed: str | None = None

    # ------------------------------------------------------------------------------------ basics
    @property
    def params(self) -> Params:
        """The selected parameters at the model's own point (detached, not copies)."""
        return self.fm.params

    @property
    def buffers(self) -> Params:
        """Copies of the model's buffers (a train-mode BatchNorm updates these, never the caller's)."""
        return self.fm.buffers

    def _rng(self) -> Any:
        if not self.train_mode:
            return _NullContext()
        return _SeededFork(self.seed)

    def _correct(self, out: Any, y: Any) -> Tensor | None:
        logits = _logits(out)
        if (
            isinstance(y, Tensor)
            and isinstance(logits, Tensor)
            and not y.is_floating_point()
            and y.ndim == 1
            and logits.ndim == 2
            and logits.shape[1] >= 2
            and logits.shape[0] == y.shape[0]
        ):
            return (logits.argmax(-1) == y).sum()
        return None

    def _check_first_batch(self) -> None:
        """One forward of the first batch: inputs that fit the model and a scalar loss, before any work."""
        batch, labels = self.batches[0]
        # two rows say as much as the batch (train-mode BatchNorm needs the batch); every batch's labels are checked
        with self._rng():
            check_loss_batch(lambda r: self.fm(self.fm.params, r), self.loss_fn, batch, labels, what=self.what,
                             model=self.model, probe=None if self.train_mode else 2,
                             more_labels=[y for _, y in self.batches[1:]])

    def loss_at(self, values: Mapping[str, Tensor] | None = None) -> tuple[float, float | None]:
        """Loss and accuracy at one point, by the plain (unbatched) forward.

        Args:
            values: ``{name: tensor}`` replacing parameters or buffers; ``None`` is the model's own point.

        Returns:
            ``(loss, accuracy or None)``; the loss is the size-weighted mean of the batch losses, so with
            one batch it equals ``loss_fn(model(x), y)`` exactly.
        """
        p = dict(self.fm.params) if values is None else {**self.fm.params, **values}
        total = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.float64)
        seen = torch.zeros((), dtype=torch.float64)
        has_acc = True
        with torch.no_grad(), self._rng():
            for x, y in self.batches:
                out = self.fm(p, x)
                total += self.loss_fn(out, y).detach().to("cpu", torch.float64) * x.shape[0]
                c = self._correct(out, y)
                if c is None:
                    has_acc = False
                else:
                    correct += c.to("cpu", torch.float64)
                seen += x.shape[0]
        if self._has_accuracy is None:
            self._has_accuracy = has_acc
        n = float(all_reduce_sum(seen))
        acc = float(all_reduce_sum(correct)) / n if has_acc else None
        return float(all_reduce_sum(total)) / n, acc

    @property
    def has_accuracy(self) -> bool:
        """Whether the labels are class indices for a ``(N, C)`` output (accuracy is reported)."""
        if self._has_accuracy is None:
            x, y = self.batches[0]
            with torch.no_grad(), self._rng():
                self._has_accuracy = self._correct(self.fm(self.fm.params, x[:2]), None if y is None else y[:2]) \
                    is not None
        return self._has_accuracy

    def bytes_per_point(self, moving: Mapping[str, Tensor]) -> int:
        """Memory one point of a chunk needs: activations of the largest batch plus its parameters."""
        if self._bytes_per_example is None:
            x = self.batches[0][0]
            p = self.fm.params
            with self._rng():
                self._bytes_per_example = estimate_example_bytes(
                    self.model, x[:2], forward=lambda r: self.fm(p, r), factor=1.5
                )
        rows = max(int(x.shape[0]) for x, _ in self.batches)
        param_bytes = sum(t.numel() * t.element_size() for t in moving.values())
        return self._bytes_per_example * rows + 3 * param_bytes

    # ------------------------------------------------------------------------------------ many points
    def evaluate(
        self,
        make: Callable[[slice], Params],
        n_points: int,
        *,
        moving: Mapping[str, Tensor],
        static: Mapping[str, Tensor] | None = None,
        chunk_size: int | None = None,
        max_memory: int | str | None = None,
        vectorize: bool | None = None,
        show_progress: bool | None = False,
        desc: str = "loss landscape",
    ) -> PointLosses:
        """Loss (and accuracy) at ``n_points`` points.

        Args:
            make: ``make(slice) -> {name: (B, *shape) tensor}``: the values of the moving tensors at the
                points of the slice, stacked. The same values feed the vectorised and the one-at-a-time
                path, so the two differ only in how the forward runs.
            n_points: Number of points.
            moving: ``{name: tensor}`` of the tensors that move (for the memory estimate).
            static: Values that replace parameters/buffers at every point (unbatched).
            chunk_size: Points per chunk; default from the memory budget.
            max_memory: Memory budget (bytes or e.g. ``"2GB"``); on CPU the default is also capped at
                :data:`CPU_POINT_CHUNK_BYTES`.
            vectorize: ``True``: vmap (errors propagate); ``False``: one point at a time; ``None``: vmap on
                accelerators, and on CPU when one point's activations fit :data:`CPU_VMAP_MAX_BYTES`
                (else one point at a time, faster there); vmap falls back to one at a time with a
                warning when it cannot run the model.
            show_progress: Progress bar (``None``: on a TTY).
            desc: Progress bar label.

        Returns:
            A :class:`PointLosses`.

        Raises:
            ValueError: ``vectorize=True`` on a train-mode model with BatchNorm/Dropout.
        """
        if self.train_mode:
            if vectorize:
                raise ValueError(
                    f"{self.what}: vectorize=True cannot run a train-mode model with BatchNorm/Dropout under "
                    "vmap (running statistics, random masks); use vectorize=None or False."
                )
            vectorize = False
        static = dict(static or {})
        if chunk_size is None:
            per_point = self.bytes_per_point(moving)
            device = next(iter(moving.values())).device if moving else torch.device("cpu")
            budget = max_memory
            if budget is None and device.type == "cpu":
                from gradsense.core.batching import default_budget

                budget = min(default_budget(device), CPU_POINT_CHUNK_BYTES)
            size = chunk_size_for(per_point, max_memory=budget, total=n_points, device=device)
        else:
            size = chunk_size_for(1, chunk_size=chunk_size, total=n_points)
        losses = torch.zeros(n_points, dtype=torch.float64)
        correct = torch.zeros(n_points, dtype=torch.float64)
        seen = torch.zeros((), dtype=torch.float64)
        has_acc = self.has_accuracy
        fn = self._point_fn(static, has_acc)
        batched = vmap(fn, in_dims=(0, None, None))
        if vectorize is None and self._vmap_failed is None:
            use_vmap = self._vmap_pays(moving)
        else:
            use_vmap = bool(vectorize)
        n_forward = 0
        parts = list(chunks(n_points, size))
        loop_fn = fn if use_vmap else self._loop_point_fn(static, has_acc, fn)
        with torch.no_grad(), self._rng():
            for sl in progress(parts, total=len(parts), desc=desc, enabled=show_progress):
                values = make(sl)
                for x, y in self.batches:
                    if use_vmap:
                        try:
                            lv, cv = batched(values, x, y)
                            n_forward += 1
                        except (RuntimeError, NotImplementedError, ValueError, TypeError) as err:
                            if vectorize:
                                raise
                            loop_fn = self._loop_point_fn(static, has_acc, fn)
                            lv, cv = self._one_by_one(loop_fn, values, x, y)  # a real error raises here
                            n_forward += lv.shape[0]
                            use_vmap = False
                            self._vmap_failed = f"{type(err).__name__}: {str(err)[:200]}"
                            warnings.warn(
                                f"{self.what}: vmap could not run this model ({self._vmap_failed}); evaluating "
                                "the points one at a time (same results, slower).",
                                RuntimeWarning,
                                stacklevel=3,
                            )
                    else:
                        lv, cv = self._one_by_one(loop_fn, values, x, y)
                        n_forward += lv.shape[0]
                    losses[sl] += lv.detach().to("cpu", torch.float64).reshape(-1) * x.shape[0]
                    correct[sl] += cv.detach().to("cpu", torch.float64).reshape(-1)
                if sl.start == 0:
                    seen += sum(x.shape[0] for x, _ in self.batches)
        n = float(all_reduce_sum(seen))
        losses = all_reduce_sum(losses) / n
        accuracy = all_reduce_sum(correct) / n if has_acc else None
        return PointLosses(losses=losses, accuracy=accuracy, vectorized=use_vmap, chunk_size=size,
                           n_forward=n_forward)

    def _vmap_pays(self, moving: Mapping[str, Tensor]) -> bool:
        """The ``vectorize=None`` choice: always on accelerators; on CPU only for small per-point forwards."""
        device = next(iter(moving.values())).device if moving else torch.device("cpu")
        if device.type != "cpu":
            return True
        return self.bytes_per_point({}) <= CPU_VMAP_MAX_BYTES

    def _point_fn(self, static: Mapping[str, Tensor], has_acc: bool) -> Callable[..., tuple[Tensor, Tensor]]:
        fm, loss_fn = self.fm, self.loss_fn

        def point(values: Mapping[str, Tensor], x: Any, y: Any) -> tuple[Tensor, Tensor]:
            out = fm({**static, **values}, x)
            loss = loss_fn(out, y).reshape(())
            if has_acc:
                correct = (_logits(out).argmax(-1) == y).sum()
            else:
                correct = torch.zeros((), dtype=torch.int64, device=loss.device)
            return loss, correct

        return point

    def _loop_point_fn(
        self, static: Mapping[str, Tensor], has_acc: bool, fallback: Callable[..., tuple[Tensor, Tensor]]
    ) -> Callable[..., tuple[Tensor, Tensor]]:
        """The one-point-at-a-time evaluation, without a functional call per point where that is exact.

        ``functional_call`` swaps every tensor of the module in and out on each call, which costs about as
        much as a small model's forward. For an eval-mode model (forwards change no buffer) the points run
        on one private copy of the module instead, made here once per :meth:`evaluate`, whose tensors are
        pointed at each point's values (``tensor.data = value``: no copy, no functional call) before an
        ordinary forward: the very tensors the functional call would use and the same operations, so the
        same numbers. The caller's module is only read (copied).
        Train mode, tied or unmatched names, or a module that cannot be copied keep ``fallback``.
        """
        if self.train_mode:
            return fallback
        fm, loss_fn = self.fm, self.loss_fn
        try:
            twin = copy.deepcopy(fm.module)
        except Exception:  # an uncopyable module (locks, handles): the functional call works on the template
            return fallback
        slots = dict(twin.named_parameters(remove_duplicate=False))
        slots.update(dict(twin.named_buffers(remove_duplicate=False)))
        base = {**fm.frozen, **fm.buffers, **fm.params, **static}
        if set(slots) != set(base) or len({id(t) for t in slots.values()}) != len(slots):
            return fallback  # tied weights or names the functional call would resolve differently
        for n, t in base.items():
            if slots[n].shape != t.shape or slots[n].dtype != t.dtype or slots[n].device != t.device:
                return fallback
        with torch.no_grad():  # the copy keeps every module's train/eval flag; values as the template's
            for n, t in base.items():
                slots[n].copy_(t)
        def point(values: Mapping[str, Tensor], x: Any, y: Any) -> tuple[Tensor, Tensor]:
            for n, v in values.items():
                t = slots.get(n)
                if t is None or t.shape != v.shape or t.dtype != v.dtype or t.device != v.device:
                    return fallback(values, x, y)
                t.data = v
            out = twin(x)
            loss = loss_fn(out, y).reshape(())
            if has_acc:  # the same count as the vmapped ``.sum()``, without a reduction's set-up per point
                correct = (_logits(out).argmax(-1) == y).count_nonzero()
            else:
                correct = torch.zeros((), dtype=torch.int64, device=loss.device)
            return loss, correct

        return point

    @staticmethod
    def _one_by_one(
        fn: Callable[..., tuple[Tensor, Tensor]], values: Mapping[str, Tensor], x: Any, y: Any
    ) -> tuple[Tensor, Tensor]:
        b = next(iter(values.values())).shape[0] if values else 1
        rows = {k: v.unbind(0) for k, v in values.items()}  # every point's views at once, not one select each
        ls, cs = [], []
        for i in range(b):
            loss, c = fn({k: r[i] for k, r in rows.items()}, x, y)
            ls.append(loss)
            cs.append(c)
        return torch.stack(ls), torch.stack(cs)


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _SeededFork:
    """Fork torch's CPU RNG and seed it, so train-mode Dropout neither depends on nor changes global state."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        self._fork.__exit__(*exc)
