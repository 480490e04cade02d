"""``gradsense importance``: which weights, channels, heads and layers matter -> masks and bits, measured."""

from __future__ import annotations

from typing import Any

import click

from gradsense.cli.common import Run, analysis_command


def _fmt(x: Any, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:+.{digits}g}" if isinstance(x, float) else str(x)


def measured_table(rows: list[tuple[str, dict[str, Any]]], metric_name: str) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of decisions with the measured and predicted loss change and whether the prediction
    holds (:func:`gradsense.results.importance.prediction_verdict`); the metric column is named ``metric_name``."""
    from gradsense.results.importance import prediction_verdict

    header = ["decision", "held-out loss", "measured change", "predicted (1st order)", "predicted (2nd order)",
              "Taylor prediction", metric_name, f"{metric_name} change"]
    out = []
    for name, m in rows:
        out.append([name, f"{m['loss_after']:.5g}", _fmt(m["loss_change"]), _fmt(m["predicted_first_order"]),
                    _fmt(m["predicted_second_order"]), prediction_verdict(m)[1],
                    "n/a" if m["metric_after"] is None else f"{m['metric_after']:.4f}", _fmt(m["metric_change"])])
    return header, out


def flagged_sentence(rows: list[tuple[str, dict[str, Any] | None]]) -> str:
    """One sentence naming the decisions whose Taylor prediction fails, with measured vs predicted."""
    from gradsense.results.importance import prediction_verdict

    failed = []
    for name, m in rows:
        holds, verdict = prediction_verdict(m)
        if holds is False and m is not None:
            pred = m["predicted_second_order"] if m.get("predicted_second_order") is not None else m["predicted_first_order"]
            failed.append(f"{name} (measured {m['loss_change']:+.4g} vs predicted {pred:+.4g}: {verdict[7:]})")
    if not failed:
        return "Every prediction here holds."
    return "Outside the expansion here: " + "; ".join(failed) + "."


def _parse_list(text: str, kind: type, what: str) -> list[Any]:
    try:
        return [kind(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise ValueError(f"{what} must be a comma-separated list, got {text!r}.") from err


def _data(run: Run, n_heldout: int | None, heldout: str | None) -> dict[str, Any]:
    """Model (wrapped for sentence pairs), loss, metric, calibration and held-out data."""
    spec = run.data_spec()
    if spec in ("sentence-pairs", "zoo:sentence-pairs"):
        from gradsense.importance.sentences import (
            MINILM_PARAMS,
            SentencePairModel,
            pair_data,
            similarity_loss,
            spearman,
        )

        encoder = run.model()
        if not hasattr(encoder, "tokenizer"):
            raise ValueError(f"--data sentence-pairs needs a sentence encoder (e.g. zoo:minilm); {run.model_spec} is "
                             f"a {type(encoder).__name__}.")
        model = SentencePairModel(encoder).eval()
        return {"model": model, "loss": similarity_loss, "metric": spearman, "params": MINILM_PARAMS,
                "calibration": pair_data(encoder, split="calibration"), "heldout": pair_data(encoder, split="heldout"),
                "metric_name": "Spearman", "describe": "32 calibration / 16 held-out bundled sentence pairs"}
    if spec is None:
        raise ValueError(f"`gradsense importance` needs --data SPEC for {run.model_spec} (calibration data).")
    model = run.model()
    calib = run.data(spec=spec, labels=True)
    if heldout is not None:
        held = run.data(spec=heldout, n=n_heldout, labels=True)
        where = f"{len(held)} examples of {held.name} (held-out)"
    elif spec.startswith("zoo:") or calib.kind == "zoo":
        held = run.data(spec=spec, split="test" if run.options.get("split") != "test" else "train", n=n_heldout,
                        labels=True)
        where = f"{len(held)} examples of {held.name} (held-out)"
    else:
        held = calib if n_heldout is None else calib.take(n_heldout)
        where = "the same examples (no --heldout given: the measured change is not out-of-sample)"
        run.note("no --heldout SPEC: the decisions are measured on the calibration data itself.")
    return {"model": model, "loss": run.loss(), "metric": "auto", "params": None,
            "calibration": calib.pair(), "heldout": held.pair(), "metric_name": "accuracy",
            "describe": f"{len(calib)} examples of {calib.name} (calibration), measured on {where}"}


@analysis_command("importance", short_help="Which weights matter: scores, masks and bits, measured.", n=256, split="train",
                  data_help="calibration data: zoo:NAME (held-out: its other split), tensors, .csv, an image "
                            "folder or text; or sentence-pairs (with zoo:minilm).",
                  n_help="calibration examples (the first N).")
@click.option("--method", required=True, help="score: magnitude, taylor, taylor2, fisher, gblm, wanda, serene, "
                                              "hessian, ecoflap, pqi (gaprune needs two data sets: use the API).")
@click.option("--heldout", default=None, metavar="SPEC",
              help="data the decisions are measured on (default: a zoo dataset's other split; else the calibration "
                   "data).")
@click.option("--granularity", default=None, type=click.Choice(["weight", "channel", "head", "layer"]),
              help="default: follows --structure (channel/head), else weight.")
@click.option("--sparsity", default=0.5, show_default=True, type=float, help="fraction of weights/units to remove.")
@click.option("--structure", default="unstructured", show_default=True, help="unstructured, N:M (e.g. 2:4), channel, head.")
@click.option("--scope", default="global", show_default=True, type=click.Choice(["global", "layer", "row"]))
@click.option("--bits", default=None, type=int, help="also allocate mixed precision at this average (HAWQ-V2).")
@click.option("--choices", default="2,3,4,8", show_default=True, help="bit widths for --bits.")
@click.option("--params", "params_spec", default=None,
              help="regex of the parameters to score (default: every Linear/Conv weight).")
@click.option("--n-heldout", default=None, type=int, help="held-out examples (default: all of them).")
@click.option("--compare", default="magnitude,taylor,taylor2,gblm", show_default=True,
              help="methods of the sparsity sweep (with --method); '' skips the sweep.")
@click.option("--sparsities", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", show_default=True)
def importance_cmd(
    run: Run, method: str, heldout: str | None, granularity: str | None, sparsity: float, structure: str, scope: str,
    bits: int | None, choices: str, params_spec: str | None, n_heldout: int | None, compare: str, sparsities: str,
) -> None:
    """What is the model's loss sensitive to among its weights? Scores -> masks and bits, with the loss change
    measured on held-out data next to the change the scores predicted.

    \b
    Examples:
      gradsense importance --model zoo:digits-cnn --data zoo:digits \\
          --method taylor --sparsity 0.5 --out runs/imp
      gradsense importance --model zoo:digits-cnn --data zoo:digits \\
          --method hessian --structure 2:4 --bits 4
      gradsense importance --model zoo:digits-cnn --data zoo:digits \\
          --method taylor --structure channel --sparsity 0.3
      gradsense importance --model my.py:build --weights w.pt --data train.npz \\
          --heldout val.npz --method taylor2
      gradsense importance --model zoo:minilm --data sentence-pairs \\
          --method taylor --structure head --sparsity 0.25
    """
    from gradsense.importance import METHODS, importance, sweep
    from gradsense.importance.bits import check_bits, check_choices
    from gradsense.importance.engine import resolve_params
    from gradsense.importance.masks import check_nm, check_sparsity, parse_structure
    from gradsense.results.importance import PREDICTION_NOTE

    # every check before any work or file
    if method not in METHODS:
        raise ValueError(f"unknown --method {method!r}; available: {sorted(METHODS)}.")
    if method == "gaprune":
        raise ValueError("--method gaprune compares a domain and a general data set; use the Python API "
                         "(gradsense.importance.importance(..., method='gaprune', reference=general_data)).")
    kind, nm = parse_structure(structure)
    if kind != "nm":
        check_sparsity(sparsity)
    if n_heldout is not None and n_heldout < 1:
        raise ValueError(f"--n-heldout must be >= 1, got {n_heldout}.")
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
    d = _data(run, n_heldout, heldout)
    model, loss, metric = d["model"], d["loss"], d["metric"]
    metric_name = d["metric_name"]
    if params_spec is not None:
        d["params"] = params_spec
    if kind == "nm":
        check_nm({k: v.shape for k, v in resolve_params(model, d["params"]).items()}, *nm)
    name = run.model_spec
    kw = run.engine_kwargs(importance)
    with run.stage(f"{method} scores ({gran}) on the calibration data"):
        res = importance(model, loss, d["calibration"], method=method, granularity=gran, params=d["params"],
                         heldout=d["heldout"], metric=metric, name=name, **kw)

    run.table(f"Layers ranked by {method} importance ({gran})", ["#", "layer", "total score"],
              [[str(i + 1), layer, f"{value:.4g}"] for i, (layer, value) in enumerate(res.ranking()[:12])],
              name="ranking")

    decisions: list[tuple[str, dict[str, Any]]] = []
    masks = None
    if gran != "layer":
        with run.stage(f"masks: {structure} at {sparsity:.0%} ({scope}), measured on held-out data"):
            masks = res.prune(None if kind == "nm" else sparsity, structure=structure, scope=scope)
        label = f"{structure} {masks.meta['achieved']:.0%} {masks.meta['unit']}"
        decisions.append((f"{method} {label}", masks.measured))
    alloc = None
    if bits is not None:
        source = res
        if not any(k.startswith("curvature/") for k in res.tensors):
            run.note(f"{method} has no curvature: Hutch++ layer traces (method='hessian') set the bits.")
            with run.stage("Hutch++ layer traces for the bits"):
                source = importance(model, loss, d["calibration"], method="hessian", granularity="layer",
                                    params=d["params"], heldout=d["heldout"], metric=metric, name=name, **kw)
        with run.stage(f"bits: {bits} on average from {list(bit_choices)}, measured"):
            alloc = source.allocate_bits(bits, choices=bit_choices)
        decisions.append((f"{source.method} mixed {alloc.meta['achieved_mean_bits']:.3g} bits", alloc.measured))
        if alloc.meta.get("uniform_measured"):
            decisions.append((f"uniform {bits} bits", alloc.meta["uniform_measured"]))
        run.table("Bits per tensor (HAWQ-V2: min sum Tr(H_l)/n_l ||Q(W_l) - W_l||^2)", ["tensor", "bits", "Tr/n"],
                  [[k, str(b), f"{alloc.meta['sensitivity'][k]:.4g}"] for k, b in alloc.items()], name="bits")
    measured = None
    if decisions:
        measured = measured_table(decisions, metric_name)
        run.table(f"Measured vs predicted on held-out data ({d['describe']})", *measured, name="measured")
        if any(row[5].startswith("fails") for row in measured[1]):
            run.note(PREDICTION_NOTE)

    swept = None
    if compare_methods:
        methods = list(dict.fromkeys([*compare_methods, method])) if gran != "layer" else compare_methods
        sweep_structure = structure if kind in ("channel", "head") else "unstructured"
        with run.stage(f"sparsity sweep: {len(methods)} methods x {len(sweep_sparsities)} sparsities"):
            swept = sweep(model, loss, d["calibration"], d["heldout"], methods=methods, sparsities=sweep_sparsities,
                          structure=sweep_structure, scope=scope, params=d["params"], metric=metric, name=name,
                          **run.engine_kwargs(sweep))
        for what, title in (("loss", "held-out loss"), ("metric", f"held-out {metric_name}")):
            header, rows = swept.grid(what)
            run.table(f"Sparsity sweep ({sweep_structure}, {scope}): {title}", header, rows, name=f"sweep-{what}")

    for key, r in (("importance", res), ("masks", masks), ("bits", alloc), ("sweep", swept)):
        if r is not None:
            run.add(key, r)
    if run.out:
        from gradsense.viz.report import Report

        with run.stage(f"writing {run.out}"):
            report = Report(f"gradsense importance: {method} on {name} ({d['describe']})")
            run.save("importance", res, figure=None)
            run.folder().save_figure(res.plot(), "importance-layers")
            report.add_result(res, title=f"Ranked layers: {method} ({gran})")
            if measured is not None:
                report.add_section("Measured vs predicted loss change", text=(
                    "Each decision applied to a copy of the model and measured on held-out data, next to the change "
                    "the Taylor expansion predicts on the calibration data (first order g.delta; second order adds "
                    "1/2 delta^T H delta from one Hessian-vector product).\n\n" + PREDICTION_NOTE), table=measured)
            if masks is not None:
                run.save("masks", masks, figure=None)
                run.folder().save_figure(masks.plot(), "masks-sparsity")
                report.add_result(masks, title="Per-layer sparsity")
            if alloc is not None:
                run.save("bits", alloc)
                report.add_result(alloc, title="Per-layer bits")
            if swept is not None:
                run.save("sweep", swept, figure=None)
                fig_loss, fig_metric = swept.plot(), swept.plot("metric")
                run.folder().save_figure(fig_loss, "sweep-loss")
                report.add_section("Sparsity sweep: methods compared", text=(
                    f"Held-out loss (log axis) and {metric_name} of each method's masks at each sparsity."),
                    table=swept.table(metric_name),
                    figures=[("held-out loss", fig_loss), (f"held-out {metric_name}", fig_metric)])
            path = report.write(run.out / "report.html")
        run.wrote(path)


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
    from gradsense.results.importance import PREDICTION_NOTE

    rows = [("taylor2, 50% unstructured (global)", masks.measured), ("taylor2 Fisher traces, mixed 4-bit", bits.measured),
            ("uniform 4-bit", bits.meta.get("uniform_measured"))]
    table = measured_table([(name, m) for name, m in rows if m], "accuracy")
    report.add_section(
        "Which weights matter: importance -> masks and bits",
        text=("Second-order Taylor scores |g w - F w^2 / 2| (LLM-Pruner, Fisher diagonal) of every conv/linear weight "
              f"from 128 training digits. Each decision is applied to a copy of the model and measured on the {len(held[0])} "
              "test digits, next to the loss change the Taylor expansion predicts (second order: one Hessian-vector "
              "product). Mixed precision: HAWQ-V2's sum Tr(F_l)/n_l ||Q(W_l) - W_l||^2 minimised at 4 bits on average."
              "\n\n" + PREDICTION_NOTE + " " + flagged_sentence(rows)),
        table=table,
        figures=[("layers ranked by importance", res.plot()), ("bits per tensor", bits.plot())],
    )
    report.add_section("Sparsity sweep: methods compared", text=(
        "Held-out loss and accuracy of magnitude and Wanda (|W| ||X||) masks at 50-90% sparsity."),
                       table=swept.grid("metric"), figures=[("held-out loss", swept.plot()),
                                                            ("held-out accuracy", swept.plot("metric"))])
