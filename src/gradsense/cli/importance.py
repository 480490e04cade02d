"""``gradsense importance``: which weights, channels, heads and layers matter -> masks and bits, measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from gradsense.cli.common import console, friendly_errors, model_option


def _fmt(x: Any, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:+.{digits}g}" if isinstance(x, float) else str(x)


def _measured_table(title: str, rows: list[tuple[str, dict[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    from rich.table import Table

    header = ["decision", "held-out loss", "measured change", "predicted (1st order)", "predicted (2nd order)",
              "metric", "metric change"]
    out = []
    table = Table(title=title, title_justify="left")
    for col in header:
        table.add_column(col, justify="left" if col == "decision" else "right", no_wrap=col == "decision")
    for name, m in rows:
        cells = [name, f"{m['loss_after']:.5g}", _fmt(m["loss_change"]), _fmt(m["predicted_first_order"]),
                 _fmt(m["predicted_second_order"]),
                 "n/a" if m["metric_after"] is None else f"{m['metric_after']:.4f}", _fmt(m["metric_change"])]
        table.add_row(*cells)
        out.append(cells)
    console.print(table)
    return header, out


def _parse_list(text: str, kind: type, what: str) -> list[Any]:
    try:
        return [kind(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise ValueError(f"{what} must be a comma-separated list, got {text!r}.") from err


def _data(model_spec: str, weights: str | None, dataset: str, n_examples: int, n_heldout: int | None) -> dict[str, Any]:
    """Model (wrapped for sentence pairs), loss, metric, calibration and held-out data."""
    import gradsense as gs
    from gradsense.specs import load_model

    if dataset == "sentence-pairs":
        from gradsense.importance.sentences import (
            MINILM_PARAMS,
            SentencePairModel,
            pair_data,
            similarity_loss,
            spearman,
        )

        encoder = load_model(model_spec, weights=weights)
        if not hasattr(encoder, "tokenizer"):
            raise ValueError(f"--dataset sentence-pairs needs a sentence encoder (e.g. zoo:minilm); {model_spec} is "
                             f"a {type(encoder).__name__}.")
        model = SentencePairModel(encoder).eval()
        return {"model": model, "loss": similarity_loss, "metric": spearman, "params": MINILM_PARAMS,
                "calibration": pair_data(encoder, split="calibration"), "heldout": pair_data(encoder, split="heldout"),
                "metric_name": "Spearman", "describe": "32 calibration / 16 held-out bundled sentence pairs"}
    model = load_model(model_spec, weights=weights)
    train, test = gs.zoo.dataset(dataset, split="train"), gs.zoo.dataset(dataset, split="test")
    held = test[:] if n_heldout is None else test[:n_heldout]
    return {"model": model, "loss": gs.losses.cross_entropy, "metric": "auto", "params": None,
            "calibration": train[:n_examples], "heldout": held, "metric_name": "accuracy",
            "describe": f"{min(n_examples, len(train))} {dataset} training examples (calibration), "
                        f"{held[0].shape[0]} test examples (held-out)"}


@click.command("importance")
@model_option
@click.option("--dataset", required=True, help="zoo dataset (digits, breast-cancer) or sentence-pairs (with zoo:minilm).")
@click.option("--method", required=True, help="score: magnitude, taylor, taylor2, fisher, gblm, wanda, serene, "
                                              "hessian, ecoflap, pqi (gaprune needs two data sets: use the API).")
@click.option("--granularity", default=None, type=click.Choice(["weight", "channel", "head", "layer"]),
              help="default: follows --structure (channel/head), else weight.")
@click.option("--sparsity", default=0.5, show_default=True, type=float, help="fraction of weights/units to remove.")
@click.option("--structure", default="unstructured", show_default=True, help="unstructured, N:M (e.g. 2:4), channel, head.")
@click.option("--scope", default="global", show_default=True, type=click.Choice(["global", "layer"]))
@click.option("--bits", default=None, type=int, help="also allocate mixed precision at this average (HAWQ-V2).")
@click.option("--choices", default="2,3,4,8", show_default=True, help="bit widths for --bits.")
@click.option("--params", "params_spec", default=None,
              help="regex of the parameters to score (default: every Linear/Conv weight).")
@click.option("--n", "n_examples", default=256, show_default=True, type=int, help="calibration examples.")
@click.option("--n-heldout", default=None, type=int, help="held-out examples (default: the whole test split).")
@click.option("--compare", default="magnitude,taylor,taylor2,gblm", show_default=True,
              help="methods of the sparsity sweep (with --method); '' skips the sweep.")
@click.option("--sparsities", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", default=None, type=click.Path(file_okay=False), help="run folder to write (results, figures, report).")
@friendly_errors
def importance_cmd(
    model_spec: str, weights: str | None, dataset: str, method: str, granularity: str | None, sparsity: float,
    structure: str, scope: str, bits: int | None, choices: str, params_spec: str | None, n_examples: int, n_heldout: int | None,
    compare: str, sparsities: str, seed: int, out: str | None,
) -> None:
    """What is the model's loss sensitive to among its weights? Scores -> masks and bits, with the loss change
    measured on held-out data next to the change the scores predicted.

    \b
    Examples:
      gradsense importance --model zoo:digits-cnn --dataset digits --method taylor --sparsity 0.5 --out runs/imp
      gradsense importance --model zoo:digits-cnn --dataset digits --method hessian --structure 2:4 --bits 4
      gradsense importance --model zoo:digits-cnn --dataset digits --method taylor --structure channel --sparsity 0.3
      gradsense importance --model zoo:minilm --dataset sentence-pairs --method taylor --structure head --sparsity 0.25
    """
    from rich.table import Table

    from gradsense.importance import METHODS, importance, sweep
    from gradsense.importance.bits import check_bits, check_choices
    from gradsense.importance.engine import resolve_params
    from gradsense.importance.masks import check_nm, check_sparsity, parse_structure

    # every check before any work or file
    if method not in METHODS:
        raise ValueError(f"unknown --method {method!r}; available: {sorted(METHODS)}.")
    if method == "gaprune":
        raise ValueError("--method gaprune compares a domain and a general data set; use the Python API "
                         "(gradsense.importance.importance(..., method='gaprune', reference=general_data)).")
    kind, nm = parse_structure(structure)
    if kind != "nm":
        check_sparsity(sparsity)
    if n_examples < 1:
        raise ValueError(f"--n must be >= 1, got {n_examples}.")
    bit_choices = check_choices(_parse_list(choices, int, "--choices"))
    if bits is not None:
        check_bits(bits, "--bits")
        if bits not in bit_choices:
            raise ValueError(f"--bits {bits} is not one of --choices {list(bit_choices)}: the uniform baseline at the "
                             "same budget needs it. Add it to --choices.")
    compare_methods = _parse_list(compare, str, "--compare")
    unknown = [m for m in compare_methods if m not in METHODS or m == "gaprune"]
    if unknown:
        raise ValueError(f"--compare: unknown or unsupported methods {unknown}; available: {sorted(set(METHODS) - {'gaprune'})}.")
    sweep_sparsities = [check_sparsity(s) for s in _parse_list(sparsities, float, "--sparsities")]
    gran = granularity or {"channel": "channel", "head": "head"}.get(kind, "weight")
    d = _data(model_spec, weights, dataset, n_examples, n_heldout)
    model, loss, metric = d["model"], d["loss"], d["metric"]
    if params_spec is not None:
        d["params"] = params_spec
    if kind == "nm":
        check_nm({k: v.shape for k, v in resolve_params(model, d["params"]).items()}, *nm)
    res = importance(model, loss, d["calibration"], method=method, granularity=gran, params=d["params"],
                     heldout=d["heldout"], metric=metric, seed=seed, name=model_spec)

    ranked = res.ranking()
    table = Table(title=f"Layers ranked by {method} importance ({gran})", title_justify="left")
    for col in ("#", "layer", "total score"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for i, (name, value) in enumerate(ranked[:12]):
        table.add_row(str(i + 1), name, f"{value:.4g}")
    console.print(table)

    decisions: list[tuple[str, dict[str, Any]]] = []
    masks = None
    if gran != "layer":
        masks = res.prune(None if kind == "nm" else sparsity, structure=structure, scope=scope)
        label = f"{structure} {masks.meta['achieved']:.0%} {masks.meta['unit']}"
        decisions.append((f"{method} {label}", masks.measured))
    alloc = None
    if bits is not None:
        source = res
        if not any(k.startswith("curvature/") for k in res.tensors):
            console.print(f"[dim]{method} has no curvature: Hutch++ layer traces (method='hessian') set the bits.[/]")
            source = importance(model, loss, d["calibration"], method="hessian", granularity="layer",
                                params=d["params"], heldout=d["heldout"], metric=metric, seed=seed, name=model_spec)
        alloc = source.allocate_bits(bits, choices=bit_choices)
        decisions.append((f"{source.method} mixed {alloc.meta['achieved_mean_bits']:.3g} bits",
                          alloc.measured))
        if alloc.meta.get("uniform_measured"):
            decisions.append((f"uniform {bits} bits", alloc.meta["uniform_measured"]))
        per = Table(title="Bits per tensor (HAWQ-V2: min sum Tr(H_l)/n_l ||Q(W_l) - W_l||^2)", title_justify="left")
        for col in ("tensor", "bits", "Tr/n"):
            per.add_column(col, justify="left" if col == "tensor" else "right")
        for k, b in alloc.items():
            per.add_row(k, str(b), f"{alloc.meta['sensitivity'][k]:.4g}")
        console.print(per)
    measured = _measured_table(f"Measured vs predicted on held-out data ({d['describe']})", decisions) if decisions else None

    swept = None
    if compare_methods:
        methods = list(dict.fromkeys([*compare_methods, method])) if gran != "layer" else compare_methods
        sweep_structure = structure if kind in ("channel", "head") else "unstructured"
        swept = sweep(model, loss, d["calibration"], d["heldout"], methods=methods, sparsities=sweep_sparsities,
                      structure=sweep_structure, scope=scope, params=d["params"], metric=metric, seed=seed,
                      name=model_spec)
        for what, title in (("loss", "held-out loss"), ("metric", f"held-out {d['metric_name']}")):
            header, rows = swept.grid(what)
            t = Table(title=f"Sparsity sweep ({sweep_structure}, {scope}): {title}", title_justify="left")
            for col in header:
                t.add_column(col, justify="left" if col == "method" else "right")
            for row in rows:
                t.add_row(*row)
            console.print(t)

    if out:
        from gradsense.results import RunFolder
        from gradsense.viz.report import Report

        run = RunFolder(out)
        report = Report(f"gradsense importance: {method} on {model_spec} ({d['describe']})")
        run.save_result(res, "importance")
        run.save_figure(res.plot(), "importance-layers")
        report.add_result(res, title=f"Ranked layers: {method} ({gran})")
        if measured is not None:
            report.add_section("Measured vs predicted loss change", text=(
                "Each decision applied to a copy of the model and measured on held-out data, next to the change the "
                "Taylor expansion predicts on the calibration data (first order g.delta; second order adds "
                "1/2 delta^T H delta from one Hessian-vector product)."), table=measured)
        if masks is not None:
            run.save_result(masks, "masks")
            run.save_figure(masks.plot(), "masks-sparsity")
            report.add_result(masks, title="Per-layer sparsity")
        if alloc is not None:
            run.save_result(alloc, "bits")
            run.save_figure(alloc.plot(), "bits")
            report.add_result(alloc, title="Per-layer bits")
        if swept is not None:
            run.save_result(swept, "sweep")
            fig_loss, fig_metric = swept.plot(), swept.plot("metric")
            run.save_figure(fig_loss, "sweep-loss")
            report.add_section("Sparsity sweep: methods compared", text=(
                "Held-out loss (log axis) and metric of each method's masks at each sparsity."),
                table=swept.table(), figures=[("held-out loss", fig_loss), (f"held-out {d['metric_name']}", fig_metric)])
        path = report.write(Path(out) / "report.html")
        console.print(f"wrote {path}")


def demo_section(run: Any, report: Any) -> None:
    """The importance part of ``gradsense demo``: on the bundled digits CNN, masks and 4-bit mixed precision with
    their measured held-out change next to the prediction, and a sparsity sweep of two methods (a few seconds).

    Args:
        run: The demo's :class:`gradsense.results.RunFolder`.
        report: The demo's :class:`gradsense.viz.report.Report`.
    """
    import gradsense as gs
    from gradsense.importance import importance, sweep

    model = gs.zoo.load("digits-cnn")
    calib = gs.zoo.dataset("digits", split="train")[:128]
    held = gs.zoo.dataset("digits", split="test")[:]
    loss = gs.losses.cross_entropy
    res = importance(model, loss, calib, method="taylor2", heldout=held, name="zoo:digits-cnn")
    masks = res.prune(0.5)
    bits = res.allocate_bits(4)
    swept = sweep(model, loss, calib, held, methods=("magnitude", "wanda"), sparsities=(0.5, 0.7, 0.9),
                  name="zoo:digits-cnn")
    for name, r in (("importance", res), ("importance-masks", masks), ("importance-bits", bits),
                    ("importance-sweep", swept)):
        run.save_result(r, name)
    rows = [["taylor2, 50% unstructured (global)", masks.measured], ["taylor2 Fisher traces, mixed 4-bit", bits.measured],
            ["uniform 4-bit", bits.meta.get("uniform_measured")]]
    table = (["decision", "held-out loss", "measured change", "predicted (1st)", "predicted (2nd)", "accuracy"],
             [[name, f"{m['loss_after']:.4f}", f"{m['loss_change']:+.4f}", f"{m['predicted_first_order']:+.4f}",
               f"{m['predicted_second_order']:+.4f}", f"{m['metric_after']:.3f}"] for name, m in rows if m])
    report.add_section(
        "Which weights matter: importance -> masks and bits",
        text=("Second-order Taylor scores |g w - F w^2 / 2| (LLM-Pruner, Fisher diagonal) of every conv/linear weight "
              f"from 128 training digits. Each decision is applied to a copy of the model and measured on the {len(held[0])} "
              "test digits, next to the loss change the Taylor expansion predicts (second order: one Hessian-vector "
              "product). Mixed precision: HAWQ-V2's sum Tr(F_l)/n_l ||Q(W_l) - W_l||^2 minimised at 4 bits on average."),
        table=table,
        figures=[("layers ranked by importance", res.plot()), ("bits per tensor", bits.plot())],
    )
    report.add_section("Sparsity sweep: methods compared", text=(
        "Held-out loss and accuracy of magnitude and Wanda (|W| ||X||) masks at 50-90% sparsity."),
                       table=swept.grid("metric"), figures=[("held-out loss", swept.plot()),
                                                            ("held-out accuracy", swept.plot("metric"))])
