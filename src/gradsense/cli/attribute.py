"""``gradsense attribute``: attribution maps for a few examples of a dataset."""

from __future__ import annotations

from pathlib import Path

import click

from gradsense.cli.common import console, friendly_errors, model_option, print_rows


@click.command("attribute")
@model_option
@click.option("--dataset", required=True, help="zoo dataset name, e.g. digits.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test"]))
@click.option("--method", default="saliency", show_default=True, help="attribution method (see gradsense.attribution.METHODS).")
@click.option("--target", default="label", show_default=True, help="'label', 'predicted', or a class index.")
@click.option("--n", "n_examples", default=8, show_default=True, type=int, help="number of examples.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="run folder to write (result, figure, report).")
@friendly_errors
def attribute_cmd(
    model_spec: str, weights: str | None, dataset: str, split: str, method: str, target: str, n_examples: int, out: str | None
) -> None:
    """Attribute predictions on the first N examples of a dataset to their inputs.

    \b
    Example:
      gradsense attribute --model zoo:digits-cnn --dataset digits --method saliency --n 8 --out runs/sal
    """
    import gradsense as gs
    from gradsense.attribution import get_method
    from gradsense.specs import load_model

    get_method(method)
    if n_examples < 1:
        raise ValueError(f"--n must be >= 1, got {n_examples}.")
    data = gs.zoo.dataset(dataset, split=split)
    model = load_model(model_spec, weights=weights)
    x, y = data[:n_examples]
    tgt: object
    if target == "label":
        tgt = y
    elif target == "predicted":
        tgt = "predicted"
    else:
        try:
            tgt = int(target)
        except ValueError as err:
            raise ValueError(f"--target must be 'label', 'predicted' or an int, got {target!r}.") from err
    titles = [f"label {data.classes[int(c)]}" for c in y]
    result = gs.attribute(model, x, target=tgt, method=method, titles=titles, feature_names=data.feature_names)
    print_rows(result.title, result.summary())
    if out:
        from gradsense.results import RunFolder
        from gradsense.viz.report import Report

        run = RunFolder(out)
        run.save_result(result, method)
        fig = result.plot()
        run.save_figure(fig, method)
        report = Report(f"gradsense attribute: {model_spec}")
        report.add_result(result)
        path = report.write(Path(out) / "report.html")
        console.print(f"wrote {path}")
