"""Gradient leakage: reconstruction quality against model evaluations, speed against breaching, the full audit.

Run: python bench/bench_privacy.py [--quick] [--threads 2] [--skip-audit] [--skip-breaching]

1. Quality vs evaluations: PSNR / SSIM / label accuracy of DLG (L-BFGS, L2) and Inverting Gradients (cosine + TV,
   signed Adam) at growing budgets, for batches of 1 and 4 textured photo crops, on the DLG paper's sigmoid LeNet
   (zoo:photos-lenet's architecture) and a ReLU CNN with max-pooling (zoo:photos-cnn's), both untrained as in the
   papers and breaching's notebooks, and trained (the bundled weights). One evaluation = one forward of the
   model on a candidate batch plus its double backward.
2. Floor: the plain loop the attack cannot avoid, one ``torch.autograd.grad(create_graph=True)`` of the loss and
   one backward of the matching loss per evaluation, on the module itself; ratio of our time per evaluation.
3. Breaching (0.1.2): its own ``deepleakage`` attack configuration (joint label optimisation, L-BFGS lr 1, randn
   start, Euclidean matching, no box) run by its own attacker on the same model and image, against ours with
   the same settings (``labels="joint"``, ``line_search=None``, ``init="randn"``): wall time, evaluations, PSNR.
   Breaching imports torchvision at module level, which does not load with torch 2.13 here; its attack code never
   calls it, so a stub module stands in for torchvision in this process only.
4. The full audit of one model: 3 attacks x (no defence + 4 defences) x batch sizes 1, 4, 16, with the fine-tunes.

Anchors (breaching's stored notebook outputs): DLG on CIFAR-10, batch 1, a 2.9M-parameter ConvNet: PSNR 23.4,
SSIM 0.876 after 1200 L-BFGS iterations; R-GAP on a 154k-parameter CNN: PSNR 49.0.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradsense as gs
from gradsense.privacy.attacks import GradientMatcher
from gradsense.privacy.demo import textured
from gradsense.privacy.shared import as_shared

CE = gs.losses.cross_entropy


def models(trained: bool) -> dict[str, torch.nn.Module]:
    out = {}
    for name, label in (("photos-lenet", "LeNet sigmoid"), ("photos-cnn", "ReLU CNN")):
        m = gs.zoo.load(name)
        if not trained:
            torch.manual_seed(0)
            for mod in m.modules():
                if hasattr(mod, "reset_parameters"):
                    mod.reset_parameters()
        out[f"{label} ({'trained' if trained else 'untrained'})"] = m
    return out


def batch(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = gs.zoo.dataset("photos", split="train")
    idx = textured(data.inputs, data.labels, 8)[:b]
    return data[idx]


def quality(quick: bool) -> None:
    budgets = {"inverting": [100, 300] if quick else [100, 300, 1000], "dlg": [5, 15] if quick else [5, 15, 50]}
    print("\n== 1. quality vs model evaluations (photo crops 3x32x32; PSNR/SSIM mean over the batch, label accuracy)")
    print(f"{'model':<26} {'B':>2} {'attack':<10} {'budget':>7} {'evals':>6} {'PSNR':>6} {'SSIM':>6} {'labels':>6} "
          f"{'seconds':>8}")
    for trained in (False, True):
        for mname, model in models(trained).items():
            for b in (1, 4):
                x, y = batch(b)
                g = gs.privacy.client_gradient(model, CE, x, y)
                for attack, steps_list in budgets.items():
                    for steps in steps_list:
                        t0 = time.perf_counter()
                        rec = gs.privacy.reconstruct(model, CE, g, attack=attack, batch_size=b, steps=steps,
                                                     truth=(x, y), seed=0)
                        s = time.perf_counter() - t0
                        print(f"{mname:<26} {b:>2} {attack:<10} {steps:>7} {rec.n_evaluations:>6} "
                              f"{float(rec.psnr.clamp(max=100).mean()):>6.1f} {float(rec.ssim.mean()):>6.3f} "
                              f"{rec.label_accuracy:>6.0%} {s:>8.1f}", flush=True)


def floor(quick: bool) -> None:
    print("\n== 2. time per evaluation: ours (one restart) vs the plain autograd loop of the same passes (the floor)")
    reps = 10 if quick else 30
    for mname, model in models(False).items():
        for b in (1, 4, 16):
            x, y = batch(min(b, 8)) if b <= 8 else batch(8)
            if b == 16:
                x, y = torch.cat([x, x.flip(-1)]), torch.cat([y, y])
            g = gs.privacy.client_gradient(model, CE, x, y)
            matcher = GradientMatcher(model, CE, as_shared(model, g), distance="cosine", tv=0.01)
            z = torch.rand_like(x)[None]
            params = list(model.parameters())
            target = list(g.values())
            tnorm = torch.sqrt(sum(t.pow(2).sum() for t in target))

            def ours(z: torch.Tensor = z, y: torch.Tensor = y, matcher: Any = matcher) -> None:
                matcher.value_and_grad(z, y)

            def plain(z: torch.Tensor = z[0], y: torch.Tensor = y, model: Any = model, params: Any = params,
                      target: Any = target, tnorm: torch.Tensor = tnorm) -> None:
                zz = z.detach().requires_grad_(True)
                gr = torch.autograd.grad(CE(model(zz), y), params, create_graph=True)
                dot = sum((a * t).sum() for a, t in zip(gr, target))
                obj = 1 - dot / (torch.sqrt(sum(a.pow(2).sum() for a in gr)) * tnorm) + 0.01 * (
                    (zz[..., :, 1:] - zz[..., :, :-1]).abs().mean() + (zz[..., 1:, :] - zz[..., :-1, :]).abs().mean())
                torch.autograd.grad(obj, zz)

            times: dict[str, list[float]] = {"ours": [], "plain": []}
            for fn in (ours, plain):
                fn()
            for _ in range(reps):  # interleaved
                for key, fn in (("ours", ours), ("plain", plain)):
                    t0 = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - t0)
            o, p = statistics.median(times["ours"]), statistics.median(times["plain"])
            print(f"{mname:<26} B={b:<3} ours {o * 1e3:7.2f} ms   floor {p * 1e3:7.2f} ms   ratio {o / p:5.2f}",
                  flush=True)


class _Stub(types.ModuleType):
    """Stands in for torchvision, which breaching imports at module level but its attacks never call."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name.lstrip("_")[:1].isupper():
            return type(name, (torch.nn.Module,), {})
        return _Stub(f"{self.__name__}.{name}")


def _import_breaching() -> Any:
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in ("torchvision", "torchvision.transforms", "torchvision.datasets", "torchvision.datasets.utils",
                     "torchvision.models", "torchvision.utils", "torchvision.transforms.functional"):
            mod = _Stub(name)
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
            mod.__path__ = []
            sys.modules[name] = mod
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*version_base.*")
    logging.getLogger("breaching").setLevel(logging.WARNING)
    import breaching

    return breaching


def versus_breaching(quick: bool) -> None:
    print("\n== 3. DLG against breaching 0.1.2's own deepleakage attack (same model, image, iterations, seeds; "
          "runs interleaved, medians over seeds)")
    try:
        breaching = _import_breaching()
    except Exception as err:
        print(f"breaching not runnable here ({type(err).__name__}: {err}); skipped")
        return
    from omegaconf import OmegaConf

    iterations, seeds = (10, 2) if quick else (30, 3)
    meta = OmegaConf.create({"shape": [3, 32, 32], "modality": "vision", "task": "classification", "classes": 8})
    for mname, model in models(False).items():
        x, y = batch(1)
        g = gs.privacy.client_gradient(model, CE, x, y)
        calls = [0]

        def count(*_: Any, calls: list[int] = calls) -> None:
            calls[0] += 1

        cfg = breaching.get_attack_config("deepleakage", overrides=[f"optim.max_iterations={iterations}",
                                                                    f"optim.callback={10**6}"])
        rows: dict[str, list[tuple[float, int, float]]] = {"breaching": [], "ours (same config)": [],
                                                           "ours (default)": []}
        for seed in range(seeds):
            hook = model.register_forward_hook(count)
            try:
                attacker = breaching.attacks.prepare_attack(model, torch.nn.CrossEntropyLoss(), cfg,
                                                            setup=dict(device=torch.device("cpu"), dtype=torch.float))
                payload = [{"parameters": [p.detach() for p in model.parameters()], "buffers": None, "metadata": meta}]
                shared = [{"gradients": [t.clone() for t in g.values()], "buffers": None,
                           "metadata": {"num_data_points": 1, "labels": None, "local_hyperparams": None}}]
                calls[0] = 0
                torch.manual_seed(seed)
                t0 = time.perf_counter()
                out, _ = attacker.reconstruct(payload, shared, {}, dryrun=False)
                tb = time.perf_counter() - t0
            finally:
                hook.remove()
            rows["breaching"].append((tb, calls[0], float(gs.privacy.psnr(x, out["data"].detach().clamp(0, 1))[0])))
            for key, kw in (("ours (same config)", {"labels": "joint", "line_search": None, "init": "randn"}),
                            ("ours (default)", {})):
                t0 = time.perf_counter()
                rec = gs.privacy.reconstruct(model, CE, g, attack="dlg", steps=iterations, truth=(x, y), seed=seed,
                                             **kw)
                rows[key].append((time.perf_counter() - t0, rec.n_evaluations, float(rec.psnr[0])))
        ref = statistics.median(t / max(n, 1) for t, n, _ in rows["breaching"])
        for key, vals in rows.items():
            per = statistics.median(t / max(n, 1) for t, n, _ in vals)
            print(f"{mname:<26} {key:<19} {iterations} it: {statistics.median(t for t, _, _ in vals):6.1f} s, "
                  f"{statistics.median(n for _, n, _ in vals):6.0f} evals, {per * 1e3:5.1f} ms/eval "
                  f"(breaching/ours {ref / per:4.2f}), PSNR median {statistics.median(p for _, _, p in vals):5.1f} "
                  f"[{min(p for _, _, p in vals):.1f}, {max(p for _, _, p in vals):.1f}]", flush=True)


def full_audit(quick: bool) -> None:
    print("\n== 4. the full audit of one model: 3 attacks x (none + 4 defences) x batch sizes 1, 4, 16, with fine-tunes")
    for trained in (True, False):
        model = models(trained)["LeNet sigmoid (trained)" if trained else "LeNet sigmoid (untrained)"]
        label = "zoo:photos-lenet" + ("" if trained else " (untrained)")
        train, test = gs.zoo.dataset("photos", split="train"), gs.zoo.dataset("photos", split="test")
        opts = {"inverting": {"steps": 150}, "dlg": {"steps": 10}} if quick else {}
        t0 = time.perf_counter()
        res = gs.privacy.audit(model, CE, train, attacks=("idlg", "dlg", "inverting"),
                               defenses=("none", "prune:0.1", "dp:0.1", "int8", "local:4:0.01"),
                               batch_sizes=(1, 4, 16), heldout=test[:], attack_options=opts, finetune_steps=50,
                               seed=0, show_progress=False, name=label)
        total = time.perf_counter() - t0
        print(f"\n{label}")
        header, rows = res.table()
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        costs = res.cost_table()
        if costs:
            print(f"fine-tune: 50 rounds, batches of 32, step 0.01; held-out accuracy before "
                  f"{100 * res.meta['finetune']['accuracy_before']:.1f}%")
            for r in [costs[0], *costs[1]]:
                print("  ".join(str(c).ljust(20) for c in r))
        per: dict[str, float] = {}
        for r in res.rows:
            per[r["attack"]] = per.get(r["attack"], 0.0) + r["seconds"]
        budgets = res.meta["settings"]["attack_options"]
        print(f"audit total {total:.1f} s (attacks: " + ", ".join(f"{k} {v:.1f} s" for k, v in per.items())
              + f"; inverting {budgets['inverting']['steps']} steps, dlg {budgets['dlg']['steps']} L-BFGS iterations); "
              f"torch threads {torch.get_num_threads()}", flush=True)


def costs(quick: bool) -> None:
    print("\n== 5. accuracy cost of the defences where training moves accuracy: an MLP 64-128-10 on the digits, trained "
          "from scratch by federated SGD with each defence")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10)).eval()
    train, test = gs.zoo.dataset("digits", split="train"), gs.zoo.dataset("digits", split="test")
    rounds = 60 if quick else 200
    t0 = time.perf_counter()
    res = gs.privacy.audit(model, CE, train, attacks=("idlg", "analytic"),
                           defenses=("none", "prune:0.1", "dp:1.0", "int8", "local:4:0.1"), batch_sizes=(1, 8),
                           heldout=test[:], finetune_steps=rounds, finetune_lr=0.1, seed=0, show_progress=False,
                           name="digits MLP (untrained)")
    print(f"{rounds} rounds, batches of 32, server step 0.1 (local steps: 4 client steps of 0.1 per round), from "
          f"random weights; held-out accuracy before {100 * res.meta['finetune']['accuracy_before']:.1f}% "
          f"({time.perf_counter() - t0:.1f} s)")
    header, rows = res.cost_table()
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(16) for c in r))
    header, rows = res.table()
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(14) for c in r))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller budgets")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--skip-audit", action="store_true")
    parser.add_argument("--skip-breaching", action="store_true")
    parser.add_argument("--only", choices=["quality", "floor", "breaching", "audit", "costs"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    parts = {"quality": quality, "floor": floor, "breaching": versus_breaching, "audit": full_audit, "costs": costs}
    for name, fn in parts.items():
        if args.only and name != args.only:
            continue
        if (name == "audit" and args.skip_audit) or (name == "breaching" and args.skip_breaching):
            continue
        fn(args.quick)


if __name__ == "__main__":
    main()
