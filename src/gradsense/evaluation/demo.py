"""The explanation-quality sections of ``gradsense demo`` (a few seconds on a CPU).

``demo_section(run, report)`` adds: the block-digits method ranking (localisation on ground truth and
deletion/insertion), the randomisation check of Saliency, the predicted-vs-actual radius of the gradient,
and the breast-cancer MLP's dataset-level feature sensitivity (orders 1-3).
"""

from __future__ import annotations

from typing import Any

__all__ = ["demo_section"]

DEMO_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("saliency", {}),
    ("input_x_gradient", {}),
    ("smoothgrad", {"n_samples": 16}),
    ("integrated_gradients", {"steps": 16}),
    ("gradcam", {}),
    ("gradcam_plus_plus", {}),
]


def demo_section(run: Any, report: Any, *, n_examples: int = 16) -> None:
    """Add the evaluation sections to a demo run.

    Args:
        run: A :class:`~gradsense.results.RunFolder` (results and figures are saved into it).
        report: A :class:`~gradsense.viz.report.Report` (sections are appended).
        n_examples: Block-digits test examples to explain.
    """
    import gradsense as gs
    from gradsense.evaluation import global_sensitivity, method_table, randomization, taylor

    model = gs.zoo.load("block-digits-cnn")
    data = gs.zoo.dataset("block-digits", split="test")
    x, y = data[:n_examples]
    mask = data.masks[:n_examples]
    acc = gs.zoo.info("block-digits-cnn")["test_accuracy"]

    table = method_table(model, x, target=y, mask=mask, methods=DEMO_METHODS, steps=32)
    run.save_result(table, "evaluation-methods")
    header, rows = table.table()
    report.add_section(
        "Explanations: which method finds the digit? (ground truth)",
        text=(f"block-digits (after Shah et al. 2021): a digit in one 8x8 block, a fixed uninformative ring in the "
              f"other, the side random. zoo:block-digits-cnn classifies them with {acc:.1%} test accuracy, so only the "
              f"digit block carries the label. Mass in mask: share of |map| inside the digit's block (chance: "
              f"{table.meta['mask_area']:.2f}); pointing game: the map's largest pixel is in it. Deletion/insertion "
              f"AUC: class probability as the top pixels are removed / inserted (Petsiuk et al. 2018). 'random' is "
              f"the control."),
        table=(header, rows), figures=[table.plot()],
    )

    rnd = randomization(model, x[:8], None, target=y[:8], explainer="saliency")
    run.save_result(rnd, "evaluation-randomization")
    report.add_result(rnd, title="Explanations: do the maps depend on the weights? (randomisation check)", text=(
        "Cascading randomisation (Adebayo et al. 2018): the layers are re-initialised from the output down, on a copy "
        "of the model, and the Saliency maps are compared with the trained model's. A method that explains the "
        "model must change: " + ("it does." if rnd.passed else "it does not - the maps do not depend on the weights.")))

    tay = taylor(model, x[:8], None, target=y[:8], n_directions=4)
    run.save_result(tay, "evaluation-taylor")
    report.add_result(tay, title="Explanations: how far does the gradient hold?", text=(
        "First- and second-order predictions of the logit's change under random perturbations of growing radius "
        "(relative to ||x||) against the actual change: the radius where the relative error passes 10% is how far "
        "a gradient explanation is a faithful local account."))

    bc = gs.zoo.load("breast-cancer-mlp")
    bd = gs.zoo.dataset("breast-cancer", split="test")
    sens = global_sensitivity(bc, bd, loss_fn=gs.losses.cross_entropy, order=3, name="zoo:breast-cancer-mlp")
    run.save_result(sens, "evaluation-global-sensitivity")
    report.add_result(sens, title="Tabular: which features is the loss sensitive to? (whole test set)", text=(
        "Mean |d^k L / dx_j^k| of the cross-entropy over all test patients, per standardised feature, k = 1..3; "
        "the Spearman rows say whether the orders rank the features alike."))
