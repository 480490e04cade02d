"""Training-monitor overhead per step, against the plain loop, Cockpit and wandb.watch-style histograms.

Run: python bench/bench_monitor.py [--quick] [--models cnn,mlp,minilm] [--rounds 7] [--memory]

For each model the same training step (forward, backward, optimizer step; the plain loop is the floor: the monitor
adds no pass the loop does not make, except per-example norms and scheduled extras) runs under each configuration
on its own copy of the model, interleaved round by round in one process with 1 thread, and the median CPU seconds
per step (``time.process_time``: the process's own time, so that other jobs on a shared machine do not enter the
ratios) are compared with the plain loop's:

- ``cheap`` / ``standard`` / ``full``: gradsense.monitor presets (``full`` = per-example statistics every step);
- ``histograms``: what ``wandb.watch(model, log="all", log_freq=1)`` computes, reimplemented (wandb itself needs an
  account or a run): ``torch.histc`` of every parameter and every gradient (64 bins between their min and max),
  copied to the host, every step;
- ``cockpit economy`` / ``cockpit full`` (MLP only): Cockpit's presets (BackPACK extensions, every step).

Targets (issue 12): cheap <= 3%, standard <= 10%, full <= 35% overhead per step. ``--memory`` measures, each in a
fresh subprocess, how much the resident memory grows over 10 steps after the first (what a configuration keeps:
copies, caches), next to the bytes the monitor reports holding (``Monitor.memory_bytes()``).

Models: the bundled digits CNN (BatchNorm in train mode, batch 64), the bench MLP (64-256-256-10, batch 128) and
all-MiniLM-L6-v2 fine-tuned on the bundled sentence pairs (batch 8 pairs, needs the ``hf`` extra).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradsense as gs
from bench.models import mlp

CONFIGS = ["plain", "cheap", "standard", "full", "histograms", "cockpit economy", "cockpit full"]


# ------------------------------------------------------------------------------------------ workloads
def cnn_workload(seed: int) -> dict[str, Any]:
    from gradsense.zoo.models import DigitsCNN

    torch.manual_seed(seed)
    model = DigitsCNN().train()
    data = gs.zoo.dataset("digits", split="train")
    g = torch.Generator().manual_seed(0)
    batches = [(data.inputs[idx], data.labels[idx]) for idx in (torch.randint(0, len(data), (64,), generator=g)
                                                                 for _ in range(8))]
    return {"model": model, "batches": batches, "loss": F.cross_entropy,
            "opt": torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)}


def mlp_workload(seed: int) -> dict[str, Any]:
    model = mlp(seed).train()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(128, 1, 8, 8, generator=g), torch.randint(0, 10, (128,), generator=g)) for _ in range(8)]
    return {"model": model, "batches": batches, "loss": F.cross_entropy,
            "opt": torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)}


def minilm_workload(seed: int) -> dict[str, Any]:
    from gradsense.importance.sentences import SentencePairModel, pair_data, similarity_loss

    torch.manual_seed(seed)
    enc = gs.zoo.load("minilm")
    model = SentencePairModel(enc).train()
    x, y = pair_data(enc)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 48, 8)]
    return {"model": model, "batches": batches, "loss": similarity_loss,
            "opt": torch.optim.AdamW(model.parameters(), lr=2e-5)}


WORKLOADS: dict[str, Callable[[int], dict[str, Any]]] = {"cnn": cnn_workload, "mlp": mlp_workload,
                                                          "minilm": minilm_workload}


# ------------------------------------------------------------------------------------------ configurations
class Histograms:
    """wandb.watch(log="all", log_freq=1) reimplemented: histograms of every parameter and gradient per step."""

    def __init__(self, model: nn.Module, bins: int = 64) -> None:
        self.model, self.bins = model, bins
        self.logged: list[Any] = []

    def after_step(self) -> None:
        out = {}
        for name, p in self.model.named_parameters():
            for tag, t in (("parameters", p.detach()), ("gradients", p.grad)):
                if t is None:
                    continue
                lo, hi = float(t.min()), float(t.max())
                out[f"{tag}/{name}"] = (torch.histc(t.float(), bins=self.bins, min=lo, max=hi).cpu().tolist(), lo, hi)
        self.logged = [out]  # wandb sends them; keep only the last step


def _cockpit_import() -> Any:
    # cockpit 1.0.2 imports pkg_resources, which setuptools >= 81 no longer ships: give it the two names it uses
    if "pkg_resources" not in sys.modules:
        shim = types.ModuleType("pkg_resources")
        shim.DistributionNotFound = importlib.metadata.PackageNotFoundError  # type: ignore[attr-defined]

        class _Dist:
            def __init__(self, name: str) -> None:
                self.version = importlib.metadata.version(name)

        shim.get_distribution = _Dist  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim
    import backpack
    import cockpit
    from cockpit.utils.configuration import configuration

    return backpack, cockpit, configuration


def make_runner(name: str, workload: str, seed: int = 0) -> Callable[[int], None] | None:
    """A function running ``n`` training steps of ``workload`` under configuration ``name`` (None: unavailable)."""
    w = WORKLOADS[workload](seed)
    model, opt, loss_fn, batches = w["model"], w["opt"], w["loss"], w["batches"]
    state = {"i": 0}
    extra: Any = None
    if name in ("cheap", "standard", "full"):
        extra = gs.monitor.Monitor(model, opt, quantities=name)
    elif name == "histograms":
        extra = Histograms(model)
    elif name.startswith("cockpit"):
        if workload != "mlp":
            return None
        try:
            backpack, cockpit, configuration = _cockpit_import()
        except ImportError as err:
            print(f"  cockpit unavailable: {err}")
            return None
        model = backpack.extend(model)
        loss_mod = backpack.extend(nn.CrossEntropyLoss())
        per_example = nn.CrossEntropyLoss(reduction="none")
        ck = cockpit.Cockpit(model.parameters(), quantities=configuration(name.split()[1]))

        def ck_step(n: int) -> None:
            for _ in range(n):
                step = state["i"]
                x, y = batches[step % len(batches)]
                state["i"] += 1
                opt.zero_grad()
                out = model(x)
                loss, losses = loss_mod(out, y), per_example(out, y)
                with ck(step, info={"batch_size": x.shape[0], "individual_losses": losses, "loss": loss,
                                    "optimizer": opt}):
                    loss.backward(create_graph=ck.create_graph(step))
                opt.step()

        return ck_step

    def step(n: int) -> None:
        for _ in range(n):
            x, y = batches[state["i"] % len(batches)]
            state["i"] += 1
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            if isinstance(extra, gs.monitor.Monitor):
                extra.log(loss=loss.detach())
            elif isinstance(extra, Histograms):
                extra.after_step()

    step.monitor = extra  # type: ignore[attr-defined]
    return step


# ------------------------------------------------------------------------------------------ timing
def time_workload(workload: str, configs: list[str], rounds: int, steps: int) -> dict[str, float]:
    runners = {}
    for c in configs:
        r = make_runner(c, workload)
        if r is not None:
            runners[c] = r
    block = {}
    for c, r in runners.items():  # warm-up (first calls, allocator, hooks' first due steps), and the block size
        r(2)
        t0 = time.process_time()
        r(1)
        one = time.process_time() - t0
        # the monitors' schedules repeat every 10 steps: their blocks are multiples of 10 steps
        block[c] = steps if c in ("plain", "cheap", "standard", "full", "histograms") else max(1, min(steps, round(
            0.5 / max(one, 1e-6))))
    times: dict[str, list[float]] = {c: [] for c in runners}
    for _ in range(rounds):
        for c, r in runners.items():
            t0 = time.process_time()
            r(block[c])
            times[c].append((time.process_time() - t0) / block[c])
    return {c: statistics.median(v) for c, v in times.items()}


def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def memory_child(workload: str, config: str, steps: int) -> None:
    torch.set_num_threads(1)
    r = make_runner(config, workload)
    if r is None:
        print(json.dumps(None))
        return
    r(1)
    before = _rss_kb()
    r(steps)
    extra = getattr(r, "monitor", None)
    held = extra.memory_bytes() if isinstance(extra, gs.monitor.Monitor) else None
    print(json.dumps({"rss_added_kb": _rss_kb() - before, "held": held}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="cnn,mlp,minilm")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed block (default: by model)")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory per configuration")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory_child:
        memory_child(args.memory_child[0], args.memory_child[1], int(args.memory_child[2]))
        return
    configs = args.configs.split(",")
    print(f"torch {torch.__version__}, 1 thread; overhead = median CPU seconds per step / plain loop's - 1")
    for workload in args.models.split(","):
        if workload == "minilm":
            try:
                gs.zoo.load("minilm")
            except ImportError as err:
                print(f"\n== minilm skipped: {err}")
                continue
        rounds = args.rounds or (3 if args.quick else (3 if workload == "minilm" else 9))
        steps = args.steps or {"cnn": 20, "mlp": 40, "minilm": 20}[workload]
        med = time_workload(workload, configs, rounds, steps)
        base = med["plain"]
        print(f"\n== {workload}: plain step {base * 1e3:.2f} ms ({rounds} rounds x {steps} steps, interleaved)")
        print(f"{'config':<18}{'ms/step':>10}{'overhead':>10}")
        for c, v in med.items():
            print(f"{c:<18}{v * 1e3:>10.2f}{(v / base - 1) * 100:>9.1f}%")
        if args.memory:
            print(f"{'config':<18}{'RSS growth, 10 steps':>22}{'monitor holds':>15}")
            rows = {}
            for c in configs:
                out = subprocess.run([sys.executable, __file__, "--memory-child", workload, c, "10"], capture_output=True,
                                     text=True, check=True).stdout.strip().splitlines()[-1]
                rows[c] = json.loads(out)
            for c, d in rows.items():
                if d is None:
                    continue
                held = f"{d['held'] / 2**20:.2f} MiB" if d.get("held") is not None else "-"
                print(f"{c:<18}{d['rss_added_kb'] / 1024:>18.1f} MiB{held:>15}")


if __name__ == "__main__":
    main()
