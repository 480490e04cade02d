"""Engine primitives in units of one fwd+bwd: input gradients, per-example gradients, HVPs.

Run: python bench/bench_engine.py   (CPU; prints tables, asserts nothing)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradsense as gs
from bench.models import small_resnet
from bench.runner import Bench
from gradsense.core import CurvatureOperator, input_gradients, per_example_grads
from gradsense.core.targets import as_target


def run(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, title: str) -> Bench:
    b = Bench(title, model, x, y)
    tgt = as_target(y, x.shape[0])
    b.time("input gradients (Saliency)", lambda: input_gradients(model, x, tgt))
    b.time("gs.attribute saliency", lambda: gs.attribute(model, x, target=y, method="saliency"))
    b.time("per-example grads (vmap)", lambda: per_example_grads(model, gs.losses.cross_entropy, x, y), repeats=3)
    op = CurvatureOperator(model, gs.losses.cross_entropy, (x, y))
    v = torch.randn(op.numel)
    b.time("HVP fwd-over-rev", lambda: op.matvec(v), repeats=3)
    op2 = CurvatureOperator(model, gs.losses.cross_entropy, (x, y), method="double-backward")
    b.time("HVP double backward", lambda: op2.matvec(v), repeats=3)
    op3 = CurvatureOperator(model, gs.losses.cross_entropy, (x, y), kind="ggn")
    b.time("GGN-vector product", lambda: op3.matvec(v), repeats=3)
    b.print()
    return b


def main() -> None:
    torch.manual_seed(0)
    digits = gs.zoo.dataset("digits", split="test")
    x, y = digits[:64]
    run(gs.zoo.load("digits-cnn"), x, y, "zoo:digits-cnn, batch 64 of 1x8x8")
    model = small_resnet()
    xr, yr = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    run(model, xr, yr, "SmallResNet (~309k params), batch 64 of 3x32x32")


if __name__ == "__main__":
    main()
