"""``gradsense evaluate``: can the explanation be trusted? Rank attribution methods on ground truth and by
deletion/insertion, and show which input features a model's loss is sensitive to over a whole dataset."""

from __future__ import annotations

from typing import Any

import click

from gradsense.cli.common import Run, analysis_command


def _print_table(run: Run, table: Any) -> None:
    header, rows = table.table()
    run.table(table.title, header, rows, name="methods")
    for m, why in (table.meta.get("skipped") or {}).items():
        run.note(f"skipped {m}: {why}")


def _print_sensitivity(run: Run, res: Any, top: int = 10) -> None:
    others = [dict(res.ranking(k)) for k in range(1, res.order + 1)]
    rows = [[str(i + 1), name, *[f"{o[name]:.4g}" for o in others]] for i, (name, _) in enumerate(res.ranking(1)[:top])]
    run.table(f"{res.title}: top {top} features by mean |dL/dx|",
              ["rank", "feature", *[f"mean |d^{k}L/dx^{k}|" for k in range(1, res.order + 1)]], rows,
              name="sensitivity")
    for a in range(res.order):
        for b in range(a + 1, res.order):
            run.note(f"Spearman rank agreement, order {a + 1} vs {b + 1}: {float(res.spearman[a, b]):.3f}")


@analysis_command("evaluate", short_help="Can the explanation be trusted? Rank attribution methods.", n=64, data_help="examples to explain (default: the zoo model's own data); "
                                             "ground-truth masks come with zoo:block-digits.")
@click.option("--methods", default="all", show_default=True,
              help="attribution methods to rank: 'all' or a comma-separated list, e.g. saliency,gradcam.")
@click.option("--target", default="label", show_default=True, help="'label', 'predicted' or a class index.")
@click.option("--steps", default=32, show_default=True, type=int, help="steps of the deletion/insertion curves.")
@click.option("--no-curves", is_flag=True, help="skip deletion/insertion (rank by localisation only).")
@click.option("--order", default=None, type=click.IntRange(0, 3),
              help="dataset-level sensitivity up to this derivative order (default: 3 for tabular data, else 0 = off).")
def evaluate_cmd(
    run: Run, methods: str, target: str, steps: int, no_curves: bool, order: int | None,
) -> None:
    """Can the explanation be trusted? Rank attribution methods, and measure dataset-level sensitivity.

    On a dataset with ground-truth masks (block-digits: a digit in one block, an uninformative pattern in
    the other; Shah et al. 2021) every method is scored by the share of its map inside the true block and
    by the pointing game; deletion and insertion areas (Petsiuk et al. 2018) are added unless --no-curves.
    A random map is the control row. For tabular data the loss's (--loss) per-feature mean |d^k L/dx^k|,
    k <= --order, over all of --data is ranked too.

    \b
    Examples:
      gradsense evaluate --model zoo:block-digits-cnn --methods all \\
          --out runs/eval
      gradsense evaluate --model zoo:digits-cnn \\
          --methods saliency,integrated_gradients,gradcam --n 32
      gradsense evaluate --model zoo:breast-cancer-mlp --order 3 \\
          --out runs/tabular
      gradsense evaluate --model zoo:breast-cancer-mlp --data patients.csv \\
          --label-column diagnosis --order 2
    """
    from gradsense.attribution import get_method
    from gradsense.evaluation import global_sensitivity, method_table

    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}.")
    method_list: Any = "all" if methods.strip() == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    if method_list != "all":
        if not method_list:
            raise ValueError("--methods is empty; give 'all' or names such as saliency,gradcam.")
        for m in method_list:
            get_method(m)
    if target not in ("label", "predicted"):
        try:
            int(target)
        except ValueError as err:
            raise ValueError(f"--target must be 'label', 'predicted' or an int, got {target!r}.") from err
    spec = run.data_spec()
    if spec is None:
        raise ValueError("--data is required for models that are not from the zoo.")
    model = run.model()
    data = run.data(spec=spec)
    x, y = data.inputs, data.labels
    if target == "label" and y is None:
        raise ValueError(f"{spec} has no labels: use --target predicted or a class index.")
    tabular = x.ndim == 2
    order = (3 if tabular else 0) if order is None else order
    tgt = y if target == "label" else ("predicted" if target == "predicted" else int(target))
    mask = data.masks

    table = None
    if not tabular or method_list != "all":
        refs = _references(run, spec, x)
        with run.stage(f"ranking attribution methods on {len(x)} examples"):
            table = method_table(model, x, target=tgt, mask=mask, methods=method_list, references=refs,
                                 curves=not no_curves, steps=min(steps, int(x[0].numel())) if not no_curves else None,
                                 **run.engine_kwargs(method_table))
        _print_table(run, table)
    sens = None
    if order > 0:
        limit = run.options.get("n")
        # --n examples that were all of the data are all of it: read the file once
        full = data if data.labels is not None and limit is not None and len(data) < int(limit) else \
            run.data(spec=spec, n=None, labels=True)
        with run.stage(f"dataset-level sensitivity up to order {order} on {len(full)} examples"):
            sens = global_sensitivity(model, full.pair(), loss_fn=run.loss(), order=order,
                                      feature_names=full.feature_names, name=run.model_spec,
                                      **run.engine_kwargs(global_sensitivity))
        _print_sensitivity(run, sens)
    if table is not None:
        run.add("evaluation-methods", table)
    if sens is not None:
        run.add("evaluation-global-sensitivity", sens)
    if run.out:
        from gradsense.viz.report import Report

        with run.stage(f"writing {run.out}"):
            report = Report(f"gradsense evaluate: {run.model_spec} on {len(x)} examples of {data.name}")
            if table is not None:
                run.save("evaluation-methods", table)
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
                run.save("evaluation-global-sensitivity", sens)
                report.add_result(sens, title="Dataset-level input sensitivity", text=(
                    f"Mean |d^k L / dx_j^k| of the loss ({run.loss_name}) over all of {data.name}, per input "
                    "feature, ranked; orders agree when their Spearman correlation is near 1."))
            path = report.write(run.out / "report.html")
        run.wrote(path)


def _references(run: Run, spec: str, x: Any) -> Any:
    """Baselines for expected gradients: the zoo training split, else the examples themselves."""
    if spec.startswith("zoo:"):
        try:
            return run.data(spec=spec, split="train", n=64).inputs
        except ValueError:
            pass
    return x[:64]
