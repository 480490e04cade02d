"""``gradsense audit``: if clients share this model's gradients, what can a server reconstruct, and what does each
defence cost in accuracy?"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from gradsense.cli.common import Run, analysis_command


def _parse_list(text: str, kind: type, what: str) -> list[Any]:
    try:
        items = [kind(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise ValueError(f"{what} must be a comma-separated list, got {text!r}.") from err
    if not items:
        raise ValueError(f"{what} is empty.")
    return items


def write_audit(res: Any, out: str | Path, *, title: str, text: str, source: str = "audit") -> Path:
    """Save an audit into a run folder (result, figures, report section) and return the report's path."""
    from gradsense.results import RunFolder
    from gradsense.viz.report import Report

    run = RunFolder(out)
    report = Report.extend(Path(out) / "report.html", title, source=source)
    run.save_result(res, "privacy-audit")
    figures = []
    try:
        rec = res.plot("reconstructions")
        run.save_figure(rec, "privacy-reconstructions")
        figures.append(("originals and reconstructions per defence", rec))
    except NotImplementedError:
        pass
    trade = res.plot("tradeoff")
    run.save_figure(trade, "privacy-tradeoff")
    figures.append(("privacy-accuracy trade-off", trade))
    header, rows = res.table()
    report.add_section("Privacy audit: what a shared gradient gives away", text=text, table=(header, rows),
                       figures=figures)
    costs = res.cost_table()
    if costs is not None:
        report.add_section("Privacy audit: the accuracy cost of each defence", level=3, table=costs, text=(
            "Held-out accuracy after the same short federated fine-tune with each defence applied to every round's "
            "shared gradient; the cost is the drop against the fine-tune without defence."))
    report.add_section("Privacy audit: settings and assumptions", level=3,
                       table=(["key", "value"], [[k, v] for k, v in res.summary()]))
    return report.write(Path(out) / "report.html")


@analysis_command("audit", short_help="What a shared gradient reveals, and what defences cost.", split="train",
                  n=None, n_help="number of client examples the audited batches are drawn from (the first N).",
                  data_help="the data the clients hold: zoo:NAME (photos, digits; a bare name works), a tensor file, "
                            "a .csv or an image folder; --split picks the zoo split the batches come from.")
@click.option("--heldout", "heldout_spec", default=None, metavar="SPEC",
              help="held-out data for the accuracy cost (default: the other split of zoo data).")
@click.option("--attacks", default="idlg,dlg,inverting", show_default=True,
              help="comma-separated: idlg, dlg, inverting, analytic.")
@click.option("--defenses", default="none,prune,dp,int8,local", show_default=True,
              help="comma-separated: none, prune[:KEEP], dp[:SIGMA[:CLIP]], fp16, int8, local[:STEPS[:LR]].")
@click.option("--batch-sizes", default="1,4,16", show_default=True, help="client batch sizes to audit.")
@click.option("--n-batches", default=1, show_default=True, type=int, help="batches per batch size.")
@click.option("--steps", default=None, type=int, help="Adam steps of the inverting attack (default 1000).")
@click.option("--dlg-steps", default=None, type=int, help="L-BFGS iterations of the DLG attack (default 100).")
@click.option("--restarts", default=None, type=int, help="random restarts of the inverting attack (default 1).")
@click.option("--n-heldout", default=256, show_default=True, type=int,
              help="held-out examples for the accuracy cost; 0 skips the fine-tunes.")
@click.option("--finetune-steps", default=50, show_default=True, type=int, help="rounds of the accuracy fine-tune.")
@click.option("--untrained", is_flag=True, help="attack a freshly initialised copy of the architecture (as DLG and "
              "Inverting Gradients do) instead of the trained weights.")
def audit_cmd(run: Run, heldout_spec: str | None, attacks: str, defenses: str, batch_sizes: str, n_batches: int,
              steps: int | None, dlg_steps: int | None, restarts: int | None, n_heldout: int, finetune_steps: int,
              untrained: bool) -> None:
    """What can a server reconstruct from the gradients clients share, and what does each defence cost?

    Runs every attack on every defence's shared message for batches of every size, scores the reconstructions
    against the clients' data (PSNR, SSIM, label accuracy; mean and worst case), and measures each defence's
    accuracy cost by a short federated fine-tune with it.

    \b
    Examples:
      gradsense audit --model zoo:photos-lenet --data photos --out runs/audit
      gradsense audit --model zoo:photos-cnn --data photos \\
          --attacks idlg,inverting --defenses none,dp:0.1 --batch-sizes 1,8
      gradsense audit --model zoo:photos-lenet --data photos --untrained \\
          --steps 300 --dlg-steps 20
    """
    import torch

    import gradsense as gs

    for value, flag in ((n_batches, "--n-batches"), (finetune_steps, "--finetune-steps")):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}.")
    if n_heldout < 0:
        raise ValueError(f"--n-heldout must be >= 0, got {n_heldout}.")
    attack_list = _parse_list(attacks, str, "--attacks")
    sizes = _parse_list(batch_sizes, int, "--batch-sizes")
    defense_list = _parse_list(defenses, str, "--defenses")
    for d in defense_list:
        gs.privacy.parse_defense(d)
    from gradsense.core.checks import suggest

    for a in attack_list:  # every name checked before anything is loaded
        if a not in gs.privacy.ATTACKS:
            raise ValueError(f"unknown attack {a!r} in --attacks; choose from {sorted(gs.privacy.ATTACKS)}."
                             f"{suggest(a, gs.privacy.ATTACKS)}")
    model = run.model()
    seed, split = run.seed, str(run.options.get("split") or "train")
    spec = run.data_spec()
    if spec is None:
        raise ValueError("`gradsense audit` needs --data SPEC (the data the clients hold).")
    loaded = run.data(split=split, labels=True)
    data = (loaded.inputs, loaded.labels)
    heldout = None
    if n_heldout:
        other = "test" if split == "train" else "train"
        if heldout_spec is not None:
            held = run.data(spec=heldout_spec, split=other, n=n_heldout, labels=True)
        elif spec.startswith("zoo:") or not any(c in spec for c in "./"):
            held = run.data(spec=spec, split=other, n=n_heldout, labels=True)
        else:
            raise ValueError(f"{spec} has no other split: give --heldout SPEC for the accuracy cost, or --n-heldout 0.")
        heldout = (held.inputs, held.labels)
    if untrained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in model.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    options: dict[str, dict[str, Any]] = {}
    if steps is not None:
        options["inverting"] = {"steps": steps}
    if restarts is not None:
        options.setdefault("inverting", {})["restarts"] = restarts
    if dlg_steps is not None:
        options["dlg"] = {"steps": dlg_steps}
    name = run.model_spec + (" (untrained)" if untrained else "")
    data_name = spec[4:] if spec.startswith("zoo:") else spec
    with run.stage("attacks and defences"):
        res = gs.privacy.audit(model, run.loss(), data, attacks=attack_list, defenses=defense_list,
                               batch_sizes=sizes, n_batches=n_batches, heldout=heldout, attack_options=options,
                               finetune_steps=finetune_steps, seed=seed, name=name)
    header, rows = res.table()
    run.table(f"What {name} leaks: {data_name} ({split}), {n_batches} batch(es) per size", header, rows,
              name="leakage")
    run.note("cells: mean / worst case (the most revealing image, or batch for labels)")
    costs = res.cost_table()
    if costs is not None:
        run.table(f"Accuracy cost: {finetune_steps}-round fine-tune, {n_heldout} held-out examples", *costs,
                  name="cost")
        run.note("cost in percentage points against no defence; ε at delta 1e-5 (RDP)")
    run.note("PSNR below ~20 dB: a photo is not recognisable; labels can leak even when images do not.")
    run.add("privacy-audit", res)
    if run.out:
        with run.stage("writing the run folder"):
            path = write_audit(res, run.out, title=f"gradsense audit: {name} on {data_name}", text=(
                f"Every attack on what a client shares under every defence, for batches of "
                f"{', '.join(map(str, sizes))} {data_name} examples ({n_batches} per size). PSNR/SSIM compare each "
                "original with its best-matched reconstruction; label accuracy counts the recovered labels as a "
                "multiset. Below ~20 dB a photo is not recognisable; labels leak even when images do not."))
        run.wrote(path)
