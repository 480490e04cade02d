"""Loss-surface cost in units of ONE FORWARD pass (U), ours vs loss-landscapes, same model and data, one process.

Run: python bench/bench_landscape.py [--quick] [--threads N] [--clock cpu] [--repeats N] [--skip-resnet]
Targets: a 21x21 filter-normalised surface of the ~85k-parameter MLP on 512 examples of 8x8 inputs
<= 1.15x the plain-forward floor (issue 11; issue 6: <= 200 U, loss-landscapes ~540 U); the ResNet-style CNN
reported too (64 random 3x32x32 images, 7x7 grid; --quick: 32 images, 5x5). All rows interleaved (one
round runs each once), medians.

Rows:
- "plain loop of forwards": P forwards of the unchanged model, the floor of any one-point-at-a-time method;
- "ours, default": gs.loss_surface with its defaults (vmap, or one point at a time on CPU when one point's
  forward is large: meta["vectorized"] says which);
- "ours, vmap": vectorize=True, grid points as a vmap batch, chunked under the memory budget;
- "ours, one point at a time": gs.loss_surface(vectorize=False), the same arithmetic as a loop;
- "loss-landscapes random_plane": deepcopy_model=True (its default, False, moves the caller's weights).
Every row is the median of --repeats rounds after one warm-up round; ratios: ours / floor, peer / ours.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradsense as gs
from bench.models import mlp, small_resnet
from bench.runner import FloorBench, add_clock_args
from gradsense.landscape import loss_surface


def run(title: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, repeats: int,
        clock: str = "wall") -> dict:
    import loss_landscapes
    from loss_landscapes.metrics import Loss

    loss = gs.losses.cross_entropy
    points = steps * steps

    def plain_loop() -> None:  # the floor: one forward of the data per grid point, nothing else
        with torch.no_grad():
            for _ in range(points):
                loss(model(x), y).item()

    def theirs() -> None:
        loss_landscapes.random_plane(model, Loss(loss, x, y), distance=1, steps=steps, normalization="filter",
                                     deepcopy_model=True)

    b = FloorBench(f"{title}: {steps}x{steps} grid ({points} points), {x.shape[0]} examples", repeats=repeats,
                   clock=clock)
    b.add("plain loop of forwards", plain_loop, "floor")
    b.add("ours, default", lambda: loss_surface(model, loss, (x, y), steps=steps, seed=0))
    b.add("ours, vmap", lambda: loss_surface(model, loss, (x, y), steps=steps, seed=0, vectorize=True))
    b.add("ours, one point at a time", lambda: loss_surface(model, loss, (x, y), steps=steps, seed=0, vectorize=False))
    b.add("loss-landscapes random_plane", theirs, "peer")
    b.run()
    res = loss_surface(model, loss, (x, y), steps=steps, seed=0)
    u = b.seconds("plain loop of forwards") / points  # one forward, on the same clock
    b.print(unit_seconds=u, unit_name="U")
    print(f"(U = one forward = {u * 1e3:.2f} ms; default ran {'vmap' if res.meta['vectorized'] else 'one point at a time'}"
          f", chunk {res.meta['chunk_size']} points)")
    out = b.print_ratios("ours, default", "plain loop of forwards", ["loss-landscapes random_plane"])
    for k in ("ours, vmap", "ours, one point at a time"):
        print(f"        {k}: {b.vs_floor(k, 'plain loop of forwards'):.2f}x the floor")
    return out


def weights_moved_by_peer() -> None:
    """loss-landscapes' default (deepcopy_model=False) leaves the caller's weights moved; ours never does."""
    import loss_landscapes
    from loss_landscapes.metrics import Loss

    model = mlp()
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    before = copy.deepcopy(model.state_dict())
    loss_surface(model, gs.losses.cross_entropy, (x, y), steps=5, seed=0)
    ours = max(float((model.state_dict()[k] - v).abs().max()) for k, v in before.items())
    loss_landscapes.random_plane(model, Loss(gs.losses.cross_entropy, x, y), distance=1, steps=5)
    theirs = max(float((model.state_dict()[k] - v).abs().max()) for k, v in before.items())
    print(f"\nlargest weight change after the call: ours {ours:g}, loss-landscapes default {theirs:.3g}; "
          f"requires_grad left on the caller's parameters by loss-landscapes: "
          f"{sorted({p.requires_grad for p in model.parameters()})}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller ResNet grid")
    parser.add_argument("--skip-resnet", action="store_true", help="only the MLP's 21x21 surface")
    add_clock_args(parser, threads=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 5)
    digits = gs.zoo.dataset("digits", split="train")
    x, y = digits[:512]
    run("MLP 64-256-256-10 (~85k params)", mlp(), x, y, steps=21, repeats=repeats, clock=args.clock)
    if args.skip_resnet:
        return
    torch.manual_seed(0)
    resnet = small_resnet()
    with torch.no_grad():  # loss-landscapes' filter normalisation divides by zero on an all-zero parameter
        for mod in resnet.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.bias.normal_(0.0, 0.1)
    n = 32 if args.quick else 64
    xr = torch.rand(n, 3, 32, 32)
    with torch.no_grad():
        yr = resnet(xr).argmax(1)
    run("SmallResNet (~309k params), 3x32x32", resnet, xr, yr, steps=5 if args.quick else 7, repeats=repeats,
        clock=args.clock)
    weights_moved_by_peer()


if __name__ == "__main__":
    main()
