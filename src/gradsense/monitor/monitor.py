"""The training monitor: per-step gradient statistics of any training loop, read through hooks.

How it reads a step (the optimizer's own hooks, so a plain loop needs no extra call):

1. **End of every backward.** A post-accumulate-grad hook on each trainable parameter queues a callback that
   runs when the backward pass ends (after a ``DistributedDataParallel`` all-reduce, which queues its own
   callback first). It reads every parameter's ``.grad`` norm with one ``torch._foreach_norm``: the
   accumulated gradient *before* any clipping. With gradient accumulation the last backward before the step
   gives the step's values.
2. **Optimizer step pre-hook** (``Optimizer.register_step_pre_hook``; for a ``step(closure)`` the closure is
   wrapped and this runs after it returns). The gradients the optimizer is about to use are compared with
   those of step 1 by identity and autograd version counter; if clipping (or anything else) changed them in
   place, their norms are read again: the norm *after* clipping and the clip factor come from the actual
   gradients. The parameters are copied (for the update norm) and their norms read.
3. **Optimizer step post-hook.** ``||w_new - w_old||`` per parameter from the copy (one ``_foreach_sub_`` and
   one ``_foreach_norm``), the scheduled quantities (per-example statistics, rotation, curvature), then the
   record of the step. It is written once the step's loss may still arrive (``mon.log(loss=...)`` after
   ``optimizer.step()``): at the next training forward or backward, or at :meth:`Monitor.result`/:meth:`close`.

Training is never changed: nothing writes to ``.grad``, parameters, buffers or optimizer state, no random
number is drawn from the global generators (curvature uses its own seeds and restores the RNG state), and the
hooks are removed by :meth:`close`. The same seed gives bitwise the same weights with and without a monitor.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradsense.core.checks import check_out_dir, check_positive_int
from gradsense.core.distributed import all_reduce_sum, num_examples, world
from gradsense.core.functional import check_model, model_fingerprint, preserve_model
from gradsense.core.per_example import PerExampleNorms
from gradsense.monitor.attention import AttentionProbe, find_attention_modules
from gradsense.monitor.quantities import QUANTITIES, resolve_quantities
from gradsense.monitor.stats import (
    FewSpikeDetector,
    ScalarSpikeDetector,
    SpikeDetector,
    gram_cosines,
    noise_estimates,
    ratio_of_means,
)
from gradsense.results.monitor import Alarm, MonitorLog, MonitorResult

__all__ = ["Monitor", "objectives"]

_ACTIVE: dict[int, weakref.ReferenceType[Monitor]] = {}
_OWN_PREFIXES = frozenset({"grad_norm", "grad_norm_clipped", "weight_norm", "update_norm", "update_ratio", "gns",
                           "gns2", "snr", "coherence", "rotation", "attn_entropy", "curvature", "cos", "loss",
                           "objective_grad_norm", "clip_factor", "nonfinite_grads"})  # id(model) -> the monitor attached most recently


def objectives(model: nn.Module, **losses: Tensor) -> None:
    """Measure gradient conflict between named losses with the monitor attached to ``model``.

    For code that has the model but not the monitor (e.g. a LightningModule's ``training_step``:
    ``gs.monitor.objectives(self, task_a=loss_a, task_b=loss_b)``). Call it before ``backward()``.

    Raises:
        ValueError: No open monitor is attached to ``model`` (or see :meth:`Monitor.objectives`).
    """
    ref = _ACTIVE.get(id(model))
    mon = ref() if ref is not None else None
    if mon is None or mon.closed:
        raise ValueError("no open gradsense Monitor is attached to this model; create one with "
                         "gs.monitor.Monitor(model, optimizer) (or the HF/Lightning callback) first.")
    mon.objectives(**losses)


def _unwrap_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers (accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer)."""
    seen = 0
    while seen < 5:
        inner = getattr(opt, "optimizer", None) or getattr(opt, "_optimizer", None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not opt:
            opt, seen = inner, seen + 1
            continue
        break
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or None), got {type(opt).__name__}.")
    return opt


def _unwrap_model(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def _strip(name: str) -> str:
    """A parameter or module name without the prefix ``torch.compile``'s wrapper adds."""
    return name[len("_orig_mod."):] if name.startswith("_orig_mod.") else ("" if name == "_orig_mod" else name)


def _loss_from_output(out: Any) -> Tensor | None:
    loss = getattr(out, "loss", None) if not isinstance(out, Mapping) else out.get("loss")
    if loss is None and isinstance(out, Mapping):
        return None
    if isinstance(loss, Tensor) and loss.ndim == 0 and loss.is_floating_point():
        return loss
    return None


def _norms(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """2-norms of tensors as one float64 vector on ``device`` (accumulated in at least float32)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64, device=device)
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    devices = {t.device for t in tensors}
    if len(devices) == 1:
        return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=acc)).to(device, torch.float64)
    out = torch.zeros(len(tensors), dtype=torch.float64, device=device)
    for dev in devices:
        idx = [i for i, t in enumerate(tensors) if t.device == dev]
        vals = torch.stack(torch._foreach_norm([tensors[i] for i in idx], 2, dtype=acc))
        out[torch.tensor(idx, device=device)] = vals.to(device, torch.float64)
    return out


class Monitor:
    """Record gradient statistics of a model while it trains, per step, with alarms.

    Attach it to a model and its optimizer; it reads every optimizer step through
    ``Optimizer.register_step_pre_hook``/``register_step_post_hook`` and the end of every backward through
    parameter hooks, so the training loop itself needs no change. ``close()`` (or leaving a ``with`` block)
    removes every hook.

    Args:
        model: The module being trained (a ``DistributedDataParallel`` wrapper is looked through; layer names are
            the inner module's).
        optimizer: Its ``torch.optim.Optimizer`` (wrappers of accelerate and Lightning are looked through). ``None``:
            the first optimizer that steps parameters of ``model`` (a global optimizer hook, removed by ``close``).
        quantities: ``"cheap"``, ``"standard"``, ``"full"``, a list of names, or ``{name: every}``
            (see :mod:`gradsense.monitor.quantities` for what each costs).
        every: Record every ``every``-th optimizer step (schedules count in steps too).
        log_dir: Run folder to write as training goes (``LOG_DIR/monitor/``: safetensors shards, JSON lines and an
            atomic manifest; readable while running and after a crash; see :mod:`gradsense.results.monitor`).
            On close the final :class:`~gradsense.results.MonitorResult` is saved there as well. With a log_dir the
            rows are not kept in memory (:meth:`result` reads them back), so long runs take no growing memory.
        tensorboard: ``True`` (``LOG_DIR/tensorboard``) or a folder: TensorBoard event files (needs ``tensorboard``).
        per: ``"module"`` (per-layer scalars), ``"parameter"``, or both as a tuple.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss of a step combines its examples. Only the absolute
            values of ``|G|^2`` and ``tr(Sigma)`` depend on it (``B_simple``, SNR and coherence do not): with
            ``"mean"`` they are in units of the gradient of one example's loss when the step's loss is the mean over
            its examples (gradient accumulation dividing each micro-batch loss by the number of micro-batches, as
            HF and Lightning do).
        loss_fn: ``(output, labels) -> scalar`` for curvature on ``held_out``.
        held_out: ``(inputs, labels)`` (or a Dataset/DataLoader) for curvature.
        alarm_threshold: z-score above which a per-layer norm or the loss is a spike (default 6: a log value more
            than 6 running standard deviations above its prediction from the running level and trend, see
            :class:`~gradsense.monitor.stats.SpikeDetector`). With the default floor, no series alarms on a
            one-step jump below ``exp(6 * 0.2) = 3.3`` times its predicted value; 4 clean 1000-step runs of the
            bundled digits CNN reached at most z = 5.3.
        alarm_warmup: Steps before alarms may be raised.
        alarm_decay: Memory of the residual variance (0.98: about 50 steps).
        alarm_floor: Minimum standard deviation of the log values (0.2 = 20%).
        gns_window: Steps of per-step noise estimates averaged before dividing (``gns``, ``gns_stderr``).
        compact_every: Steps per safetensors shard of the log.
        curvature_hvp: Hessian-vector products per curvature estimate (top eigenvalue, trace) on a due step.
        max_memory: Budget for per-example work (bytes or e.g. ``"1GB"``).
        resume: Append to an existing log in ``log_dir`` (steps continue after its last one).
        loss_from_output: Read the loss from the model output's ``loss`` (attribute or key) at each training forward
            (averaged over the step's forwards).
        grad_scaler: The ``torch.amp.GradScaler`` of a mixed-precision loop: gradients at the end of backward are
            scaled by it, so their norms are divided by its scale (``grad_norm`` is then the unscaled norm before
            clipping). Steps the scaler skips (non-finite gradients) call no optimizer hook and are not recorded.
        seed: Seed of the monitor's own random numbers (curvature probes); the global RNG is never used.
        name: Model name for the result's metadata.

    Raises:
        TypeError, ValueError: Bad arguments, before any hook is registered or file written.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with Monitor(model, opt, quantities="cheap") as mon:
        ...     for _ in range(3):
        ...         opt.zero_grad()
        ...         loss = model(torch.randn(8, 3)).pow(2).mean()
        ...         loss.backward()
        ...         opt.step()
        ...         mon.log(loss=loss)
        >>> res = mon.result()
        >>> res.scalars["grad_norm"].shape
        torch.Size([3])
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any = None,
        *,
        quantities: Any = "standard",
        every: int = 1,
        log_dir: str | Path | None = None,
        tensorboard: bool | str | Path = False,
        per: str | Sequence[str] = "module",
        loss_reduction: str = "mean",
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        held_out: Any = None,
        alarm_threshold: float = 6.0,
        alarm_warmup: int = 50,
        alarm_decay: float = 0.98,
        alarm_floor: float = 0.2,
        gns_window: int = 50,
        compact_every: int = 1000,
        curvature_hvp: int = 100,
        max_memory: int | str | None = None,
        resume: bool = False,
        loss_from_output: bool = True,
        grad_scaler: Any = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        # ---------------------------------------------------------------- checks (nothing registered yet)
        check_model(model)
        self.model = model
        self.root = _unwrap_model(model)
        self.every = check_positive_int(every, "every")
        self.schedule = resolve_quantities(quantities)
        self.quantities = list(self.schedule)
        pers = (per,) if isinstance(per, str) else tuple(per)
        if not pers or any(p not in ("module", "parameter") for p in pers):
            raise ValueError(f"per must be 'module', 'parameter' or both, got {per!r}.")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")
        if not (isinstance(alarm_threshold, (int, float)) and alarm_threshold > 0):
            raise ValueError(f"alarm_threshold must be a positive number, got {alarm_threshold!r}.")
        if not 0.0 < float(alarm_decay) < 1.0:
            raise ValueError(f"alarm_decay must be in (0, 1), got {alarm_decay!r}.")
        check_positive_int(alarm_warmup, "alarm_warmup", minimum=0)
        check_positive_int(gns_window, "gns_window")
        check_positive_int(compact_every, "compact_every")
        self.curvature_hvp = check_positive_int(curvature_hvp, "curvature_hvp", minimum=8)
        check_positive_int(seed, "seed", minimum=0)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (output, labels) -> scalar, got {type(loss_fn).__name__}.")
        if log_dir is not None:
            check_out_dir(log_dir, "log_dir")
        if "curvature" in self.schedule:
            if isinstance(held_out, torch.Tensor):
                raise ValueError("held_out holds inputs only, but curvature needs a loss: pass held_out=(inputs, labels).")
            if held_out is None or loss_fn is None:
                if isinstance(quantities, str):
                    del self.schedule["curvature"]  # a preset asks for it only where it can be had
                    self.quantities.remove("curvature")
                else:
                    raise ValueError("quantity 'curvature' needs held_out=(inputs, labels) and loss_fn=.")
            else:
                if not callable(loss_fn):
                    raise TypeError(f"loss_fn must be callable (output, labels) -> scalar, got {type(loss_fn).__name__}.")
                if num_examples(held_out) == 0:
                    raise ValueError("held_out is empty.")
        named = [(_strip(n), p) for n, p in self.root.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameter that requires grad: nothing to monitor.")
        self.optimizer: torch.optim.Optimizer | None = None
        if optimizer is not None:
            if isinstance(optimizer, (list, tuple)):
                if len(optimizer) != 1:
                    raise ValueError(f"one optimizer per monitor, got {len(optimizer)}; create one Monitor per optimizer.")
                optimizer = optimizer[0]
            self.optimizer = _unwrap_optimizer(optimizer)
            owned = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
            if not any(id(p) in owned for _, p in named):
                raise ValueError("the optimizer holds none of the model's trainable parameters.")
        tb_dir: Path | None = None
        if tensorboard:
            if tensorboard is True:
                if log_dir is None:
                    raise ValueError("tensorboard=True writes to LOG_DIR/tensorboard: give log_dir=, or a folder.")
                tb_dir = Path(log_dir) / "tensorboard"
            else:
                tb_dir = Path(tensorboard)
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError as err:
                raise ImportError("tensorboard= needs the tensorboard package: pip install tensorboard") from err
        if log_dir is not None:
            existing = Path(log_dir) / "monitor" / "manifest.json"
            if existing.is_file() and not resume:
                raise ValueError(f"{log_dir} already holds a monitor log; use another log_dir, delete it, or pass "
                                 "resume=True to append to it.")
        self.loss_reduction = loss_reduction
        self.loss_from_output = bool(loss_from_output)
        if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}.")
        self.grad_scaler = grad_scaler
        self.loss_fn, self.held_out = loss_fn, held_out
        self.max_memory = max_memory
        self.seed = seed
        self.gns_window = gns_window
        self.name = name
        self.rank, self.world_size = world()
        self.closed = False

        # ---------------------------------------------------------------- parameters, layers, groups
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.device = self.params[0].device
        layer_of = [n.rsplit(".", 1)[0] if "." in n else "(root)" for n in self.param_names]
        self.layers = list(dict.fromkeys(layer_of))
        groups: list[str] = []
        index_rows: list[list[int]] = []
        if "module" in pers:
            groups += self.layers
            index_rows += [[i for i, lay in enumerate(layer_of) if lay == layer] for layer in self.layers]
        if "parameter" in pers:
            groups += [n for n in self.param_names if n not in groups]
            index_rows += [[i] for i, n in enumerate(self.param_names) if n not in self.layers]
        self.groups = groups
        assign = torch.zeros(len(self.params), len(groups), dtype=torch.float64)
        for g, rows in enumerate(index_rows):
            assign[rows, g] = 1.0
        # norms are accumulated in float32, or float64 where a parameter is float64; rows of one buffer hold the
        # step's per-parameter norms: 0 gradient at the end of backward, 1 gradient used, 2 weight, 3 update
        self._acc = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        # every parameter in the accumulation dtype (then so are their .grad, which torch keeps in the parameter's
        # dtype): _foreach_norm needs no dtype argument (the same values, without its conversion path)
        self._norm_kw: dict[str, Any] = {} if all(p.dtype == self._acc for p in self.params) else {"dtype": self._acc}
        self._one_device = len({p.device for p in self.params}) == 1
        self._update_due = self._weight_due = False
        self._buf = torch.zeros(4, len(self.params), dtype=self._acc, device=self.device)
        self._assign64 = assign.to(self.device)
        self._assign_np = assign.numpy()
        self._module_groups = [g for g in range(len(groups)) if groups[g] in self.layers]
        self._mods_prefix = self._module_groups == list(range(len(self._module_groups)))
        layer_index = {lay: i for i, lay in enumerate(self.layers)}
        self._param_layer = torch.tensor([layer_index[lay] for lay in layer_of])

        # ---------------------------------------------------------------- columns
        q = self.schedule
        self.columns: list[str] = []
        self._col: dict[str, int] = {}
        core = []
        if "loss" in q:
            core.append("loss")
        if "grad_norm" in q:
            core += ["grad_norm", "grad_norm_clipped", "clip_factor", "nonfinite_grads"]
            core += [f"grad_norm/{g}" for g in groups]
        if "weight_norm" in q:
            core += [f"weight_norm/{g}" for g in groups]
        if "update" in q:
            core += [f"update_norm/{g}" for g in groups]
            core += [f"update_ratio/{g}" for g in groups]
        for c in core:
            self._column(c)
        self._core_columns = frozenset(core)
        # where each per-group block of the core columns starts (the groups are consecutive columns)
        self._starts = {q: self._col[f"{q}/{groups[0]}"] for q in ("grad_norm", "weight_norm", "update_norm",
                                                                    "update_ratio") if f"{q}/{groups[0]}" in self._col}

        # ---------------------------------------------------------------- state
        self._step = 0
        self._handles: list[Any] = []
        self._bw_count = 0  # backwards since the last step
        self._bw_queued = False
        self._have_bw = False
        self._bw_grads: list[Tensor | None] | None = None
        self._bw_versions: list[int] | None = None

        self._used_modified = False
        self._nonfinite: list[str] = []
        self._used_grads: list[Tensor | None] | None = None

        self._snapshot: list[Tensor] | None = None
        self._snap_idx: list[int] = []
        self._owned_key: tuple[int, ...] = ()
        self._recording = False
        self._losses: list[Tensor] = []
        self._extras: dict[str, float] = {}
        self._pending: dict[str, Any] | None = None
        self._rows: list[tuple[int, np.ndarray]] = []
        self._alarms: list[Alarm] = []
        self._quiet = 0
        self._warned: set[str] = set()
        self.disabled: dict[str, str] = {}
        self._micro: list[tuple[float, Tensor]] = []  # (examples, per-group squared norm) of micro-batch gradients
        self._micro_grads: dict[int, Tensor] = {}
        self._micro_handles: list[Any] = []
        self._micro_mark = 0  # per-example forwards seen at the last backward's end
        self._gns_hist: deque[tuple[float, float]] = deque(maxlen=gns_window)  # (trace, |G|^2) per step
        self._gns2_hist: deque[tuple[float, float]] = deque(maxlen=gns_window)
        self._z_hist: deque[tuple[int, np.ndarray]] = deque(maxlen=6)
        self._spikes: SpikeDetector | FewSpikeDetector | None = None
        self._loss_spikes: ScalarSpikeDetector | None = None
        if "alarms" in q:
            opts = {"threshold": alarm_threshold, "decay": alarm_decay, "warmup": alarm_warmup, "floor": alarm_floor}
            n_series = 2 * len(self._module_groups)
            self._spikes = FewSpikeDetector(n_series, **opts) if n_series <= 32 else SpikeDetector(n_series, **opts)
            self._loss_spikes = ScalarSpikeDetector(**opts)
        self.alarm_threshold = float(alarm_threshold)
        self._pe: PerExampleNorms | None = None
        if "gns" in q:
            budget = None
            if max_memory is not None:
                from gradsense.core.batching import parse_memory

                budget = parse_memory(max_memory)
            self._pe = PerExampleNorms(self.root, dict(named), max_memory=budget)
        self._attn: AttentionProbe | None = None
        if "attention" in q:
            found = find_attention_modules(self.root)
            if found:
                self._attn = AttentionProbe(self.root, found, self._training_forward)
        self._init: list[Tensor] | None = None
        if "rotation" in q:
            self._init = [p.detach().clone() for p in self.params]
        self._t0 = time.perf_counter()
        self._meta_settings = {
            "quantities": dict(q), "every": every, "per": list(pers), "loss_reduction": loss_reduction,
            "alarm_threshold": alarm_threshold, "alarm_warmup": alarm_warmup, "alarm_decay": alarm_decay,
            "alarm_floor": alarm_floor, "gns_window": gns_window, "seed": seed, "world_size": self.world_size,
            "optimizer": type(self.optimizer).__name__ if self.optimizer is not None else None,
        }

        # ---------------------------------------------------------------- writers (rank 0), then hooks
        self._log: MonitorLog | None = None
        self._tb: Any = None
        self.log_dir = Path(log_dir) if log_dir is not None else None
        if self.rank == 0 and log_dir is not None:
            self._log = MonitorLog(log_dir, self._static_meta(), compact_every=compact_every, resume=resume)
            if resume and self._log.last_step is not None:
                self._step = self._log.last_step + 1
        if self.rank == 0 and tb_dir is not None:
            from gradsense.monitor.writers import TensorBoardWriter

            self._tb = TensorBoardWriter(tb_dir)
        self._attach()
        _ACTIVE[id(model)] = weakref.ref(self)
        if self.root is not model:
            _ACTIVE[id(self.root)] = weakref.ref(self)

    # ============================================================================ attach / detach
    def _attach(self) -> None:
        for p in self.params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._on_accumulate))
        self._handles.append(self.root.register_forward_pre_hook(self._on_forward_pre, with_kwargs=True))
        self._handles.append(self.root.register_forward_hook(self._on_forward))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_step_pre))
            self._handles.append(self.optimizer.register_step_post_hook(self._on_step_post))
        else:
            from torch.optim.optimizer import (
                register_optimizer_step_post_hook,
                register_optimizer_step_pre_hook,
            )

            self._handles.append(register_optimizer_step_pre_hook(self._on_any_step_pre))
            self._handles.append(register_optimizer_step_post_hook(self._on_any_step_post))
        self._prepare_step()

    def close(self) -> None:
        """Finish the last step, remove every hook, close the writers (the log is compacted and marked closed, and
        the final result is saved in ``log_dir``). Safe to call twice."""
        if self.closed:
            return
        try:
            self._finalize()
        finally:
            self.closed = True
            for h in self._handles + self._micro_handles:
                h.remove()
            self._handles, self._micro_handles = [], []
            if self._pe is not None:
                self._pe.detach()
            if self._attn is not None:
                self._attn.detach()
            self._snapshot = None
            self._bw_grads = None
            for key in (id(self.model), id(self.root)):
                ref = _ACTIVE.get(key)
                if ref is not None and ref() is self:
                    del _ACTIVE[key]
            if self._tb is not None:
                self._tb.close()
            if self._log is not None:
                self._log.close(**self._dynamic_meta())
                from gradsense.results.run import RunFolder

                assert self.log_dir is not None
                RunFolder(self.log_dir).save_result(self.result(), "monitor")

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ============================================================================ public API
    @property
    def step(self) -> int:
        """Number of optimizer steps seen (the index the next step will get)."""
        return self._step

    def log(self, **scalars: Any) -> None:
        """Record scalars at the current step: ``loss`` (averaged over the step's micro-batches) and any others.

        Called after ``optimizer.step()`` and before the next forward, the values belong to the step just taken;
        otherwise to the step in progress. Tensors are read without a device sync until the step is written.

        Raises:
            ValueError: A value that is not a real number or a one-element tensor, a name the monitor itself records
                (other than ``loss``), or a closed monitor.
        """
        if self.closed:
            raise ValueError("the monitor is closed: log() needs an open monitor.")
        for key in scalars:
            if key != "loss" and (key in self._core_columns or key.split("/")[0] in _OWN_PREFIXES):
                raise ValueError(f"log({key}=...): {key!r} is a name the monitor records itself; choose another name.")
        for key, value in scalars.items():
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    raise ValueError(f"log({key}=...) needs a number or a one-element tensor, got shape "
                                     f"{tuple(value.shape)}.")
                value = value.detach().reshape(())
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"log({key}=...) needs a number or a one-element tensor, got {type(value).__name__}.")
            target = self._pending if self._pending is not None else None
            if key == "loss":
                if "loss" not in self.schedule:
                    continue
                val = value if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)
                (target["losses"] if target is not None else self._losses).append(val)
            else:
                (target["extras"] if target is not None else self._extras)[key] = value

    def flush(self) -> None:
        """Finish the last step now: a loss or scalars logged afterwards belong to the next step.

        The monitor does this by itself at the model's next training forward; call it when training code does not
        call the model passed to the monitor (a LightningModule whose ``training_step`` calls submodules).
        """
        self._finalize()

    def objectives(self, **losses: Tensor) -> None:
        """Measure the conflict between named losses' gradients at this step (call before ``backward()``).

        Each objective's gradient is computed with ``torch.autograd.grad(..., retain_graph=True)`` - no ``.grad``
        is touched and no graph is kept afterwards - then the pairwise cosines, globally and per layer, are recorded
        as ``cos/<a>|<b>`` and ``cos/<a>|<b>/<layer>``, with ``loss/<name>`` and ``objective_grad_norm/<name>``.

        A summed loss passed as objectives is refused: the monitor walks each objective's autograd graph (up to
        a few hundred nodes) and refuses one that is the same tensor or graph node as another, or whose graph
        contains another objective's node (``total = loss_a + loss_b`` next to ``loss_a``); a loss whose graph was
        already freed by a ``backward()`` is refused too (call ``objectives`` before ``backward``).

        Args:
            **losses: At least two named scalar losses that require grad.

        Raises:
            ValueError: Fewer than two objectives, a non-scalar or detached one, a summed loss, or a freed graph.
        """
        if self.closed:
            raise ValueError("the monitor is closed.")
        if len(losses) < 2:
            raise ValueError(f"objectives needs at least two named losses, got {len(losses)}.")
        nodes = {}
        for name, loss in losses.items():
            if not isinstance(loss, Tensor) or loss.ndim != 0 or not loss.is_floating_point():
                got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(f"objective {name!r} must be a scalar floating-point loss tensor, got {got}.")
            if loss.grad_fn is None:
                raise ValueError(f"objective {name!r} has no autograd graph (detached, or computed under no_grad).")
            nodes[name] = loss.grad_fn
        names = list(losses)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if losses[a] is losses[b] or nodes[a] is nodes[b]:
                    raise ValueError(f"objectives {a!r} and {b!r} are the same loss; pass each objective's own loss.")
        for a in names:
            others = {nodes[b]: b for b in names if b != a}
            found = _graph_contains(nodes[a], others)
            if found is not None:
                raise ValueError(
                    f"objective {a!r} is computed from objective {found!r} (a summed or combined loss): pass the "
                    "separate losses, e.g. mon.objectives(task_a=loss_a, task_b=loss_b), then backward their sum.")
        if "conflict" not in self.schedule or not self._due("conflict", self._step):
            return
        with self._paused():
            grads = []
            for name in names:
                try:
                    g = torch.autograd.grad(losses[name], self.params, retain_graph=True, allow_unused=True)
                except RuntimeError as err:
                    if "second time" in str(err) or "freed" in str(err):
                        raise ValueError(
                            f"objective {name!r}: its graph was freed by an earlier backward(); call "
                            "mon.objectives(...) before backward().") from err
                    raise
                grads.append([None if t is None else t.detach() for t in g])
        values = torch.stack([losses[n].detach().to(torch.float64) for n in names]).to(self.device)
        if self.world_size > 1:  # the objectives of the global batch: the ranks' gradients and losses averaged
            values = all_reduce_sum(values) / self.world_size
            for gs in grads:
                for j, t in enumerate(gs):
                    buf = torch.zeros_like(self.params[j]) if t is None else t.clone()
                    gs[j] = all_reduce_sum(buf) / self.world_size
        total, per = gram_cosines(grads, self._param_layer, len(self.layers))
        norms = [float(_norms([t for t in gs if t is not None], self.device).square().sum().sqrt()) for gs in grads]
        del grads
        extras = self._extras if self._pending is None else self._pending["extras"]
        total_np, per_np, loss_np = total.cpu().numpy(), per.cpu().numpy(), values.cpu().numpy()
        for i, a in enumerate(names):
            extras[f"loss/{a}"] = float(loss_np[i])
            extras[f"objective_grad_norm/{a}"] = norms[i]
            for j in range(i + 1, len(names)):
                b = names[j]
                extras[f"cos/{a}|{b}"] = float(total_np[i, j])
                for li, layer in enumerate(self.layers):
                    extras[f"cos/{a}|{b}/{layer}"] = float(per_np[li, i, j])

    def result(self) -> MonitorResult:
        """The scalars and alarms recorded so far (the last step included) as a :class:`MonitorResult`."""
        self._finalize()
        if self._log is not None:  # the rows live on disk (flushed at every step), not in memory
            from gradsense.results.monitor import read_monitor_log

            assert self.log_dir is not None
            log_steps, log_cols, log_values, _, _ = read_monitor_log(self.log_dir)
            steps = torch.from_numpy(log_steps)
            values = np.full((log_values.shape[0], len(self.columns)), np.nan)
            index = [self._col[c] for c in log_cols]
            values[:, index] = log_values
        else:
            steps = torch.tensor([s for s, _ in self._rows], dtype=torch.int64)
            values = np.full((len(self._rows), len(self.columns)), np.nan)
            for i, (_, row) in enumerate(self._rows):
                values[i, : row.size] = row
        meta = {**self._static_meta(), **self._dynamic_meta()}
        return MonitorResult.build(
            {"steps": steps, "values": torch.from_numpy(values)}, method="monitor",
            settings=self._meta_settings, model=model_fingerprint(self.root, self.name), seed=self.seed,
            wall_time_s=time.perf_counter() - self._t0,
            **{k: v for k, v in meta.items() if k not in ("settings", "method", "model")})

    def memory_bytes(self) -> int:
        """Bytes of tensors the monitor holds between steps (parameter copies for updates and rotation)."""
        total = 0
        for ts in (self._snapshot, self._init):
            if ts:
                total += sum(t.numel() * t.element_size() for t in ts)
        return total

    # ============================================================================ hooks
    def _training_forward(self) -> bool:
        busy = self._pe is not None and self._pe._busy  # the per-example fallback re-running a module
        return torch.is_grad_enabled() and self.root.training and not self._quiet and not busy

    def _on_forward_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._quiet or not torch.is_grad_enabled():
            return
        self._finalize()

    def _on_forward(self, module: nn.Module, args: Any, out: Any) -> None:
        if self._quiet or not self.loss_from_output or not torch.is_grad_enabled() or "loss" not in self.schedule:
            return
        loss = _loss_from_output(out)
        if loss is not None:
            self._losses.append(loss.detach())

    def _on_accumulate(self, _p: Tensor) -> None:
        if self._quiet or self._bw_queued:
            return
        self._bw_queued = True
        torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end_first)

    def _on_backward_end_first(self) -> None:
        # run once more at the very end: after callbacks queued later (DDP's gradient all-reduce)
        torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    def _on_backward_end(self) -> None:
        self._bw_queued = False
        self._finalize()
        self._bw_count += 1
        if not self._recording_step():
            return
        grads = [p.grad for p in self.params]
        self._fill(0, grads)
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            self._buf[0].div_(self.grad_scaler.get_scale())  # gradients of the scaled loss
        self._have_bw = True
        self._bw_grads = grads
        self._bw_versions = [g._version if g is not None else -1 for g in grads]
        if self._micro_grads:
            sq = torch.zeros(len(self.params), dtype=torch.float64, device=self.device)
            idx = list(self._micro_grads)
            sq[torch.tensor(idx, device=self.device)] = _norms([self._micro_grads[i] for i in idx], self.device).square()
            size = 0
            if self._pe is not None:
                size = sum(self._pe._sizes[self._micro_mark:])
                self._micro_mark = len(self._pe._sizes)
            self._micro.append((float(size), sq))
            self._micro_grads = {}
        if self._pe is not None and self._pe._handles:
            self._pe.end_backward()

    def _on_any_step_pre(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> Any:
        if self.optimizer is None:
            mine = {id(p) for p in self.params}
            if not any(id(p) in mine for g in opt.param_groups for p in g["params"]):
                return None
            self.optimizer = opt
            self._meta_settings["optimizer"] = type(opt).__name__
        if opt is not self.optimizer:
            return None
        return self._on_step_pre(opt, args, kwargs)

    def _on_any_step_post(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if opt is self.optimizer:
            self._on_step_post(opt, args, kwargs)

    def _on_step_pre(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> Any:
        if self._quiet:
            return None
        self._recording = self._recording_step()
        if not self._recording:
            return None
        key = tuple(id(p) for g in opt.param_groups for p in g["params"])
        if key != self._owned_key:  # the optimizer's parameters changed (add_param_group)
            owned = set(key)
            self._owned_key = key
            self._snap_idx = [i for i, p in enumerate(self.params) if id(p) in owned]
        step = self._step
        self._update_due = self._due("update", step)
        self._weight_due = self._update_due or self._due("weight_norm", step)
        if self._weight_due:
            ps = [self.params[i].detach() for i in self._snap_idx]
            self._fill(2, [p.detach() for p in self.params])
            if self._update_due:
                if self._snapshot is None or len(self._snapshot) != len(ps) or any(
                        s.shape != p.shape or s.dtype != p.dtype or s.device != p.device
                        for s, p in zip(self._snapshot, ps)):
                    self._snapshot = [torch.empty_like(p) for p in ps]
                torch._foreach_copy_(self._snapshot, ps)
        closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if closure is None:
            self._read_used_grads()
            return None

        def wrapped(*a: Any, **k: Any) -> Any:
            out = closure(*a, **k)
            self._read_used_grads()
            return out

        if "closure" in kwargs:
            return args, {**kwargs, "closure": wrapped}
        return (args[0], wrapped, *args[2:]), kwargs

    def _update_norms(self) -> None:
        """``||w_old - w_new||`` per parameter into row 3 of the norm buffer, from the copy taken before the step."""
        assert self._snapshot is not None
        ps = [self.params[i].detach() for i in self._snap_idx]
        torch._foreach_sub_(self._snapshot, ps)  # old - new, in place in the copy
        self._fill(3, self._snapshot, self._snap_idx)

    def _fill(self, row: int, tensors: Sequence[Tensor | None], index: Sequence[int] | None = None) -> None:
        """Write the 2-norms of ``tensors`` (``None``: 0) into row ``row`` of the norm buffer, at the positions
        ``index`` (default: one per parameter, in order)."""
        out = self._buf[row]
        complete = index is None or len(index) == len(self.params)
        if complete and self._one_device and not any(t is None for t in tensors):
            torch.stack(torch._foreach_norm(list(tensors), 2, **self._norm_kw), out=out)  # type: ignore[arg-type]
            return
        out.zero_()
        pos = list(range(len(tensors))) if index is None else list(index)
        keep = [(j, t) for j, t in zip(pos, tensors) if t is not None]
        if keep:
            idx = torch.tensor([j for j, _ in keep], device=self.device)
            out[idx] = _norms([t for _, t in keep], self.device).to(self._acc)

    def _read_used_grads(self) -> None:
        """Norms of the gradients the optimizer is about to use (after clipping), and non-finite ones."""
        grads = [p.grad for p in self.params]
        same = self._bw_grads is not None and all(
            g is h and (g is None or g._version == v) for g, h, v in zip(grads, self._bw_grads, self._bw_versions or []))
        if same and self._have_bw:
            self._buf[1].copy_(self._buf[0])
            self._used_modified = False
        else:
            self._fill(1, grads)
            self._used_modified = self._have_bw
            if not self._have_bw:  # gradients set without a backward we saw
                self._buf[0].copy_(self._buf[1])
                self._have_bw = True
        self._used_grads = grads  # non-finite ones are named in _record, where the norms reach the host anyway

    def _on_step_post(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self._quiet:
            return
        step = self._step
        try:
            if self._recording:
                self._record(step)
        finally:
            self._step += 1
            self._bw_count = 0
            self._bw_grads = self._bw_versions = self._used_grads = None
            self._have_bw = False
            self._micro, self._micro_grads, self._micro_mark = [], {}, 0
            self._prepare_step()

    # ============================================================================ a step's record
    def _recording_step(self, step: int | None = None) -> bool:
        return (self._step if step is None else step) % self.every == 0

    def _due(self, quantity: str, step: int) -> bool:
        n = self.schedule.get(quantity)
        return n is not None and quantity not in self.disabled and step % self.every == 0 and step % n == 0

    def _prepare_step(self) -> None:
        """Attach the hooks the coming step needs (per-example capture, micro-batch gradients, attention)."""
        step = self._step
        for h in self._micro_handles:
            h.remove()
        self._micro_handles = []
        gns = self._pe is not None and self._due("gns", step)
        if gns:
            assert self._pe is not None
            self._pe.reset()
            self._pe.attach()
            self._micro_grads = {}
            for i, p in enumerate(self.params):
                self._micro_handles.append(p.register_hook(self._micro_hook(i)))
        elif self._pe is not None:
            self._pe.detach()
        if self._attn is not None:
            if self._due("attention", step):
                self._attn.reset()
                self._attn.attach()
            else:
                self._attn.detach()

    def _micro_hook(self, i: int) -> Callable[[Tensor], None]:
        def hook(g: Tensor) -> None:
            if not self._quiet:
                prev = self._micro_grads.get(i)
                self._micro_grads[i] = g if prev is None else prev + g

        return hook

    def _column(self, name: str) -> int:
        j = self._col.get(name)
        if j is None:
            j = self._col[name] = len(self.columns)
            self.columns.append(name)
        return j

    def _record(self, step: int) -> None:
        q = self.schedule
        if not self._have_bw:
            self._buf[:2].zero_()
        if self._update_due and self._snapshot is not None:
            self._update_norms()
        # one transfer of the (4, P) per-parameter norms; the per-layer sums are small host arithmetic
        sq = np.square(self._buf.cpu().numpy(), dtype=np.float64)
        grp = np.sqrt(sq @ self._assign_np)  # (4, G)
        tot = np.sqrt(sq.sum(1))  # (4,)
        used = self._buf[1]
        g = len(self.groups)
        self._nonfinite = []
        if "grad_norm" in q and not np.isfinite(tot[1]):  # some gradient the optimizer uses is NaN or infinite
            bad = (~torch.isfinite(used)).nonzero().flatten().tolist()
            grads = self._used_grads or []
            self._nonfinite = [self.param_names[i] for i in bad if i < len(grads) and grads[i] is not None
                               and not bool(torch.isfinite(grads[i]).all())]
        row: dict[str, Any] = {}
        core = np.full(len(self.columns), np.nan)
        c = self._col
        if "grad_norm" in q:
            clip = tot[1] / tot[0] if tot[0] > 0 else 1.0
            core[c["grad_norm"]], core[c["grad_norm_clipped"]], core[c["clip_factor"]] = tot[0], tot[1], clip
            core[c["nonfinite_grads"]] = len(self._nonfinite)
            start = self._starts["grad_norm"]
            core[start:start + g] = grp[0]
            if self._used_modified:
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = grp[1] / grp[0]
                ok = np.isfinite(ratio)
                if ok.any() and np.abs(ratio[ok] - clip).max() > 1e-6 * max(1.0, abs(clip)):
                    for k, name in enumerate(self.groups):  # clipping was not one global factor
                        row[f"grad_norm_clipped/{name}"] = grp[1][k]
        if "weight_norm" in q and self._weight_due:
            start = self._starts["weight_norm"]
            core[start:start + g] = grp[2]
        if self._update_due:
            start = self._starts["update_norm"]
            core[start:start + g] = grp[3]
            start = self._starts["update_ratio"]
            np.divide(grp[3], grp[2], out=core[start:start + g], where=grp[2] > 0)
        alarms = [Alarm(step, "nonfinite_grad", n, math.nan) for n in self._nonfinite]
        self._scheduled(step, row)
        loss = math.nan
        if "loss" in q:
            local = float(torch.stack([v.to(torch.float64).cpu() for v in self._losses]).mean()) if self._losses \
                else math.nan
            if self.world_size > 1:
                # the ranks' losses are averaged here, where every rank takes part (a loss logged after the step is
                # this rank's own)
                buf = torch.tensor([0.0 if math.isnan(local) else local, 0.0 if math.isnan(local) else 1.0],
                                   dtype=torch.float64, device=self.device)
                buf = all_reduce_sum(buf)
                local = float(buf[0] / buf[1]) if float(buf[1]) > 0 else math.nan
            loss = local
            core[c["loss"]] = loss
        values = {**self._extras, **row}
        self._losses, self._extras = [], {}
        if self._spikes is not None:
            alarms += self._norm_alarms(step, grp)
            if not math.isnan(loss):
                alarms += self._loss_alarms(step, loss)
        full = self._emit(step, core, values, alarms)
        # the step is on disk now; a loss or scalars logged before the next forward are added to it (a patch line)
        self._pending = {"step": step, "row": full, "losses": [], "extras": {}, "has_loss": not math.isnan(loss)}

    def _emit(self, step: int, core: np.ndarray, values: Mapping[str, Any], alarms: list[Alarm]) -> np.ndarray:
        """The step's row in memory and in the log (written and flushed now)."""
        vals = {k: (float(v) if not isinstance(v, Tensor) else float(v.to(torch.float64).cpu())) for k, v in values.items()}
        for k in vals:
            self._column(k)
        if core.size == len(self.columns):  # the usual step: no new column, the core row is the row (no copy)
            row = core
        else:
            row = np.full(len(self.columns), np.nan)
            row[: core.size] = core
        for k, v in vals.items():
            row[self._col[k]] = v
        self._alarms.extend(alarms)
        if self._log is not None:
            self._rows = [(step, row)]  # the log holds the others; this one may still be patched
        else:
            self._rows.append((step, row))
        if self._log is not None:
            self._log.append(step, self.columns, row, [a.to_json() for a in alarms])
        return row

    def _scheduled(self, step: int, row: dict[str, Any]) -> None:
        """Per-example statistics, rotation, attention entropy, curvature on their schedules."""
        if self._pe is not None and self._due("gns", step):
            bw = self._buf[0].to(torch.float64)
            self._run("gns", lambda: self._gns(row, bw))
        if self._init is not None and self._due("rotation", step):
            self._run("rotation", lambda: self._rotation(row))
        if self._attn is not None and self._due("attention", step):
            self._run("attention", lambda: self._attention(row))
        if "curvature" in self.schedule and self._due("curvature", step):
            self._run("curvature", lambda: self._curvature(step, row))

    def _run(self, quantity: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self.disabled[quantity] = f"{type(err).__name__}: {first[:200]}"
            warnings.warn(f"gradsense monitor: {quantity} disabled after an error ({self.disabled[quantity]}).",
                          RuntimeWarning, stacklevel=2)

    # ---------------------------------------------------------------------------- noise scale
    def _gns(self, row: dict[str, Any], bw: Tensor) -> None:
        pe = self._pe
        assert pe is not None
        missing = pe.missing()
        if missing:
            have_grad = [n for n in missing if self.params[self.param_names.index(n)].grad is not None]
            if have_grad:
                pe.exclude(have_grad, "no forward of its module was seen (its parameters are used by other code)")
        n_local = pe.n_examples
        per_param = pe.sums(self.param_names).to(self.device)  # sum_i ||g_i||^2 per parameter, this rank
        covered = torch.tensor([n not in pe.excluded and n in pe._parts and bool(pe._parts[n])
                                for n in self.param_names], dtype=torch.float64, device=self.device)
        c_local = float(n_local) if self.loss_reduction == "mean" else 1.0
        bw_sq = bw.square()
        micro = self._micro
        micro_sq = torch.zeros_like(bw_sq)
        micro_inv = 0.0
        for size, v in micro:
            if size > 0:
                micro_sq += v * (c_local / size) ** 2
                micro_inv += 1.0 / size
        # one host transfer: [per-example sums, covered gradient, all gradient, micro-batch sums] per parameter
        host = torch.stack([per_param * c_local**2, bw_sq * covered, bw_sq, micro_sq]).cpu().numpy() @ self._assign_np
        counts = np.array([float(n_local), float(len(micro)), micro_inv])
        if self.world_size > 1:  # the per-example and micro-batch sums and counts add up over ranks
            packed = torch.from_numpy(np.concatenate([host[0], host[3], counts])).to(self.device)
            packed = all_reduce_sum(packed).cpu().numpy()
            g = host.shape[1]
            host[0], host[3], counts = packed[:g], packed[g:2 * g], packed[2 * g:]
        sum_sq, grad_sq, grad_sq_all, micro_sq_g = host
        n_total, micro_n, micro_inv = (float(v) for v in counts)
        if self.loss_reduction == "sum":
            scale = (self.world_size / max(n_total, 1.0)) ** 2
            grad_sq, grad_sq_all = grad_sq * scale, grad_sq_all * scale
        mods = self._module_groups
        if n_total >= 2:
            mean_sq = sum_sq / n_total
            gsq, tr = noise_estimates(mean_sq, 1.0, grad_sq, n_total)
            tot_gsq, tot_tr = float(gsq[mods].sum()), float(tr[mods].sum())
            row["gns/grad_sq"], row["gns/trace"], row["gns/batch"] = tot_gsq, tot_tr, n_total
            self._gns_hist.append((tot_tr, tot_gsq))
            row["gns"], row["gns_stderr"] = ratio_of_means(*np.array(self._gns_hist).T)
            with np.errstate(divide="ignore", invalid="ignore"):
                snr = np.where(tr > 0, gsq / tr, np.nan)
                coherence = np.where(mean_sq > 0, grad_sq / mean_sq, np.nan)
            for k in mods:
                layer = self.groups[k]
                row[f"snr/{layer}"] = float(snr[k])
                row[f"coherence/{layer}"] = float(coherence[k])
        if micro_n > 1 and n_total > 0:
            b_small = micro_n / micro_inv
            if n_total > b_small:
                gsq2, tr2 = noise_estimates(micro_sq_g / micro_n, b_small, grad_sq_all, n_total)
                t_g, t_t = float(gsq2[mods].sum()), float(tr2[mods].sum())
                row["gns2/grad_sq"], row["gns2/trace"], row["gns2/batch_small"] = t_g, t_t, b_small
                self._gns2_hist.append((t_t, t_g))
                ratio, se = ratio_of_means(*np.array(self._gns2_hist).T)
                row["gns2"], row["gns2_stderr"] = ratio, se
                if "gns" not in row:
                    row["gns"], row["gns_stderr"] = ratio, se

    # ---------------------------------------------------------------------------- rotation, attention, curvature
    def _rotation(self, row: dict[str, Any]) -> None:
        """``1 - cos(w_t, w_0)`` per layer, from ``||w_t - w_0||`` and the norms (one parameter-sized temporary at a
        time): ``1 - cos = (||a - b||^2 - (|a| - |b|)^2) / (2 |a| |b|)`` over the layer's weights."""
        assert self._init is not None
        ps = [p.detach() for p in self.params]
        dist = torch.stack([torch.linalg.vector_norm(a - b, dtype=torch.float64) for a, b in zip(ps, self._init)])
        sq = torch.stack([dist, _norms(ps, self.device), _norms(self._init, self.device)]).cpu().numpy() ** 2
        d2, now, init = sq @ self._assign_np  # squared norms per group
        a, b = np.sqrt(now), np.sqrt(init)
        with np.errstate(divide="ignore", invalid="ignore"):
            rot = (d2 - (a - b) ** 2) / (2 * a * b)
        for k in self._module_groups:
            row[f"rotation/{self.groups[k]}"] = float(rot[k]) if np.isfinite(rot[k]) else math.nan

    def _attention(self, row: dict[str, Any]) -> None:
        assert self._attn is not None
        sums = self._attn.sums
        for name in sorted(self._attn.failed):
            key = f"attention:{name}"
            if key not in self._warned:
                self._warned.add(key)
                warnings.warn(f"gradsense monitor: attention entropy of {name} skipped ({self._attn.failed[name]}).",
                              RuntimeWarning, stacklevel=3)
        names = [n for n in self._attn.kinds if n in sums]
        if self.world_size > 1:
            # every rank must reduce the same tensors: one row per supported module, zeros where nothing was seen
            for n in self._attn.kinds:
                if n not in sums:
                    continue
                total, count = sums[n]
                packed = all_reduce_sum(torch.cat([total, count]).to(torch.float64))
                h = total.numel()
                sums[n] = (packed[:h], packed[h:])
        for n in names:
            total, count = sums[n]
            ent = (total / count.clamp_min(1)).cpu().numpy()
            for h, v in enumerate(ent):
                row[f"attn_entropy/{_strip(n)}/h{h}"] = float(v)
            row[f"attn_entropy/{_strip(n)}"] = float(ent.mean())
        self._attn.reset()

    def _curvature(self, step: int, row: dict[str, Any]) -> None:
        from gradsense.curvature import hessian_eigs, hessian_trace

        assert self.loss_fn is not None
        devices = sorted({p.device.index or 0 for p in self.params if p.device.type == "cuda"})
        seed = (self.seed * 1_000_003 + step) % (2**62)
        with self._paused(), torch.random.fork_rng(devices=devices), preserve_model(self.root, eval_mode=True), \
                warnings.catch_warnings():
            # a fixed budget of products per due step; the residual and the standard error are recorded instead
            warnings.simplefilter("ignore", RuntimeWarning)
            eig = hessian_eigs(self.root, self.loss_fn, self.held_out, k=1, tol=1e-2, seed=seed,
                               return_vectors=False, overlap=False, max_hvp=self.curvature_hvp)
            tr = hessian_trace(self.root, self.loss_fn, self.held_out, rtol=0.05, seed=seed,
                               max_hvp=self.curvature_hvp)
        row["curvature/top_eig"] = float(eig.eigenvalues[0])
        row["curvature/top_eig_residual"] = float(eig.residuals[0])
        row["curvature/trace"] = tr.value
        row["curvature/trace_stderr"] = tr.stderr

    @contextlib.contextmanager
    def _paused(self) -> Iterator[None]:
        """Our hooks ignore what happens inside (our own forwards and backwards)."""
        self._quiet += 1
        busy = self._pe._busy if self._pe is not None else False
        if self._pe is not None:
            self._pe._busy = True
        try:
            yield
        finally:
            self._quiet -= 1
            if self._pe is not None:
                self._pe._busy = busy

    # ---------------------------------------------------------------------------- finalising a step
    def _finalize(self) -> None:
        """Close the last step: add a loss or scalars logged after it (patching the log), write TensorBoard."""
        pend = self._pending
        if pend is None:
            return
        self._pending = None
        step, row = pend["step"], pend["row"]
        patch: dict[str, float] = {}
        alarms: list[Alarm] = []
        if pend["losses"] and "loss" in self._col:
            vals = pend["losses"]
            loss = float(vals[0]) if len(vals) == 1 else float(torch.stack([v.to(torch.float64).cpu() for v in vals]).mean())
            patch["loss"] = loss
            if self._spikes is not None and not pend["has_loss"]:
                alarms = self._loss_alarms(step, loss)
        for k, v in pend["extras"].items():
            patch[k] = float(v) if not isinstance(v, Tensor) else float(v.to(torch.float64).cpu())
        if patch or alarms:
            for k in patch:
                self._column(k)
            if row.size < len(self.columns):
                grown = np.full(len(self.columns), np.nan)
                grown[: row.size] = row
                row = grown
                for i, (s_, _) in enumerate(self._rows):
                    if s_ == step:
                        self._rows[i] = (step, row)
            for k, v in patch.items():
                row[self._col[k]] = v
            self._alarms.extend(alarms)
            if self._log is not None:
                self._log.patch(step, self.columns, patch, [a.to_json() for a in alarms])
        if self._tb is not None:
            self._tb.write(step, self.columns, row)

    def _norm_alarms(self, step: int, grp: np.ndarray) -> list[Alarm]:
        assert self._spikes is not None
        mods = self._module_groups
        m = len(mods)
        sel = slice(0, m) if self._mods_prefix else mods  # module groups first (per="module"): a view, no copy
        grad = grp[0][sel] if "grad_norm" in self.schedule else np.full(m, np.nan)
        upd = grp[3][sel] if self._update_due else np.full(m, np.nan)
        z = self._spikes.update(np.concatenate([grad, upd]))
        thr = self.alarm_threshold
        out = []
        hits = np.flatnonzero(z > thr)  # NaN compares False, without a warning
        for j in hits.tolist():
            k = j % m
            kind, value = ("grad_spike", grad[k]) if j < m else ("update_spike", upd[k])
            out.append(Alarm(step, kind, self.groups[mods[k]], float(value), thr, float(z[j])))
        out.sort(key=lambda a: (a.kind != "grad_spike", a.layer))
        self._z_hist.append((step, np.fmax(z[:m], z[m:2 * m])))
        return out

    def _loss_alarms(self, step: int, loss: float) -> list[Alarm]:
        assert self._loss_spikes is not None
        z = self._loss_spikes.update(loss)
        thr = self.alarm_threshold
        if z > thr:
            return [Alarm(step, "loss_spike", "", loss, thr, z, self._moved_first(thr / 2))]
        return []

    def _moved_first(self, level: float) -> tuple[str, ...]:
        """Layers whose gradient or update norm z-score passed ``level`` in the last steps, earliest first."""
        first: dict[int, tuple[int, float]] = {}
        for step, zs in self._z_hist:
            for k in np.flatnonzero(np.nan_to_num(zs, nan=-np.inf) > level):
                if k not in first:
                    first[int(k)] = (step, float(zs[k]))
                else:
                    first[int(k)] = (first[int(k)][0], max(first[int(k)][1], float(zs[k])))
        order = sorted(first, key=lambda k: (first[k][0], -first[k][1]))
        return tuple(self.groups[self._module_groups[k]] for k in order[:3])

    # ---------------------------------------------------------------------------- metadata
    def _static_meta(self) -> dict[str, Any]:
        return {"method": "monitor", "quantities": list(self.schedule), "settings": self._meta_settings,
                "layers": self.layers, "params": self.param_names, "groups": self.groups,
                "model": model_fingerprint(self.root, self.name),
                "descriptions": {k: QUANTITIES[k] for k in self.schedule}}

    def _dynamic_meta(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"columns": list(self.columns), "alarms": [a.to_json() for a in self._alarms],
                                 "disabled": dict(self.disabled), "steps_seen": self._step}
        if self._pe is not None:
            extra["gns_excluded"] = sorted(self._pe.excluded)
            extra["gns_coupled"] = list(self._pe.coupled)
        if self._attn is not None:
            extra["attention_modules"] = dict(self._attn.kinds)
            extra["attention_failed"] = dict(self._attn.failed)
        return extra

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"step {self._step}"
        return f"Monitor({type(self.root).__name__}, quantities={self.quantities}, {state})"


def _graph_contains(start: Any, targets: Mapping[Any, str], limit: int = 500) -> str | None:
    """The name of a target node reachable from ``start`` in the autograd graph (breadth first, ``limit`` nodes)."""
    seen = {start}
    queue = deque([start])
    while queue and len(seen) < limit:
        node = queue.popleft()
        for nxt, _ in getattr(node, "next_functions", ()):
            if nxt is None or nxt in seen:
                continue
            if nxt in targets:
                return targets[nxt]
            seen.add(nxt)
            queue.append(nxt)
    return None
