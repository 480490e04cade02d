"""The gradient-leakage sections of ``gradsense demo``: on the bundled photo crops and the DLG paper's LeNet.

``demo_section(run, report)`` adds two sections:

1. What one shared gradient reveals: two textured photo crops, each shared alone, attacked by iDLG (label) and DLG on
   the untrained LeNet (the papers' setting) and by Inverting Gradients on the trained ``zoo:photos-lenet``.
2. Defences and what they cost: an audit of ``zoo:photos-lenet`` (iDLG + Inverting Gradients x no defence,
   pruning, DP-SGD noise x batches of 1 and 4) with each defence's accuracy cost measured by a short federated
   fine-tune with it, and the privacy-accuracy trade-off. (``gradsense audit`` adds int8, local steps and DLG.)

The attack budgets are the demo's (about 15 CPU seconds in all), below the papers'; see :func:`demo_section`.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["demo_section", "textured"]


def textured(inputs: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of ``n`` examples with the most texture (pixel standard deviation), from distinct classes first."""
    order = torch.argsort(inputs.flatten(1).std(dim=1), descending=True)
    picked: list[int] = []
    seen: set[int] = set()
    for i in order.tolist():
        if int(labels[i]) not in seen:
            picked.append(i)
            seen.add(int(labels[i]))
        if len(picked) == n:
            break
    return torch.tensor(picked)


def _untrained(name: str, seed: int = 0) -> torch.nn.Module:
    import gradsense as gs

    model = gs.zoo.load(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return model


DEMO_DEFENSES = ("none", "prune:0.1", "dp:0.1")


def demo_section(run: Any, report: Any, *, steps: int = 150, dlg_steps: int = 10, n_images: int = 2,
                 audit_steps: int = 100, defenses: tuple[str, ...] = DEMO_DEFENSES, finetune_steps: int = 20) -> None:
    """Add the privacy sections to a demo run (about 15 CPU seconds).

    The budgets are the demo's, a few times below the papers' (and ``gradsense audit``'s defaults): enough for the
    untrained network's photos to come back recognisably and for the trained network's not to; a real audit runs
    longer attacks (``gs.privacy.audit``'s defaults, 300 Inverting Gradients steps, or the papers' thousands).

    Args:
        run: A :class:`~gradsense.results.RunFolder` (results and figures are saved into it).
        report: A :class:`~gradsense.viz.report.Report` (sections are appended).
        steps: Adam steps of every Inverting Gradients run of the first section.
        dlg_steps: L-BFGS iterations of every DLG run.
        n_images: Photo crops attacked one at a time in the first section.
        audit_steps: Adam steps of the audit's Inverting Gradients runs.
        defenses: The audited defences (see :func:`~gradsense.privacy.defenses.parse_defense`).
        finetune_steps: Rounds of the fine-tune that measures each defence's accuracy cost.
    """
    import gradsense as gs
    from gradsense.results.privacy import image_rows

    ce = gs.losses.cross_entropy
    train = gs.zoo.dataset("photos", split="train")
    test = gs.zoo.dataset("photos", split="test")
    idx = textured(train.inputs, train.labels, n_images)
    x, y = train[idx]
    rows = [("original", x, [train.classes[int(c)] for c in y])]
    table = []
    trained = gs.zoo.load("photos-lenet")
    runs = [("untrained LeNet, DLG", _untrained("photos-lenet"), "dlg", {"steps": dlg_steps}),
            ("trained LeNet, inverting", trained, "inverting", {"steps": steps})]
    for label, model, attack, opts in runs:
        recs, caps = [], []
        for i in range(x.shape[0]):
            g = gs.privacy.client_gradient(model, ce, x[i : i + 1], y[i : i + 1])
            rec = gs.privacy.reconstruct(model, ce, g, attack=attack, truth=(x[i : i + 1], y[i : i + 1]), seed=i,
                                         name=f"zoo:photos-lenet ({label})", **opts)
            recs.append(rec.inputs)
            ok = rec.label_accuracy == 1
            caps.append(f"{float(rec.psnr[0]):.1f} dB, label {'ok' if ok else 'wrong'}")
            table.append([label, train.classes[int(y[i])], f"{float(rec.psnr[0]):.1f}", f"{float(rec.ssim[0]):.3f}",
                          "yes" if ok else "no", str(rec.n_evaluations)])
        rows.append((label, torch.cat(recs), caps))
    fig = image_rows(rows, (0.0, 1.0), "Reconstructions from one shared gradient per photo")
    run.save_figure(fig, "privacy-single")
    acc = gs.zoo.info("photos-lenet")["test_accuracy"]
    report.add_section(
        "Privacy: what one shared gradient reveals",
        text=(f"{n_images} photo crops from the bundled photos set (32x32 crops of scikit-learn's two sample "
              "photos), each shared as the gradient of one example, as a federated client would. The label comes from "
              "the sign of the last layer's bias gradient (iDLG); the image from Deep Leakage from Gradients (L2 "
              f"matching, {dlg_steps} L-BFGS iterations) on Zhu et al.'s sigmoid LeNet, untrained as in the papers, "
              f"and from Inverting Gradients (cosine + total variation, signed Adam, {steps} steps) on the same network "
              "trained "
              f"(zoo:photos-lenet, {acc:.0%} test accuracy on 8 location classes, chance 12.5%). Below ~20 dB a photo "
              "is not recognisable: the untrained network gives its inputs away, the trained one much less - but "
              "every label."),
        table=(["network and attack", "class", "PSNR dB", "SSIM", "label", "evaluations"], table),
        figures=[("originals and reconstructions", fig)],
    )

    res = gs.privacy.audit(trained, ce, train, attacks=("idlg", "inverting"), defenses=defenses, batch_sizes=(1, 4),
                           heldout=test[:], attack_options={"inverting": {"steps": audit_steps}},
                           finetune_steps=finetune_steps,
                           seed=0, name="zoo:photos-lenet")
    run.save_result(res, "privacy-audit")
    rec_fig, trade = res.plot("reconstructions"), res.plot("tradeoff")
    run.save_figure(rec_fig, "privacy-audit-reconstructions")
    run.save_figure(trade, "privacy-tradeoff")
    ft = res.meta["finetune"]
    report.add_section(
        "Privacy: defences and what they cost",
        text=("An audit of the trained zoo:photos-lenet: iDLG and Inverting Gradients "
              f"({audit_steps} steps: a short attack, for the demo) against every defence, for one "
              "batch of 1 and one of 4 training crops (`gradsense audit` also runs DLG, int8 and local steps, with "
              "longer attacks). PSNR/SSIM compare each original with its best-matched "
              "reconstruction (mean / most revealing image); label accuracy counts recovered labels as a multiset. "
              f"Each defence's accuracy cost is measured, not assumed: the model is fine-tuned for {finetune_steps} "
              "federated rounds "
              "(batches of 32, server step 0.01) with the defence applied to every round's shared gradient, and its "
              f"accuracy on the {len(test)} test crops is compared with the same fine-tune without defence "
              f"({100 * ft['reference_accuracy']:.1f}%; {100 * ft['accuracy_before']:.1f}% before). The standard error "
              "of each paired difference says which costs are real on this small test set. Labels leak even where "
              "images do not."),
        table=res.table(),
        figures=[("originals and Inverting Gradients' reconstructions per defence", rec_fig),
                 ("privacy-accuracy trade-off", trade)],
    )
    costs = res.cost_table()
    if costs is not None:
        report.add_section("Privacy: accuracy cost and epsilon", level=3, table=costs, text=(
            "Epsilon (delta = 1e-5) from the RDP accountant when Opacus or dp-accounting is installed: for the "
            f"{finetune_steps}-round fine-tune under Poisson-subsampling accounting, and for one release of one batch's "
            "gradient."))
