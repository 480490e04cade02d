"""What scalar to differentiate: one convention, turned into a callable at the door.

Every analysis that differentiates a model output takes ``target=`` in one of these forms:

==========================  ===============================================================
``int``                     that class's logit, for every example
sequence / tensor of ints   one class per example (length must equal the batch)
``"predicted"``             the logit of the class the model predicts for the *original* input
                            (fixed once, so path/noise samples keep the same class)
a ``Target`` object         :class:`ClassLogit`, :class:`LogProbability`, :class:`Probability`,
                            :class:`Loss` (a loss with labels), :class:`CosineSimilarity`,
                            :class:`RegressionOutput`, :class:`Contrastive`,
                            :class:`Continuation` (a causal LM's continuation log-probability)
a callable                  ``fn(output, batch) -> per-example scalar`` of shape ``(n,)``, where
                            ``batch`` is a :class:`Batch` (``.inputs``, ``.index``, ``.labels``)
==========================  ===============================================================

Analyses expand batches (path steps, noise samples): a row of an expanded batch knows the example
it came from through ``batch.index``, so per-example targets follow their example.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

from gradsense.core.checks import check_labels

__all__ = [
    "Batch",
    "CallableTarget",
    "ClassLogit",
    "Continuation",
    "Contrastive",
    "CosineSimilarity",
    "LogProbability",
    "Loss",
    "Probability",
    "RegressionOutput",
    "Target",
    "TargetLike",
    "as_target",
]


@dataclass(frozen=True)
class Batch:
    """The rows a target is evaluated on.

    Attributes:
        inputs: The rows fed to the model (possibly perturbed or interpolated copies of examples).
        index: ``(n,)`` int64, the original example each row belongs to.
        labels: Labels of those rows (already indexed by ``index``), or ``None``.
    """

    inputs: Any
    index: Tensor
    labels: Tensor | None = None


def _output_tensor(output: Any) -> Tensor:
    """Take the tensor from common model outputs (tensor, HF ModelOutput with logits, tuple)."""
    if isinstance(output, Tensor):
        return output
    for key in ("logits", "pooler_output", "last_hidden_state"):
        value = output.get(key) if isinstance(output, dict) else getattr(output, key, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"cannot read a tensor from a model output of type {type(output).__name__}; "
        "pass target= as a callable (output, batch) -> per-example scalar."
    )


class Target:
    """Base class: ``target(output, batch) -> Tensor`` of shape ``(n,)``, one scalar per row."""

    name: str = "target"

    def __call__(self, output: Any, batch: Batch) -> Tensor:
        raise NotImplementedError

    def validate(self, output: Any, n_examples: int) -> None:
        """Check against the first model output; raise ``ValueError`` with what to do."""

    def describe(self) -> str:
        """Short description for result metadata."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


def _class_tensor(classes: int | Sequence[int] | Tensor, what: str) -> Tensor:
    if isinstance(classes, bool):
        raise TypeError(f"{what}: expected an int class index, got a bool.")
    if isinstance(classes, int):
        return torch.tensor(classes, dtype=torch.long)
    t = torch.as_tensor(classes)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{what}: class indices must be integers, got dtype {t.dtype}.")
    if t.ndim > 1:
        raise ValueError(f"{what}: expected one class index per example (1-D), got shape {tuple(t.shape)}.")
    return t.long()


class _ClassTarget(Target):
    """Shared logic: pick a class per row from a (n, C) output."""

    def __init__(self, classes: int | Sequence[int] | Tensor) -> None:
        self.classes = _class_tensor(classes, type(self).__name__)

    def _pick(self, scores: Tensor, batch: Batch) -> Tensor:
        cls = self.classes.to(scores.device)
        idx = cls.expand(scores.shape[0]) if cls.ndim == 0 else cls[batch.index.to(cls.device)]
        return scores.gather(1, idx[:, None]).squeeze(1)

    def validate(self, output: Any, n_examples: int) -> None:
        out = _output_tensor(output)
        if out.ndim != 2:
            raise ValueError(
                f"{type(self).__name__} needs a (batch, classes) output, got shape {tuple(out.shape)}. "
                "Use RegressionOutput, CosineSimilarity or a callable target for other outputs."
            )
        n_cls = out.shape[1]
        if self.classes.ndim == 1 and self.classes.numel() != n_examples:
            raise ValueError(
                f"target has {self.classes.numel()} class indices but there are {n_examples} examples; "
                "give one index per example, or a single int for all."
            )
        if self.classes.numel() and (self.classes.min() < 0 or self.classes.max() >= n_cls):
            bad = self.classes[(self.classes < 0) | (self.classes >= n_cls)].unique().tolist()
            raise ValueError(
                f"target class index out of range: {bad[:8]} for a model with {n_cls} outputs "
                f"(valid: 0..{n_cls - 1})."
            )

    def describe(self) -> str:
        c = self.classes
        return f"class {int(c)}" if c.ndim == 0 else f"classes {c.tolist()[:8]}{'...' if c.numel() > 8 else ''}"


class ClassLogit(_ClassTarget):
    """The raw logit (pre-softmax score) of a class. ``classes``: int or one int per example."""

    name = "logit"

    def __call__(self, output: Any, batch: Batch) -> Tensor:
        return self._pick(_output_tensor(output), batch)

    def describe(self) -> str:
        return f"logit of {super().describe()}"


class LogProbability(_ClassTarget):
    """``log_softmax(output)[class]``: the log-probability of a class."""

    name = "log_probability"

    def __call__(self, output: Any, batch: Batch) -> Tensor:
        return self._pick(torch.log_softmax(_output_tensor(output), dim=1), batch)

    def describe(self) -> str:
        return f"log-probability of {super().describe()}"


class Probability(_ClassTarget):
    """``softmax(output)[class]``: the probability of a class."""

    name = "probability"

    def __call__(self, output: Any, batch: Batch) -> Tensor:
        return self._pick(torch.softmax(_output_tensor(output), dim=1), batch)

    def describe(self) -> str:
        return f"probability of {super().describe()}"


class RegressionOutput(Target):
    """Output number ``index`` of a regression model (``output[:, index]``; a (n,) output as is)."""

    name = "regression_output"

    def __init__(self, index: int = 0) -> None:
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"RegressionOutput index must be an int, got {type(index).__name__}.")
        self.index = index

    def __call__(self, output: Any, batch: Batch) -> Tensor:
        out = _output_tensor(output)
        return out if out.ndim == 1 else out.reshape(out.shape[0], -1)[:, self.index]

    def validate(self, output: Any, n_examples: int) -> None:
        out = _output_tensor(output)
        width = 1 if out.ndim == 1 else out.reshape(out.shape[0], -1).shape[1]
        if not -width <= self.index < width:
            raise ValueError(f"RegressionOutput index {self.index} out of range for {width} outputs.")

    def describe(self) -> str:
        return f"output[{self.index}]"


class CosineSimilarity(Target):
    """Cosine similarity between the output embedding and a reference embedding.

    Args:
        reference: ``(D,)`` for all examples or ``(N, D)``, one per example.
    """

    name = "cosine_similarity"

    def __init__(self, reference: Tensor) -> None:
        if not isinstance(reference, Tensor) or not reference.is_floating_point():
            raise TypeError("CosineSimilarity reference must be a floating-point tensor (D,) or (N, D).")
        self.reference = reference.detach()

    def __call__(self, output: Any, batch: Batch) -> Tensor:
        out = _output_tensor(output)
        ref = self.reference.to(out.device, out.dtype)
        ref = ref.expand(out.shape[0], -1) if ref.ndim == 1 else ref[batch.index.to(ref.device)]
        return torch.nn.functional.cosine_similarity(out, ref, dim=1)

    def validate(self, output: Any, n_examples: int) -> None:
        out = _output_tensor(output)
        if out.ndim != 2 or out.shape[1] != self.reference.shape[-1]:
            raise ValueError(
                f"CosineSimilarity: model output shape {tuple(out.shape)} does not match the reference "
                f"embedding of size {self.reference.shape[-1]}."
            )
        if self.reference.ndim == 2 and self.reference.shape[0] != n_examples:
            raise ValueError(
                f"CosineSimilarity: {self.reference.shape[0]} references for {n_examples} examples."
            )

    def describe(self) -> str:
        return f"cosine similarity to a reference of size {self.reference.shape[-1]}"


def _takes_reduction(fn: Callable[..., Any]) -> bool:
    try:
        return "reduction" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class Loss(Target):
    """A per-example loss with labels, e.g. ``Loss(torch.nn.functional.cross_entropy, y)``.

    ``loss_fn(output, labels)`` may reduce or not: loss modules get ``reduction='none'`` on a copy;
    a function that returns one number for a batch is mapped over the rows with ``torch.func.vmap``.

    Args:
        loss_fn: ``(output, labels) -> loss``.
        labels: One label per example (indexed by ``batch.index``).
    """

    name = "loss"

    def __init__(self, loss_fn: Callable[[Tensor, Tensor], Tensor], labels: Tensor) -> None:
        if not callable(loss_fn):
            raise TypeError(f"Loss needs a callable loss_fn, got {type(loss_fn).__name__}.")
        if not isinstance(labels, Tensor):
            labels = torch.as_tensor(labels)
        if isinstance(getattr(loss_fn, "reduction", None), str):
            loss_fn = copy.copy(loss_fn)
            loss_fn.reduction = "none"  # type: ignore[union-attr]
        elif _takes_reduction(loss_fn):
            loss_fn = functools.partial(loss_fn, reduction="none")
        self.loss_fn = loss_fn
        self.labels = labels.detach()

    def __call__(self, output: Any, batch: Batch) -> Tensor:
        out = _output_tensor(output)
        labels = self.labels.to(out.device)[batch.index.to(out.device)]
        value = self.loss_fn(out, labels)
        if value.ndim == 1 and value.shape[0] == out.shape[0]:
            return value
        if value.ndim == 0 and out.shape[0] == 1:
            return value.reshape(1)
        if value.ndim > 1 and value.shape[0] == out.shape[0]:
            return value.reshape(out.shape[0], -1).mean(1)
        fn = self.loss_fn
        return torch.func.vmap(lambda o, y: fn(o[None], y[None]).reshape(()))(out, labels)

    def validate(self, output: Any, n_examples: int) -> None:
        if self.labels.ndim == 0 or self.labels.shape[0] != n_examples:
            got = self.labels.shape[0] if self.labels.ndim else "a 0-d tensor of"
            raise ValueError(f"Loss target: {got} labels for {n_examples} examples.")
        check_labels(self.loss_fn, output, self.labels, what="Loss target")

    def describe(self) -> str:
        fn = getattr(self.loss_fn, "func", self.loss_fn)
        return f"loss {getattr(fn, '__name__', type(fn).__name__)}"


class Contrastive(Target):
    """Score of target ``a`` minus score of target ``b`` ("why A rather than B")."""

    name = "contrastive"

    def __init__(self, a: TargetLike, b: TargetLike) -> None:
        self.a, self.b = a, b
        self._a: Target | None = a if isinstance(a, Target) else None
        self._b: Target | None = b if isinstance(b, Target) else None

    def _resolved(self) -> tuple[Target, Target]:
        if self._a is None or self._b is None:
            raise RuntimeError("Contrastive target used before as_target() resolved it.")
        return self._a, self._b

    def resolve(self, n_examples: int, predict: Callable[[], Any] | None) -> Contrastive:
        out = Contrastive(self.a, self.b)
        out._a = as_target(self.a, n_examples, predict=predict)
        out._b = as_target(self.b, n_examples, predict=predict)
        return out

    def __call__(self, output: Any, batch: Batch) -> Tensor:
        a, b = self._resolved()
        return a(output, batch) - b(output, batch)

    def validate(self, output: Any, n_examples: int) -> None:
        a, b = self._resolved()
        a.validate(output, n_examples)
        b.validate(output, n_examples)

    def describe(self) -> str:
        a, b = self._resolved()
        return f"({a.describe()}) - ({b.describe()})"


class Continuation(Target):
    """Log-probability of a continuation under a causal language model (teacher forcing).

    The model reads prompt + continuation; the continuation is the **last** ``C`` tokens of every input
    (pad on the left). The target is ``sum_j log p(c_j | prompt, c_<j)``, read at the positions that
    predict each continuation token: ``log_softmax(logits[:, T - C - 1 + j])[c_j]``. Attributing it
    says which prompt tokens make the model produce this answer (captum's ``LLMGradientAttribution``
    explains the same sum; Sarti et al. 2023, *Inseq*). ``token=j`` keeps continuation token ``j``
    alone; ``per_token=True`` asks token attribution for the breakdown, one attribution per
    continuation token, which sums to the total for gradient x input and IG (both are linear in the
    target).

    Args:
        continuation: Token ids ``(C,)`` for every example, or ``(N, C)`` one row per example.
        token: Only this continuation token's log-probability (``0 <= token < C``).
        per_token: Request the per-token breakdown from token attribution.

    Raises:
        TypeError: Non-integer ids.
        ValueError: Empty ids, more than two dimensions, or ``token`` out of range.

    Example:
        >>> t = Continuation(torch.tensor([5, 7]))
        >>> logits = torch.zeros(1, 4, 10)  # uniform next-token distribution
        >>> round(float(t(logits, Batch(None, torch.tensor([0])))), 4)  # 2 * log(1/10)
        -4.6052
    """

    name = "continuation"

    def __init__(self, continuation: Sequence[int] | Tensor, *, token: int | None = None,
                 per_token: bool = False) -> None:
        ids = torch.as_tensor(continuation)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"Continuation: token ids must be integers, got dtype {ids.dtype}.")
        if ids.ndim not in (1, 2) or ids.shape[-1] == 0:
            raise ValueError(
                f"Continuation: expected token ids (C,) or (N, C) with C >= 1, got shape {tuple(ids.shape)}."
            )
        length = int(ids.shape[-1])
        if token is not None and (isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < length):
            raise ValueError(f"Continuation: token must be an int in 0..{length - 1}, got {token!r}.")
        self.ids = ids.long().detach()
        self.token = token
        self.per_token = bool(per_token)

    @property
    def length(self) -> int:
        """Number of continuation tokens ``C``."""
        return int(self.ids.shape[-1])

    def for_token(self, j: int) -> Continuation:
        """The same continuation, explaining only token ``j``'s log-probability."""
        return Continuation(self.ids, token=j)

    def token_log_probs(self, output: Any, batch: Batch) -> Tensor:
        """``(n, C)``: the log-probability of every continuation token, per row."""
        logits = _output_tensor(output)
        c = self.length
        t = logits.shape[1]
        ids = self.ids.to(logits.device)
        ids = ids.expand(logits.shape[0], c) if ids.ndim == 1 else ids[batch.index.to(ids.device)]
        pred = logits[:, t - c - 1 : t - 1]  # the position before each continuation token predicts it
        return torch.log_softmax(pred, dim=-1).gather(-1, ids[..., None]).squeeze(-1)

    def __call__(self, output: Any, batch: Batch) -> Tensor:
        if self.token is not None:  # one position only: no log-softmax over the others
            logits = _output_tensor(output)
            t, c = logits.shape[1], self.length
            ids = self.ids.to(logits.device)
            col = ids[self.token].expand(logits.shape[0]) if ids.ndim == 1 else ids[batch.index.to(ids.device), self.token]
            row = torch.log_softmax(logits[:, t - c - 1 + self.token], dim=-1)
            return row.gather(1, col[:, None]).squeeze(1)
        return self.token_log_probs(output, batch).sum(1)

    def validate(self, output: Any, n_examples: int) -> None:
        logits = _output_tensor(output)
        if logits.ndim != 3:
            raise ValueError(
                f"Continuation needs a causal LM's logits (batch, tokens, vocabulary), got shape "
                f"{tuple(logits.shape)}; use a model such as GPT2LMHeadModel."
            )
        if logits.shape[1] <= self.length:
            raise ValueError(
                f"Continuation: the inputs have {logits.shape[1]} tokens but the continuation has {self.length}; "
                "give prompt + continuation (at least one prompt token), the continuation last."
            )
        if self.ids.ndim == 2 and self.ids.shape[0] != n_examples:
            raise ValueError(f"Continuation: {self.ids.shape[0]} continuations for {n_examples} examples.")
        vocab = logits.shape[2]
        if int(self.ids.min()) < 0 or int(self.ids.max()) >= vocab:
            raise ValueError(f"Continuation: token ids out of range for a vocabulary of {vocab}.")

    def describe(self) -> str:
        what = f"token {self.token} of " if self.token is not None else ""
        return f"log-probability of {what}a {self.length}-token continuation"


class CallableTarget(Target):
    """Wrap ``fn(output, batch) -> (n,)``; checks the shape of what it returns."""

    name = "callable"

    def __init__(self, fn: Callable[[Any, Batch], Tensor]) -> None:
        self.fn = fn

    def __call__(self, output: Any, batch: Batch) -> Tensor:
        value = self.fn(output, batch)
        n = batch.index.shape[0]
        if not isinstance(value, Tensor):
            raise TypeError(f"target callable must return a tensor of shape ({n},), got {type(value).__name__}.")
        if value.shape != (n,):
            if value.numel() == n:
                return value.reshape(n)
            raise ValueError(
                f"target callable must return one scalar per row, shape ({n},); got {tuple(value.shape)}. "
                "Reduce over everything but the batch dimension."
            )
        return value

    def describe(self) -> str:
        return getattr(self.fn, "__qualname__", type(self.fn).__name__)


TargetLike = Union[int, Sequence[int], Tensor, str, Target, Callable[[Any, Batch], Tensor]]


def as_target(
    target: TargetLike,
    n_examples: int,
    *,
    predict: Callable[[], Any] | None = None,
) -> Target:
    """Turn any accepted ``target=`` value into a :class:`Target`.

    Args:
        target: See the module docstring for the accepted forms.
        n_examples: Number of (original) examples, to check per-example targets.
        predict: Returns the model output on the original examples; needed for ``"predicted"``.

    Returns:
        A :class:`Target`.

    Raises:
        ValueError: For an unknown string, a wrong number of per-example targets, or
            ``"predicted"`` without a way to predict.
        TypeError: For an unsupported type.
    """
    if target is None:
        raise ValueError(
            "target is required: an int class, one int per example, 'predicted', a gs.targets object "
            "or a callable (output, batch) -> per-example scalar."
        )
    if isinstance(target, Contrastive):
        return target.resolve(n_examples, predict)
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        if target != "predicted":
            raise ValueError(f"target={target!r} is not understood; the only string accepted is 'predicted'.")
        if predict is None:
            raise ValueError("target='predicted' needs the model's output on the inputs; none was given.")
        with torch.no_grad():
            out = _output_tensor(predict())
        if out.ndim != 2:
            raise ValueError(
                f"target='predicted' needs a (batch, classes) output, got shape {tuple(out.shape)}."
            )
        return ClassLogit(out.argmax(dim=1).cpu())
    if isinstance(target, bool):
        raise TypeError("target must be an int class index, not a bool.")
    if isinstance(target, int):
        return ClassLogit(target)
    if type(target).__module__ == "numpy" and hasattr(target, "dtype"):
        target = torch.as_tensor(target)
    if isinstance(target, (Tensor, Sequence)) and not isinstance(target, str):
        t = torch.as_tensor(target)
        if t.ndim == 0:
            return ClassLogit(t)
        if t.ndim != 1 or t.shape[0] != n_examples:
            raise ValueError(
                f"target: expected one class index per example ({n_examples}), got shape {tuple(t.shape)}."
            )
        return ClassLogit(t)
    if callable(target):
        return CallableTarget(target)
    raise TypeError(
        f"target of type {type(target).__name__} is not supported; use an int, ints, 'predicted', "
        "a gs.targets object or a callable."
    )
