"""Throughput under torchrun: 2 ranks x 1 thread against 1 rank x 2 threads and 1 rank x 1 thread.

Run: python bench/bench_distributed.py [--rounds 2] [--repeats 2] [--examples 256] [--hvp 16]

Workloads (the same work in every configuration; each rank does its share of the data):

- ``trace``: ``gs.hessian_trace`` of the bundled digits CNN (24k parameters) over ``--examples`` digits in
  batches of 64, Hutchinson with a fixed budget of ``--hvp`` Hessian-vector products (``rtol`` unreachable, so
  every configuration makes exactly the same products).
- ``attribution``: attribution over a dataset, timed when ``gs.attribute_dataset`` exists in the gradsense under
  test; otherwise reported as skipped (the hook is :func:`workload_attribution`).

How it is measured: every configuration runs in fresh processes (``python bench/bench_distributed.py --worker``,
under ``python -m torch.distributed.run --standalone --nproc-per-node 2`` for 2 ranks) that build the model and
data, warm up with one call, then time ``--repeats`` calls by wall clock between barriers (the slowest rank
counts); the configurations are interleaved over ``--rounds`` rounds and the table shows the median over all
timed calls, examples per second, the speed-up over 1 x 1, the CPU seconds each call spent (all ranks
together), and the speed-up those CPU seconds imply on an idle machine. Wall time is what a parallel run saves, so it is the clock here; the machine's load average before
and after is printed, because a shared machine's other work changes these numbers.

Floor: 2 ranks cannot beat 2.0x of 1 x 1 (the work splits in two); the issue's goal is >= 1.7x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------- workers
def workload_trace(args: argparse.Namespace) -> Callable[[], Any]:
    """One Hutchinson trace with a fixed number of Hessian-vector products over this rank's share."""
    import gradsense as gs

    model = gs.zoo.load("digits-cnn").eval()
    data = gs.zoo.dataset("digits", split="train")
    x, y = data.inputs[: args.examples], data.labels[: args.examples]

    def call() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "not converged": the budget is the point
            return gs.hessian_trace(
                model,
                gs.losses.cross_entropy,
                (x, y),
                method="hutchinson",
                rtol=1e-12,
                max_hvp=args.hvp,
                min_samples=args.hvp,
                batch_size=64,
                seed=0,
            )

    return call


def workload_attribution(args: argparse.Namespace) -> Callable[[], Any] | None:
    """Attribution over a dataset (``gs.attribute_dataset``), or ``None`` where it does not exist yet.

    Integrated gradients (16 steps) of the digits CNN over ``--examples`` digits in shards of 32, written to a
    fresh temporary folder per call (under torch.distributed the shards are dealt to the ranks, rank 0 writes).
    """
    import gradsense as gs

    fn = getattr(gs, "attribute_dataset", None)
    if fn is None:
        return None
    model = gs.zoo.load("digits-cnn").eval()
    data = gs.zoo.dataset("digits", split="train")
    x, y = data.inputs[: args.examples], data.labels[: args.examples]

    import itertools
    import os
    import tempfile

    # under torch.distributed the shards go through a folder every rank can read (rank 0 writes); one fresh
    # folder per call, the same name on every rank
    base = os.path.join(tempfile.gettempdir(), f"gs-bench-attr-{os.environ.get('MASTER_PORT', 'single')}-{os.getppid() if 'MASTER_PORT' in os.environ else os.getpid()}")
    calls = itertools.count()

    def call() -> Any:
        out = os.path.join(base, f"call{next(calls)}")
        return fn(model, (x, y), method="integrated_gradients", steps=16, shard_size=32, show_progress=False, out=out)

    return call


WORKLOADS: dict[str, Callable[[argparse.Namespace], Callable[[], Any] | None]] = {
    "trace": workload_trace,
    "attribution": workload_attribution,
}


def worker(args: argparse.Namespace) -> None:
    """Time ``--repeats`` calls of the workload in this configuration; rank 0 writes one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from gradsense.core.distributed import process_group

    with process_group() as (rank, size):
        call = WORKLOADS[args.workload](args)
        if call is None:
            if rank == 0:
                Path(args.result).write_text(json.dumps({"skipped": True}))
            return
        call()  # warm-up: imports, first products, caches

        def barrier() -> None:
            if size > 1:
                torch.distributed.barrier()

        walls, cpus = [], []
        for _ in range(args.repeats):
            barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            call()
            cpu = torch.tensor([time.process_time() - c0], dtype=torch.float64)
            barrier()  # the slowest rank ends the call
            walls.append(time.perf_counter() - t0)
            if size > 1:
                torch.distributed.all_reduce(cpu)
            cpus.append(float(cpu))
        if rank == 0:
            Path(args.result).write_text(
                json.dumps({"walls": walls, "cpus": cpus, "ranks": size, "threads": torch.get_num_threads()})
            )


# ----------------------------------------------------------------------------------------------- driver
CONFIGS = (("1 rank x 1 thread", 1, 1), ("1 rank x 2 threads", 1, 2), ("2 ranks x 1 thread", 2, 1))


def launch(workload: str, ranks: int, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        common = [
            str(Path(__file__).resolve()),
            "--worker",
            "--workload",
            workload,
            "--threads",
            str(threads),
            "--repeats",
            str(args.repeats),
            "--examples",
            str(args.examples),
            "--hvp",
            str(args.hvp),
            "--result",
            str(result),
        ]
        if ranks == 1:
            cmd = [sys.executable, *common]
        else:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(ranks),
                *common,
            ]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workload", default="trace", choices=sorted(WORKLOADS), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--workloads", default="trace,attribution", help="comma-separated workloads.")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every configuration.")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per process (after one warm-up).")
    parser.add_argument("--examples", type=int, default=256, help="examples of the digits data.")
    parser.add_argument("--hvp", type=int, default=16, help="Hessian-vector products of the trace.")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} ({os.cpu_count()} CPUs)")
    for workload in args.workloads.split(","):
        walls: dict[str, list[float]] = {name: [] for name, _, _ in CONFIGS}
        cpus: dict[str, list[float]] = {name: [] for name, _, _ in CONFIGS}
        skipped = False
        for _ in range(args.rounds):
            for name, ranks, threads in CONFIGS:
                got = launch(workload, ranks, threads, args)
                if got.get("skipped"):
                    skipped = True
                    break
                walls[name] += got["walls"]
                cpus[name] += got["cpus"]
            if skipped:
                break
        if skipped:
            print(
                f"\n== {workload}: skipped (gs.attribute_dataset does not exist in this gradsense; the hook is "
                "workload_attribution in this file)"
            )
            continue
        base = statistics.median(walls["1 rank x 1 thread"])
        what = (
            f"Hutchinson trace, {args.hvp} HVPs, digits CNN, {args.examples} examples in batches of 64"
            if workload == "trace"
            else f"integrated gradients (16 steps), {args.examples} examples"
        )
        print(f"\n== {workload}: {what}; {args.rounds} rounds x {args.repeats} calls, interleaved")
        cpu_base = statistics.median(cpus["1 rank x 1 thread"])
        print(
            f"{'configuration':<20} {'wall s (median)':>16} {'min':>8} {'max':>8} {'examples/s':>11} "
            f"{'x 1x1':>7} {'CPU s/call':>11} {'x 1x1 if idle':>14}"
        )
        for name, ranks, threads in CONFIGS:
            w, c = statistics.median(walls[name]), statistics.median(cpus[name])
            print(
                f"{name:<20} {w:>16.3f} {min(walls[name]):>8.3f} {max(walls[name]):>8.3f} "
                f"{args.examples / w:>11.1f} {base / w:>7.2f} {c:>11.3f} {ranks * threads * cpu_base / c:>14.2f}"
            )
        print(
            "floor: 2 ranks <= 2.00x of 1 x 1 (the work splits in two); goal >= 1.70x. 'x 1x1 if idle': the\n"
            "speed-up if every rank or thread had a core of its own, ranks*threads*CPU(1x1)/CPU (all CPU counted):\n"
            "below ranks*threads only by what the split costs in CPU (collectives, duplicated set-up)."
        )
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
