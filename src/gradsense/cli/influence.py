"""``gradsense influence``: which training examples help or hurt each query, and which look mislabelled."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from gradsense.cli.common import console, friendly_errors, model_option

_SPEC = re.compile(r"^(?P<name>[A-Za-z][\w-]*)(?::(?P<split>train|test))?(?:\[(?P<a>-?\d*):(?P<b>-?\d*)\])?$")


def load_data(spec: str, default_split: str) -> tuple[Any, Any]:
    """``NAME[:split][[a:b]]`` (a zoo dataset, e.g. ``digits:test[:16]``) or a ``.safetensors``/``.npz`` file holding
    ``inputs`` and ``labels`` -> ``(inputs, labels)``.

    Raises:
        ValueError, FileNotFoundError: An unknown name or file, or a file without ``inputs``/``labels``.
    """
    import torch

    path = Path(spec)
    if path.suffix in (".safetensors", ".npz"):
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist.")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            import numpy as np

            with np.load(path, allow_pickle=False) as z:
                tensors = {k: torch.from_numpy(z[k]) for k in z.files}
        missing = [k for k in ("inputs", "labels") if k not in tensors]
        if missing:
            raise ValueError(f"{path} must hold tensors named 'inputs' and 'labels'; it has {sorted(tensors)}.")
        return tensors["inputs"], tensors["labels"]
    m = _SPEC.match(spec)
    if not m:
        raise ValueError(f"data {spec!r} not understood: use a zoo dataset like digits:train[:500] or a .safetensors/"
                         ".npz file with 'inputs' and 'labels'.")
    import gradsense as gs

    data = gs.zoo.dataset(m["name"], split=m["split"] or default_split)
    a = int(m["a"]) if m["a"] else None
    b = int(m["b"]) if m["b"] else None
    x, y = data[a:b]
    if x.shape[0] == 0:
        raise ValueError(f"data {spec!r} selects no example.")
    return x, y


def _table(res: Any, k: int, queries: int) -> None:
    from rich.table import Table

    table = Table(title=f"{res.method}: top {k} proponents (+) and opponents (-) per query", title_justify="left")
    for col in ("query", "label", "rank", "proponent", "score", "opponent", "score"):
        table.add_column(col, justify="right", no_wrap=True)
    ql = res.tensors.get("query_labels")
    tl = res.tensors.get("train_labels")

    def who(j: Any) -> str:
        return f"#{int(j)}" + ("" if tl is None else f" (y={int(tl[int(j)])})")

    for i in range(min(queries, res.n_query)):
        top, bot = res.top(i, k), res.bottom(i, k)
        for r in range(len(top.indices)):
            table.add_row(str(i) if r == 0 else "", ("" if ql is None else str(int(ql[i]))) if r == 0 else "",
                          str(r + 1), who(top.indices[r]), f"{float(top.scores[r]):+.3g}", who(bot.indices[r]),
                          f"{float(bot.scores[r]):+.3g}", end_section=r == len(top.indices) - 1)
    console.print(table)


@click.command("influence", short_help="Which training examples help or hurt each prediction.")
@model_option
@click.option("--train", "train_spec", required=True, metavar="DATA",
              help="training data: zoo dataset (digits, digits:train[:500]) or .safetensors/.npz with inputs, labels.")
@click.option("--query", "query_spec", required=True, metavar="DATA", help="query data, same forms (default split test).")
@click.option("--method", default="grad_cos", show_default=True,
              type=click.Choice(["grad_dot", "grad_cos", "tracin", "influence", "ekfac", "trak"]))
@click.option("--k", default=5, show_default=True, type=int, help="proponents and opponents shown per query.")
@click.option("--proj-dim", default=None, type=int, help="project gradients to this many dimensions (seeded).")
@click.option("--projection", default="dense", show_default=True, type=click.Choice(["dense", "kronecker"]))
@click.option("--damping", default=None, type=float, help="lambda for influence/ekfac/trak (default: heuristic).")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(dir_okay=False),
              help="checkpoint file (.safetensors or .pt state dict); repeat for TracIn over several.")
@click.option("--lr", "lrs", multiple=True, type=float, help="learning rate of each --checkpoint (TracIn weights).")
@click.option("--self-influence", "self_inf", is_flag=True, help="also rank the training examples by self-influence.")
@click.option("--max-memory", default=None, help="memory budget, e.g. 2GB.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="run folder: training features as resumable shards, results, figures, report.")
@click.option("--resume", is_flag=True, help="continue (or reuse) the training features already in --out.")
@friendly_errors
def influence_cmd(model_spec: str, weights: str | None, train_spec: str, query_spec: str, method: str, k: int,
                  proj_dim: int | None, projection: str, damping: float | None, checkpoints: tuple[str, ...],
                  lrs: tuple[float, ...], self_inf: bool, max_memory: str | None, seed: int, out: str | None,
                  resume: bool) -> None:
    """Which training examples made these predictions? Scores of every training example for every query.

    Positive = proponent: training on the example lowers the query's loss; negative = opponent. Scales: grad_dot
    and tracin in loss per unit learning rate, grad_cos in [-1, 1], influence and ekfac in loss per unit
    upweighting (removing an example raises the query loss by about score / n), trak in margin units.

    \b
    Examples:
      gradsense influence --model zoo:digits-cnn --train digits:train --query digits:test[:4] --method ekfac
      gradsense influence --model zoo:digits-cnn --train digits:train --query digits:test[:8] \\
          --method grad_cos --proj-dim 2048 --out runs/influence --self-influence
    """
    import gradsense as gs
    from gradsense.specs import load_model

    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}.")
    if lrs and len(lrs) != len(checkpoints):
        raise ValueError(f"give one --lr per --checkpoint ({len(checkpoints)} checkpoints, {len(lrs)} --lr).")
    if resume and out is None:
        raise ValueError("--resume needs --out (the run folder to continue).")
    model = load_model(model_spec, weights=weights)
    train = load_data(train_spec, "train")
    query = load_data(query_spec, "test")
    loss = gs.losses.cross_entropy
    ckpts = list(checkpoints) or None
    target = "margin" if method == "trak" else "loss"
    feats: Any = train
    if out is not None:
        feats = gs.influence.features(model, loss, train, proj_dim=proj_dim, projection=projection,  # type: ignore[arg-type]
                                      seed=seed, target=target, checkpoints=ckpts, lrs=list(lrs) or None,
                                      layers_only=method == "ekfac", out=Path(out) / "features", resume=resume,
                                      max_memory=max_memory, name=model_spec)
    res = gs.influence.scores(model, loss, feats, query, method=method, checkpoints=ckpts,  # type: ignore[arg-type]
                              lrs=list(lrs) or None, proj_dim=proj_dim, projection=projection,  # type: ignore[arg-type]
                              damping=damping, seed=seed, curvature_data=train if out is not None else None,
                              max_memory=max_memory, name=model_spec)
    if out is not None:
        from dataclasses import replace

        res = replace(res, context={"train": train[0], "query": query[0]})
    console.print(f"[bold]{method}[/]: {res.n_query} queries x {res.n_train} training examples. "
                  f"{gs.influence.CONVENTIONS[method]}")
    if res.meta.get("solver_summary"):
        console.print(f"[dim]solver: {res.meta['solver_summary']}[/]")
    _table(res, k, 12)
    selfres = None
    if self_inf:
        selfres = gs.influence.self_influence(model, loss, train, method="ekfac" if method in ("ekfac", "influence")
                                              else "grad_dot", damping=damping, seed=seed, max_memory=max_memory,
                                              name=model_spec)
        top = selfres.top(min(10, selfres.scores.numel()))
        labels = train[1]
        console.print("most self-influential training examples (label-error and outlier candidates): " +
                      ", ".join(f"#{int(i)} (label {int(labels[int(i)])})" for i in top.indices))
    if out is not None:
        from gradsense.results import RunFolder
        from gradsense.viz.report import Report

        run = RunFolder(out)
        run.save_result(res, "influence")
        report = Report.extend(Path(out) / "report.html", f"gradsense influence: {method} on {model_spec}",
                               source="influence")
        fig = res.plot(k=min(k, 4))
        run.save_figure(fig, "influence")
        report.add_result(res, title=f"Influence ({method}): proponents and opponents",
                          text=f"Positive = proponent. {gs.influence.CONVENTIONS[method]}")
        if selfres is not None:
            run.save_result(selfres, "self-influence")
            report.add_result(selfres, title="Self-influence: candidates for label errors",
                              plot_kwargs={"inputs": train[0], "labels": train[1]})
        path = report.write(Path(out) / "report.html")
        console.print(f"wrote {path}")
