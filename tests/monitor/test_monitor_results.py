"""MonitorResult: save/load round trip, accessors, figures; torch.compile'd models (slow)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

import gradsense as gs
from gradsense.monitor import Alarm, Monitor, MonitorResult


def run(model=None, steps=5, **kw):
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, opt, **kw) as mon:
        for _ in range(steps):
            x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            mon.log(loss=loss, lr=opt.param_groups[0]["lr"])
    return mon.result()


def test_round_trip_accessors_and_figures(tmp_path):
    res = run(quantities={"loss": 1, "grad_norm": 1, "update": 1, "gns": 2}, alarm_warmup=0)
    res.save(tmp_path / "r")
    back = gs.Result.load(tmp_path / "r")
    assert isinstance(back, MonitorResult) and back.columns == res.columns
    assert torch.equal(back.steps, res.steps)
    torch.testing.assert_close(back.tensors["values"], res.tensors["values"], equal_nan=True)
    names, mat = res.matrix("grad_norm")
    assert names == ["0", "2"] and mat.shape == (2, 5)
    torch.testing.assert_close(mat[1], res.series("grad_norm/2"))
    assert float(res.series("lr")[0]) == 0.1  # any scalar logged with the loss
    assert math.isnan(float(res.series("gns")[1]))  # every 2 steps
    with pytest.raises(KeyError, match="no scalar 'grad_nrm'"):
        res.series("grad_nrm")
    assert isinstance(res.plot(), Figure) and isinstance(res.plot("update_ratio"), Figure)
    html = res._repr_html_()
    assert "Training monitor" in html and "data:image/png" in html
    a = Alarm(3, "loss_spike", "", 2.5, 6.0, 7.25, ("0", "2"))
    assert Alarm.from_json(a.to_json()) == a
    assert a.describe() == "step 3: loss spike, value 2.5 (z = 7.2 > 6); moved first: 0, 2"


@pytest.mark.slow
def test_torch_compile():
    def build():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    res = run(torch.compile(build()), steps=3, quantities="standard")
    ref = run(build(), steps=3, quantities="standard")
    assert res.layers == ["0", "2"]
    torch.testing.assert_close(res.series("grad_norm"), ref.series("grad_norm"), rtol=1e-5, atol=0)
