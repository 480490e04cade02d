"""Gradient noise scale: the per-example estimator against explicit per-example gradients (a loop), and both
estimators unbiased within their standard errors on a quadratic model with a known gradient covariance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monitor_models import mlp
from torch import nn

from gradsense.monitor import Monitor
from gradsense.monitor.stats import noise_estimates, ratio_of_means


def loop_estimates(model, x, y):
    """Unbiased |G|^2 and tr(Sigma) per layer and overall from per-example gradients computed one by one."""
    params = dict(model.named_parameters())
    per = {n: [] for n in params}
    for i in range(x.shape[0]):
        g = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(params.values()))
        for n, gi in zip(params, g):
            per[n].append(gi.reshape(-1))
    n_ex = x.shape[0]
    out = {}
    layers = sorted({n.rsplit(".", 1)[0] for n in params})
    for layer in [*layers, "all"]:
        mat = torch.cat([torch.stack(per[n]) for n in params if layer == "all" or n.rsplit(".", 1)[0] == layer], 1)
        mean = mat.mean(0)
        trace = float(((mat - mean) ** 2).sum() / (n_ex - 1))
        out[layer] = (float(mean @ mean) - trace / n_ex, trace)
    return out


@pytest.mark.parametrize("mode", ["one-batch", "accumulated", "sum-reduction"])
def test_per_example_estimator_equals_the_loop(mode):
    model = mlp(width=6)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    expected = loop_estimates(model, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reduction = "sum" if mode == "sum-reduction" else "mean"
    with Monitor(model, opt, quantities={"gns": 1}, loss_reduction=reduction) as mon:
        if mode == "accumulated":
            for sl in (slice(0, 3), slice(3, 8)):  # unequal micro-batches, each loss scaled to the step mean
                (F.cross_entropy(model(x[sl]), y[sl], reduction="sum") / 8).backward()
        else:
            F.cross_entropy(model(x), y, reduction=reduction).backward()
        opt.step()
    s = mon.result().scalars
    gsq, tr = expected["all"]
    assert float(s["gns/grad_sq"][0]) == pytest.approx(gsq, rel=1e-9)
    assert float(s["gns/trace"][0]) == pytest.approx(tr, rel=1e-9)
    assert float(s["gns/batch"][0]) == 8
    assert float(s["gns"][0]) == pytest.approx(tr / gsq, rel=1e-9)
    for layer in ("0", "2"):
        assert float(s[f"snr/{layer}"][0]) == pytest.approx(expected[layer][0] / expected[layer][1], rel=1e-9)
    if mode == "accumulated":  # two micro-batches of 3 and 5 give the two-batch estimator as well
        assert math.isfinite(float(s["gns2/trace"][0]))


def test_noise_estimates_special_cases():
    # |G_B|^2 = |G|^2 + tr/B exactly: the estimates invert it
    gsq, tr = noise_estimates(2.0 + 3.0 / 4, 4, 2.0 + 3.0 / 32, 32)
    assert gsq == pytest.approx(2.0) and tr == pytest.approx(3.0)
    with pytest.raises(ValueError, match="larger"):
        noise_estimates(1.0, 8, 1.0, 8)
    r, se = ratio_of_means(np.array([1.0, 3.0, np.nan]), np.array([2.0, 2.0, 5.0]))
    assert r == pytest.approx(1.0) and se > 0


class Quadratic(nn.Module):
    """loss_i = |w - x_i|^2 / 2: per-example gradient w - x_i, covariance Sigma = Cov(x). ``w`` is the bias of a
    Linear layer whose weight is frozen at zero (so that per-example norms take the closed-form Linear rule)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d).double()
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.bias.zero_()
        self.lin.weight.requires_grad_(False)

    def forward(self, x):
        return x - self.lin(x)


def test_two_batch_and_per_example_estimators_unbiased_on_a_quadratic():
    d, micro, k, steps = 6, 8, 4, 200
    mu = torch.linspace(-1.0, 1.0, d, dtype=torch.float64) * 0.3
    sigma = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    true_gsq, true_tr = float(mu @ mu), float((sigma**2).sum())  # w = 0: G = -mu
    model = Quadratic(d)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gen = torch.Generator().manual_seed(0)
    with Monitor(model, opt, quantities={"gns": 1}, gns_window=steps) as mon:
        for _ in range(steps):
            opt.zero_grad()
            for _ in range(k):
                x = mu + sigma * torch.randn(micro, d, generator=gen, dtype=torch.float64)
                (0.5 * model(x).square().sum(1).mean() / k).backward()
            opt.step()
    s = mon.result().scalars
    for prefix in ("gns2", "gns"):
        gsq, tr = s[f"{prefix}/grad_sq"].numpy(), s[f"{prefix}/trace"].numpy()
        for est, truth in ((gsq, true_gsq), (tr, true_tr)):
            se = est.std(ddof=1) / math.sqrt(est.size)
            assert abs(est.mean() - truth) < 4 * se, (prefix, est.mean(), truth, se)
        ratio, se = float(s[prefix][-1]), float(s[f"{prefix}_stderr"][-1])
        assert abs(ratio - true_tr / true_gsq) < 4 * se, (prefix, ratio, true_tr / true_gsq, se)
        assert se < 0.5 * ratio  # the test has power: the error bar is not huge
    assert float(s["gns2/batch_small"][0]) == micro


def test_objectives_in_the_same_step_do_not_disturb_per_example_norms():
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    values = []
    for with_objectives in (False, True):
        model = mlp(width=6)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        with Monitor(model, opt, quantities={"gns": 1, "conflict": 1}) as mon:
            out = model(x)
            la, lb = F.cross_entropy(out[:4], y[:4]), F.cross_entropy(out[4:], y[4:])
            if with_objectives:
                mon.objectives(a=la, b=lb)  # two extra backward passes through the same graph
            (0.5 * (la + lb)).backward()
            opt.step()
        values.append(float(mon.result().scalars["gns/trace"][0]))
    assert values[0] == values[1]
