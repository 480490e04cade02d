"""``gradsense evaluate``: can the explanation be trusted? Rank attribution methods on ground truth and by
deletion/insertion, and show which input features a model's loss is sensitive to over a whole dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from gradsense.cli.common import console, friendly_errors, model_option


def _print_table(table: Any) -> None:
    from rich.table import Table

    header, rows = table.table()
    t = Table(title=table.title, title_justify="left")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 1 else "right")
    for row in rows:
        t.add_row(*row)
    console.print(t)
    for m, why in (table.meta.get("skipped") or {}).items():
        console.print(f"skipped {m}: {why}")


def _print_sensitivity(res: Any, top: int = 10) -> None:
    from rich.table import Table

    t = Table(title=f"{res.title}: top {top} features by mean |dL/dx|", title_justify="left")
    t.add_column("rank", justify="right")
    t.add_column("feature")
    for k in range(1, res.order + 1):
        t.add_column(f"mean |d^{k}L/dx^{k}|", justify="right")
    others = [dict(res.ranking(k)) for k in range(1, res.order + 1)]
    for i, (name, _) in enumerate(res.ranking(1)[:top]):
        t.add_row(str(i + 1), name, *[f"{o[name]:.4g}" for o in others])
    console.print(t)
    for a in range(res.order):
        for b in range(a + 1, res.order):
            console.print(f"Spearman rank agreement, order {a + 1} vs {b + 1}: {float(res.spearman[a, b]):.3f}")


@click.command("evaluate")
@model_option
@click.option("--dataset", default=None, help="zoo dataset (default: the one the zoo model was trained on).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test"]))
@click.option("--n", "n_examples", default=64, show_default=True, type=int, help="number of dataset examples.")
@click.option("--methods", default="all", show_default=True,
              help="attribution methods to rank: 'all' or a comma-separated list, e.g. saliency,gradcam.")
@click.option("--target", default="label", show_default=True, help="'label', 'predicted' or a class index.")
@click.option("--steps", default=32, show_default=True, type=int, help="steps of the deletion/insertion curves.")
@click.option("--no-curves", is_flag=True, help="skip deletion/insertion (rank by localisation only).")
@click.option("--order", default=None, type=click.IntRange(0, 3),
              help="dataset-level sensitivity up to this derivative order (default: 3 for tabular data, else 0 = off).")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the random control map.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="run folder to write (results, figures, report).")
@friendly_errors
def evaluate_cmd(
    model_spec: str, weights: str | None, dataset: str | None, split: str, n_examples: int, methods: str,
    target: str, steps: int, no_curves: bool, order: int | None, seed: int, out: str | None,
) -> None:
    """Can the explanation be trusted? Rank attribution methods, and measure dataset-level sensitivity.

    On a dataset with ground-truth masks (block-digits: a digit in one block, an uninformative pattern in
    the other; Shah et al. 2021) every method is scored by the share of its map inside the true block and
    by the pointing game; deletion and insertion areas (Petsiuk et al. 2018) are added unless --no-curves.
    A random map is the control row. For tabular data the loss's per-feature mean |d^k L/dx^k|, k <= --order,
    over the dataset is ranked too.

    \b
    Examples:
      gradsense evaluate --model zoo:block-digits-cnn --methods all --out runs/eval
      gradsense evaluate --model zoo:digits-cnn --methods saliency,integrated_gradients,gradcam --n 32
      gradsense evaluate --model zoo:breast-cancer-mlp --order 3 --out runs/tabular
    """
    import gradsense as gs
    from gradsense.attribution import get_method
    from gradsense.evaluation import global_sensitivity, method_table
    from gradsense.specs import load_model

    if n_examples < 1:
        raise ValueError(f"--n must be >= 1, got {n_examples}.")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}.")
    method_list: Any = "all" if methods.strip() == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    if method_list != "all":
        if not method_list:
            raise ValueError("--methods is empty; give 'all' or names such as saliency,gradcam.")
        for m in method_list:
            get_method(m)
    if dataset is None:
        if not model_spec.startswith("zoo:"):
            raise ValueError("--dataset is required for models that are not from the zoo.")
        dataset = gs.zoo.info(model_spec).get("dataset")
        if dataset is None:
            raise ValueError(f"{model_spec} has no bundled dataset; give --dataset.")
    data = gs.zoo.dataset(dataset, split=split)  # unknown names raise with the list of datasets
    tabular = data.inputs.ndim == 2
    order = (3 if tabular else 0) if order is None else order
    if target not in ("label", "predicted"):
        try:
            tgt: Any = int(target)
        except ValueError as err:
            raise ValueError(f"--target must be 'label', 'predicted' or an int, got {target!r}.") from err
    model = load_model(model_spec, weights=weights)
    x, y = data[:n_examples]
    tgt = y if target == "label" else ("predicted" if target == "predicted" else int(target))
    mask = None if data.masks is None else data.masks[:n_examples]

    table = None
    if not tabular or method_list != "all":
        refs = gs.zoo.dataset(dataset, split="train").inputs[:64]
        table = method_table(model, x, target=tgt, mask=mask, methods=method_list, references=refs,
                             curves=not no_curves, steps=min(steps, int(x[0].numel())) if not no_curves else None,
                             seed=seed)
        _print_table(table)
    sens = None
    if order > 0:
        sens = global_sensitivity(model, (data.inputs, data.labels), loss_fn=gs.losses.cross_entropy, order=order,
                                  feature_names=data.feature_names, name=model_spec)
        _print_sensitivity(sens)
    if out:
        from gradsense.results import RunFolder
        from gradsense.viz.report import Report

        run = RunFolder(out)
        report = Report(f"gradsense evaluate: {model_spec} on {len(x)} {dataset} examples ({split})")
        if table is not None:
            run.save_result(table, "evaluation-methods")
            run.save_figure(table.plot(), "evaluation-methods")
            header, rows = table.table()
            area = table.meta.get("mask_area")
            text = ("Each attribution method explained the same examples. "
                    + (f"Mass in mask is the share of |map| inside the ground-truth block (a map that ignores the "
                       f"image scores the block's area, {area:.2f}); pointing game: the map's largest pixel is in "
                       "the block. " if mask is not None else "")
                    + ("Deletion/insertion AUC: class probability as the top pixels are removed / inserted "
                       "(Petsiuk et al. 2018). " if not no_curves else "")
                    + "'random' is a uniform random map, the control.")
            report.add_section(table.title, text=text, table=(header, rows), figures=[table.plot()])
        if sens is not None:
            run.save_result(sens, "evaluation-global-sensitivity")
            run.save_figure(sens.plot(), "evaluation-global-sensitivity")
            report.add_result(sens, title="Dataset-level input sensitivity", text=(
                "Mean |d^k L / dx_j^k| of the cross-entropy loss over the whole split, per input feature, ranked; "
                "orders agree when their Spearman correlation is near 1."))
        path = report.write(Path(out) / "report.html")
        console.print(f"wrote {path}")
