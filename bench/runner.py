"""Benchmark runner: the unit U = one forward+backward of the model on the batch, and costs in U.

Every benchmark measures in one process, on the same model and data: first U, then each method;
it prints seconds and the cost in U (and ratios to a peer where there is one). Timings are medians
of ``repeats`` runs after a warm-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Timing:
    name: str
    seconds: float
    units: float
    note: str = ""


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def unit(model: nn.Module, x: Tensor, y: Tensor, repeats: int = 7) -> float:
    """Seconds of one forward+backward (cross-entropy, parameter gradients) on ``(x, y)``."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    seconds = median_time(step, repeats=repeats, warmup=2)
    model.zero_grad(set_to_none=True)
    return seconds


class Bench:
    """Collect timings in units of one fwd+bwd and print a table."""

    def __init__(self, title: str, model: nn.Module, x: Tensor, y: Tensor, repeats: int = 5) -> None:
        self.title, self.repeats = title, repeats
        self.u = unit(model, x, y)
        self.rows: list[Timing] = []

    def time(self, name: str, fn: Callable[[], Any], note: str = "", repeats: int | None = None) -> Timing:
        s = median_time(fn, repeats=repeats or self.repeats)
        t = Timing(name, s, s / self.u, note)
        self.rows.append(t)
        return t

    def ratio(self, ours: str, peer: str) -> float:
        a = next(r for r in self.rows if r.name == ours)
        b = next(r for r in self.rows if r.name == peer)
        return b.seconds / a.seconds

    def print(self) -> None:
        print(f"\n== {self.title}  (U = one fwd+bwd = {self.u * 1e3:.2f} ms, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads)")
        w = max(len(r.name) for r in self.rows) if self.rows else 10
        print(f"{'method':<{w}}  {'seconds':>10}  {'U':>8}  note")
        for r in self.rows:
            print(f"{r.name:<{w}}  {r.seconds:>10.4f}  {r.units:>8.2f}  {r.note}")
