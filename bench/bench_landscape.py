"""Loss-surface cost in units of ONE FORWARD pass (U), ours vs loss-landscapes, same model and data, one process.

Run: python bench/bench_landscape.py [--quick] [--threads N]
Target (issue 6): a 21x21 filter-normalised surface of the ~85k-parameter MLP on 512 examples of 8x8 inputs
<= 200 U (loss-landscapes ~540 U, about 1.2x a plain loop of forwards); the ResNet-style CNN reported too
(64 random 3x32x32 images, 7x7 grid; --quick: 32 images, 5x5).

Rows:
- "plain loop of forwards": P forwards of the unchanged model, the floor of any one-point-at-a-time method;
- "ours, default": gs.loss_surface with its defaults (vmap, or one point at a time on CPU when one point's
  forward is large: meta["vectorized"] says which);
- "ours, vmap": vectorize=True, grid points as a vmap batch, chunked under the memory budget;
- "ours, one point at a time": gs.loss_surface(vectorize=False), the same arithmetic as a loop;
- "loss-landscapes random_plane": deepcopy_model=True (its default, False, moves the caller's weights).
Every row is the median of --repeats runs after one warm-up.
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
from bench.runner import median_time
from gradsense.landscape import loss_surface


def run(title: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, repeats: int) -> dict:
    import loss_landscapes
    from loss_landscapes.metrics import Loss

    loss = gs.losses.cross_entropy
    points = steps * steps

    def forward() -> None:
        with torch.no_grad():
            loss(model(x), y).item()

    u = median_time(forward, repeats=max(7, repeats), warmup=2)

    def plain_loop() -> None:
        with torch.no_grad():
            for _ in range(points):
                loss(model(x), y).item()

    def theirs() -> None:
        loss_landscapes.random_plane(model, Loss(loss, x, y), distance=1, steps=steps, normalization="filter",
                                     deepcopy_model=True)

    rows = {
        "plain loop of forwards": median_time(plain_loop, repeats=repeats),
        "ours, default": median_time(lambda: loss_surface(model, loss, (x, y), steps=steps, seed=0),
                                     repeats=repeats),
        "ours, vmap": median_time(
            lambda: loss_surface(model, loss, (x, y), steps=steps, seed=0, vectorize=True), repeats=repeats),
        "ours, one point at a time": median_time(
            lambda: loss_surface(model, loss, (x, y), steps=steps, seed=0, vectorize=False), repeats=repeats),
        "loss-landscapes random_plane": median_time(theirs, repeats=repeats),
    }
    res = loss_surface(model, loss, (x, y), steps=steps, seed=0)
    print(f"\n== {title}: {steps}x{steps} grid ({points} points), {x.shape[0]} examples  "
          f"(U = one forward = {u * 1e3:.2f} ms, torch {torch.__version__}, {torch.get_num_threads()} threads)")
    w = max(len(k) for k in rows)
    print(f"{'method':<{w}}  {'seconds':>8}  {'U':>7}  {'U/point':>7}")
    for k, s in rows.items():
        print(f"{k:<{w}}  {s:>8.3f}  {s / u:>7.0f}  {s / u / points:>7.2f}")
    ll = rows["loss-landscapes random_plane"]
    print(f"ratios: loss-landscapes / ours (default) {ll / rows['ours, default']:.2f}x, "
          f"/ ours (vmap) {ll / rows['ours, vmap']:.2f}x, "
          f"/ ours (one at a time) {ll / rows['ours, one point at a time']:.2f}x, "
          f"/ plain loop {ll / rows['plain loop of forwards']:.2f}x; default ran "
          f"{'vmap' if res.meta['vectorized'] else 'one point at a time'}, chunk {res.meta['chunk_size']} points")
    return {k: v / u for k, v in rows.items()}


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
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2 in the reference setting)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    digits = gs.zoo.dataset("digits", split="train")
    x, y = digits[:512]
    run("MLP 64-256-256-10 (~85k params)", mlp(), x, y, steps=21, repeats=repeats)
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
    run("SmallResNet (~309k params), 3x32x32", resnet, xr, yr, steps=5 if args.quick else 7, repeats=repeats)
    weights_moved_by_peer()


if __name__ == "__main__":
    main()
