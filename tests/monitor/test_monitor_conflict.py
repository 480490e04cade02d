"""Conflict between objectives: known angles on linear models, refusal of summed losses and freed graphs, no
graph kept alive, .grad untouched, the same training with and without the measurement."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from torch import nn

import gradsense as gs
from gradsense.monitor import Monitor


class TwoLayers(nn.Module):
    """Two linear maps whose weights the objectives weigh: loss_k = <a_k, w1> + <b_k, w2> has gradient (a_k, b_k)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 1, bias=False).double()
        self.second = nn.Linear(2, 1, bias=False).double()

    def forward(self, x):
        return self.first(x[:, :3]) + self.second(x[:, 3:])


def losses_with_known_gradients(model):
    # a linear model of its weights: loss = sum over a one-hot batch, so d loss / d w = the batch's coefficients
    a1, b1 = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([1.0, 0.0])
    a2, b2 = torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([3.0, 1.0])
    xa = torch.cat([a1, b1]).double().unsqueeze(0)
    xb = torch.cat([a2, b2]).double().unsqueeze(0)
    return model(xa).sum(), model(xb).sum(), (a1, b1, a2, b2)


def cos(u, v):
    return float(u @ v / (u.norm() * v.norm()))


def test_known_angles_globally_and_per_layer_and_grad_untouched():
    model = TwoLayers()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Monitor(model, opt, quantities=["grad_norm", "conflict"]) as mon:
        for _ in range(3):
            opt.zero_grad()
            la, lb, (a1, b1, a2, b2) = losses_with_known_gradients(model)
            before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
            mon.objectives(task_a=la, task_b=lb)
            assert all(p.grad is None for p in model.parameters()) and all(b is None for b in before)
            (la + lb).backward()
            opt.step()
    res = mon.result()
    s = res.scalars
    expected = cos(torch.cat([a1, b1]).double(), torch.cat([a2, b2]).double())
    assert float(s["cos/task_a|task_b"][0]) == pytest.approx(expected, rel=1e-12)
    assert float(s["cos/task_a|task_b/first"][0]) == pytest.approx(cos(a1.double(), a2.double()), abs=1e-12)
    assert float(s["cos/task_a|task_b/second"][0]) == pytest.approx(cos(b1.double(), b2.double()), rel=1e-12)
    assert float(s["objective_grad_norm/task_a"][0]) == pytest.approx(math.sqrt(6.0))
    conflict = res.conflict()["task_a|task_b"]
    assert conflict["steps"] == 3 and conflict["fraction_in_conflict"] == (1.0 if expected < 0 else 0.0)


def test_three_objectives_fraction_in_conflict_and_schedule():
    torch.manual_seed(0)
    w = nn.Linear(4, 1, bias=False).double()
    opt = torch.optim.SGD(w.parameters(), lr=0.0)
    dirs = {"a": torch.tensor([1.0, 0, 0, 0]), "b": torch.tensor([-1.0, 1, 0, 0]), "c": torch.tensor([0.0, 0, 1, 0])}
    with Monitor(w, opt, quantities={"conflict": 2}) as mon:
        for step in range(4):
            sign = 1.0 if step < 2 else -1.0  # b turns around after two steps
            losses = {k: w(v.double().unsqueeze(0) * (sign if k == "b" else 1.0)).sum() for k, v in dirs.items()}
            mon.objectives(**losses)
            sum(losses.values()).backward()
            opt.step()
    s = mon.result().scalars
    ab = s["cos/a|b"]
    assert math.isnan(float(ab[1])) and math.isnan(float(ab[3]))  # every 2 steps
    assert float(ab[0]) == pytest.approx(-1 / math.sqrt(2)) and float(ab[2]) == pytest.approx(1 / math.sqrt(2))
    assert float(s["cos/a|c"][0]) == 0.0
    assert mon.result().conflict()["a|b"]["fraction_in_conflict"] == 0.5


def test_summed_losses_freed_graphs_and_bad_objectives_refused():
    model = TwoLayers()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Monitor(model, opt, quantities="cheap") as mon:
        la, lb, _ = losses_with_known_gradients(model)
        with pytest.raises(ValueError, match="computed from objective"):
            mon.objectives(task_a=la, task_b=lb, total=la + lb)
        with pytest.raises(ValueError, match="computed from objective"):
            mon.objectives(total=0.5 * (la + lb), task_a=la)
        with pytest.raises(ValueError, match="same loss"):
            mon.objectives(task_a=la, task_b=la)
        with pytest.raises(ValueError, match="at least two"):
            mon.objectives(task_a=la)
        with pytest.raises(ValueError, match="no autograd graph"):
            mon.objectives(task_a=la, task_b=lb.detach())
        with pytest.raises(ValueError, match="scalar"):
            mon.objectives(task_a=la, task_b=torch.ones(2, requires_grad=True) * 2)
        h = torch.tanh(model(torch.randn(4, 5, dtype=torch.float64)))  # tanh keeps its output for backward
        lc, ld = h[:2].sum(), h[2:].sum()
        (lc + ld).backward()
        with pytest.raises(ValueError, match="before backward"):
            mon.objectives(task_c=lc, task_d=ld)
    with pytest.raises(ValueError, match="no open gradsense Monitor"):
        gs.monitor.objectives(model, a=la, b=lb)


def test_no_graph_kept_alive():
    model = TwoLayers()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Monitor(model, opt, quantities="cheap") as mon:
        x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
        h = torch.tanh(model(x))
        la, lb = h[:4].sum(), h[4:].sum()
        probe = weakref.ref(h)
        gs.monitor.objectives(model, task_a=la, task_b=lb)  # the module-level form finds the monitor
        (la + lb).backward()
        opt.step()
        del h, la, lb, x
        gc.collect()
        assert probe() is None
    assert "cos/task_a|task_b" in mon.result().scalars
