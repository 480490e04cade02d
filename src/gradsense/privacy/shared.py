"""What a client shares, checked and normalised: a gradient or a weight update after local steps.

A federated client sends either

- the **gradient** of its mean loss on one batch (FedSGD): a mapping ``{parameter name: tensor}``, or the
  tuple ``torch.autograd.grad(loss, params)`` returns, in ``model.parameters()`` order; or
- a **weight update** after ``local_steps`` steps of plain SGD on its data (FedAvg): ``theta_after -
  theta_before``, wrapped in :class:`WeightUpdate` with the learning rate and the local mini-batch size,
  which the attacker is assumed to know (as in Geiping et al. 2020, section 5, and Dimitrov et al. 2022).

:func:`as_shared` turns either into a :class:`Shared` (names in the model's order, tensors on the model's
device and dtype) after one round of checks that name what was expected, what was received and what to do.
:func:`client_gradient` and :func:`client_update` compute what an honest client would send, on a functional
copy of the model (the caller's module, ``.grad`` and buffers are never touched).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad

from gradsense.core.checks import check_module_batch, check_positive_int, explain_model_errors
from gradsense.core.functional import ParamSpec, check_model, select_parameters

__all__ = ["Shared", "WeightUpdate", "as_shared", "client_gradient", "client_update", "local_batches"]

LossFn = Callable[[Any, Tensor], Tensor]


@dataclasses.dataclass(frozen=True)
class WeightUpdate:
    """A FedAvg weight update: ``delta = theta_after - theta_before`` after ``local_steps`` SGD steps.

    The attacker is assumed to know the learning rate, the number of steps and the local mini-batch size
    (they are protocol settings), and that the client took its mini-batches in order, cycling through its
    data: step ``k`` uses examples ``[k*b, (k+1)*b)`` modulo the number of examples.

    Attributes:
        delta: ``{name: theta_after - theta_before}`` or a sequence in ``model.parameters()`` order.
        local_steps: SGD steps the client took.
        lr: the client's learning rate (plain SGD, no momentum, no weight decay).
        batch_size: examples per local step (``None``: every step uses all the client's examples).
    """

    delta: Mapping[str, Tensor] | Sequence[Tensor]
    local_steps: int
    lr: float
    batch_size: int | None = None


@dataclasses.dataclass(frozen=True)
class Shared:
    """A checked shared message.

    Attributes:
        kind: ``"gradient"`` or ``"update"``.
        tensors: ``{name: tensor}`` in the model's parameter order (detached, the model's device and dtype).
        local_steps, lr, batch_size: the local-training settings of an update (``None`` for a gradient).
    """

    kind: str
    tensors: dict[str, Tensor]
    local_steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None

    @property
    def names(self) -> list[str]:
        """The shared parameters' names."""
        return list(self.tensors)

    def describe(self) -> str:
        """One line: what was shared."""
        n = sum(t.numel() for t in self.tensors.values())
        if self.kind == "gradient":
            return f"gradient of {len(self.tensors)} parameter tensors ({n} values)"
        per = "all examples" if self.batch_size is None else f"{self.batch_size} examples"
        return (f"weight update after {self.local_steps} local SGD steps (lr {self.lr:g}, {per} per step) of "
                f"{len(self.tensors)} parameter tensors ({n} values)")


def _expected(model: nn.Module, params: ParamSpec) -> dict[str, Tensor]:
    if params is None:
        return {n: p for n, p in model.named_parameters() if p.requires_grad} or dict(model.named_parameters())
    return select_parameters(model, params)


def _as_mapping(values: Any, expected: dict[str, Tensor], model: nn.Module, what: str) -> dict[str, Any]:
    if isinstance(values, Mapping):
        return dict(values)
    if isinstance(values, (list, tuple)):
        names = list(expected)
        every = [n for n, _ in model.named_parameters()]
        if len(values) == len(names):
            return dict(zip(names, values))
        if len(values) == len(every):
            return dict(zip(every, values))
        raise ValueError(
            f"shared: the {what} is a sequence of {len(values)} tensors, but the model has {len(names)} "
            f"trainable parameter tensors ({len(every)} in all). Pass what torch.autograd.grad(loss, "
            "[p for p in model.parameters() if p.requires_grad]) returns, or a mapping {name: tensor}."
        )
    raise TypeError(
        f"shared must be a mapping {{parameter name: tensor}}, a sequence of tensors in model.parameters() "
        f"order (what torch.autograd.grad returns), or a gradsense.privacy.WeightUpdate; got {type(values).__name__}."
    )


def as_shared(model: nn.Module, shared: Any, *, params: ParamSpec = None) -> Shared:
    """Check what a client shared against the model and normalise it.

    Args:
        model: The model the client trained (never modified).
        shared: A gradient (mapping or sequence, see the module docstring) or a :class:`WeightUpdate`.
        params: Which parameters the client shares (a :data:`~gradsense.core.functional.ParamSpec`);
            default: every trainable parameter.

    Returns:
        The :class:`Shared` message, tensors detached and cast to the model's parameters' device and dtype.

    Raises:
        TypeError: ``shared`` of the wrong type, a non-tensor entry, or integer tensors.
        ValueError: Missing or unknown parameter names, shapes that do not match the parameters, NaN/Inf,
            or bad local-training settings of a :class:`WeightUpdate`.
    """
    check_model(model)
    expected = _expected(model, params)
    settings: dict[str, Any] = {}
    if isinstance(shared, WeightUpdate):
        kind, what, values = "update", "weight update", shared.delta
        check_positive_int(shared.local_steps, "WeightUpdate.local_steps")
        if isinstance(shared.lr, bool) or not isinstance(shared.lr, (int, float)) or not (
                math.isfinite(shared.lr) and shared.lr > 0):
            raise ValueError(f"WeightUpdate.lr must be a positive number, got {shared.lr!r}.")
        if shared.batch_size is not None:
            check_positive_int(shared.batch_size, "WeightUpdate.batch_size")
        settings = {"local_steps": shared.local_steps, "lr": float(shared.lr), "batch_size": shared.batch_size}
    else:
        kind, what, values = "gradient", "gradient", shared
    mapping = _as_mapping(values, expected, model, what)
    named = dict(model.named_parameters())
    unknown = [k for k in mapping if k not in named]
    if unknown:
        raise ValueError(
            f"shared: {len(unknown)} names are not parameters of {type(model).__name__}: {unknown[:5]}. "
            f"Its parameters are {list(named)[:5]}{' ...' if len(named) > 5 else ''}."
        )
    missing = [k for k in expected if k not in mapping]
    if missing:
        raise ValueError(
            f"shared: the {what} lacks {len(missing)} of the {len(expected)} expected parameters: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}. Pass every trainable parameter's {what}, or say which "
            "parameters the client shares with params=[...]."
        )
    out: dict[str, Tensor] = {}
    for name in named:
        if name not in mapping:
            continue
        value, param = mapping[name], named[name]
        if not isinstance(value, Tensor):
            raise TypeError(f"shared: the {what} of {name!r} is {type(value).__name__}, expected a tensor "
                            f"shaped {tuple(param.shape)}.")
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"shared: the {what} of {name!r} has shape {tuple(value.shape)}, but the parameter "
                             f"has shape {tuple(param.shape)}. Is it the same model, in the same parameter order?")
        if not value.is_floating_point():
            raise TypeError(f"shared: the {what} of {name!r} has dtype {value.dtype}, expected floating point.")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"shared: the {what} of {name!r} contains NaN/Inf values.")
        out[name] = value.detach().to(device=param.device, dtype=param.dtype)
    return Shared(kind=kind, tensors=out, **settings)


def _state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Detached parameters and *copied* buffers (a train-mode forward must not move the caller's statistics)."""
    return ({n: p.detach() for n, p in model.named_parameters()},
            {n: b.detach().clone() for n, b in model.named_buffers()})


def client_gradient(model: nn.Module, loss_fn: LossFn, inputs: Tensor, labels: Tensor, *,
                    params: ParamSpec = None) -> dict[str, Tensor]:
    """The gradient an honest FedSGD client sends: ``d loss_fn(model(inputs), labels) / d theta``.

    The model is run as it is (train-mode BatchNorm uses the batch's statistics, on copies of the running
    buffers; train-mode dropout draws from torch's global RNG), through ``torch.func.functional_call``.

    Args:
        model: The client's model (never modified; ``.grad`` untouched).
        loss_fn: ``(output, labels) -> scalar`` averaged over the batch.
        inputs: The client's batch.
        labels: Its labels.
        params: The shared parameters (default: every trainable one).

    Returns:
        ``{name: gradient}`` in the model's parameter order.
    """
    check_model(model)
    names = list(_expected(model, params))
    check_module_batch(model, loss_fn, inputs, labels, what="client_gradient")  # shapes, dtypes, labels in range
    theta, buffers = _state(model)

    def loss_of(p: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:  # buffers are an argument: BN may update them
        out = functional_call(model, {**theta, **b, **p}, (inputs,))
        return loss_fn(out, labels)

    with explain_model_errors(inputs, "client_gradient", model):
        g = grad(loss_of)({n: theta[n] for n in names}, buffers)
    return {n: g[n].detach() for n in names}


def local_batches(n: int, local_steps: int, batch_size: int | None) -> list[Tensor]:
    """Example indices of every local step: consecutive mini-batches, cycling through ``range(n)``."""
    if batch_size is None or batch_size >= n:
        return [torch.arange(n)] * local_steps
    out, start = [], 0
    for _ in range(local_steps):
        out.append(torch.arange(start, start + batch_size) % n)
        start = (start + batch_size) % n
    return out


def client_update(model: nn.Module, loss_fn: LossFn, inputs: Tensor, labels: Tensor, *, local_steps: int,
                  lr: float, batch_size: int | None = None, params: ParamSpec = None) -> WeightUpdate:
    """The weight update an honest FedAvg client sends after ``local_steps`` steps of plain SGD.

    Args:
        model: The client's starting model (never modified).
        loss_fn: ``(output, labels) -> scalar`` averaged over the batch.
        inputs: All of the client's examples.
        labels: Their labels.
        local_steps: SGD steps.
        lr: Learning rate.
        batch_size: Examples per step, taken in order and cycling (``None``: all of them every step).
        params: The trained and shared parameters (default: every trainable one).

    Returns:
        A :class:`WeightUpdate` with ``delta = theta_after - theta_before``.
    """
    check_model(model)
    check_positive_int(local_steps, "local_steps")
    names = list(_expected(model, params))
    theta, buffers = _state(model)
    current = {n: theta[n] for n in names}
    for idx in local_batches(inputs.shape[0], local_steps, batch_size):
        def loss_of(p: dict[str, Tensor], b: dict[str, Tensor], idx: Tensor = idx) -> Tensor:
            out = functional_call(model, {**theta, **b, **p}, (inputs[idx],))
            return loss_fn(out, labels[idx])

        with explain_model_errors(inputs, "client_update", model):
            g = grad(loss_of)(current, buffers)
        current = {n: current[n] - lr * g[n] for n in names}
    delta = {n: (current[n] - theta[n]).detach() for n in names}
    return WeightUpdate(delta=delta, local_steps=local_steps, lr=float(lr), batch_size=batch_size)
