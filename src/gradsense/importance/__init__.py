"""Which weights, neurons, heads and layers matter: importance scores -> pruning masks and bit allocations,
each with the loss change measured on held-out data next to the change the scores predicted.

- :func:`importance` (``method=``, ``granularity="weight"|"channel"|"head"|"layer"``) ->
  :class:`~gradsense.results.importance.ImportanceResult` with ``.scores``, ``.ranking()``,
  ``.prune(sparsity, structure="unstructured"|"N:M"|"channel"|"head", scope="global"|"layer"|"row")`` and
  ``.allocate_bits(mean_bits, choices=(2, 3, 4, 8))``;
- :func:`apply` (masks or bits -> a pruned / fake-quantised copy; the caller's model is untouched),
  :func:`measure` (measured vs predicted change), :func:`sweep` (methods x sparsities, measured).

Methods (:data:`METHODS`; formula and reference in each module): ``magnitude`` (global magnitude with a
per-layer floor), ``taylor`` and ``taylor2`` (LLM-Pruner), ``fisher``, ``gblm`` (GBLM-Pruner), ``wanda``,
``gaprune`` (Fisher x gradient alignment between two data sets), ``serene`` (neuron sensitivity), ``hessian``
(HAWQ-V2 / Hessian-Aware Pruning with Hutch++ traces), ``ecoflap`` (zeroth-order layer sparsity), ``pqi``
(post-quantisation integral).

The module itself is callable: ``gradsense.importance(model, loss, data, method=...)`` is
``gradsense.importance.importance(...)``.

Example:
    >>> import gradsense as gs
    >>> from gradsense.importance import importance, apply
    >>> model, digits = gs.zoo.load("digits-cnn"), gs.zoo.dataset("digits", split="test")
    >>> res = importance(model, gs.losses.cross_entropy, digits[:128], method="taylor", heldout=digits[128:])
    >>> masks = res.prune(0.5, structure="2:4")
    >>> pruned = apply(model, masks)
    >>> round(masks.meta["achieved"], 3), masks.measured["loss_change"] > 0
    (0.5, True)
"""

import sys
import types
from typing import Any

from gradsense.importance.api import METHODS, MethodSpec, allocate_bits, importance, prune, sweep
from gradsense.importance.apply import apply
from gradsense.importance.bits import quantize
from gradsense.importance.measure import Measurer, accuracy, measure
from gradsense.results.importance import BitsResult, ImportanceResult, PruneResult, SweepResult

__all__ = [
    "METHODS",
    "BitsResult",
    "ImportanceResult",
    "Measurer",
    "MethodSpec",
    "PruneResult",
    "SweepResult",
    "accuracy",
    "allocate_bits",
    "apply",
    "importance",
    "measure",
    "prune",
    "quantize",
    "sweep",
]


class _CallableModule(types.ModuleType):
    """``gradsense.importance`` is both a namespace and the verb: calling it calls :func:`importance`."""

    def __call__(self, *args: Any, **kwargs: Any) -> ImportanceResult:
        return importance(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
