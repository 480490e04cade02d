"""Explanation-quality metrics in units of one fwd+bwd (U), ours vs captum.metrics, same perturbations, one process.

Run: python bench/bench_evaluation.py [--quick]
Target (issue 5): infidelity and max-sensitivity, batched, >= 3x faster than captum.metrics with the same
number of perturbations on the ResNet-style CNN (32 images 3x32x32, 2 threads). captum is timed at its default
(all perturbed rows in one batch, ``max_examples_per_batch=None``) and looping one perturbation at a time
(``max_examples_per_batch=32``, what a memory-bound user sets). Before timing, both are run on one shared
tensor of perturbations and their values compared.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradsense as gs
import gradsense.evaluation as ev
from bench.models import small_resnet
from bench.runner import Bench


def agreement(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, attr: torch.Tensor) -> None:
    """Max relative difference ours vs captum on the same explicit perturbations."""
    from captum.attr import Saliency
    from captum.metrics import infidelity, sensitivity_max

    s, n = 8, x.shape[0]
    pert = ev.perturbations("gaussian", x, s, seed=0, noise_scale=0.1)
    ex_major = pert.transpose(0, 1).reshape(n * s, *x.shape[1:])
    ours = ev.infidelity(model, x, attr, target=y, n_perturbations=s, perturbation=pert).values
    theirs = infidelity(model, lambda inp: (ex_major, inp - ex_major), x, attr, target=y, n_perturb_samples=s)
    print(f"infidelity agreement (same perturbations): max rel. diff {((ours - theirs).abs() / theirs.abs()).max():.2e}")
    ys = ev.perturbations("uniform", x, s, seed=0, radius=0.02)
    ey = ys.transpose(0, 1).reshape(n * s, *x.shape[1:])
    ours = ev.max_sensitivity(model, x, None, target=y, explainer="saliency", n_perturbations=s, perturbation=ys).values
    theirs = sensitivity_max(Saliency(model).attribute, x, perturb_func=lambda inp, r: inp + ey, n_perturb_samples=s,
                             target=y, abs=False)
    print(f"max-sensitivity agreement (same perturbations): max rel. diff {((ours - theirs).abs() / theirs.abs()).max():.2e}")


def run(title: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int, n_inf: int,
        n_sens: int) -> None:
    from captum.attr import Saliency
    from captum.metrics import infidelity, sensitivity_max

    attr = gs.attribute(model, x, target=y, method="saliency").attributions
    agreement(model, x, y, attr)
    b = Bench(title, model, x, y, repeats=repeats)
    sigma = 0.1

    def perturb(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noise = sigma * torch.randn_like(inputs)
        return noise, inputs - noise

    n = x.shape[0]
    b.time(f"infidelity {n_inf} perturbations (ours)",
           lambda: ev.infidelity(model, x, attr, target=y, n_perturbations=n_inf, noise_scale=sigma))
    b.time(f"infidelity {n_inf} perturbations (captum default)",
           lambda: infidelity(model, perturb, x, attr, target=y, n_perturb_samples=n_inf))
    b.time(f"infidelity {n_inf} perturbations (captum, max_examples_per_batch={n})",
           lambda: infidelity(model, perturb, x, attr, target=y, n_perturb_samples=n_inf, max_examples_per_batch=n))
    b.time(f"max-sensitivity {n_sens} perturbations, saliency (ours)",
           lambda: ev.max_sensitivity(model, x, None, target=y, explainer="saliency", n_perturbations=n_sens))
    b.time(f"max-sensitivity {n_sens} perturbations, saliency (captum default)",
           lambda: sensitivity_max(Saliency(model).attribute, x, n_perturb_samples=n_sens, target=y, abs=False))
    b.time(f"max-sensitivity {n_sens} perturbations, saliency (captum, max_examples_per_batch={n})",
           lambda: sensitivity_max(Saliency(model).attribute, x, n_perturb_samples=n_sens, target=y, abs=False,
                                   max_examples_per_batch=n))
    b.print()
    names = [r.name for r in b.rows]
    print(f"ratios (captum / ours): infidelity default {b.ratio(names[0], names[1]):.2f}x, looped "
          f"{b.ratio(names[0], names[2]):.2f}x; max-sensitivity default {b.ratio(names[3], names[4]):.2f}x, looped "
          f"{b.ratio(names[3], names[5]):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    torch.set_num_threads(2)
    repeats = 1 if args.quick else 2
    torch.manual_seed(0)
    model = small_resnet()
    x = torch.rand(32, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)
    run("SmallResNet (~309k params), 32 images 3x32x32", model, x, y, repeats, n_inf=50, n_sens=10)


if __name__ == "__main__":
    main()
