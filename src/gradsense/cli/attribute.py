"""``gradsense attribute``: attribution maps for images, text, tensors or dataset examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from gradsense.cli.common import Run, analysis_command

TEXT_METHODS = ("integrated_gradients", "input_x_gradient", "gradient")


def _parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    import json

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--option must be KEY=VALUE, got {pair!r}.")
        k, v = pair.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


@analysis_command("attribute", short_help="Attribute predictions to pixels, tokens or features.", n=8, data_help="examples to explain: zoo:NAME, tensors, .csv, an image folder or "
                                              "text (.txt/.jsonl); the first --n are taken (with --all: every one).",
                  resumable=True)
@click.option("--input", "input_files", multiple=True, type=click.Path(dir_okay=False),
              help="image file(s) (PNG/JPG...) or one tensor file (.safetensors/.npy). Repeatable.")
@click.option("--text", "texts", multiple=True, help="sentence(s) for a text model. Repeatable.")
@click.option("--compare", default=None, help="with --text on a sentence encoder: explain the similarity to this sentence.")
@click.option("--method", default="saliency", show_default=True,
              help="attribution method (gradsense.attribution.METHODS; for text: integrated_gradients, input_x_gradient, gradient).")
@click.option("--target", default=None,
              help="'label' (default with labels), 'predicted' (default otherwise), 'loss' (the --loss of each example), "
                   "or a class index.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="method option, e.g. steps=32 (JSON values). Repeatable.")
@click.option("--key", default=None, help="tensor name inside a .safetensors --input.")
@click.option("--all", "whole", is_flag=True,
              help="every example of --data (or the first --n given explicitly), streamed in resumable shards into "
                   "--out, with mean |attribution| per class and per feature (implied by --resume).")
@click.option("--shard-size", default=None, type=int, help="with --all: examples per shard (default: about 32 MB).")
def attribute_cmd(
    run: Run, input_files: tuple[str, ...], texts: tuple[str, ...], compare: str | None, method: str,
    target: str | None, options: tuple[str, ...], key: str | None, whole: bool, shard_size: int | None,
) -> None:
    """Attribute a model's prediction to its inputs: pixels, tokens or features.

    \b
    Examples:
      gradsense attribute --model zoo:digits-cnn --data zoo:digits \\
          --method integrated_gradients --out runs/ig
      gradsense attribute --model zoo:digits-cnn --input my_digit.png \\
          --method smoothgrad
      gradsense attribute --model my.py:build --weights w.pt --data photos/ \\
          --input-shape 3,64,64 --normalize 0.5,0.25
      gradsense attribute --model zoo:breast-cancer-mlp --data patients.csv \\
          --label-column diagnosis --method ig
      gradsense attribute --model zoo:minilm --text "A person plays music." \\
          --compare "A man plays guitar."
      gradsense attribute --model zoo:digits-cnn --data zoo:digits --all \\
          --method smoothgrad --out runs/all  [--resume]
    """
    import gradsense as gs
    from gradsense.attribution import get_method

    data_given = run.options.get("data") is not None
    sources = sum([bool(input_files), bool(texts), data_given])
    if sources != 1:
        raise ValueError("give exactly one input source: --data SPEC, --input FILE(S) or --text \"...\".")
    if compare is not None and not texts:
        raise ValueError("--compare goes with --text (sentence similarity).")
    opts = _parse_options(options)
    is_text = bool(texts) or (data_given and Path(str(run.options["data"])).suffix.lower() in (".txt", ".jsonl"))
    tmethod = {"ig": "integrated_gradients", "saliency": "gradient"}.get(method, method)
    if is_text:
        if tmethod not in TEXT_METHODS:
            raise ValueError(f"for text, --method must be one of {TEXT_METHODS}, got {method!r}.")
    else:
        get_method(method)
    if target not in (None, "label", "predicted", "loss"):
        try:
            int(target)
        except ValueError as err:
            raise ValueError(f"--target must be 'label', 'predicted', 'loss' or an int, got {target!r}.") from err
    if (whole or run.resume) and not data_given:
        raise ValueError("--all/--resume attribute a dataset: give --data SPEC.")
    if shard_size is not None and not (whole or run.resume):
        raise ValueError("--shard-size goes with --all (attribution of a whole dataset in shards).")
    model = run.model()
    if (whole or run.resume) and not is_text:
        _whole_dataset(run, model, method, target, opts, shard_size)
        return

    if is_text:
        from gradsense.attribution.tokens import TokenAttribution, find_embedding_layer, similarity_target

        try:
            find_embedding_layer(model)  # a clear error for image or tabular models given text
        except ValueError as err:
            given = "--text" if texts else f"{run.options['data']} is text"
            raise ValueError(f"{given}, but {run.model_spec} has no nn.Embedding layer to attribute tokens at: text "
                             "needs a text model such as zoo:minilm or hf:DIR (with its tokenizer).") from err
        labels = None
        if texts:
            sentences = list(texts)
        else:
            data = run.data(tensors=False)
            if data.texts is None:
                raise ValueError(f"{run.options['data']} is not text.")
            sentences, labels = data.texts, data.labels
        default = "label" if labels is not None else "predicted"
        tgt: Any = similarity_target(model, compare) if compare is not None else \
            _target(target if target is not None else default, labels, run)
        with run.stage(f"{tmethod} on {len(sentences)} text(s)"):
            result: Any = TokenAttribution(model, method=tmethod, **run.engine_kwargs(TokenAttribution, **opts)) \
                .attribute(sentences, target=tgt)
        name = f"tokens-{tmethod}"
    else:
        titles, feature_names, labels = None, None, None
        if data_given:
            data = run.data()
            x, labels = data.inputs, data.labels
            feature_names = data.feature_names
            if labels is not None and labels.ndim == 1 and not labels.is_floating_point():
                names = data.classes
                titles = [f"label {names[int(c)] if names and 0 <= int(c) < len(names) else int(c)}" for c in labels]
            elif data.files is not None:
                titles = [Path(f).name for f in data.files]
        else:
            x, titles = _file_inputs(run, model, input_files, key)
        if _has_embedding_only(model):
            raise ValueError(f"{run.model_spec} is a text model; give --text \"...\" or text --data instead of "
                             "images/tensors.")
        tgt = _target(target if target is not None else ("label" if labels is not None else "predicted"), labels, run)
        with run.stage(f"{method} on {x.shape[0]} example(s)"):
            result = gs.attribute(model, x, target=tgt, method=method, titles=titles, feature_names=feature_names,
                                  **run.engine_kwargs(get_method(method), **opts))
        name = method
    run.rows(result.title, result.summary(), name=name)
    if not is_text:
        _feature_table(run, result, feature_names)
    _keep(run, name, result)


def _keep(run: Run, name: str, result: Any) -> None:
    """With ``--out``: save the result and add its section to the folder's report; else keep it for ``--json``."""
    if not run.out:
        run.add(name, result)
        return
    from gradsense.viz.report import Report

    with run.stage(f"writing {run.out}"):
        run.save(name, result)
        report = Report.extend(run.out / "report.html", f"gradsense attribute: {run.model_spec}",
                               source=f"attribute:{name}")
        report.add_result(result)
        path = report.write(run.out / "report.html")
    run.wrote(path)


def _feature_table(run: Run, result: Any, feature_names: Any, top: int = 10) -> None:
    """For tabular inputs (N, F): the features ranked by mean |attribution| over the examples, with the signed mean."""
    a = result.tensors["attributions"]
    if a.ndim != 2:
        return  # images: the maps are in the run folder's figures and report
    names = list(feature_names) if feature_names is not None and len(feature_names) == a.shape[1] else \
        [f"x[{j}]" for j in range(a.shape[1])]
    mean_abs, mean = a.abs().mean(0), a.mean(0)
    order = mean_abs.argsort(descending=True).tolist()[:top]
    rows = [[str(r + 1), names[j], f"{float(mean_abs[j]):.4g}", f"{float(mean[j]):+.4g}"] for r, j in enumerate(order)]
    shown = f"top {len(order)} of {a.shape[1]}" if a.shape[1] > len(order) else f"all {a.shape[1]}"
    run.table(f"Features by mean |attribution| over {a.shape[0]} example(s) ({shown})",
              ["rank", "feature", "mean |attribution|", "mean attribution"], rows, name=f"{result.method}-features")


def _whole_dataset(run: Run, model: Any, method: str, target: str | None, opts: dict[str, Any],
                   shard_size: int | None) -> None:
    """``--all``: :func:`gradsense.attribute_dataset` over the data, shards in ``--out/dataset-METHOD``."""
    import click

    import gradsense as gs
    from gradsense.attribution import get_method

    ctx = click.get_current_context()
    explicit_n = ctx.get_parameter_source("n") not in (click.core.ParameterSource.DEFAULT, None)
    data = run.data(n=run.options.get("n") if explicit_n else None)
    x, labels = data.inputs, data.labels
    cls = get_method(method)
    kwargs = run.engine_kwargs(cls, **opts)
    kwargs.pop("seed", None)  # attribute_dataset's own seed: each shard derives its seed from it
    kwargs.pop("show_progress", None)
    tgt: Any = target if target is not None else ("label" if labels is not None else "predicted")
    if tgt not in ("label", "predicted", "loss"):
        tgt = int(tgt)
    name = f"dataset-{cls.name}"
    out = None if run.out is None else run.out / name
    with run.long_stage(f"{cls.name} on {x.shape[0]} example(s)" + (f" into {out}" if out else "")) as bar:
        result = gs.attribute_dataset(
            model, (x, labels) if labels is not None else x, method=method, target=tgt, out=out, resume=run.resume,
            shard_size=shard_size, seed=run.seed, loss_fn=run.loss() if tgt == "loss" else None,
            feature_names=data.feature_names, class_names=data.classes, show_progress=bar, name=run.model_spec,
            **kwargs)
    from gradsense.core.distributed import is_main_process

    if not is_main_process():  # under torchrun: rank 0 reports and writes
        return
    run.rows(result.title, result.summary(), name=name)
    _aggregate_tables(run, result)
    _keep(run, name, result)


def _aggregate_tables(run: Run, result: Any) -> None:
    """Mean |attribution| per class and, for named features, the top features overall and per class."""
    counts = result.class_counts()
    per_class = result.mean_abs_per_class()
    names = result.meta.get("class_names")
    rows = [[str(names[c]) if names and c < len(names) else str(c), str(int(counts[c])), f"{float(per_class[c]):.4g}"]
            for c in range(counts.shape[0]) if int(counts[c]) > 0]
    if rows:
        run.table(f"mean |attribution| per class (grouped by {result.meta.get('group_by')})",
                  ["class", "examples", "mean |attribution|"], rows, name="per_class")
    features = result.meta.get("feature_names")
    if features and len(result.input_shape) == 1:
        overall = result.mean_abs_per_feature()
        order = overall.argsort(descending=True)[:10].tolist()
        run.table("features with the largest mean |attribution|", ["feature", "mean |attribution|"],
                  [[features[j], f"{float(overall[j]):.4g}"] for j in order], name="per_feature")


def _target(target: str | None, labels: Any, run: Run) -> Any:
    if target is None or target == "predicted":
        return "predicted"
    if target in ("label", "loss"):
        if labels is None:
            raise ValueError(f"--target {target} needs labelled data (--data with labels); files and texts have none; "
                             "use 'predicted' or a class index.")
        if target == "label":
            return labels
        from gradsense.core.targets import Loss

        return Loss(run.loss(), labels)
    return int(target)


def _has_embedding_only(model: Any) -> bool:
    from torch import nn

    mods = list(model.modules())
    return any(isinstance(m, nn.Embedding) for m in mods) and not any(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in mods) \
        and hasattr(model, "tokenizer")


def _file_inputs(run: Run, model: Any, files: tuple[str, ...], key: str | None) -> tuple[Any, list[str]]:
    from gradsense.io import load_data, load_images
    from gradsense.io.data import IMAGE_SUFFIXES, TENSOR_SUFFIXES

    suffixes = {Path(f).suffix.lower() for f in files}
    if suffixes <= set(TENSOR_SUFFIXES):
        if len(files) != 1:
            raise ValueError("give one tensor file (.safetensors/.npz/.npy/.pt) holding a batch.")
        data = load_data(files[0], inputs_key=key or run.options.get("inputs_key"))
        x = data.to(None, run._parameter_dtype(model)).inputs
        return x, [f"{Path(files[0]).name}[{i}]" for i in range(x.shape[0])]
    if suffixes <= set(IMAGE_SUFFIXES):
        shape = run.options.get("input_shape") or run.model_input_shape(model)
        if shape is None:
            raise ValueError("cannot tell this model's input size for images; give --input-shape C,H,W "
                             "(or a tensor file).")
        # dark-on-light single images (a digit on paper) are inverted only without --normalize (the digits' case)
        invert = None if run.options.get("normalize") is None else False
        x = load_images(files, shape, invert=invert, normalize=run.options.get("normalize"))
        return x.to(dtype=run._parameter_dtype(model)), [Path(f).name for f in files]
    raise ValueError(f"unsupported input file type(s) {sorted(suffixes)}; images {sorted(IMAGE_SUFFIXES)} or "
                     f"tensors {sorted(TENSOR_SUFFIXES)}.")
