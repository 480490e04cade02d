"""``gradsense doctor``: a support report for a model."""

from __future__ import annotations

import click

from gradsense.cli.common import friendly_errors, model_option, print_rows


@click.command("doctor")
@model_option
@click.option("--dataset", default=None, help="zoo dataset to take an example input from (default: guessed from the zoo model).")
@click.option("--input-shape", default=None, help="shape of one input without batch, e.g. 1,8,8 (instead of --dataset).")
@click.option("--batch-size", default=32, show_default=True, type=int, help="batch size for the memory estimate.")
@friendly_errors
def doctor_cmd(model_spec: str, weights: str | None, dataset: str | None, input_shape: str | None, batch_size: int) -> None:
    """Parameter count, layer types, which analyses apply, and memory for one fwd+bwd.

    \b
    Example:
      gradsense doctor --model zoo:digits-cnn --batch-size 64
    """
    import torch

    from gradsense.doctor import doctor
    from gradsense.specs import load_model

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}.")
    example = _example_input(model_spec, dataset, input_shape)
    model = load_model(model_spec, weights=weights)
    if example is not None:
        example = example.to(next(model.parameters(), torch.empty(0)).dtype)
    result = doctor(model, example, batch_size=batch_size, name=model_spec)
    print_rows(result.title, result.summary())


_DEFAULT_DATA = {"digits-cnn": "digits", "digits-vit": "digits", "breast-cancer-mlp": "breast-cancer"}


def _example_input(model_spec: str, dataset: str | None, input_shape: str | None):
    import torch

    from gradsense import zoo

    if input_shape:
        try:
            shape = tuple(int(s) for s in input_shape.replace("x", ",").split(",") if s.strip())
        except ValueError as err:
            raise ValueError(f"--input-shape must be integers like 1,8,8; got {input_shape!r}.") from err
        return torch.zeros((1, *shape))
    if dataset is None and model_spec.startswith("zoo:"):
        dataset = _DEFAULT_DATA.get(model_spec[4:])
    if dataset is None:
        return None
    x, _ = zoo.dataset(dataset, split="test")[:1]
    return x
