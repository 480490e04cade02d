"""``gradsense influence``: which training examples help or hurt each query, and which look mislabelled."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from gradsense.cli.common import Run, analysis_command

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


def _rows(res: Any, k: int, queries: int) -> list[list[str]]:
    ql = res.tensors.get("query_labels")
    tl = res.tensors.get("train_labels")

    def who(j: Any) -> str:
        return f"#{int(j)}" + ("" if tl is None else f" (y={int(tl[int(j)])})")

    rows = []
    for i in range(min(queries, res.n_query)):
        top, bot = res.top(i, k), res.bottom(i, k)
        for r in range(len(top.indices)):
            rows.append([str(i) if r == 0 else "", ("" if ql is None else str(int(ql[i]))) if r == 0 else "",
                         str(r + 1), who(top.indices[r]), f"{float(top.scores[r]):+.3g}", who(bot.indices[r]),
                         f"{float(bot.scores[r]):+.3g}"])
    return rows


def _is_legacy(spec: str) -> bool:
    """``NAME:split[a:b]`` forms of this command (a zoo dataset with a split or a slice), kept working."""
    return not spec.startswith("zoo:") and not Path(spec).exists() and _SPEC.match(spec) is not None \
        and (":" in spec or "[" in spec)


def _load(run: Run, spec: str | None, split: str, n: int | str | None, what: str) -> tuple[Any, Any]:
    """``(inputs, labels)`` of ``spec``: the shared data forms (read like every command's ``--data``), or this
    command's ``NAME[:split][[a:b]]``."""
    if n == "option":
        n = run.options.get("n")
    if spec is not None and _is_legacy(spec):
        x, y = load_data(spec, split)
        if n is not None:
            x, y = x[: int(n)], y[: int(n)]
        return x, y
    data = run.data(spec=spec, split=split, n=n, labels=True)
    if data is None or data.inputs is None:
        raise ValueError(f"{what} must be tensors with labels (zoo:NAME, a tensor file, a .csv, an image folder).")
    return data.inputs, data.labels


@analysis_command("influence", short_help="Which training examples help or hurt each prediction.", split="train",
                  n=None, resumable=True, n_help="number of training examples (the first N).",
                  data_help="the training data: zoo:NAME (e.g. zoo:digits with --split train), a tensor file, a .csv "
                            "or an image folder; also NAME[:split][[a:b]] (digits:train[:500]).")
@click.option("--train", "train_spec", default=None, metavar="DATA", help="the training data (the same as --data).")
@click.option("--query", "query_spec", required=True, metavar="SPEC",
              help="query data, the same forms as --data (its test split; digits:test[:4] works too).")
@click.option("--n-query", default=None, type=int, help="number of query examples (the first N).")
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
def influence_cmd(run: Run, train_spec: str | None, query_spec: str, n_query: int | None, method: str, k: int,
                  proj_dim: int | None, projection: str, damping: float | None, checkpoints: tuple[str, ...],
                  lrs: tuple[float, ...], self_inf: bool) -> None:
    """Which training examples made these predictions? Scores of every training example for every query.

    Positive = proponent: training on the example lowers the query's loss; negative = opponent. Scales: grad_dot
    and tracin in loss per unit learning rate, grad_cos in [-1, 1], influence and ekfac in loss per unit
    upweighting (removing an example raises the query loss by about score / n), trak in margin units. With
    --out the training gradients are written as resumable shards (--resume continues them).

    \b
    Examples:
      gradsense influence --model zoo:digits-cnn --data zoo:digits --split train \\
          --query zoo:digits --n-query 4 --method ekfac
      gradsense influence --model zoo:digits-cnn --train digits:train \\
          --query "digits:test[:8]" --method grad_cos --proj-dim 2048 \\
          --out runs/influence --self-influence
    """
    import gradsense as gs

    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}.")
    if n_query is not None and n_query < 1:
        raise ValueError(f"--n-query must be >= 1, got {n_query}.")
    if lrs and len(lrs) != len(checkpoints):
        raise ValueError(f"give one --lr per --checkpoint ({len(checkpoints)} checkpoints, {len(lrs)} --lr).")
    if train_spec is not None and run.options.get("data") is not None:
        raise ValueError("give the training data once: --data or --train.")
    out = run.out
    model = run.model()
    train = _load(run, train_spec or run.data_spec(), run.options.get("split") or "train", "option",
                  "the training data")
    query = _load(run, query_spec, "test", n_query, "--query")
    loss = run.loss()
    seed, max_memory, spec = run.seed, run.max_memory, run.model_spec
    ckpts = list(checkpoints) or None
    target = "margin" if method == "trak" else "loss"
    feats: Any = train
    if out is not None:
        with run.long_stage(f"training gradients of {train[0].shape[0]} examples into {out / 'features'}") as bar:
            feats = gs.influence.features(model, loss, train, proj_dim=proj_dim, projection=projection,  # type: ignore[arg-type]
                                          seed=seed, target=target, checkpoints=ckpts, lrs=list(lrs) or None,
                                          layers_only=method == "ekfac", out=out / "features", resume=run.resume,
                                          max_memory=max_memory, name=spec, show_progress=bar)
    with run.stage(f"{method}: {query[0].shape[0]} queries x {train[0].shape[0]} training examples"):
        res = gs.influence.scores(model, loss, feats, query, method=method, checkpoints=ckpts,  # type: ignore[arg-type]
                                  lrs=list(lrs) or None, proj_dim=proj_dim, projection=projection,  # type: ignore[arg-type]
                                  damping=damping, seed=seed, curvature_data=train if out is not None else None,
                                  max_memory=max_memory, name=spec)
    if out is not None:
        from dataclasses import replace

        res = replace(res, context={"train": train[0], "query": query[0]})
    run.note(f"{method}: {res.n_query} queries x {res.n_train} training examples. {gs.influence.CONVENTIONS[method]}")
    if res.meta.get("solver_summary"):
        run.note(f"solver: {res.meta['solver_summary']}")
    run.table(f"{res.method}: top {k} proponents (+) and opponents (-) per query",
              ["query", "label", "rank", "proponent", "score", "opponent", "score"], _rows(res, k, 12),
              name="influence")
    selfres = None
    if self_inf:
        with run.stage("self-influence"):
            selfres = gs.influence.self_influence(model, loss, train, method="ekfac" if method in ("ekfac", "influence")
                                                  else "grad_dot", damping=damping, seed=seed, max_memory=max_memory,
                                                  name=spec)
        top = selfres.top(min(10, selfres.scores.numel()))
        labels = train[1]
        run.note("most self-influential training examples (label-error and outlier candidates): " +
                 ", ".join(f"#{int(i)} (label {int(labels[int(i)])})" for i in top.indices))
    if out is None:
        run.add("influence", res)
        if selfres is not None:
            run.add("self-influence", selfres)
        return
    from gradsense.viz.report import Report

    with run.stage(f"writing {out}"):
        run.save("influence", res, figure=res.plot(k=min(k, 4)))
        report = Report.extend(out / "report.html", f"gradsense influence: {method} on {spec}", source="influence")
        report.add_result(res, title=f"Influence ({method}): proponents and opponents",
                          text=f"Positive = proponent. {gs.influence.CONVENTIONS[method]}")
        if selfres is not None:
            run.save("self-influence", selfres, figure=None)
            report.add_result(selfres, title="Self-influence: candidates for label errors",
                              plot_kwargs={"inputs": train[0], "labels": train[1]})
        path = report.write(out / "report.html")
    run.wrote(path)
