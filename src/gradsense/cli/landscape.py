"""``gradsense landscape``: a loss surface around a model and its sharpness, with figures and a report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from gradsense.cli.common import console, friendly_errors, model_option, print_rows

SHARPNESS_KINDS = ("sam", "average", "first-order")
WHAT = {
    "sam": "max L(w+e) - L(w), |e| <= rho",
    "average": "mean L(w+e) - L(w), |e| = rho",
    "first-order": "rho * max |grad L(w+e)|, |e| <= rho",
}


@click.command("landscape")
@model_option
@click.option("--dataset", required=True, help="zoo dataset name, e.g. digits (the first --n examples of --split).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test"]))
@click.option("--n", "n_examples", default=512, show_default=True, type=int, help="examples the loss is averaged over.")
@click.option("--steps", default=21, show_default=True, type=int, help="grid points per axis (odd puts the model on the grid).")
@click.option("--dims", default="2", show_default=True, type=click.Choice(["1", "2"]), help="a line (1) or a plane (2).")
@click.option("--span", default=1.0, show_default=True, type=float, help="half-width of the grid in units of the directions.")
@click.option("--directions", default="filter", show_default=True, type=click.Choice(["filter", "layer", "hessian"]),
              help="filter-normalised (Li et al. 2018), layer-normalised, or the top Hessian eigenvectors.")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the directions and of sharpness.")
@click.option("--rho", default=0.05, show_default=True, type=float, help="radius of the sharpness ball.")
@click.option("--sharpness/--no-sharpness", "with_sharpness", default=True, show_default=True,
              help="also measure SAM, average-case and first-order sharpness.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="run folder to write (results, figures, report).")
@friendly_errors
def landscape_cmd(
    model_spec: str, weights: str | None, dataset: str, split: str, n_examples: int, steps: int, dims: str,
    span: float, directions: str, seed: int, rho: float, with_sharpness: bool, out: str | None,
) -> None:
    """Loss surface around a model (contour, 3-D view, 1-D slices) and its sharpness.

    \b
    Examples:
      gradsense landscape --model zoo:digits-cnn --dataset digits --out runs/landscape
      gradsense landscape --model zoo:digits-cnn --dataset digits --dims 1 --steps 41 --span 2
      gradsense landscape --model zoo:breast-cancer-mlp --dataset breast-cancer --directions hessian
    """
    import gradsense as gs
    from gradsense.landscape import loss_surface, sharpness
    from gradsense.specs import load_model

    if n_examples < 1:
        raise ValueError(f"--n must be >= 1, got {n_examples}.")
    if steps < 2:
        raise ValueError(f"--steps must be >= 2, got {steps}.")
    if not span > 0:
        raise ValueError(f"--span must be > 0, got {span}.")
    if with_sharpness and not rho > 0:
        raise ValueError(f"--rho must be > 0, got {rho}.")
    model = load_model(model_spec, weights=weights)
    data = gs.zoo.dataset(dataset, split=split)
    x, y = data[:n_examples]
    loss = gs.losses.cross_entropy
    surface = loss_surface(model, loss, (x, y), steps=steps, span=span, directions=directions,  # type: ignore[arg-type]
                           dims=int(dims), seed=seed, show_progress=None, name=model_spec)
    print_rows(surface.title, surface.summary())
    sharp: list[Any] = []
    if with_sharpness:
        from rich.table import Table

        table = Table(title=f"Sharpness (rho={rho}, {x.shape[0]} examples)", title_justify="left")
        for col in ("kind", "value", "what", "passes: loss/grad/HVP", "seconds"):
            table.add_column(col)
        for kind in SHARPNESS_KINDS:
            res = sharpness(model, loss, (x, y), rho=rho, kind=kind, seed=seed, name=model_spec)  # type: ignore[arg-type]
            sharp.append(res)
            value = f"{res.value:.4g}" + (f" ± {res.stderr:.1g}" if res.stderr is not None else "")
            table.add_row(kind, value, WHAT[kind], f"{res.n_loss} / {res.n_grad} / {res.n_hvp}",
                          f"{res.meta['wall_time_s']:.2f}")
        console.print(table)
    if out:
        from gradsense.results import RunFolder
        from gradsense.results.base import atomic_write_bytes
        from gradsense.viz.figures import fig_to_png
        from gradsense.viz.report import Report

        run = RunFolder(out)
        report = Report.extend(Path(out) / "report.html", f"gradsense landscape: {model_spec}", source="landscape")
        texts = {"surface": (
            f"The loss of {model_spec} on {x.shape[0]} {split} examples of {dataset}, on a {dims}-D grid through the "
            f"model along {directions} directions (span ±{span}). The cross marks the model, the star the lowest "
            "grid point.")}
        for name, res in [("surface", surface), *((f"sharpness-{r.meta['kind']}", r) for r in sharp)]:
            run.save_result(res, name)
            png = fig_to_png(res.plot(), dpi=110)  # rendered once, for the run folder and the report
            atomic_write_bytes(Path(out) / "figures" / f"{name}.png", png)
            report.add_section(res.title, text=texts.get(name), figures=[png],
                               table=(["key", "value"], [[str(k), str(v)] for k, v in res.summary()]))
        path = report.write(Path(out) / "report.html")
        console.print(f"wrote {path}")
