"""Attribution cost against the physical floor and captum, same model and data, one process.

Run: python bench/bench_attribution.py [--quick] [--clock cpu] [--threads N] [--only floor|costs]

1. ``floor`` (issue 11): IG 50 steps and SmoothGrad 50 samples at default settings, each against the plain
   loop of the passes it cannot avoid - input-gradient passes (forward, target logit, ``autograd.grad`` w.r.t.
   the rows) over the same 50 x N rows in chunks of the size our default picks, plus the plain forwards of the
   N clean inputs (the reported scores) and, for IG, of the N baselines (``delta``) - and against captum's
   defaults (all 50 x N rows in one batch) and captum tuned to the same chunk (``internal_batch_size`` /
   ``nt_samples_batch_size``). All interleaved, medians. Targets: ours <= 1.15x the floor and >= 2x captum's
   defaults, on the ResNet-style CNN (32 images 3x32x32) and an MLP 64-256-256-10 (32 digits).
2. ``costs`` (issue 3): costs in units of one fwd+bwd (U): IG and SmoothGrad <= 30 U on the ResNet-style CNN
   (2 threads); Grad-CAM with upsampling <= 0.4 U; adaptive IG reaches 1% completeness in >= 3x fewer model
   passes than captum's default 50-step IG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradsense as gs
from bench.models import mlp, small_resnet
from bench.runner import Bench, FloorBench, add_clock_args
from gradsense.core.batching import chunk_size_for, estimate_example_bytes


def completeness(model, x, y, attr, baseline) -> torch.Tensor:
    """Relative completeness error |sum(attr) - (F(x) - F(b))| / |F(x) - F(b)| per example."""
    with torch.no_grad():
        gap = model(x).gather(1, y[:, None]).squeeze(1) - model(baseline).gather(1, y[:, None]).squeeze(1)
    return (attr.reshape(len(x), -1).sum(1) - gap).abs() / gap.abs()


def run(title: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> None:
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, NoiseTunnel, Saliency

    b = Bench(title, model, x, y, repeats=repeats)
    last_conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    b.time("saliency (ours)", lambda: gs.attribute(model, x, target=y, method="saliency"))
    b.time("saliency (captum)", lambda: Saliency(model).attribute(x, target=y, abs=False))
    b.time("IG 50 steps (ours, default)", lambda: gs.attribute(model, x, target=y, method="ig", steps=50))
    b.time("IG 50 steps (captum default)", lambda: IntegratedGradients(model).attribute(x, target=y, n_steps=50))
    b.time("IG 50 steps (captum, internal_batch_size=32)",
           lambda: IntegratedGradients(model).attribute(x, target=y, n_steps=50, internal_batch_size=32))
    b.time("SmoothGrad 50 (ours, default)", lambda: gs.attribute(model, x, target=y, method="smoothgrad", n_samples=50))
    b.time("SmoothGrad 50 (captum NoiseTunnel default batch)",
           lambda: NoiseTunnel(Saliency(model)).attribute(x, target=y, nt_samples=50, abs=False, stdevs=0.15))
    b.time("SmoothGrad 50 (captum, nt_samples_batch_size=1)",
           lambda: NoiseTunnel(Saliency(model)).attribute(x, target=y, nt_samples=50, abs=False, stdevs=0.15,
                                                         nt_samples_batch_size=1))
    b.time("Grad-CAM + upsample (ours)", lambda: gs.attribute(model, x, target=y, method="gradcam"))
    b.time("Grad-CAM + upsample (captum)", lambda: LayerAttribution.interpolate(
        LayerGradCam(model, last_conv).attribute(x, target=y), x.shape[2:], "bilinear"))
    b.print()
    print(f"ratios (captum / ours): IG default {b.ratio('IG 50 steps (ours, default)', 'IG 50 steps (captum default)'):.2f}x, "
          f"SmoothGrad default {b.ratio('SmoothGrad 50 (ours, default)', 'SmoothGrad 50 (captum NoiseTunnel default batch)'):.2f}x, "
          f"Grad-CAM {b.ratio('Grad-CAM + upsample (ours)', 'Grad-CAM + upsample (captum)'):.2f}x")

    # adaptive IG vs captum's default 50-step Gauss-Legendre: passes per example to 1% completeness,
    # and what the maps are worth: L1 error against a 1024-step reference
    ref = gs.attribute(model, x, target=y, method="ig", steps=1024, rule="riemann_middle").attributions

    def l1(a: torch.Tensor) -> float:
        return float(((a - ref).abs().reshape(len(x), -1).sum(1) / ref.abs().reshape(len(x), -1).sum(1)).mean())

    for refine in ("uniform", "greedy"):
        ours = gs.attribute(model, x, target=y, method="ig", steps="auto", rtol=0.01, refine=refine)
        steps = ours.tensors["steps"].float()
        passes = steps + 1  # k intervals cost k + 1 gradient evaluations, all reused
        err = completeness(model, x, y, ours.attributions, torch.zeros_like(x))
        print(f"adaptive IG (rtol 1%, refine={refine}): passes/example mean {passes.mean():.1f} (min "
              f"{int(passes.min())}, max {int(passes.max())}), ratio 50/mean {50 / passes.mean():.2f}x; "
              f"max rel. completeness error {err.max():.4f}; map L1 error {l1(ours.attributions):.3f}; "
              f"steps chosen {sorted(steps.int().tolist())}")
    for n_steps in (50, 100, 200, 400):
        theirs = IntegratedGradients(model).attribute(x, target=y, n_steps=n_steps)
        err = completeness(model, x, y, theirs, torch.zeros_like(x))
        print(f"captum IG {n_steps} steps: max rel. completeness error {err.max():.4f}, examples over 1%: "
              f"{(err > 0.01).sum().item()}/{len(x)}; map L1 error {l1(theirs):.3f}")


def default_chunk(model: torch.nn.Module, x: torch.Tensor, rows: int) -> int:
    """Rows per forward/backward our default picks for ``rows`` rows shaped like ``x`` (the memory budget)."""
    return chunk_size_for(estimate_example_bytes(model, x[:2]), total=rows, device=x.device)


def input_gradient_floor(model: torch.nn.Module, rows: torch.Tensor, target: torch.Tensor, chunk: int,
                         forwards: tuple[torch.Tensor, ...] = ()) -> None:
    """The passes IG and SmoothGrad cannot avoid: forward, target logit, gradient w.r.t. the rows, per chunk;
    plus plain forwards of ``forwards`` (the clean inputs whose scores are reported, IG's baseline for delta)."""
    with torch.no_grad():
        for f in forwards:
            model(f)
    for start in range(0, rows.shape[0], chunk):
        r = rows[start : start + chunk].detach().requires_grad_(True)
        out = model(r)
        torch.autograd.grad(out.gather(1, target[start : start + chunk, None]).sum(), r)


def floor(title: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int,
          clock: str) -> dict[str, float]:
    """IG 50 / SmoothGrad 50: ours vs the input-gradient floor vs captum default and tuned, interleaved."""
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    n, s = x.shape[0], 50
    chunk = default_chunk(model, x, s * n)
    gen = torch.Generator().manual_seed(0)
    rows = torch.rand((s * n, *x.shape[1:]), generator=gen)  # the passes cost the same at any point
    target = y.repeat(s)
    b = FloorBench(f"{title}: {s} x {n} rows, chunks of {chunk}", repeats=repeats, clock=clock)
    zeros = torch.zeros_like(x)
    b.add("floor IG: gradient passes + F(x), F(0)",
          lambda: input_gradient_floor(model, rows, target, chunk, (x, zeros)), "floor")
    b.add("floor SmoothGrad: gradient passes + F(x)",
          lambda: input_gradient_floor(model, rows, target, chunk, (x,)), "floor")
    b.add("IG 50 (ours, default)", lambda: gs.attribute(model, x, target=y, method="ig", steps=50))
    b.add("IG 50 (captum default)", lambda: IntegratedGradients(model).attribute(x, target=y, n_steps=50), "peer")
    b.add("IG 50 (captum tuned)", lambda: IntegratedGradients(model).attribute(
        x, target=y, n_steps=50, internal_batch_size=chunk), "peer")
    b.add("SmoothGrad 50 (ours, default)", lambda: gs.attribute(model, x, target=y, method="smoothgrad", n_samples=s))
    b.add("SmoothGrad 50 (captum default)", lambda: NoiseTunnel(Saliency(model)).attribute(
        x, target=y, nt_samples=s, abs=False, stdevs=0.15), "peer")
    b.add("SmoothGrad 50 (captum tuned)", lambda: NoiseTunnel(Saliency(model)).attribute(
        x, target=y, nt_samples=s, abs=False, stdevs=0.15, nt_samples_batch_size=max(1, chunk // n)), "peer")
    b.run().print()
    out = b.print_ratios("IG 50 (ours, default)", "floor IG: gradient passes + F(x), F(0)",
                         ["IG 50 (captum default)", "IG 50 (captum tuned)"])
    out.update({f"sg {k}": v for k, v in b.print_ratios(
        "SmoothGrad 50 (ours, default)", "floor SmoothGrad: gradient passes + F(x)",
        ["SmoothGrad 50 (captum default)", "SmoothGrad 50 (captum tuned)"]).items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--only", choices=["floor", "costs"], default=None)
    add_clock_args(parser, threads=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only in (None, "floor"):
        torch.manual_seed(0)
        resnet = small_resnet()
        xr = torch.rand(32, 3, 32, 32)
        with torch.no_grad():
            yr = resnet(xr).argmax(1)
        reps = args.repeats or (3 if args.quick else 7)
        floor("SmallResNet (~309k params), 32 images 3x32x32", resnet, xr, yr, reps, args.clock)
        digits = gs.zoo.dataset("digits", split="test")
        xm, ym = digits[:32]
        floor("MLP 64-256-256-10 (~85k params), 32 digits 1x8x8", mlp(), xm, ym, reps, args.clock)
    if args.only == "floor":
        return
    repeats = args.repeats or (2 if args.quick else 3)
    digits = gs.zoo.dataset("digits", split="test")
    x, y = digits[:32]
    run("zoo:digits-cnn, 32 digits 1x8x8", gs.zoo.load("digits-cnn"), x, y, repeats)
    torch.manual_seed(0)
    model = small_resnet()
    xr = torch.rand(32, 3, 32, 32)
    with torch.no_grad():
        yr = model(xr).argmax(1)
    run("SmallResNet (~309k params), 32 images 3x32x32", model, xr, yr, repeats)


if __name__ == "__main__":
    main()
