"""Training-data attribution: LDS against retrained models, mislabel detection, cost, and MiniLM features at scale.

Run (the full sizes of issue 13; every section prints its own table):

    python bench/bench_influence.py lds --model logreg --subsets 100 --queries 100
    python bench/bench_influence.py lds --model cnn --subsets 100 --queries 100 --epochs 20 [--with-cg]
    python bench/bench_influence.py mislabel --model logreg
    python bench/bench_influence.py mislabel --model cnn --epochs 20
    python bench/bench_influence.py cost --n-train 1000 --n-query 100
    python bench/bench_influence.py minilm --n 10000 --proj-dim 4096 --max-memory 4GB --out runs/minilm-features

Everything runs in one process per section on the same model and data, peers (kronfluence, dattri) next to
gradsense where they are installed. ``cost`` runs each method in a child process to read its peak resident memory
(``ru_maxrss`` minus the child's baseline after loading the data), and prints the floor: the plain batched
forward+backward passes the method cannot avoid (EK-FAC: two passes over the training set for the factors, one
for the training gradients, one for the queries).

Ground truth for LDS (Park et al. 2023): ``--subsets`` random halves of the training split, each trained from
scratch with the same recipe as the scored model (logistic regression: L-BFGS on mean CE + wd/2 |theta|^2 to
convergence; CNN: AdamW, ``--epochs`` epochs, seeded), query losses of each; resumable with ``--truth DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "influence"))

import gradsense as gs  # noqa: E402
from bench.runner import median_time  # noqa: E402

CE = gs.losses.cross_entropy
WD = 1e-3


# ------------------------------------------------------------------------------------------------ models and data
def digits(n_query: int) -> tuple[Any, Any]:
    train = gs.zoo.dataset("digits", split="train")[:]
    test = gs.zoo.dataset("digits", split="test")[:n_query]
    return train, test


def train_logreg(x: torch.Tensor, y: torch.Tensor, wd: float = WD, seed: int = 0) -> nn.Module:
    """Multinomial logistic regression on the 64 pixels, L-BFGS to convergence (deterministic given the data)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=200, tolerance_grad=1e-8, tolerance_change=1e-11,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = F.cross_entropy(model(x), y) + wd / 2 * sum((p**2).sum() for p in model.parameters())
        value.backward()
        return value

    opt.step(closure)
    for p in model.parameters():
        p.grad = None
    return model.eval()


def train_cnn(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    """The bundled digits CNN architecture, AdamW lr 3e-3, weight decay 0.01, batch 64, seeded."""
    from gradsense.zoo.models import DigitsCNN

    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), 64):
            b = perm[s:s + 64]
            if len(b) < 2:
                continue
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in model.parameters():
        p.grad = None
    return model.eval()


def make_train_fn(kind: str, x: torch.Tensor, y: torch.Tensor, epochs: int) -> Any:
    def fn(indices: torch.Tensor, seed: int) -> nn.Module:
        if kind == "logreg":
            return train_logreg(x[indices], y[indices])
        return train_cnn(x[indices], y[indices], epochs, seed)

    fn.__qualname__ = f"train_{kind}_{epochs}"
    return fn


# ------------------------------------------------------------------------------------------------ methods
def our_methods(kind: str, with_cg: bool = False) -> dict[str, dict[str, Any]]:
    if kind == "logreg":
        return {
            "grad_dot": {"method": "grad_dot"},
            "grad_cos": {"method": "grad_cos"},
            "influence (exact, lambda=wd)": {"method": "influence", "curvature": "hessian", "damping": WD},
            "influence (CG, lambda=wd)": {"method": "influence", "curvature": "ggn", "solver": "cg", "damping": WD},
            "ekfac (lambda=wd)": {"method": "ekfac", "damping": WD},
            "ekfac (heuristic lambda)": {"method": "ekfac"},
            "trak (no projection)": {"method": "trak"},
        }
    out = {
        "grad_dot": {"method": "grad_dot"},
        "grad_cos": {"method": "grad_cos"},
        "ekfac (heuristic lambda)": {"method": "ekfac"},
        "trak (proj 2048)": {"method": "trak", "proj_dim": 2048},
    }
    if with_cg:  # one pass over the training set per query per iteration: ~20 min for 50 queries on 2 cores
        out["influence (CG 30 it., GGN)"] = {"method": "influence", "curvature": "ggn", "solver": "cg", "maxiter": 30}
    return out


def peer_methods(kind: str, with_cg: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        import kronfluence  # noqa: F401
        from peer_harness import kronfluence_scores

        out["kronfluence ekfac (heuristic)"] = lambda m, tr, q: kronfluence_scores(m, tr, q, strategy="ekfac")
        if kind == "logreg":
            out["kronfluence ekfac (lambda=wd)"] = lambda m, tr, q: kronfluence_scores(m, tr, q, damping=WD)
    except ImportError:
        pass
    try:
        import dattri  # noqa: F401
        from peer_harness import dattri_scores

        out["dattri grad-dot (TracIn, 1 ckpt)"] = lambda m, tr, q: dattri_scores(m, tr, q, method="tracin")
        if kind == "logreg" or with_cg:
            out["dattri IF-CG (10 it.)"] = lambda m, tr, q: dattri_scores(
                m, tr, q, method="cg", regularization=WD if kind == "logreg" else 1e-3)
        if kind == "logreg":
            out["dattri IF-explicit"] = lambda m, tr, q: dattri_scores(m, tr, q, method="explicit", regularization=WD)
        out["dattri TRAK (proj 512)"] = lambda m, tr, q: dattri_scores(m, tr, q, method="trak", proj_dim=512)
    except ImportError:
        pass
    return out


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n== {title}")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


# ------------------------------------------------------------------------------------------------ sections
def lds_section(args: argparse.Namespace) -> None:
    (x, y), (xq, yq) = digits(args.queries)
    model = train_logreg(x, y) if args.model == "logreg" else train_cnn(x, y, args.epochs, seed=0)
    acc = float((model(xq).argmax(1) == yq).float().mean())
    t0 = time.perf_counter()
    truth = gs.influence.retrain(make_train_fn(args.model, x, y, args.epochs), len(y), (xq, yq), CE,
                                 subsets=args.subsets, fraction=0.5, seeds=args.seeds, seed=0,
                                 out=args.truth, resume=args.truth is not None and Path(args.truth).exists(),
                                 show_progress=True)
    t_truth = time.perf_counter() - t0
    rows = []
    for name, opts in our_methods(args.model, args.with_cg).items():
        t0 = time.perf_counter()
        res = gs.influence.scores(model, CE, (x, y), (xq, yq), **opts)
        sec = time.perf_counter() - t0
        lds = gs.influence.lds(res, truth)
        rows.append([f"gradsense {name}", f"{lds.value:.3f} +- {lds.stderr:.3f}", f"{sec:.1f}"])
        print(rows[-1], flush=True)
    if not args.no_peers:
        for name, fn in peer_methods(args.model, args.with_cg).items():
            t0 = time.perf_counter()
            try:
                s = fn(model, (x, y), (xq, yq))
            except Exception as err:  # a peer failing is a result to report, not a crash
                rows.append([name, f"failed: {type(err).__name__}: {str(err)[:60]}", ""])
                continue
            sec = time.perf_counter() - t0
            lds = gs.influence.lds(s.double(), truth)
            rows.append([name, f"{lds.value:.3f} +- {lds.stderr:.3f}", f"{sec:.1f}"])
            print(rows[-1], flush=True)
    table(f"LDS on digits {args.model} ({len(y)} train, {len(yq)} test queries, test acc {acc:.3f}; {args.subsets} "
          f"retrained halves x {args.seeds} seed(s), ground truth {t_truth:.0f} s)",
          ["method", "LDS +- s.e.", "seconds"], rows)


def noisy_labels(y: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    flip = torch.randperm(len(y), generator=g)[: round(fraction * len(y))]
    noisy = y.clone()
    noisy[flip] = (y[flip] + torch.randint(1, 10, (len(flip),), generator=g)) % 10
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[flip] = True
    return noisy, mask


def mislabel_section(args: argparse.Namespace) -> None:
    (x, y), _ = digits(1)
    noisy, flipped = noisy_labels(y, 0.1)
    model = train_logreg(x, noisy) if args.model == "logreg" else train_cnn(x, noisy, args.epochs, seed=0)
    methods = {"grad_dot": {"method": "grad_dot"}, "ekfac": {"method": "ekfac"}}
    if args.model == "logreg":
        methods["influence (exact, lambda=wd)"] = {"method": "influence", "damping": WD, "curvature": "hessian"}
        methods["ekfac (lambda=wd)"] = {"method": "ekfac", "damping": WD}
    else:
        methods["trak (proj 2048)"] = {"method": "trak", "proj_dim": 2048}
    rows = []
    for name, opts in methods.items():
        t0 = time.perf_counter()
        res = gs.influence.self_influence(model, CE, (x, noisy), **opts)
        rows.append([f"gradsense {name}", f"{res.fraction_found(flipped, 0.1):.1%}", f"{time.perf_counter() - t0:.1f}"])
        print(rows[-1], flush=True)
    loss = F.cross_entropy(model(x), noisy, reduction="none").detach()
    top = torch.argsort(loss, descending=True)[: round(0.1 * len(y))]
    rows.append(["(baseline: highest training loss)", f"{float(flipped[top].sum()) / float(flipped.sum()):.1%}", ""])
    if not args.no_peers:
        try:
            from peer_harness import kronfluence_scores

            t0 = time.perf_counter()
            s = kronfluence_scores(model, (x, noisy), (x[:1], noisy[:1]), self_influence=True)
            res = gs.influence.SelfInfluenceResult(tensors={"scores": s.double()})
            rows.append(["kronfluence ekfac self-influence", f"{res.fraction_found(flipped, 0.1):.1%}",
                         f"{time.perf_counter() - t0:.1f}"])
        except ImportError:
            pass
    table(f"Mislabel detection: digits {args.model}, {int(flipped.sum())} of {len(y)} labels flipped; share found in the "
          "top 10% by self-influence (chance 10%)", ["method", "found", "seconds"], rows)


COST_METHODS = ["gradsense ekfac", "gradsense ekfac (max_memory=64MB)", "gradsense grad_cos", "gradsense trak (proj 2048)", "kronfluence ekfac",
                "dattri TRAK (proj 2048)", "floor"]


def _cost_child(method: str, n_train: int, n_query: int) -> dict[str, float]:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    model = gs.zoo.load("digits-cnn")
    train = gs.zoo.dataset("digits", split="train")[:n_train]
    query = gs.zoo.dataset("digits", split="test")[:n_query]
    if method == "floor":
        def run(tr: Any, q: Any) -> None:
            for _ in range(3):
                model.zero_grad()
                CE(model(tr[0]), tr[1]).backward()
            model.zero_grad()
            CE(model(q[0]), q[1]).backward()
            model.zero_grad()
    elif method.startswith("gradsense"):
        opts = {"gradsense ekfac": {"method": "ekfac"}, "gradsense grad_cos": {"method": "grad_cos"},
                "gradsense ekfac (max_memory=64MB)": {"method": "ekfac", "max_memory": "64MB"},
                "gradsense trak (proj 2048)": {"method": "trak", "proj_dim": 2048}}[method]

        def run(tr: Any, q: Any) -> None:
            gs.influence.scores(model, CE, tr, q, **opts)
    elif method == "kronfluence ekfac":
        from peer_harness import kronfluence_scores

        def run(tr: Any, q: Any) -> None:
            kronfluence_scores(model, tr, q, strategy="ekfac")
    else:
        from peer_harness import dattri_scores

        def run(tr: Any, q: Any) -> None:
            dattri_scores(model, tr, q, method="trak", proj_dim=2048)
    # one call on a few examples first: libraries' one-time imports and set-up are not the method's memory
    run((train[0][:16], train[1][:16]), (query[0][:2], query[1][:2]))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sec = median_time(lambda: run(train, query), repeats=2, warmup=1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": sec, "peak_mb": (peak - base) / 1024}


def cost_section(args: argparse.Namespace) -> None:
    rows = []
    results = {}
    for method in COST_METHODS:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "GRADSENSE_PROGRESS": "0"}
        proc = subprocess.run([sys.executable, __file__, "cost-child", "--method", method, "--n-train",
                               str(args.n_train), "--n-query", str(args.n_query)], capture_output=True, text=True,
                              env=env, timeout=3600)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not line:
            rows.append([method, "failed", proc.stderr.strip().splitlines()[-1][:60] if proc.stderr else "", ""])
            continue
        r = json.loads(line[-1])
        results[method] = r
    floor = results.get("floor", {}).get("seconds")
    for method, r in results.items():
        ratio = f"{r['seconds'] / floor:.1f}x" if floor else ""
        rows.append([method, f"{r['seconds']:.2f}", ratio, f"{r['peak_mb']:.0f}"])
    kf = results.get("kronfluence ekfac")
    ours = results.get("gradsense ekfac")
    if kf and ours:
        rows.append(["ekfac: kronfluence / gradsense", f"{kf['seconds'] / ours['seconds']:.2f}x time", "",
                     f"{kf['peak_mb'] / max(ours['peak_mb'], 1):.2f}x memory"])
    table(f"Cost of {args.n_train} train x {args.n_query} query scores, zoo:digits-cnn (1 thread; peak = resident "
          "memory above the child's baseline after a warm-up call on 16 examples)", ["method", "seconds", "/ floor",
                                                                                      "peak MB"], rows)


class MiniLMClassifier(nn.Module):
    """MiniLM sentence encoder + a seeded linear head: a loss for token sequences without any download."""

    def __init__(self, encoder: nn.Module, classes: int = 4) -> None:
        super().__init__()
        self.encoder = encoder
        g = torch.Generator().manual_seed(0)
        self.head = nn.Linear(encoder.embedding_dim, classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) * 0.05)
            self.head.bias.zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids=ids))


def minilm_section(args: argparse.Namespace) -> None:
    enc = gs.zoo.load("minilm")
    model = MiniLMClassifier(enc).eval()
    g = torch.Generator().manual_seed(0)
    vocab = enc.tokenizer.vocab_size
    ids = torch.randint(1000, vocab, (args.n, args.seq_len), generator=g)
    labels = torch.randint(0, 4, (args.n,), generator=g)
    out = Path(args.out)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    feats = gs.influence.features(model, CE, (ids, labels), proj_dim=args.proj_dim, projection="kronecker",
                                  max_memory=args.max_memory, out=out, resume=True, show_progress=True)
    sec = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t1 = time.perf_counter()
    again = gs.influence.features(model, CE, (ids, labels), proj_dim=args.proj_dim, projection="kronecker",
                                  max_memory=args.max_memory, out=out, resume=True)
    reuse = time.perf_counter() - t1
    params = sum(p.numel() for p in model.parameters())
    chunk = int(feats.meta["settings"]["chunk_size"])

    def floor() -> None:  # the passes LoGra cannot avoid: one forward+backward of a chunk (no parameter grads kept)
        out = model(ids[:chunk])
        torch.autograd.grad(CE(out, labels[:chunk]), list(model.parameters()), allow_unused=True)

    per_chunk = median_time(floor, repeats=2, warmup=1)
    floor_1000 = per_chunk * 1000 / chunk
    table(f"MiniLM features: {args.n} sequences x {args.seq_len} tokens, {params / 1e6:.1f}M parameters, "
          f"proj_dim {feats.dim} (Kronecker, {len(feats.meta['projection']['layers'])} layers), budget "
          f"{args.max_memory}", ["what", "value"],
          [["wall time", f"{sec:.1f} s ({1000 * sec / args.n:.1f} s per 1000 sequences)"],
           ["floor: forward+backward", f"{floor_1000:.1f} s per 1000 sequences (ratio "
                                       f"{1000 * sec / args.n / floor_1000:.2f}x)"],
           ["peak resident memory above start", f"{(peak - base) / 1024:.0f} MB (budget {args.max_memory})"],
           ["chunk / shard", f"{feats.meta['settings']['chunk_size']} / {feats.meta['settings']['shard_size']} "
                             "sequences"],
           ["reopening the finished run (resume)", f"{reuse:.2f} s, {again.n} rows, nothing recomputed"],
           ["stored in", str(out)]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=["lds", "mislabel", "cost", "minilm", "cost-child"])
    parser.add_argument("--model", choices=["logreg", "cnn"], default="logreg")
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--truth", default=None, help="folder for the retrained ground truth (resumable)")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--with-cg", action="store_true", help="also CG influence on the CNN (slow)")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-query", type=int, default=100)
    parser.add_argument("--method", default=None)
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--proj-dim", type=int, default=4096)
    parser.add_argument("--max-memory", default="4GB")
    parser.add_argument("--out", default="runs/minilm-features")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("BENCH_THREADS", str(args.threads))
    if args.section == "cost-child":
        print(json.dumps(_cost_child(args.method, args.n_train, args.n_query)))
        return
    {"lds": lds_section, "mislabel": mislabel_section, "cost": cost_section, "minilm": minilm_section}[args.section](args)


if __name__ == "__main__":
    main()
