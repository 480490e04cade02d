"""Attribution cost in units of one fwd+bwd (U), ours vs captum, same model and data, one process.

Run: python bench/bench_attribution.py [--quick]
Targets (issue 3): IG 50 steps and SmoothGrad 50 samples at default settings <= 30 U on the
ResNet-style CNN (32 images 3x32x32, 2 threads); Grad-CAM with upsampling <= 0.4 U; adaptive IG reaches
1% completeness in >= 3x fewer model passes than captum's default 50-step IG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradsense as gs
from bench.models import small_resnet
from bench.runner import Bench


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    torch.set_num_threads(2)
    repeats = 2 if args.quick else 3
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
