"""Benchmark runner: the unit U = one forward+backward of the model on the batch, and costs in U.

Every benchmark measures in one process, on the same model and data: first U, then each method;
it prints seconds and the cost in U (and ratios to a peer where there is one). Timings are medians
of ``repeats`` runs after a warm-up.

:class:`FloorBench` times a method against its *physical floor* - a plain loop of the passes the method
cannot avoid (input-gradient passes for IG/SmoothGrad, forwards for a loss surface) - and against peers,
all interleaved in one process (round-robin, so a noisy neighbour hits every row alike), and prints
ours/floor and peer/ours from the medians. ``clock="cpu"`` times process CPU time instead of wall time:
on a shared machine, time spent waiting for a core does not count.
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


# ---------------------------------------------------------------------------------------------- the floor
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def add_clock_args(parser: Any, threads: int = 1) -> None:
    """Add ``--clock {wall,cpu}``, ``--threads N`` and ``--repeats N`` to an argparse parser."""
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or process CPU time (robust on a shared machine)")
    parser.add_argument("--threads", type=int, default=threads, help=f"torch threads (default {threads})")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (medians are reported)")


@dataclass
class Entry:
    name: str
    fn: Callable[[], Any]
    role: str  # "ours", "floor" or "peer"
    times: list[float]


class FloorBench:
    """A method, the plain loop of the passes it cannot avoid (its floor), and peers, timed interleaved.

    Every round runs every entry once (the order rotates from round to round); after ``warmup`` rounds,
    ``repeats`` rounds are recorded and the medians compared.

    Args:
        title: Printed above the table.
        repeats: Timed rounds.
        warmup: Untimed rounds first.
        clock: ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``: all threads of this
            process; with more than one torch thread, spinning threads count too).
    """

    def __init__(self, title: str, *, repeats: int = 5, warmup: int = 1, clock: str = "wall") -> None:
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}.")
        self.title, self.repeats, self.warmup, self.clock = title, repeats, warmup, clock
        self.entries: dict[str, Entry] = {}

    def add(self, name: str, fn: Callable[[], Any], role: str = "ours") -> None:
        """Register ``fn`` under ``name`` as ``"ours"``, ``"floor"`` or ``"peer"``."""
        if role not in ("ours", "floor", "peer"):
            raise ValueError(f"role must be 'ours', 'floor' or 'peer', got {role!r}.")
        self.entries[name] = Entry(name, fn, role, [])

    def run(self) -> FloorBench:
        """Time every entry ``warmup + repeats`` times, round-robin."""
        tick = CLOCKS[self.clock]
        order = list(self.entries.values())
        for r in range(self.warmup + self.repeats):
            k = r % len(order)
            for e in order[k:] + order[:k]:
                t0 = tick()
                e.fn()
                dt = tick() - t0
                if r >= self.warmup:
                    e.times.append(dt)
        return self

    def seconds(self, name: str) -> float:
        """Median seconds of ``name``."""
        return statistics.median(self.entries[name].times)

    def vs_floor(self, ours: str, floor: str) -> float:
        """``ours / floor`` (1.0 = no overhead over the plain loop)."""
        return self.seconds(ours) / self.seconds(floor)

    def speedup(self, peer: str, ours: str) -> float:
        """``peer / ours`` (how many times faster ours is)."""
        return self.seconds(peer) / self.seconds(ours)

    def print(self, unit_seconds: float | None = None, unit_name: str = "U") -> None:
        """The table: median seconds, spread (min-max), and cost in units when ``unit_seconds`` is given."""
        print(f"\n== {self.title}  ({self.clock} clock, median of {self.repeats}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads)")
        w = max(len(n) for n in self.entries)
        head = f"{'':<{w}}  {'role':<5}  {'median s':>9}  {'min s':>8}  {'max s':>8}"
        print(head + (f"  {unit_name:>7}" if unit_seconds else ""))
        for e in self.entries.values():
            line = f"{e.name:<{w}}  {e.role:<5}  {statistics.median(e.times):>9.4f}  {min(e.times):>8.4f}  " \
                   f"{max(e.times):>8.4f}"
            print(line + (f"  {statistics.median(e.times) / unit_seconds:>7.1f}" if unit_seconds else ""))

    def print_ratios(self, ours: str, floor: str, peers: list[str] | tuple[str, ...] = ()) -> dict[str, float]:
        """Print and return ``ours/floor`` and ``peer/ours`` for each peer."""
        out = {"ours/floor": self.vs_floor(ours, floor)}
        parts = [f"{ours}: {out['ours/floor']:.2f}x the floor"]
        for p in peers:
            out[f"{p}/ours"] = self.speedup(p, ours)
            parts.append(f"{p} {out[f'{p}/ours']:.2f}x slower")
        print("ratios: " + "; ".join(parts))
        return out
