"""Fake quantisation and mixed-precision bit allocation under an average bit budget (HAWQ-V2).

Quantiser (the one :func:`gradsense.importance.apply` and PQI use): symmetric, per output channel, round to
nearest. For a weight ``W`` (output channels along dim 0) and ``b`` bits, with ``q_max = 2^(b-1) - 1``::

    s_c = max_j |W_cj| / q_max,    Q_b(W)_cj = s_c * clamp(round(W_cj / s_c), -q_max, q_max)

Allocation (Dong et al. 2020, "HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural Networks"): choose
``b_l`` in ``choices`` for every weight tensor ``l`` to minimise the second-order loss proxy

    Omega = sum_l  Tr(H_l) / n_l * ||Q_{b_l}(W_l) - W_l||^2      subject to  sum_l n_l b_l <= mean_bits * sum_l n_l

(``Tr(H_l)`` from Hutch++, or the Fisher trace). This is a multiple-choice knapsack; :func:`allocate` solves it
exactly by dynamic programming over the Pareto frontier of (bits used, Omega) - HAWQ-V2 itself used the same
Pareto view.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["BITS_RANGE", "allocate", "check_bits", "check_choices", "quantization_errors", "quantize"]

BITS_RANGE = range(2, 17)


def check_bits(bits: object, where: str = "bits") -> int:
    """``bits`` as an int in 2..16, else a clear ``ValueError``/``TypeError``."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{where} must be an int number of bits (2..16), got {type(bits).__name__} {bits!r}.")
    if bits not in BITS_RANGE:
        raise ValueError(f"{where} must be between 2 and 16 bits (symmetric quantisation), got {bits}.")
    return bits


def check_choices(choices: Sequence[int]) -> tuple[int, ...]:
    """Sorted distinct bit widths, each 2..16."""
    if isinstance(choices, (int, str)) or not isinstance(choices, Sequence) or not choices:
        raise TypeError(f"choices must be a non-empty sequence of ints (e.g. (2, 3, 4, 8)), got {choices!r}.")
    out = tuple(sorted({check_bits(c, "each of choices") for c in choices}))
    return out


def quantize(w: Tensor, bits: int) -> Tensor:
    """Symmetric per-output-channel round-to-nearest fake quantisation ``Q_b(W)`` (see the module docstring).

    Args:
        w: A weight tensor (output channels along dim 0; a 0-d or 1-d tensor is one channel).
        bits: Bit width, 2..16.

    Returns:
        ``Q_b(w)``, same shape and dtype (values on the quantisation grid).

    Raises:
        ValueError, TypeError: ``bits`` outside 2..16.

    Example:
        >>> quantize(torch.tensor([[1.0, -0.6, 0.2]]), 2).tolist()  # q_max = 1: levels -1, 0, 1 times 1.0
        [[1.0, -1.0, 0.0]]
    """
    check_bits(bits)
    q_max = 2 ** (bits - 1) - 1
    flat = w.reshape(1, -1) if w.ndim <= 1 else w.reshape(w.shape[0], -1)
    scale = flat.abs().amax(dim=1, keepdim=True) / q_max
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(flat / safe), -q_max, q_max) * safe
    q = torch.where(scale > 0, q, torch.zeros_like(q))
    return q.reshape(w.shape)


def quantization_errors(w: Tensor) -> Tensor:
    """``(15,)`` float64: ``||Q_b(w) - w||^2`` for ``b = 2..16``."""
    return torch.tensor([float(((quantize(w, b) - w).double() ** 2).sum()) for b in BITS_RANGE], dtype=torch.float64)


def allocate(
    sensitivity: Mapping[str, float],
    errors: Mapping[str, Tensor],
    sizes: Mapping[str, int],
    mean_bits: float,
    choices: Sequence[int],
    *,
    max_frontier: int = 50_000,
) -> tuple[dict[str, int], float, bool]:
    """Bits per tensor minimising ``sum_l sensitivity_l * errors_l[b_l]`` under ``sum_l n_l b_l <= mean_bits sum n_l``.

    Args:
        sensitivity: ``{name: Tr(H_l)/n_l}`` (any non-negative weights).
        errors: ``{name: (15,) ||Q_b(W_l) - W_l||^2 for b = 2..16}`` (see :func:`quantization_errors`).
        sizes: ``{name: n_l}``.
        mean_bits: Average bits per weight allowed.
        choices: Allowed bit widths.
        max_frontier: Largest Pareto frontier kept; beyond it the frontier is thinned (then the answer may be
            slightly suboptimal, reported by the third return value).

    Returns:
        ``(bits, objective, exact)``: ``{name: bits}``, the minimised ``Omega`` and whether the search was exact.

    Raises:
        ValueError: ``mean_bits`` outside ``[min(choices), max(choices)]``.
    """
    choices = check_choices(choices)
    if isinstance(mean_bits, bool) or not isinstance(mean_bits, (int, float)) or not math.isfinite(mean_bits):
        raise TypeError(f"mean_bits must be a number, got {mean_bits!r}.")
    if not choices[0] <= mean_bits <= choices[-1]:
        raise ValueError(
            f"mean_bits={mean_bits} is outside the range of choices {choices}: the average must lie between "
            f"{choices[0]} and {choices[-1]} bits."
        )
    names = list(sensitivity)
    budget = math.floor(mean_bits * sum(sizes[n] for n in names) + 1e-9)
    omega = {n: {b: float(sensitivity[n]) * float(errors[n][b - 2]) for b in choices} for n in names}
    # suffix minimum cost, to drop partial plans that cannot be completed within the budget
    rest = [0] * (len(names) + 1)
    for i in range(len(names) - 1, -1, -1):
        rest[i] = rest[i + 1] + sizes[names[i]] * choices[0]
    frontier: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    exact = True
    for i, n in enumerate(names):
        cand = []
        for cost, val, plan in frontier:
            for b in choices:
                c = cost + sizes[n] * b
                if c + rest[i + 1] <= budget:
                    cand.append((c, val + omega[n][b], (*plan, b)))
        cand.sort(key=lambda t: (t[0], t[1]))
        pareto: list[tuple[int, float, tuple[int, ...]]] = []
        best = math.inf
        for item in cand:
            if item[1] < best - 1e-300 or (item[1] < best):
                pareto.append(item)
                best = item[1]
        if len(pareto) > max_frontier:
            step = len(pareto) / max_frontier
            pareto = [pareto[int(k * step)] for k in range(max_frontier)] + [pareto[-1]]
            exact = False
        frontier = pareto
    cost, value, plan = min(frontier, key=lambda t: (t[1], t[0]))
    return dict(zip(names, plan)), value, exact
