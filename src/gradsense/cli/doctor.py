"""``gradsense doctor``: a support report for a model."""

from __future__ import annotations

from typing import Any

from gradsense.cli.common import Run, analysis_command


@analysis_command("doctor", short_help="Parameters, layers, applicable analyses and memory of a model.", n=1, batch_size=32, n_help="examples the loss is measured on (with labelled --data).")
def doctor_cmd(run: Run) -> None:
    """Parameter count, layer types, which analyses apply, and memory for one fwd+bwd.

    The example input comes from --data (default: the zoo model's own data) or, without data, zeros of
    --input-shape; --batch-size sets the batch of the memory estimate. With labelled data the loss (--loss)
    on the first --n examples is shown too.

    \b
    Examples:
      gradsense doctor --model zoo:digits-cnn --batch-size 64
      gradsense doctor --model my_model.py:build --weights w.pt \\
          --input-shape 3,32,32
      gradsense doctor --model hf:./my-bert --data reviews.jsonl
    """
    import torch

    from gradsense.doctor import doctor

    model = run.model()
    example: Any = None
    loss_row = None
    shape = run.options.get("input_shape")
    if shape is not None and not run.options.get("data"):
        example = torch.zeros((1, *shape), dtype=run._parameter_dtype(model) or torch.float32, device=run.device)
    else:
        data = run.data(required=False)
        if data is not None:
            example = data.inputs[:1]
            if data.labels is not None:
                with run.stage(f"loss ({run.loss_name}) on {len(data)} example(s)"), torch.no_grad():
                    value = float(run.loss()(model(data.inputs), data.labels))
                loss_row = (f"loss ({run.loss_name}) on {len(data)} example(s) of {data.name}", f"{value:.6g}")
    with run.stage("inspecting the model"):
        result = doctor(model, example, batch_size=run.batch_size, name=run.model_spec)
    rows = result.summary()
    if loss_row is not None:
        rows.append(loss_row)
    if example is None:
        run.note("no example input: give --data or --input-shape C,H,W for the memory estimate.")
    run.rows(result.title, rows, name="doctor")
    run.add("doctor", result)
