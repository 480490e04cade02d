"""Train the small zoo models and write their weights into src/gradsense/zoo/weights.

Usage:
    python scripts/train_zoo.py                       # all models, seed 0
    python scripts/train_zoo.py digits-cnn --seed 0   # one model
    python scripts/train_zoo.py block-digits-cnn      # the block-digits ground-truth testbed (issue 5)
    python scripts/train_zoo.py --out /tmp/weights    # somewhere else

Training is deterministic (fixed seed, single thread, ``torch.use_deterministic_algorithms``),
so re-running it on the same machine and torch version reproduces the shipped files.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gradsense.zoo.registry import MODELS, WEIGHTS_DIR
from gradsense.zoo.train import save_weights, train


def main(argv: list[str] | None = None) -> int:
    """Train the requested models and save them; returns the process exit code."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"models to train (default: all of {sorted(MODELS)})"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="output folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while training")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    names = args.names or sorted(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    for name in names:
        print(f"training {name} (seed {args.seed})", flush=True)
        start = time.perf_counter()
        model, acc = train(name, seed=args.seed, num_threads=args.threads, verbose=not args.quiet)
        seconds = time.perf_counter() - start
        weights, meta = save_weights(
            model,
            name,
            test_accuracy=acc,
            seed=args.seed,
            directory=args.out,
            extra={"train_seconds": round(seconds, 1), "train_threads": args.threads},
        )
        size_kb = weights.stat().st_size / 1024
        print(
            f"{name}: test accuracy {acc:.4f}, {seconds:.1f} s, {weights} ({size_kb:.0f} KiB), {meta}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
