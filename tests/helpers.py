"""Reusable test helpers: the "caller's model is unchanged" check, hook inspection, forward counting."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from gradsense.core.functional import ModelState

__all__ = ["CountingModule", "assert_model_unchanged", "hooks_on", "model_snapshot_problems"]

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def hooks_on(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{module name: {hook dict: count}}`` for every module that has any hook registered."""
    found: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        counts = {a: len(getattr(module, a)) for a in _HOOK_DICTS if getattr(module, a, None)}
        if counts:
            found[name or "<root>"] = counts
    return found


def _grads(model: nn.Module) -> dict[str, Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def model_snapshot_problems(
    model: nn.Module,
    before: ModelState,
    grads_before: dict[str, Tensor | None],
    training_before: dict[str, bool],
    hooks_before: dict[str, dict[str, int]],
) -> list[str]:
    """What changed on ``model`` since the snapshot, as readable strings (empty if nothing)."""
    after = ModelState.capture(model, values=True)
    problems = before.diff(after)
    # independent double checks of what ModelState itself is responsible for
    training_after = {n: m.training for n, m in model.named_modules()}
    if training_after != training_before:
        problems.append(f"training flags changed: {training_before} -> {training_after}")
    hooks_after = hooks_on(model)
    if hooks_after != hooks_before:
        problems.append(f"hooks changed: {hooks_before} -> {hooks_after}")
    for name, p in model.named_parameters():
        old = grads_before.get(name)
        if old is None and p.grad is not None:
            problems.append(f".grad of {name} was set")
        elif old is not None and (p.grad is None or not torch.equal(old, p.grad)):
            problems.append(f".grad of {name} changed")
    return problems


@contextmanager
def assert_model_unchanged(model: nn.Module) -> Iterator[nn.Module]:
    """Assert that the block leaves ``model`` exactly as it found it.

    Checks parameter and buffer values, ``requires_grad``, every module's ``training`` flag, every
    hook dict, and that no parameter's ``.grad`` was set or changed. The check also runs when the
    block raises: a change is reported as an ``AssertionError`` chained to the block's exception;
    with no change the block's own exception propagates unchanged.
    """
    before = ModelState.capture(model, values=True)
    grads_before = _grads(model)
    training_before = {n: m.training for n, m in model.named_modules()}
    hooks_before = hooks_on(model)
    try:
        yield model
    except BaseException as exc:
        problems = model_snapshot_problems(model, before, grads_before, training_before, hooks_before)
        if problems:
            raise AssertionError("the model changed (block raised): " + "; ".join(problems)) from exc
        raise
    problems = model_snapshot_problems(model, before, grads_before, training_before, hooks_before)
    if problems:
        raise AssertionError("the model changed: " + "; ".join(problems))


class CountingModule(nn.Module):
    """Wraps a module and counts its forward calls (``.calls``), rows seen (``.rows``) and the batch
    size of every call (``.sizes``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        # a list, not int counters: gradsense restores a module's plain int/float/str attributes after
        # every call (ModelState), which would silently reset counters to their value before the call
        self.sizes: list[int] = []

    @property
    def calls(self) -> int:
        return len(self.sizes)

    @property
    def rows(self) -> int:
        return sum(self.sizes)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        n = int(x.shape[0]) if isinstance(x, Tensor) and x.ndim else 0
        self.sizes.append(n)
        return self.inner(x, *args, **kwargs)
