"""Loss functions with the ``(output, labels) -> scalar`` signature analyses expect.

They accept ``reduction=`` like torch's, so :class:`gradsense.targets.Loss` can ask for one value per
example.

**Models that return more than a tensor.** Every loss here reads the tensor to score from the model's
output by one rule (:func:`model_output`): a tensor as it is; the ``logits`` of a Hugging Face
``ModelOutput``, or of a ``dict``/object with a ``logits`` entry; the *first* item of a tuple or list
(``return_dict=False`` models put the logits first). Anything else - a dict without ``logits``, a tuple
that starts with something other than a tensor - is refused with a message that says how to choose:
:func:`on_output` wraps a loss with the output to use, by key, index, attribute or callable::

    loss = gs.losses.on_output("logits_aux", gs.losses.cross_entropy)
    loss = gs.losses.on_output(1, gs.losses.mse)                  # the second item of a tuple
    loss = gs.losses.on_output(lambda out: out["a"] + out["b"], gs.losses.mse)

**What the labels are.** :func:`label_kind` says whether a loss needs class indices (``"class"``:
:func:`cross_entropy`, :func:`nll`, and torch's ``F.cross_entropy``/``F.nll_loss``/
``nn.CrossEntropyLoss``/``nn.NLLLoss``) or values shaped like the output (``"value"``: :func:`mse`); the
analyses use it to check labels against the output width before any work (:mod:`gradsense.core.checks`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["bce", "cross_entropy", "label_kind", "model_output", "mse", "nll", "on_output"]

LabelKind = Literal["class", "value"]


def model_output(output: Any, *, what: str = "loss") -> Tensor:
    """The tensor a loss scores, read from a model's output (see the module docstring for the rule).

    Args:
        output: What the model returned.
        what: Name of the caller, for the message.

    Returns:
        The tensor: ``output`` itself, its ``logits``, or the first item of a tuple/list.

    Raises:
        TypeError: When the output has no unambiguous tensor; the message says how to choose one with
            :func:`on_output`.
    """
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, Mapping):
        got = f"a {type(output).__name__} with keys {list(output)[:8]} and no 'logits'"
        how = f"gs.losses.on_output({next(iter(output), 'key')!r}, gs.losses.cross_entropy)"
    elif isinstance(output, (tuple, list)):
        first = type(output[0]).__name__ if output else "nothing"
        got = f"a {type(output).__name__} of {len(output)} items whose first is {first}, not a tensor"
        how = "gs.losses.on_output(1, gs.losses.cross_entropy) (an index), or a callable"
    else:
        got = f"a {type(output).__name__} without a 'logits' tensor"
        how = "gs.losses.on_output(lambda out: out.scores, gs.losses.cross_entropy)"
    raise TypeError(
        f"{what}: the model returned {got}, so the loss cannot tell which output to score. "
        f"Choose it with {how}."
    )


def cross_entropy(output: Any, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits ``(N, C)`` against class indices ``(N,)`` (or class probabilities ``(N, C)``).

    ``output`` may be a tensor, a ``ModelOutput``/dict with ``logits`` or a tuple whose first item is the
    logits (see :func:`model_output`). Labels equal to ``-100`` are ignored, as in torch.
    """
    return F.cross_entropy(model_output(output, what="cross_entropy"), labels, reduction=reduction)


def nll(output: Any, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of log-probabilities ``(N, C)`` against class indices ``(N,)``.

    For models that end in ``log_softmax``; ``output`` is read as in :func:`cross_entropy`.
    """
    return F.nll_loss(model_output(output, what="nll"), labels, reduction=reduction)


def mse(output: Any, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Mean squared error (labels cast to the output's dtype and shape); ``output`` read as in :func:`cross_entropy`."""
    out = model_output(output, what="mse")
    target = labels.to(out.dtype).reshape(out.shape)
    if reduction == "mean":  # sum / numel: F.mse_loss's mean breaks forward-over-reverse AD (pytorch#123996)
        return F.mse_loss(out, target, reduction="sum") / out.numel()
    return F.mse_loss(out, target, reduction=reduction)


def bce(output: Any, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy on logits (``binary_cross_entropy_with_logits``); labels cast to the output's
    dtype and shape (one logit per example and ``(N,)`` 0/1 labels, or multi-label ``(N, K)``); ``output`` read
    as in :func:`cross_entropy`."""
    out = model_output(output, what="bce")
    target = labels.to(out.dtype).reshape(out.shape)
    return F.binary_cross_entropy_with_logits(out, target, reduction=reduction)


class on_output:
    """A loss applied to one chosen output of a model that returns several.

    Args:
        select: A ``str`` (a dict key, or an attribute of a ``ModelOutput``), an ``int`` (an index into a
            tuple/list) or a callable ``output -> tensor``.
        loss_fn: The loss ``(tensor, labels) -> scalar`` to apply to it (e.g. ``gs.losses.cross_entropy``).

    Returns:
        A loss ``(output, labels, reduction="mean") -> loss`` that any analysis accepts; it passes
        ``reduction=`` on when ``loss_fn`` takes it.

    Raises:
        TypeError: ``select`` or ``loss_fn`` of the wrong type (at construction), or an output that does not
            have the chosen entry (at the first forward, naming what it has).

    Example:
        >>> import torch
        >>> loss = on_output("main", cross_entropy)
        >>> out = {"main": torch.tensor([[2.0, 0.0]]), "aux": torch.zeros(1, 3)}
        >>> round(float(loss(out, torch.tensor([0]))), 4)
        0.1269
    """

    def __init__(self, select: str | int | Callable[[Any], Tensor], loss_fn: Callable[..., Tensor]) -> None:
        if isinstance(select, bool) or not (isinstance(select, (str, int)) or callable(select)):
            raise TypeError(
                f"on_output: select must be a key (str), an index (int) or a callable output -> tensor, "
                f"got {type(select).__name__}."
            )
        if not callable(loss_fn):
            raise TypeError(f"on_output: loss_fn must be callable (tensor, labels) -> loss, got {type(loss_fn).__name__}.")
        self.select, self.loss_fn = select, loss_fn
        name = select if isinstance(select, (str, int)) else getattr(select, "__name__", "callable")
        inner = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        self.__name__ = f"{inner}[{name}]"
        self._passes_reduction = _takes_reduction(loss_fn)

    def pick(self, output: Any) -> Tensor:
        """The chosen output."""
        sel = self.select
        if isinstance(sel, str):
            if isinstance(output, Mapping):
                if sel not in output:
                    raise TypeError(f"on_output({sel!r}): the model's output has keys {list(output)[:8]}, not {sel!r}.")
                value = output[sel]
            elif hasattr(output, sel):
                value = getattr(output, sel)
            else:
                raise TypeError(f"on_output({sel!r}): the model's output ({type(output).__name__}) has no {sel!r}.")
        elif isinstance(sel, int):
            if not isinstance(output, (tuple, list)) or not -len(output) <= sel < len(output):
                got = f"{len(output)} items" if isinstance(output, (tuple, list)) else type(output).__name__
                raise TypeError(f"on_output({sel}): the model's output is {got}; an index needs a tuple or list that long.")
            value = output[sel]
        else:
            value = sel(output)
        if not isinstance(value, Tensor):
            raise TypeError(f"on_output({self.__name__}): the chosen output is a {type(value).__name__}, not a tensor.")
        return value

    def __call__(self, output: Any, labels: Any, reduction: str = "mean") -> Tensor:
        if self._passes_reduction:
            return self.loss_fn(self.pick(output), labels, reduction=reduction)
        if reduction != "mean":
            raise TypeError(f"on_output: {self.__name__} does not take reduction=; pass a loss that does.")
        return self.loss_fn(self.pick(output), labels)

    def __repr__(self) -> str:
        return f"on_output({self.select!r}, {getattr(self.loss_fn, '__name__', self.loss_fn)!r})"


def _takes_reduction(fn: Callable[..., Any]) -> bool:
    import inspect

    try:
        return "reduction" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


_CLASS_FUNCTIONS: tuple[Callable[..., Any], ...] = (cross_entropy, nll, F.cross_entropy, F.nll_loss)
_VALUE_FUNCTIONS: tuple[Callable[..., Any], ...] = (mse, bce, F.binary_cross_entropy_with_logits, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss)


def label_kind(loss_fn: Any) -> LabelKind | None:
    """What labels ``loss_fn`` needs: ``"class"`` (class indices), ``"value"`` (values like the output) or ``None``.

    Known: the losses of this module, torch's cross-entropy/NLL (functions and modules) and its regression
    losses, and any of them wrapped by :func:`on_output` or ``functools.partial``. ``None`` means unknown (a
    callable of your own): then nothing is assumed about the labels.
    """
    while True:
        if isinstance(loss_fn, on_output):
            loss_fn = loss_fn.loss_fn
        elif isinstance(loss_fn, functools.partial):
            loss_fn = loss_fn.func
        else:
            break
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return "class"
    if isinstance(loss_fn, (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCEWithLogitsLoss)):
        return "value"
    if any(loss_fn is f for f in _CLASS_FUNCTIONS):
        return "class"
    if any(loss_fn is f for f in _VALUE_FUNCTIONS):
        return "value"
    return None


def scored_output(loss_fn: Any, output: Any, *, what: str = "loss") -> Tensor:
    """The tensor ``loss_fn`` scores from a model's output: through :func:`on_output` selections, then
    :func:`model_output`. Used to check labels against the right output before any work."""
    while isinstance(loss_fn, functools.partial):
        loss_fn = loss_fn.func
    if isinstance(loss_fn, on_output):
        return scored_output(loss_fn.loss_fn, loss_fn.pick(output), what=what)
    return model_output(output, what=what)


def ignore_index(loss_fn: Any) -> int | None:
    """The label a class loss ignores (torch's ``ignore_index``, ``-100`` by default); ``None`` if none."""
    while isinstance(loss_fn, (on_output, functools.partial)):
        if isinstance(loss_fn, functools.partial) and "ignore_index" in loss_fn.keywords:
            return int(loss_fn.keywords["ignore_index"])
        loss_fn = loss_fn.loss_fn if isinstance(loss_fn, on_output) else loss_fn.func
    value = getattr(loss_fn, "ignore_index", -100)
    return int(value) if isinstance(value, int) else -100
