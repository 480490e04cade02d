"""``gradsense influence``: which training examples help or hurt each query, and which look mislabelled."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from gradsense.cli.common import _SHARED, Run, analysis_command

_SPEC = re.compile(r"^(?P<name>[A-Za-z][\w-]*)(?::(?P<split>train|test))?(?:\[(?P<a>-?\d*):(?P<b>-?\d*)\])?$")


def load_data(spec: str, default_split: str, run: Any = None) -> tuple[Any, Any]:
    """``(inputs, labels)`` of a data spec: ``NAME[:split][[a:b]]`` (a zoo dataset, e.g. ``digits:test[:16]``) or any
    form of the shared data options (``zoo:NAME``, tensor files, ``.csv`` with ``--label-column``, image folders),
    read by ``run`` (:meth:`gradsense.cli.common.Run.data`) with the command's data options.

    Raises:
        ValueError, FileNotFoundError: An unknown name or file, data without labels, a slice that selects nothing.
    """
    m = _SPEC.match(spec)
    if m and not Path(spec).exists() and (m["split"] or m["a"] is not None or m["b"] is not None or run is None):
        import gradsense as gs

        data = gs.zoo.dataset(m["name"], split=m["split"] or default_split)
        a = int(m["a"]) if m["a"] else None
        b = int(m["b"]) if m["b"] else None
        x, y = data[a:b]
        if x.shape[0] == 0:
            raise ValueError(f"data {spec!r} selects no example.")
        return x, y
    path = Path(spec)
    if path.suffix in (".safetensors", ".npz", ".npy", ".pt", ".pth", ".csv", ".jsonl", ".txt") and not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist.")
    if run is None:
        raise ValueError(f"data {spec!r} not understood: use a zoo dataset like digits:train[:500] or a data file.")
    return run.data(spec=spec, split=default_split, n=None, labels=True).pair()


def _table(run: Any, res: Any, k: int, queries: int) -> None:
    header = ["query", "label", "rank", "proponent", "score", "opponent", "score"]
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
    run.table(f"{res.method}: top {k} proponents (+) and opponents (-) per query", header, rows, name="influence")


# --resume is the command's own flag until the shared option set has it (then the shared one is used)
_RESUME = [] if "resume" in _SHARED else [
    click.option("--resume", is_flag=True, help="continue (or reuse) the training features already in --out.")]


def _with_resume(fn: Any) -> Any:
    for opt in _RESUME:
        fn = opt(fn)
    return fn


@analysis_command("influence", short_help="Which training examples help or hurt each prediction.", split="train",
                  data_help="training data, when --train is not given (same forms as --train).",
                  n_help="training examples to score (the first N; default all).")
@click.option("--train", "train_spec", default=None, metavar="DATA",
              help="training data: a zoo dataset (digits, digits:train[:500]), a tensor file (.npz/.safetensors/.pt/"
                   ".npy), a .csv with --label-column or an image folder.")
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
@_with_resume
def influence_cmd(run: Run, train_spec: str | None, query_spec: str, method: str, k: int, proj_dim: int | None,
                  projection: str, damping: float | None, checkpoints: tuple[str, ...], lrs: tuple[float, ...],
                  self_inf: bool, resume: bool | None = None) -> None:
    """Which training examples made these predictions? Scores of every training example for every query.

    Positive = proponent: training on the example lowers the query's loss; negative = opponent. Scales: grad_dot
    and tracin in loss per unit learning rate, grad_cos in [-1, 1], influence and ekfac in loss per unit
    upweighting (removing an example raises the query loss by about score / n), trak in margin units.

    \b
    Examples:
      gradsense influence --model zoo:digits-cnn --train digits:train \\
          --query "digits:test[:4]" --method ekfac
      gradsense influence --model zoo:digits-cnn --train digits:train \\
          --query "digits:test[:8]" --method grad_cos --proj-dim 2048 \\
          --out runs/influence --self-influence
      gradsense influence --model my.py:build --weights w.pt --train train.csv \\
          --query test.csv --label-column label
    """
    import gradsense as gs

    resume = run.resume if resume is None else resume
    out = str(run.out) if run.out is not None else None
    model_spec, seed, max_memory = run.model_spec, run.seed, run.max_memory
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}.")
    if lrs and len(lrs) != len(checkpoints):
        raise ValueError(f"give one --lr per --checkpoint ({len(checkpoints)} checkpoints, {len(lrs)} --lr).")
    if resume and out is None:
        raise ValueError("--resume needs --out (the run folder to continue).")
    train_spec = train_spec or run.options.get("data")
    if not train_spec:
        raise ValueError("`gradsense influence` needs --train DATA (the training examples to score).")
    model = run.model()
    with run.stage(f"loading training data {train_spec}"):
        train = load_data(train_spec, "train", run)
    limit = run.options.get("n")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--n must be >= 1, got {limit}.")
        train = (train[0][:limit], train[1][:limit])
    with run.stage(f"loading query data {query_spec}"):
        query = load_data(query_spec, "test", run)
    loss = run.loss()
    ckpts = list(checkpoints) or None
    target = "margin" if method == "trak" else "loss"
    feats: Any = train
    if out is not None:
        with run.stage("training features (resumable shards in the run folder)"):
            feats = gs.influence.features(model, loss, train, proj_dim=proj_dim, projection=projection,  # type: ignore[arg-type]
                                          seed=seed, target=target, checkpoints=ckpts, lrs=list(lrs) or None,
                                          layers_only=method == "ekfac", out=Path(out) / "features", resume=resume,
                                          max_memory=max_memory, name=model_spec)
    with run.stage(f"{method} scores: {query[0].shape[0]} queries x {train[0].shape[0]} training examples"):
        res = gs.influence.scores(model, loss, feats, query, method=method, checkpoints=ckpts,  # type: ignore[arg-type]
                                  lrs=list(lrs) or None, proj_dim=proj_dim, projection=projection,  # type: ignore[arg-type]
                                  damping=damping, seed=seed, curvature_data=train if out is not None else None,
                                  max_memory=max_memory, name=model_spec)
    if out is not None:
        from dataclasses import replace

        res = replace(res, context={"train": train[0], "query": query[0]})
    run.note(f"{method}: {res.n_query} queries x {res.n_train} training examples. {gs.influence.CONVENTIONS[method]}")
    if res.meta.get("solver_summary"):
        run.note(f"solver: {res.meta['solver_summary']}")
    _table(run, res, k, 12)
    run.add("influence", res)
    selfres = None
    if self_inf:
        with run.stage("self-influence of the training examples"):
            selfres = gs.influence.self_influence(model, loss, train, method="ekfac" if method in ("ekfac", "influence")
                                                  else "grad_dot", damping=damping, seed=seed, max_memory=max_memory,
                                                  name=model_spec)
        top = selfres.top(min(10, selfres.scores.numel()))
        labels = train[1]
        run.add("self-influence", selfres)
        run.note("most self-influential training examples (label-error and outlier candidates): " +
                 ", ".join(f"#{int(i)} (label {int(labels[int(i)])})" for i in top.indices))
    if out is not None:
        from gradsense.viz.report import Report

        with run.stage("writing the run folder"):
            folder = run.folder()
            folder.save_result(res, "influence")
            report = Report.extend(Path(out) / "report.html", f"gradsense influence: {method} on {model_spec}",
                                   source="influence")
            fig = res.plot(k=min(k, 4))
            folder.save_figure(fig, "influence")
            report.add_result(res, title=f"Influence ({method}): proponents and opponents",
                              text=f"Positive = proponent. {gs.influence.CONVENTIONS[method]}")
            if selfres is not None:
                folder.save_result(selfres, "self-influence")
                report.add_result(selfres, title="Self-influence: candidates for label errors",
                                  plot_kwargs={"inputs": train[0], "labels": train[1]})
            path = report.write(Path(out) / "report.html")
        run.wrote(path)
