"""The gradient-leakage sections of ``gradsense demo``: on the bundled photo crops and the DLG paper's LeNet.

``demo_section(run, report)`` adds two sections:

1. What one shared gradient reveals: four textured photo crops, each shared alone, attacked by iDLG (label) and
   Inverting Gradients, on the untrained LeNet (the papers' setting) and on the trained ``zoo:photos-lenet``.
2. Defences and what they cost: an audit of the untrained LeNet (iDLG + Inverting Gradients x no defence,
   pruning, DP-SGD noise, int8, local steps x batches of 1 and 4) with each defence's accuracy cost measured by
   training the network for 40 federated rounds with it, and the privacy-accuracy trade-off.
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


def demo_section(run: Any, report: Any, *, steps: int = 300) -> None:
    """Add the privacy sections to a demo run (about half a minute on two cores).

    Args:
        run: A :class:`~gradsense.results.RunFolder` (results and figures are saved into it).
        report: A :class:`~gradsense.viz.report.Report` (sections are appended).
        steps: Adam steps of every Inverting Gradients run.
    """
    import gradsense as gs
    from gradsense.results.privacy import image_rows

    ce = gs.losses.cross_entropy
    train = gs.zoo.dataset("photos", split="train")
    test = gs.zoo.dataset("photos", split="test")
    idx = textured(train.inputs, train.labels, 4)
    x, y = train[idx]
    rows = [("original", x, [train.classes[int(c)] for c in y])]
    table = []
    for label, model in (("untrained LeNet", _untrained("photos-lenet")), ("trained LeNet", gs.zoo.load("photos-lenet"))):
        recs, caps = [], []
        for i in range(x.shape[0]):
            g = gs.privacy.client_gradient(model, ce, x[i : i + 1], y[i : i + 1])
            rec = gs.privacy.reconstruct(model, ce, g, attack="inverting", steps=steps, truth=(x[i : i + 1], y[i : i + 1]),
                                         seed=i, name=f"zoo:photos-lenet ({label})")
            recs.append(rec.inputs)
            caps.append(f"{float(rec.psnr[0]):.1f} dB, label {'ok' if rec.label_accuracy == 1 else 'wrong'}")
            table.append([label, train.classes[int(y[i])], f"{float(rec.psnr[0]):.1f}", f"{float(rec.ssim[0]):.3f}",
                          "yes" if rec.label_accuracy == 1 else "no", str(rec.n_evaluations)])
        rows.append((label, torch.cat(recs), caps))
    fig = image_rows(rows, (0.0, 1.0), f"Inverting Gradients from one shared gradient, {steps} steps")
    run.save_figure(fig, "privacy-single")
    acc = gs.zoo.info("photos-lenet")["test_accuracy"]
    report.add_section(
        "Privacy: what one shared gradient reveals",
        text=("Four photo crops from the bundled photos set (32x32 crops of scikit-learn's two sample photos), each "
              "shared as the gradient of one example, as a federated client would. The label comes from the sign of "
              "the last layer's bias gradient (iDLG); the image from Inverting Gradients (cosine matching + total "
              f"variation, signed Adam, {steps} steps). The LeNet is Zhu et al.'s sigmoid network, untrained as in the "
              f"papers and trained (zoo:photos-lenet, {acc:.0%} test accuracy on 8 location classes, chance 12.5%). "
              "Below ~20 dB a photo is not recognisable; a trained network leaks much less than a fresh one."),
        table=(["network", "class", "PSNR dB", "SSIM", "label", "evaluations"], table),
        figures=[("originals and reconstructions", fig)],
    )

    model = _untrained("photos-lenet")
    res = gs.privacy.audit(model, ce, train, attacks=("idlg", "inverting"),
                           defenses=("none", "prune:0.1", "dp:0.1", "int8", "local:4:0.1"), batch_sizes=(1, 4),
                           heldout=test[:], attack_options={"inverting": {"steps": steps}}, finetune_steps=40,
                           finetune_lr=0.1, seed=0, name="zoo:photos-lenet (untrained)")
    run.save_result(res, "privacy-audit")
    rec_fig, trade = res.plot("reconstructions"), res.plot("tradeoff")
    run.save_figure(rec_fig, "privacy-audit-reconstructions")
    run.save_figure(trade, "privacy-tradeoff")
    ft = res.meta["finetune"]
    report.add_section(
        "Privacy: defences and what they cost",
        text=("An audit of the untrained LeNet: iDLG and Inverting Gradients against every defence, for one batch "
              "of 1 and one of 4 training crops. PSNR/SSIM compare each original with its best-matched "
              "reconstruction (mean / most revealing image); label accuracy counts recovered labels as a multiset. "
              "Each defence's accuracy cost is measured, not assumed: the network is trained for 40 federated rounds "
              "(batches of 32, server step 0.1) with the defence applied to every round's shared gradient, and its "
              f"accuracy on {len(test)} test crops is compared with the same training without defence "
              f"({100 * ft['reference_accuracy']:.1f}%). Labels leak even where images do not."),
        table=res.table(),
        figures=[("originals and Inverting Gradients' reconstructions per defence", rec_fig),
                 ("privacy-accuracy trade-off", trade)],
    )
    costs = res.cost_table()
    if costs is not None:
        report.add_section("Privacy: accuracy cost and epsilon", level=3, table=costs, text=(
            "Epsilon (delta = 1e-5) from the RDP accountant when Opacus or dp-accounting is installed: for the 40-round "
            "training under Poisson-subsampling accounting, and for one release of one batch's gradient."))
