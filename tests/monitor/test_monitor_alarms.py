"""Spike alarms: spikes injected in one named layer are reported at that step and layer (the loss spike that
follows names the layer that moved first); a clean run of the bundled digits CNN raises none."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gradsense as gs
from gradsense.monitor import Monitor
from gradsense.monitor.stats import SpikeDetector
from gradsense.zoo.models import DigitsCNN
from gradsense.zoo.train import _schedule, random_shift

EVERY_STEP = {"loss": 1, "grad_norm": 1, "weight_norm": 1, "update": 1, "alarms": 1}


def digits_run(steps, *, seed=0, grad_spike=None, lr_jump=None, quantities=EVERY_STEP):
    """The zoo recipe for digits-cnn (AdamW, warm-up + cosine, shifts), optionally with injected spikes:
    ``grad_spike=(step, param name, factor)`` multiplies that parameter's gradient; ``lr_jump=(step, layer,
    factor)`` multiplies the learning rate of that layer's parameter group for one step."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    data = gs.zoo.dataset("digits", split="train")
    jump_layer = lr_jump[1] if lr_jump else "head.2"
    own = [p for n, p in model.named_parameters() if n.startswith(jump_layer + ".")]
    rest = [p for n, p in model.named_parameters() if not n.startswith(jump_layer + ".")]
    opt = torch.optim.AdamW([{"params": rest}, {"params": own}], lr=3e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(40, max(steps, 1000)))
    gen = torch.Generator().manual_seed(seed)
    state = {"step": 0}
    if grad_spike:
        param = dict(model.named_parameters())[grad_spike[1]]
        param.register_hook(lambda g: g * grad_spike[2] if state["step"] == grad_spike[0] else None)
    mon = Monitor(model, opt, quantities=quantities)
    n = len(data)
    while state["step"] < steps:
        order = torch.randperm(n, generator=gen)
        for s in range(0, n - 63, 64):
            step = state["step"]
            idx = order[s : s + 64]
            x, y = random_shift(data.inputs[idx], 1, gen), data.labels[idx]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            if lr_jump and step == lr_jump[0]:
                opt.param_groups[1]["lr"] *= lr_jump[2]
            opt.step()
            if lr_jump and step == lr_jump[0]:
                opt.param_groups[1]["lr"] /= lr_jump[2]
            sched.step()
            mon.log(loss=loss)
            state["step"] += 1
            if state["step"] >= steps:
                break
    mon.close()
    return mon.result()


def test_injected_spikes_are_located():
    res = digits_run(130, grad_spike=(90, "features.3.weight", 50.0), lr_jump=(115, "head.2", 40.0))
    found = {(a.step, a.kind, a.layer) for a in res.alarms}
    assert (90, "grad_spike", "features.3") in found
    assert (115, "update_spike", "head.2") in found
    # the other 128 steps are clean: no alarm there (the 1000-step clean runs are marked slow)
    layer_alarms = {(a.step, a.layer) for a in res.alarms if a.kind != "loss_spike"}
    assert layer_alarms <= {(90, "features.3"), (115, "head.2")}, layer_alarms
    for a in res.alarms:
        if a.kind == "loss_spike":
            assert 90 <= a.step <= 95 or 115 <= a.step <= 120
            assert a.layers[0] == ("features.3" if a.step < 115 else "head.2")
        assert a.threshold == 6.0 and (a.kind == "nonfinite_grad" or a.zscore > 6.0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_clean_run_raises_no_alarm_1000_steps(seed):
    assert digits_run(1000, seed=seed).alarms == []


def test_spike_detector_follows_trends_and_scores_jumps():
    det = SpikeDetector(3, threshold=6.0, warmup=20, floor=0.2)
    t = np.arange(200)
    series = np.stack([np.ones(200), np.exp(-0.03 * t), np.exp(0.05 * np.minimum(t, 60))], 1)  # flat, decay, warm-up
    series[150] *= 10.0  # a tenfold jump in every series at step 150
    zs = np.array([det.update(v) for v in series])
    assert np.isnan(zs[:20]).all()
    quiet = np.abs(np.delete(zs[20:], [130, 131], axis=0))
    assert quiet.max() < 2.0  # steady trends (decay, warm-up and its end) are followed, not flagged
    assert (zs[150] > 6.0).all()  # log(10) / 0.2 = 11.5 on the flat series
    assert zs[150, 0] == pytest.approx(np.log(10.0) / 0.2)
    assert np.abs(zs[152:, 0]).max() < 1.0  # the spike entered clipped: the level did not move much
    assert np.isnan(det.update(np.array([0.0, np.nan, -1.0]))).all()  # non-positive and missing values: skipped


def test_the_three_detectors_agree():
    from gradsense.monitor.stats import FewSpikeDetector, ScalarSpikeDetector

    rng = np.random.default_rng(0)
    values = np.exp(rng.normal(size=(120, 3)) * 0.3)
    values[80, 1] *= 20.0
    values[10, 2] = np.nan
    values[11, 0] = 0.0
    opts = {"threshold": 6.0, "warmup": 20, "floor": 0.2}
    a, b = SpikeDetector(3, **opts), FewSpikeDetector(3, **opts)
    c = [ScalarSpikeDetector(**opts) for _ in range(3)]
    for v in values:
        za, zb = a.update(v), b.update(v)
        zc = np.array([d.update(float(x)) for d, x in zip(c, v)])
        np.testing.assert_allclose(za, zb, rtol=1e-12, equal_nan=True)
        np.testing.assert_allclose(za, zc, rtol=1e-12, equal_nan=True)
    assert a.count.tolist() == [119, 120, 119]
