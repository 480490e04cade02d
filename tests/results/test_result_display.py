"""What results say about themselves: repr, summary rows, the Taylor-prediction verdict, the SLQ mean.

Oracles: hand-built measurements whose verdict follows from the stated rule, the probe-by-probe Hutchinson
values of a density result (its mean and standard error computed here with numpy), a piecewise-linear model
whose input Hessian is zero (1st- and 2nd-order Taylor errors must coincide), and the exact trace of
``x^T A x`` for the SLQ mean.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradsense as gs
from gradsense.results import BitsResult, Result
from gradsense.results.importance import prediction_verdict


def test_repr_of_results_with_and_without_tensors():
    bits = BitsResult.build({}, method="hessian", bits={"a.weight": 8, "b.weight": 3}, achieved_mean_bits=4.0)
    text = repr(bits)
    assert text == "BitsResult(method='hessian', mean_bits=4, bits={'a.weight': 8, 'b.weight': 3})"
    empty = Result.build({}, method="m")
    assert repr(empty) == "Result(method='m')"
    one = Result.build({"x": torch.zeros(2, 3)}, method="m")
    assert repr(one) == "Result(method='m', x=(2, 3))"


@pytest.mark.parametrize(
    ("measured", "first", "second", "holds", "text"),
    [
        (2.1548, -0.0003, 0.0182, False, "fails: 118x too small"),  # the demo's 50% taylor2 row
        (0.0303, 0.0008, 0.0054, False, "fails: 5.61x too small"),
        (0.010, 0.002, 0.013, True, "holds"),
        (0.010, 0.002, 0.0201, False, "fails: 2.01x too large"),
        (0.010, 0.002, -0.004, False, "fails: wrong sign"),
        (0.010, 0.012, None, True, "holds"),  # first order when there is no second
        (1e-6, 0.0, -2e-6, True, "holds (both negligible)"),
    ],
)
def test_prediction_verdict(measured, first, second, holds, text):
    m = {"loss_before": 0.0329, "loss_change": measured, "predicted_first_order": first,
         "predicted_second_order": second}
    assert prediction_verdict(m) == (holds, text)
    assert prediction_verdict(None) == (None, "not measured")


def test_density_summary_names_sigma_once_and_gives_the_slq_mean_with_its_error():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(0.1, 3.0, 12, dtype=torch.float64)) @ q.T

    class Quadratic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(12, generator=g, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * (0.5 * self.w @ a @ self.w)

    model = Quadratic()
    loss = lambda out, y: out.mean()  # noqa: E731  Hessian of the loss = A
    d = gs.spectral_density(model, loss, (torch.ones(1, 1, dtype=torch.float64), torch.zeros(1)), steps=12,
                            probes=5, seed=0)
    rows = dict(d.summary())
    assert [k for k, _ in d.summary()].count("broadening sigma") == 1 and "sigma" not in rows
    per_probe = (d.weights * d.ritz_values).sum(1).numpy()
    mean, se = per_probe.mean(), per_probe.std(ddof=1) / math.sqrt(len(per_probe))
    assert d.moment(1) == pytest.approx(mean, rel=1e-12) and d.moment_stderr(1) == pytest.approx(se, rel=1e-12)
    assert rows["mean eigenvalue tr(H)/n"].startswith(f"{mean:.4g} ± {se:.2g}")
    assert "5 probes" in rows["mean eigenvalue tr(H)/n"]
    # the estimate is unbiased for tr(A)/n: within 4 standard errors of the exact value
    assert abs(mean - float(torch.trace(a)) / 12) < 4 * se


def test_taylor_summary_says_when_the_curvature_term_adds_nothing():
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(4, 6)
    r = gs.evaluate(relu, x, None, target=0, metric="taylor", n_directions=2, radii=[1e-3, 1e-2, 1e-1])
    torch.testing.assert_close(r.errors(1), r.errors(2))  # ReLU: zero input Hessian almost everywhere
    assert "curvature term" in dict(r.summary())
    (ax,) = r.plot().axes
    assert len(ax.lines) == 3 and ax.lines[0].get_linestyle() != ax.lines[1].get_linestyle()  # + the tol line
    assert "(= 1st order (gradient))" in ax.get_legend().get_texts()[1].get_text()
    smooth = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    r2 = gs.evaluate(smooth, x, None, target=0, metric="taylor", n_directions=2, radii=[1e-2, 1e-1, 1.0])
    assert "curvature term" not in dict(r2.summary())
    assert not np.allclose(r2.errors(1).numpy(), r2.errors(2).numpy())
