"""Influence results: saved and reloaded without pickle, summaries state the sign and scale, figures draw."""

from __future__ import annotations

import torch
from influence_cases import CE, mlp_problem

import gradsense as gs
from gradsense.results import Result


def test_results_round_trip_and_plot(tmp_path):
    model, train, test = mlp_problem()
    inf = gs.influence.scores(model, CE, train, test, method="influence", damping=0.3, curvature="hessian")
    selfres = gs.influence.self_influence(model, CE, train, method="grad_dot")
    sel = gs.influence.select(model, CE, train, test, k=3)
    factors = gs.influence.fit_factors(model, CE, train)
    align = gs.gradient_alignment(model, CE, {"a": (train[0][:10], train[1][:10]), "b": (train[0][10:], train[1][10:])})
    feats = gs.influence.features(model, CE, train)
    for i, res in enumerate([inf, selfres, sel, factors, align, feats]):
        res.save(tmp_path / str(i))
        back = Result.load(tmp_path / str(i))
        assert type(back) is type(res)
        for k, v in res.tensors.items():
            assert torch.equal(back.tensors[k], v), k
        rows = dict(back.summary())
        assert rows, type(res).__name__
        fig = back.plot()
        titled = bool(fig.axes) and bool(fig.axes[0].get_title())
        assert titled or fig._suptitle is not None, type(res).__name__
    summary = dict(inf.summary())
    assert summary["sign"].startswith("positive = proponent")
    assert "score / n" in summary["scale"] and "solver" in summary
    # the query next to its proponents and opponents: one row per query, labelled scores
    fig = inf.plot(queries=[0, 1], k=2)
    assert len(fig.axes) == 2 and "query 0" in fig.axes[0].get_title()
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    top = inf.top(0, 2).indices.tolist()
    assert ticks[:2] == [f"#{j}" for j in top]
