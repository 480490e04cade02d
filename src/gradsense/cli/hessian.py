"""``gradsense hessian``: Hessian eigenvalues, trace and spectral density of a model's loss on a dataset."""

from __future__ import annotations

from typing import Any

import click

from gradsense.cli.common import Run, analysis_command


def _fmt(x: float, digits: int = 5) -> str:
    return f"{x:.{digits}g}"


def _tables(run: Run, eigs: Any, trace: Any, density: Any) -> None:
    rel = eigs.relative_errors
    rel = [float("nan")] * eigs.eigenvalues.numel() if rel is None else rel.tolist()
    rows = [[str(i + 1), _fmt(float(v), 7), _fmt(float(r), 2), _fmt(e, 2), "yes" if bool(ok) else "no"]
            for i, (v, r, e, ok) in enumerate(zip(eigs.eigenvalues, eigs.residuals, rel,
                                                  eigs.tensors["pair_converged"]))]
    run.table("Hessian eigenvalues (Lanczos)", ["#", "eigenvalue", "residual ||Hv - lv||", "est. rel. error",
                                                "converged"], rows, name="eigenvalues")

    n = max(int(trace.meta["numel"]), 1)
    probes = int(density.ritz_values.shape[0])
    se = density.moment_stderr(1)
    slq_mean = _fmt(density.moment(1), 4) + ("" if se != se else f" ± {_fmt(se, 2)}")
    kv = [
        ("trace (Hutch++)", f"{_fmt(trace.value, 6)} ± {_fmt(trace.stderr, 2)} (1 s.e.)"),
        ("mean eigenvalue tr(H)/n (Hutch++)", f"{_fmt(trace.value / n)} ± {_fmt(trace.stderr / n, 2)}"),
        (f"mean eigenvalue (SLQ, {probes} probe{'s' if probes != 1 else ''})", f"{slq_mean}"),
    ]
    if eigs.gradient_overlap is not None:
        kv.append(("gradient in top-k eigenspace", f"{eigs.gradient_overlap:.1%}"))
    kv += [
        ("density (SLQ)", f"{probes} probe{'s' if probes != 1 else ''} x {density.ritz_values.shape[1]} steps, "
                          "eigenvalues in "
                          f"[{_fmt(float(density.ritz_values.min()), 4)}, {_fmt(float(density.ritz_values.max()), 4)}]"),
        ("loss", _fmt(float(eigs.meta.get("loss", float("nan"))))),
        ("Hessian-vector products", f"eigs {eigs.n_hvp}, trace {trace.n_hvp}, density {density.n_hvp}"),
    ]
    run.rows("Trace and spectrum", kv, name="trace")
    run.note("Both mean eigenvalues estimate tr(H)/n on the same data: SLQ's from its --probes random probes "
             "alone (few, noisy samples), Hutch++'s after removing the top eigenspace, sampled to --rtol: quote "
             "Hutch++'s.")

    if trace.per_group:
        tops = eigs.group_eigenvalues
        per = []
        for g, d in trace.per_group.items():
            top = tops.get(g)
            per.append([g, str(d["numel"]), _fmt(d["trace"]), _fmt(d["stderr"], 2), _fmt(d["mean"], 4),
                        _fmt(float(top[0])) if top is not None and top.numel() else ""])
        run.table("Per group", ["group", "parameters", "trace", "s.e.", "Tr(H_l)/n_l", "top eigenvalue"], per,
                  name="per_group")


@analysis_command("hessian", short_help="Hessian eigenvalues, trace and density of the loss.", n=256)
@click.option("--per", default=None, type=click.Choice(["layer", "block", "parameter"]),
              help="also per-group traces and top eigenvalues.")
@click.option("--k", default=5, show_default=True, type=int, help="number of top eigenvalues.")
@click.option("--tol", default=1e-3, show_default=True, type=float,
              help="relative tolerance of Lanczos, on the residual or the eigenvalue error (--criterion).")
@click.option("--criterion", default="residual", show_default=True, type=click.Choice(["residual", "eigenvalue"]),
              help="stop on the Ritz residual, or on the estimated eigenvalue error (fewer products).")
@click.option("--rtol", default=0.01, show_default=True, type=float, help="relative standard error of the trace.")
@click.option("--steps", default=80, show_default=True, type=int, help="Lanczos steps per probe of the density.")
@click.option("--probes", default=4, show_default=True, type=int, help="probes of the density.")
def hessian_cmd(run: Run, per: str | None, k: int, tol: float, criterion: str, rtol: float, steps: int,
                probes: int) -> None:
    """How sharp is the minimum, and where? Hessian eigenvalues, trace and density of the loss.

    Lanczos for the top-k eigenvalues (with residuals), Hutch++ for the trace (with a standard error),
    stochastic Lanczos quadrature for the eigenvalue density; with --per layer also each layer's trace
    Tr(H_l)/n_l and top eigenvalue. The loss (--loss) is averaged over the first --n examples of --data.

    \b
    Examples:
      gradsense hessian --model zoo:digits-cnn --data zoo:digits --per layer \\
          --out runs/hessian
      gradsense hessian --model zoo:digits-cnn --data zoo:digits --k 10 --n 540 \\
          --seed 1 --json
      gradsense hessian --model my.py:build --weights ckpt.pt --data val.npz \\
          --loss mse --batch-size 64
    """
    from gradsense.curvature import hessian_eigs, hessian_trace, spectral_density

    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}.")
    model = run.model()
    data = run.data(labels=True)
    pair, loss = data.pair(), run.loss()
    name = run.model_spec
    where = f" per {per}" if per else ""
    with run.stage(f"top-{k} eigenvalues{where} (Lanczos) on {len(data)} examples"):
        eigs = hessian_eigs(model, loss, pair, k=k, tol=tol, criterion=criterion, per=per, name=name,
                            **run.engine_kwargs(hessian_eigs))
    with run.stage(f"trace{where} (Hutch++, rtol {rtol})"):
        trace = hessian_trace(model, loss, pair, rtol=rtol, per=per, name=name, **run.engine_kwargs(hessian_trace))
    with run.stage(f"spectral density (SLQ, {probes} probes x {steps} steps)"):
        density = spectral_density(model, loss, pair, steps=steps, probes=probes, name=name,
                                   **run.engine_kwargs(spectral_density))
    _tables(run, eigs, trace, density)
    for key, res in (("eigenvalues", eigs), ("trace", trace), ("density", density)):
        run.add(f"hessian-{key}", res)
    if run.out:
        from gradsense.viz.report import Report

        with run.stage(f"writing {run.out}"):
            report = Report.extend(run.out / "report.html",
                                   f"gradsense hessian: {name} on {len(data)} examples of {data.name}", source="hessian")
            for key, res in (("eigenvalues", eigs), ("trace", trace), ("density", density)):
                run.save(f"hessian-{key}", res)
                text = None
                if key == "density":
                    n = max(int(trace.meta["numel"]), 1)
                    text = slq_vs_hutchpp(density, trace.value / n, trace.stderr / n)
                report.add_result(res, text=text)
            path = report.write(run.out / "report.html")
        run.wrote(path)


def slq_vs_hutchpp(density: Any, mean: float, stderr: float) -> str:
    """A sentence reconciling SLQ's mean eigenvalue with Hutch++'s ``tr(H)/n`` (both estimate the same number)."""
    probes = int(density.ritz_values.shape[0])
    m, se = density.moment(1), density.moment_stderr(1)
    spread = "" if se != se else f" ± {se:.2g}"
    return (f"Mean eigenvalue: SLQ's {m:.4g}{spread} and Hutch++'s tr(H)/n = {mean:.4g} ± {stderr:.2g} estimate the "
            f"same number on the same data. SLQ's comes from its {probes} random probe{'s' if probes != 1 else ''} "
            "alone: each is one Hutchinson sample v^T H v with |v| = 1, and single samples scatter widely (the "
            "Gaussian broadening of the density does not change the mean). Hutch++ removes the top eigenspace "
            "exactly and samples the rest until its standard error is small, so its value is the one to quote; "
            "the two agree as the number of SLQ probes grows.")
