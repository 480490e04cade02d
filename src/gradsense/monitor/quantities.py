"""What the monitor can record, what each quantity costs, and the presets.

A quantity is recorded on a schedule: every ``n`` optimizer steps (``n`` from the preset, or yours). The presets:

=============  ==========================================================================================
``"cheap"``    loss, per-layer gradient norms every step (before clipping; global before/after clipping, clip
               factor, non-finite gradients by parameter) with spike alarms; weight norms, update norms and
               update/weight ratios every 10 steps - one read of the gradients per step, one copy of the
               parameters in memory
``"standard"`` loss, gradient, weight and update norms every step, alarms; gradient noise scale, SNR and
               coherence from per-example norms every 20 steps (and
               the two-batch estimator where micro-batches or ranks give two batch sizes), layer rotation every
               50 steps (a second copy of the parameters: the initial ones), attention entropy every 50 steps
``"full"``     standard with per-example statistics every step, rotation and attention entropy every 10 steps,
               curvature every 100 steps (when ``held_out=`` is given)
=============  ==========================================================================================

Pass a list of names for their default schedules, or a dict ``{name: every}``. Conflict between objectives
(``"conflict"``) is measured whenever :meth:`Monitor.objectives` is called on a due step (every step unless
scheduled otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gradsense.core.checks import suggest

__all__ = ["PRESETS", "QUANTITIES", "resolve_quantities"]

QUANTITIES: dict[str, str] = {
    "loss": "the training loss (mon.log(loss=...), a model output's .loss, or the framework callbacks)",
    "grad_norm": "per-layer gradient norms before clipping; global norm before/after clipping, clip factor, "
                 "non-finite gradients (one read of the gradients per backward, one more when clipping changed them)",
    "weight_norm": "per-layer weight norms (one read of the parameters per step)",
    "update": "per-layer update norm ||w_new - w_old|| and update/weight ratio (one copy of the parameters in "
              "memory, two passes per step)",
    "alarms": "spike alarms on per-layer gradient and update norms and on the loss (EMA z-score of log values)",
    "gns": "gradient noise scale B_simple, per-layer SNR and coherence from per-example gradient norms (hooks; about "
           "one weight-gradient computation per due step) and the two-batch estimator over micro-batches/ranks",
    "rotation": "layer rotation: 1 - cos(w_t, w_0) per layer (a copy of the initial parameters in memory)",
    "attention": "attention entropy per head of nn.MultiheadAttention and BERT-style attention modules "
                 "(attention probabilities recomputed without gradients on due steps)",
    "curvature": "top Hessian eigenvalue and trace on the held-out batch (tens of Hessian-vector products per due "
                 "step, the model in eval mode, RNG and buffers restored)",
    "conflict": "pairwise cosine of the objectives' gradients given to mon.objectives() (one backward per objective)",
}

_EVERY_STEP = {"loss": 1, "grad_norm": 1, "weight_norm": 1, "update": 1, "alarms": 1, "conflict": 1}
PRESETS: dict[str, dict[str, int]] = {
    "cheap": {**_EVERY_STEP, "weight_norm": 10, "update": 10},
    "standard": {**_EVERY_STEP, "gns": 20, "rotation": 50, "attention": 50},
    "full": {**_EVERY_STEP, "gns": 1, "rotation": 10, "attention": 10, "curvature": 100},
}
_DEFAULT_EVERY = {**PRESETS["full"], "gns": 10, "rotation": 50, "attention": 50}  # for a list of names


def resolve_quantities(spec: Any) -> dict[str, int]:
    """``{quantity: every}`` from a preset name, a list of names or a dict.

    Raises:
        ValueError: Unknown preset or quantity, or a schedule that is not a positive int.
        TypeError: A spec of another type.
    """
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"quantities must be one of {sorted(PRESETS)}, a list of names or a dict; got {spec!r}."
                             f"{suggest(spec, list(PRESETS) + list(QUANTITIES))}")
        out = dict(PRESETS[spec])
    elif isinstance(spec, Mapping):
        out = {}
        for k, v in spec.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"quantities[{k!r}] must be a positive int (record every n steps), got {v!r}.")
            out[str(k)] = v
    elif isinstance(spec, Sequence):
        out = {str(k): _DEFAULT_EVERY.get(str(k), 1) for k in spec}
    else:
        raise TypeError(f"quantities must be a preset name, a list of names or a dict; got {type(spec).__name__}.")
    unknown = sorted(set(out) - set(QUANTITIES))
    if unknown:
        raise ValueError(f"unknown quantities {unknown}; known: {sorted(QUANTITIES)}.{suggest(unknown[0], QUANTITIES)}")
    if "alarms" in out:
        missing = [q for q in ("grad_norm", "update") if q not in out]
        if len(missing) == 2:
            raise ValueError("quantities: 'alarms' needs 'grad_norm' or 'update' (the norms it watches).")
    return out
