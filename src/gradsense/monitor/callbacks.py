"""Framework callbacks: :class:`HFCallback` for ``transformers.Trainer``, :class:`LightningCallback` for Lightning.

Both create a :class:`~gradsense.monitor.Monitor` on the trainer's model and (unwrapped) optimizer when training
starts and close it when training ends; the run is recorded exactly as in a plain loop (the optimizer's step
hooks see the gradients after the trainer's clipping). The classes are built on first use so that importing
:mod:`gradsense.monitor` does not import transformers or lightning.

- HF: the loss is read from the model output's ``loss`` at every training forward and added up over the
  step as the Trainer backpropagates it (what it logs as ``loss``); ``objectives=("loss_a",
  "loss_b")`` reads those entries of the model output (a dict or ``ModelOutput``) in the same forward hook and
  measures their conflict before the trainer's backward.
- Lightning: the loss is the one passed to backward (``on_before_backward``, times ``accumulate_grad_batches``
  in automatic optimisation, where Lightning divides it); objectives are measured by calling
  ``gs.monitor.objectives(self, task_a=..., task_b=...)`` in ``training_step``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from gradsense.monitor.monitor import Monitor
from gradsense.results.monitor import MonitorResult

__all__ = ["hf_callback_class", "lightning_callback_class"]


class _Common:
    """What both callbacks share: the settings, the monitor and its result."""

    def _setup(self, quantities: Any, log_dir: Any, kwargs: dict[str, Any]) -> None:
        if "optimizer" in kwargs:
            raise TypeError("the callback takes the optimizer from the trainer; do not pass optimizer=.")
        from gradsense.monitor.quantities import resolve_quantities

        resolve_quantities(quantities)  # bad quantities fail when the callback is made, not when training starts
        self.quantities, self.log_dir, self.kwargs = quantities, log_dir, dict(kwargs)
        self.monitor: Monitor | None = None
        self._result: MonitorResult | None = None

    def _start(self, model: Any, optimizer: Any) -> None:
        if self.monitor is not None and not self.monitor.closed:
            self.monitor.close()
        self.monitor = Monitor(model, optimizer, quantities=self.quantities, log_dir=self.log_dir, **self.kwargs)
        self._result = None

    def _end(self) -> None:
        if self.monitor is not None and not self.monitor.closed:
            self._result = self.monitor.result()
            self.monitor.close()

    def result(self) -> MonitorResult:
        """The run's :class:`~gradsense.results.MonitorResult` (while training, what was recorded so far).

        Raises:
            ValueError: Training has not started.
        """
        if self.monitor is None:
            raise ValueError("no training run was monitored yet (the monitor starts when training starts).")
        if self._result is not None and self.monitor.closed:
            return self._result
        return self.monitor.result()


@functools.cache
def hf_callback_class() -> type:
    """The ``HFCallback`` class (a ``transformers.TrainerCallback``)."""
    try:
        from transformers import TrainerCallback
    except ImportError as err:
        raise ImportError("HFCallback needs transformers: pip install gradsense[hf]") from err

    class HFCallback(_Common, TrainerCallback):
        """Monitor a ``transformers.Trainer`` run: ``Trainer(..., callbacks=[HFCallback(log_dir="runs/x")])``.

        Args:
            quantities: As :class:`~gradsense.monitor.Monitor`.
            log_dir: Run folder (``None``: in memory only; read it with :meth:`result`).
            objectives: Names of entries of the model output (dict or ``ModelOutput``) to measure conflict between,
                e.g. ``("loss_a", "loss_b")``, read at each training forward before the backward.
            **kwargs: Other :class:`~gradsense.monitor.Monitor` arguments (``every``, ``tensorboard``, ...).

        Attributes:
            monitor: The :class:`~gradsense.monitor.Monitor` of the current run.
        """

        def __init__(self, quantities: Any = "standard", log_dir: Any = None, *, objectives: tuple[str, ...] = (),
                     **kwargs: Any) -> None:
            self._setup(quantities, log_dir, kwargs)
            self.objective_names = tuple(objectives)
            if len(self.objective_names) == 1:
                raise ValueError("objectives needs at least two output names.")
            self._hooks: list[Any] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                           **kwargs: Any) -> None:
            self.kwargs.setdefault("loss_from_output", False)  # the loss is read here, as the Trainer counts it
            self._start(model, optimizer)
            assert self.monitor is not None
            self._accumulation = max(int(getattr(args, "gradient_accumulation_steps", 1) or 1), 1)
            self._step_loss: list[Tensor] = []
            self._hooks = [self.monitor.root.register_forward_hook(self._read_loss, with_kwargs=True)]
            if self.objective_names:
                self._hooks.append(self.monitor.root.register_forward_hook(self._read_objectives))

        def _read_loss(self, module: Any, _args: Any, kwargs: dict, out: Any) -> None:
            # the Trainer backpropagates output.loss as it is when the model was given num_items_in_batch (the loss
            # is then already normalised over the whole step), else divided by the accumulation steps; the step's
            # loss is the sum of what was backpropagated, as the Trainer itself logs it
            if not module.training or not torch.is_grad_enabled():
                return
            loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
            if isinstance(loss, Tensor) and loss.ndim == 0:
                scale = 1.0 if kwargs.get("num_items_in_batch") is not None else 1.0 / self._accumulation
                self._step_loss.append(loss.detach() * scale)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.monitor is not None and not self.monitor.closed and self._step_loss:
                self.monitor.log(loss=torch.stack(self._step_loss).sum())
            self._step_loss = []

        def _read_objectives(self, module: Any, _args: Any, out: Any) -> None:
            mon = self.monitor
            if mon is None or mon.closed or not module.training:
                return
            losses = {}
            for name in self.objective_names:
                value = out.get(name) if isinstance(out, Mapping) else getattr(out, name, None)
                if not isinstance(value, Tensor):
                    raise ValueError(f"HFCallback(objectives=...): the model output has no tensor {name!r}; "
                                     f"its keys: {list(out.keys()) if isinstance(out, Mapping) else type(out).__name__}.")
                losses[name] = value
            if all(v.requires_grad for v in losses.values()):
                mon.objectives(**losses)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            for h in self._hooks:
                h.remove()
            self._hooks = []
            self._end()

    HFCallback.__module__ = "gradsense.monitor"
    return HFCallback


def _lightning_bases() -> tuple[type, ...]:
    bases = []
    for mod in ("lightning.pytorch", "pytorch_lightning"):
        try:
            module = __import__(mod, fromlist=["Callback"])
            bases.append(module.Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError("LightningCallback needs lightning (pip install lightning) or pytorch_lightning.")
    return tuple(dict.fromkeys(bases))


@functools.cache
def lightning_callback_class() -> type:
    """The ``LightningCallback`` class (a ``lightning.pytorch.Callback`` and, if installed, a
    ``pytorch_lightning.Callback``)."""
    bases = _lightning_bases()

    class LightningCallback(_Common, *bases):  # type: ignore[misc]
        """Monitor a Lightning run: ``Trainer(..., callbacks=[LightningCallback(log_dir="runs/x")])``.

        Args:
            quantities: As :class:`~gradsense.monitor.Monitor`.
            log_dir: Run folder (``None``: in memory only).
            **kwargs: Other :class:`~gradsense.monitor.Monitor` arguments.

        Conflict between objectives: call ``gs.monitor.objectives(self, task_a=loss_a, task_b=loss_b)`` in
        ``training_step`` (before returning the combined loss).
        """

        def __init__(self, quantities: Any = "standard", log_dir: Any = None, **kwargs: Any) -> None:
            self._setup(quantities, log_dir, kwargs)

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            optimizers = list(trainer.optimizers)
            if len(optimizers) != 1:
                raise ValueError(f"LightningCallback monitors one optimizer; this module has {len(optimizers)}.")
            self._start(pl_module, optimizers[0])

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.monitor is not None and not self.monitor.closed:
                self.monitor.flush()  # training_step may not call pl_module itself

        def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
            if self.monitor is None or self.monitor.closed:
                return
            scale = trainer.accumulate_grad_batches if getattr(pl_module, "automatic_optimization", True) else 1
            self.monitor.log(loss=loss.detach() * scale)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self._end()

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            self._end()

    LightningCallback.__module__ = "gradsense.monitor"
    return LightningCallback
