"""``gradsense landscape``: a loss surface around a model and its sharpness, with figures and a report."""

from __future__ import annotations

from typing import Any

import click

from gradsense.cli.common import Run, analysis_command

SHARPNESS_KINDS = ("sam", "average", "first-order")
WHAT = {
    "sam": "max L(w+e) - L(w), |e| <= rho",
    "average": "mean L(w+e) - L(w), |e| = rho",
    "first-order": "rho * max |grad L(w+e)|, |e| <= rho",
}


@analysis_command("landscape", short_help="Loss surface around the model, and its sharpness.", n=512, batch_size=512, n_help="examples the loss is averaged over (the first N).")
@click.option("--steps", default=21, show_default=True, type=int, help="grid points per axis (odd puts the model on the grid).")
@click.option("--dims", default="2", show_default=True, type=click.Choice(["1", "2"]), help="a line (1) or a plane (2).")
@click.option("--span", default=1.0, show_default=True, type=float, help="half-width of the grid in units of the directions.")
@click.option("--directions", default="filter", show_default=True, type=click.Choice(["filter", "layer", "hessian"]),
              help="filter-normalised (Li et al. 2018), layer-normalised, or the top Hessian eigenvectors.")
@click.option("--rho", default=0.05, show_default=True, type=float, help="radius of the sharpness ball.")
@click.option("--sharpness/--no-sharpness", "with_sharpness", default=True, show_default=True,
              help="also measure SAM, average-case and first-order sharpness.")
def landscape_cmd(
    run: Run, steps: int, dims: str, span: float, directions: str, rho: float, with_sharpness: bool,
) -> None:
    """Loss surface around a model (contour, 3-D view, 1-D slices) and its sharpness.

    \b
    Examples:
      gradsense landscape --model zoo:digits-cnn --data zoo:digits \\
          --out runs/landscape
      gradsense landscape --model zoo:digits-cnn --data zoo:digits --dims 1 \\
          --steps 41 --span 2
      gradsense landscape --model zoo:breast-cancer-mlp --data zoo:breast-cancer \\
          --directions hessian
    """
    from gradsense.landscape import loss_surface, sharpness

    if steps < 2:
        raise ValueError(f"--steps must be >= 2, got {steps}.")
    if not span > 0:
        raise ValueError(f"--span must be > 0, got {span}.")
    if with_sharpness and not rho > 0:
        raise ValueError(f"--rho must be > 0, got {rho}.")
    model = run.model()
    data = run.data(labels=True)
    pair, loss, name = data.pair(), run.loss(), run.model_spec
    grid = f"{steps}x{steps}" if dims == "2" else str(steps)
    with run.stage(f"loss surface, {grid} points along {directions} directions, {len(data)} examples"):
        surface = loss_surface(model, loss, pair, steps=steps, span=span, directions=directions,  # type: ignore[arg-type]
                               dims=int(dims), name=name, **run.engine_kwargs(loss_surface))
    run.rows(surface.title, surface.summary(), name="surface")
    sharp: list[Any] = []
    if with_sharpness:
        rows = []
        for kind in SHARPNESS_KINDS:
            with run.stage(f"sharpness: {kind} (rho {rho})"):
                res = sharpness(model, loss, pair, rho=rho, kind=kind, name=name,  # type: ignore[arg-type]
                                **run.engine_kwargs(sharpness))
            sharp.append(res)
            value = f"{res.value:.4g}" + (f" ± {res.stderr:.1g}" if res.stderr is not None else "")
            rows.append([kind, value, f"{res.n_loss} / {res.n_grad} / {res.n_hvp}", f"{res.meta['wall_time_s']:.2f}"])
        # the definitions under the table, one line each: in a column they wrap mid-formula at 80 columns
        run.table(f"Sharpness (rho={rho}, {len(data)} examples)",
                  ["kind", "value", "passes: loss/grad/HVP", "seconds"], rows, name="sharpness")
        for kind in SHARPNESS_KINDS:
            run.note(f"{kind}: {WHAT[kind]}")
    results = [("surface", surface), *((f"sharpness-{r.meta['kind']}", r) for r in sharp)]
    for key, res in results:
        run.add(key, res)
    if run.out:
        from gradsense.results.base import atomic_write_bytes
        from gradsense.viz.figures import fig_to_png
        from gradsense.viz.report import Report

        with run.stage(f"writing {run.out}"):
            report = Report.extend(run.out / "report.html", f"gradsense landscape: {name}", source="landscape")
            texts = {"surface": (
                f"The loss ({run.loss_name}) of {name} on {len(data)} examples of {data.name}, on a {dims}-D grid "
                f"through the model along {directions} directions (span ±{span}). The cross marks the model, the "
                "star the lowest grid point.")}
            for key, res in results:
                run.save(key, res, figure=None)
                png = fig_to_png(res.plot(), dpi=110)  # rendered once, for the run folder and the report
                atomic_write_bytes(run.out / "figures" / f"{key}.png", png)
                report.add_section(res.title, text=texts.get(key), figures=[png],
                                   table=(["key", "value"], [[str(k), str(v)] for k, v in res.summary()]))
            path = report.write(run.out / "report.html")
        run.wrote(path)
