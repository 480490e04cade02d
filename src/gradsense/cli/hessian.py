"""``gradsense hessian``: Hessian eigenvalues, trace and spectral density of a model's loss on a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from gradsense.cli.common import console, friendly_errors, model_option


def _fmt(x: float, digits: int = 5) -> str:
    return f"{x:.{digits}g}"


def _print_tables(eigs: Any, trace: Any, density: Any) -> None:
    from rich.table import Table

    table = Table(title="Hessian eigenvalues (Lanczos)", title_justify="left")
    for col in ("#", "eigenvalue", "residual ||Hv - lv||", "converged"):
        table.add_column(col, justify="right")
    for i, (v, r, ok) in enumerate(zip(eigs.eigenvalues, eigs.residuals, eigs.tensors["pair_converged"])):
        table.add_row(str(i + 1), _fmt(float(v), 7), _fmt(float(r), 2), "yes" if bool(ok) else "no")
    console.print(table)

    rows = Table(title="Trace and spectrum", title_justify="left", show_header=False)
    rows.add_column(style="bold")
    rows.add_column()
    rows.add_row("trace (Hutch++)", f"{_fmt(trace.value, 6)} ± {_fmt(trace.stderr, 2)} (1 s.e.)")
    rows.add_row("mean eigenvalue tr(H)/n", _fmt(trace.value / max(int(trace.meta["numel"]), 1)))
    if eigs.gradient_overlap is not None:
        rows.add_row("gradient in top-k eigenspace", f"{eigs.gradient_overlap:.1%}")
    rows.add_row("density (SLQ)", f"{density.ritz_values.shape[0]} probes x {density.ritz_values.shape[1]} steps, "
                 f"eigenvalues in [{_fmt(float(density.ritz_values.min()), 4)}, {_fmt(float(density.ritz_values.max()), 4)}]")
    rows.add_row("loss", _fmt(float(eigs.meta.get("loss", float("nan")))))
    rows.add_row("Hessian-vector products", f"eigs {eigs.n_hvp}, trace {trace.n_hvp}, density {density.n_hvp}")
    console.print(rows)

    if trace.per_group:
        per = Table(title="Per group", title_justify="left")
        for col in ("group", "parameters", "trace", "s.e.", "Tr(H_l)/n_l", "top eigenvalue"):
            per.add_column(col, justify="right" if col != "group" else "left")
        tops = eigs.group_eigenvalues
        for g, d in trace.per_group.items():
            top = tops.get(g)
            per.add_row(g, str(d["numel"]), _fmt(d["trace"]), _fmt(d["stderr"], 2), _fmt(d["mean"], 4),
                        _fmt(float(top[0])) if top is not None and top.numel() else "")
        console.print(per)


@click.command("hessian")
@model_option
@click.option("--dataset", required=True, help="zoo dataset name, e.g. digits (takes the first --n examples).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test"]))
@click.option("--n", "n_examples", default=256, show_default=True, type=int, help="number of dataset examples.")
@click.option("--per", default=None, type=click.Choice(["layer", "block", "parameter"]),
              help="also per-group traces and top eigenvalues.")
@click.option("--k", default=5, show_default=True, type=int, help="number of top eigenvalues.")
@click.option("--tol", default=1e-3, show_default=True, type=float, help="relative Ritz-residual tolerance of Lanczos.")
@click.option("--rtol", default=0.01, show_default=True, type=float, help="relative standard error of the trace.")
@click.option("--steps", default=80, show_default=True, type=int, help="Lanczos steps per probe of the density.")
@click.option("--probes", default=4, show_default=True, type=int, help="probes of the density.")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the random start vectors and probes.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="run folder to write (results, figures, report).")
@friendly_errors
def hessian_cmd(
    model_spec: str, weights: str | None, dataset: str, split: str, n_examples: int, per: str | None, k: int,
    tol: float, rtol: float, steps: int, probes: int, seed: int, out: str | None,
) -> None:
    """How sharp is the minimum, and where? Hessian eigenvalues, trace and density of the cross-entropy loss.

    Lanczos for the top-k eigenvalues (with residuals), Hutch++ for the trace (with a standard error),
    stochastic Lanczos quadrature for the eigenvalue density; with --per layer also each layer's trace
    Tr(H_l)/n_l and top eigenvalue.

    \b
    Examples:
      gradsense hessian --model zoo:digits-cnn --dataset digits --per layer --out runs/hessian
      gradsense hessian --model zoo:digits-cnn --dataset digits --k 10 --n 540 --seed 1
    """
    import gradsense as gs
    from gradsense.curvature import hessian_eigs, hessian_trace, spectral_density
    from gradsense.specs import load_model

    if n_examples < 1:
        raise ValueError(f"--n must be >= 1, got {n_examples}.")
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}.")
    model = load_model(model_spec, weights=weights)
    data = gs.zoo.dataset(dataset, split=split)
    x, y = data[:n_examples]
    loss = gs.losses.cross_entropy
    eigs = hessian_eigs(model, loss, (x, y), k=k, tol=tol, per=per, seed=seed, name=model_spec)
    trace = hessian_trace(model, loss, (x, y), rtol=rtol, per=per, seed=seed, name=model_spec)
    density = spectral_density(model, loss, (x, y), steps=steps, probes=probes, seed=seed, name=model_spec)
    _print_tables(eigs, trace, density)
    if out:
        from gradsense.results import RunFolder
        from gradsense.viz.report import Report

        run = RunFolder(out)
        report = Report.extend(Path(out) / "report.html",
                               f"gradsense hessian: {model_spec} on {len(x)} {dataset} examples ({split})", source="hessian")
        for name, res in (("eigenvalues", eigs), ("trace", trace), ("density", density)):
            run.save_result(res, f"hessian-{name}")
            run.save_figure(res.plot(), f"hessian-{name}")
            report.add_result(res)
        path = report.write(Path(out) / "report.html")
        console.print(f"wrote {path}")
