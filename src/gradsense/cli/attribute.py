"""``gradsense attribute``: attribution maps for images, text, tensors or dataset examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from gradsense.cli.common import console, friendly_errors, model_option, print_rows


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


@click.command("attribute")
@model_option
@click.option("--input", "input_files", multiple=True, type=click.Path(dir_okay=False),
              help="image file(s) (PNG/JPG...) or one tensor file (.safetensors/.npy). Repeatable.")
@click.option("--text", "texts", multiple=True, help="sentence(s) for a text model. Repeatable.")
@click.option("--compare", default=None, help="with --text on a sentence encoder: explain the similarity to this sentence.")
@click.option("--dataset", default=None, help="zoo dataset name, e.g. digits (takes the first --n examples).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test"]))
@click.option("--method", default="saliency", show_default=True,
              help="attribution method (gradsense.attribution.METHODS; for text: integrated_gradients, input_x_gradient, gradient).")
@click.option("--target", default=None, help="'label' (datasets), 'predicted' (default otherwise), or a class index.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="method option, e.g. steps=32 (JSON values). Repeatable.")
@click.option("--n", "n_examples", default=8, show_default=True, type=int, help="number of dataset examples.")
@click.option("--key", default=None, help="tensor name inside a .safetensors input.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="run folder to write (result, figure, report).")
@friendly_errors
def attribute_cmd(
    model_spec: str, weights: str | None, input_files: tuple[str, ...], texts: tuple[str, ...], compare: str | None,
    dataset: str | None, split: str, method: str, target: str | None, options: tuple[str, ...], n_examples: int,
    key: str | None, out: str | None,
) -> None:
    """Attribute a model's prediction to its inputs: pixels, tokens or features.

    \b
    Examples:
      gradsense attribute --model zoo:digits-cnn --dataset digits --method integrated_gradients --out runs/ig
      gradsense attribute --model zoo:digits-cnn --input my_digit.png --method smoothgrad
      gradsense attribute --model zoo:breast-cancer-mlp --dataset breast-cancer --method ig --n 4
      gradsense attribute --model zoo:minilm --text "A person plays music." --compare "A man plays guitar."
    """
    import gradsense as gs
    from gradsense.attribution import get_method
    from gradsense.specs import load_model

    sources = sum([bool(input_files), bool(texts), dataset is not None])
    if sources != 1:
        raise ValueError("give exactly one input source: --input FILE(S), --text \"...\" or --dataset NAME.")
    if compare is not None and not texts:
        raise ValueError("--compare goes with --text (sentence similarity).")
    if n_examples < 1:
        raise ValueError(f"--n must be >= 1, got {n_examples}.")
    opts = _parse_options(options)
    text_methods = ("integrated_gradients", "input_x_gradient", "gradient")
    if texts:
        tmethod = {"ig": "integrated_gradients", "saliency": "gradient"}.get(method, method)
        if tmethod not in text_methods:
            raise ValueError(f"for text, --method must be one of {text_methods}, got {method!r}.")
    else:
        get_method(method)
    model = load_model(model_spec, weights=weights)

    if texts:
        from gradsense.attribution.tokens import TokenAttribution, find_embedding_layer, similarity_target

        find_embedding_layer(model)  # a clear error for image models given text
        tgt: Any = similarity_target(model, compare) if compare is not None else _target(target, None)
        result: Any = TokenAttribution(model, method=tmethod, **opts).attribute(list(texts), target=tgt)
        name = f"tokens-{tmethod}"
    else:
        titles, feature_names, labels = None, None, None
        if dataset is not None:
            data = gs.zoo.dataset(dataset, split=split)
            x, labels = data[:n_examples]
            feature_names = data.feature_names
            titles = [f"label {data.classes[int(c)]}" for c in labels]
        else:
            x, titles = _file_inputs(model, model_spec, input_files, key)
        if _has_embedding_only(model):
            raise ValueError(f"{model_spec} is a text model; give --text \"...\" instead of images/tensors.")
        tgt = _target(target if target is not None else ("label" if labels is not None else "predicted"), labels)
        result = gs.attribute(model, x, target=tgt, method=method, titles=titles, feature_names=feature_names, **opts)
        name = method
    print_rows(result.title, result.summary())
    if out:
        from gradsense.results import RunFolder
        from gradsense.viz.report import Report

        run = RunFolder(out)
        run.save_result(result, name)
        run.save_figure(result.plot(), name)
        report = Report.extend(Path(out) / "report.html", f"gradsense attribute: {model_spec}", source=f"attribute:{name}")
        report.add_result(result)
        path = report.write(Path(out) / "report.html")
        console.print(f"wrote {path}")


def _target(target: str | None, labels: Any) -> Any:
    if target is None or target == "predicted":
        return "predicted"
    if target == "label":
        if labels is None:
            raise ValueError("--target label needs --dataset (files have no labels); use 'predicted' or an index.")
        return labels
    try:
        return int(target)
    except ValueError as err:
        raise ValueError(f"--target must be 'label', 'predicted' or an int, got {target!r}.") from err


def _has_embedding_only(model: Any) -> bool:
    from torch import nn

    mods = list(model.modules())
    return any(isinstance(m, nn.Embedding) for m in mods) and not any(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in mods) \
        and hasattr(model, "tokenizer")


def _file_inputs(model: Any, spec: str, files: tuple[str, ...], key: str | None) -> tuple[Any, list[str]]:
    from gradsense.cli.inputs import IMAGE_SUFFIXES, TENSOR_SUFFIXES, load_images, load_tensor_file

    suffixes = {Path(f).suffix.lower() for f in files}
    if suffixes <= TENSOR_SUFFIXES:
        if len(files) != 1:
            raise ValueError("give one tensor file (.safetensors/.npy) holding a batch.")
        x = load_tensor_file(files[0], key)
        return x, [f"{Path(files[0]).name}[{i}]" for i in range(x.shape[0])]
    if suffixes <= IMAGE_SUFFIXES:
        shape = _input_shape(model, spec)
        return load_images(files, shape), [Path(f).name for f in files]
    raise ValueError(f"unsupported input file type(s) {sorted(suffixes)}; images {sorted(IMAGE_SUFFIXES)} or tensors {sorted(TENSOR_SUFFIXES)}.")


def _input_shape(model: Any, spec: str) -> tuple[int, ...]:
    from gradsense import zoo

    if spec.startswith("zoo:"):
        from gradsense.zoo.registry import MODELS

        entry = MODELS.get(spec[4:])
        if entry is not None and entry.dataset != "breast-cancer":  # the image models: their dataset's shape
            return tuple(zoo.dataset(entry.dataset, split="test").inputs.shape[1:])
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError("cannot tell this model's input size for images; give a tensor file (.safetensors/.npy).")
    return tuple(shape)
