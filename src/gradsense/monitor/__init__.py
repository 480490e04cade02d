"""Watch training through its gradients: a monitor for any loop (plain, HF Trainer, Lightning).

:class:`Monitor` attaches to a model and its optimizer through ``Optimizer.register_step_pre_hook`` /
``register_step_post_hook`` and parameter hooks, records per-layer gradient, weight and update norms (the global
gradient norm before *and* after clipping, read from the gradients the optimizer uses), raises spike alarms
localised to layers, estimates the gradient noise scale (McCandlish et al. 2018) from per-example gradient
norms and from two batch sizes, measures layer rotation, attention entropy, curvature on a schedule and the
conflict between objectives' gradients - and never changes the run: the same seed gives bitwise the same
weights with and without it.

- plain loop: ``mon = gs.monitor.Monitor(model, opt, log_dir="runs/x")``, train, ``mon.close()``;
- ``transformers.Trainer``: ``callbacks=[gs.monitor.HFCallback(log_dir="runs/x")]``;
- ``lightning.Trainer``: ``callbacks=[gs.monitor.LightningCallback(log_dir="runs/x")]``;
- ``torchrun``: the same code; statistics are all-reduced where they must be, rank 0 writes.

``gradsense monitor RUN_DIR`` renders the report of a run, also while it is running.
"""

from typing import Any

from gradsense.monitor.monitor import Monitor, objectives
from gradsense.monitor.quantities import PRESETS, QUANTITIES
from gradsense.results.monitor import Alarm, MonitorResult

__all__ = ["PRESETS", "QUANTITIES", "Alarm", "HFCallback", "LightningCallback", "Monitor", "MonitorResult",
           "objectives"]


def __getattr__(name: str) -> Any:
    # the callbacks import transformers / lightning: only when asked for
    if name == "HFCallback":
        from gradsense.monitor.callbacks import hf_callback_class

        return hf_callback_class()
    if name == "LightningCallback":
        from gradsense.monitor.callbacks import lightning_callback_class

        return lightning_callback_class()
    raise AttributeError(f"module 'gradsense.monitor' has no attribute {name!r}")
