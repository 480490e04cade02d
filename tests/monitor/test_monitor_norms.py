"""Per-layer norms, update ratios and before/after-clipping norms against a manual loop over p.grad and the
parameter deltas; accumulation, mixed dtypes, frozen parameters, parameter groups, closures; clean detach."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradsense as gs
from gradsense.monitor import Monitor
from helpers import assert_model_unchanged, hooks_on

EVERY_STEP = ["loss", "grad_norm", "weight_norm", "update", "alarms"]  # default schedules: every step


class Mixed(nn.Module):
    """A float64 layer, a float32 layer with a frozen weight, a bias-free layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6).double()
        self.b = nn.Linear(6, 4)
        self.c = nn.Linear(4, 3, bias=False)
        self.b.weight.requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(self.a(x.double())).float()
        return self.c(torch.relu(self.b(h)))


def layer_norms(model, tensors):
    """{layer: norm} over the model's trainable parameters from {param name: tensor}."""
    sq = {}
    for n, p in model.named_parameters():
        if not p.requires_grad or tensors.get(n) is None:
            continue
        layer = n.rsplit(".", 1)[0]
        sq[layer] = sq.get(layer, 0.0) + float(tensors[n].double().square().sum())
    return {k: math.sqrt(v) for k, v in sq.items()}


def train(model, opt, steps, *, accumulate=1, clip=None, clip_value=None, monitor_kw=None, seed=0, closure=False):
    """Train with a monitor; return the monitor's result and the expected values from a manual loop."""
    gen = torch.Generator().manual_seed(seed)
    expected = []
    mon = Monitor(model, opt, quantities=EVERY_STEP, alarm_warmup=1000, **(monitor_kw or {}))
    for _ in range(steps):
        opt.zero_grad()
        losses = []
        for _ in range(accumulate):
            x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            loss = F.cross_entropy(model(x), y) / accumulate
            loss.backward()
            losses.append(loss.item() * accumulate)
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(model.parameters(), clip_value)
        used = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        if closure:
            opt.step(lambda: None)
        else:
            opt.step()
        delta = {n: p.detach() - before[n] for n, p in model.named_parameters()}
        mon.log(loss=sum(losses) / accumulate)
        expected.append({"param_grad": {n: float(g.double().norm()) for n, g in grads.items() if g is not None},
                         "param_update": {n: float(d.double().norm()) for n, d in delta.items()},
                         "grad": layer_norms(model, grads), "used": layer_norms(model, used),
                         "weight": layer_norms(model, before), "update": layer_norms(model, delta),
                         "loss": sum(losses) / accumulate,
                         "global": math.sqrt(sum(float(g.double().square().sum()) for n, g in grads.items()
                                                 if g is not None and dict(model.named_parameters())[n].requires_grad)),
                         "global_used": math.sqrt(sum(float(g.double().square().sum()) for n, g in used.items()
                                                      if g is not None and dict(model.named_parameters())[n].requires_grad))})
    mon.close()
    return mon.result(), expected


def assert_matches(res, expected, rtol=1e-6):
    s = res.scalars
    assert res.steps.tolist() == list(range(len(expected)))
    for t, e in enumerate(expected):
        close = lambda a, b: math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)  # noqa: E731
        assert close(float(s["grad_norm"][t]), e["global"]), (t, float(s["grad_norm"][t]), e["global"])
        assert close(float(s["grad_norm_clipped"][t]), e["global_used"])
        assert close(float(s["clip_factor"][t]), e["global_used"] / e["global"])
        assert close(float(s["loss"][t]), e["loss"])
        for layer, v in e["grad"].items():
            assert close(float(s[f"grad_norm/{layer}"][t]), v), (t, layer)
            assert close(float(s[f"weight_norm/{layer}"][t]), e["weight"][layer])
            assert close(float(s[f"update_norm/{layer}"][t]), e["update"][layer])
            assert close(float(s[f"update_ratio/{layer}"][t]), e["update"][layer] / e["weight"][layer])


def test_norms_with_clipping_accumulation_mixed_dtypes_and_frozen():
    torch.manual_seed(0)
    model = Mixed()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    res, expected = train(model, opt, 6, accumulate=3, clip=0.05)
    assert_matches(res, expected)
    assert float(res.scalars["clip_factor"].max()) < 1.0  # clipping did happen
    assert res.layers == ["a", "b", "c"] and "b.weight" not in res.meta["params"]


def test_parameter_groups_and_non_uniform_clipping():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.5}, {"params": model[2].parameters(), "lr": 0.01}],
                          momentum=0.9)
    res, expected = train(model, opt, 5, clip_value=0.02, monitor_kw={"per": ("module", "parameter")})
    assert_matches(res, expected)
    # clip_grad_value_ is not one global factor: the per-layer norms after clipping are recorded too
    for layer, v in expected[-1]["used"].items():
        assert math.isclose(float(res.scalars[f"grad_norm_clipped/{layer}"][-1]), v, rel_tol=1e-6)
    for t, e in enumerate(expected):
        for n, v in e["param_grad"].items():
            assert math.isclose(float(res.scalars[f"grad_norm/{n}"][t]), v, rel_tol=1e-6)
            assert math.isclose(float(res.scalars[f"update_norm/{n}"][t]), e["param_update"][n], rel_tol=1e-6)


def test_closure_step_and_optimizer_found_without_being_passed():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    res, expected = train(model, opt, 4, closure=True)
    assert_matches(res, expected)
    model2 = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    other = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)  # not the model's: ignored
    with Monitor(model2, None, quantities="cheap") as mon:
        for _ in range(3):
            opt2.zero_grad()
            model2(torch.randn(4, 5)).sum().backward()
            other.step()
            opt2.step()
    assert mon.result().steps.tolist() == [0, 1, 2]
    assert mon.result().meta["settings"]["optimizer"] == "SGD"


def test_every_nonfinite_and_lbfgs_closure():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, opt, quantities="cheap", every=2) as mon:
        for step in range(5):
            opt.zero_grad()
            model(torch.randn(4, 5)).sum().backward()
            if step == 4:
                model[2].bias.grad[0] = float("nan")
            opt.step()
    res = mon.result()
    assert res.steps.tolist() == [0, 2, 4]
    assert float(res.scalars["nonfinite_grads"][-1]) == 1
    assert [(a.step, a.kind, a.layer) for a in res.alarms] == [(4, "nonfinite_grad", "2.bias")]
    # LBFGS calls the closure several times inside one step: the norms are those of the last evaluation
    model = nn.Linear(3, 1)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=4)
    x, y = torch.randn(16, 3), torch.randn(16, 1)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    with Monitor(model, opt, quantities=EVERY_STEP) as mon:
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(closure)
        last = math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters()))
        moved = math.sqrt(sum(float((p.detach() - b).square().sum()) for p, b in zip(model.parameters(), before)))
    s = mon.result().scalars
    assert float(s["grad_norm_clipped"][0]) == pytest.approx(last, rel=1e-6)
    assert float(s["update_norm/(root)"][0]) == pytest.approx(moved, rel=1e-6)


def test_close_leaves_model_and_optimizer_as_before():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Dropout(0.2), nn.Linear(4, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    held = (torch.randn(16, 5), torch.randint(0, 3, (16,)))
    pre, post = dict(opt._optimizer_step_pre_hooks), dict(opt._optimizer_step_post_hooks)
    hooks, flags = hooks_on(model), {n: m.training for n, m in model.named_modules()}
    model.register_forward_hook(lambda *a: None)  # the caller's own hook stays
    hooks = hooks_on(model)
    mon = Monitor(model, opt, quantities="full", held_out=held, loss_fn=F.cross_entropy)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state_dict()["state"][0].items()}
    values = {k: v.clone() for k, v in model.state_dict().items()}
    mon.close()  # closing touches no value or .grad
    assert all(torch.equal(values[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert hooks_on(model) == hooks and {n: m.training for n, m in model.named_modules()} == flags
    assert dict(opt._optimizer_step_pre_hooks) == pre and dict(opt._optimizer_step_post_hooks) == post
    for p in model.parameters():
        assert not p._post_accumulate_grad_hooks and not p._backward_hooks
    torch.testing.assert_close(opt.state_dict()["state"][0]["exp_avg"], state["exp_avg"])
    mon.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        mon.objectives(a=model(x).sum(), b=model(x).mean())


def test_bad_arguments_fail_before_any_hook(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with assert_model_unchanged(model):
        with pytest.raises(ValueError, match="unknown quantities"):
            Monitor(model, opt, quantities=["grad_norm", "nope"])
        with pytest.raises(ValueError, match="cheap"):
            Monitor(model, opt, quantities="fast")
        with pytest.raises(TypeError, match="Optimizer"):
            Monitor(model, "sgd")
        with pytest.raises(ValueError, match="none of the model"):
            Monitor(model, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1))
        with pytest.raises(ValueError, match="held_out"):
            Monitor(model, opt, quantities=["curvature"])
        with pytest.raises(ValueError, match="every must be >= 1"):
            Monitor(model, opt, every=0)
        with pytest.raises(ValueError, match="per must"):
            Monitor(model, opt, per="layer")
        with pytest.raises(ValueError, match="requires grad"):
            Monitor(nn.Linear(2, 2).requires_grad_(False))
        with pytest.raises(TypeError, match=r"nn\.Module"):
            Monitor(lambda x: x, opt)
    assert not opt._optimizer_step_pre_hooks
    Monitor(model, opt, log_dir=tmp_path).close()
    with pytest.raises(ValueError, match="already holds a monitor log"):
        Monitor(model, opt, log_dir=tmp_path)
    assert gs.monitor.MonitorResult.read(tmp_path).steps.numel() == 0


def test_grad_scaler_norms_are_unscaled():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    expected = []
    with Monitor(model, opt, quantities="cheap", grad_scaler=scaler) as mon:
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(torch.randn(8, 5)), torch.randint(0, 3, (8,)))).backward()
            scale = scaler.get_scale()
            expected.append(math.sqrt(sum(float((p.grad / scale).square().sum()) for p in model.parameters())))
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            scaler.step(opt)
            scaler.update()
    s = mon.result().scalars
    for t, e in enumerate(expected):
        assert float(s["grad_norm"][t]) == pytest.approx(e, rel=1e-6)
        assert float(s["grad_norm_clipped"][t]) == pytest.approx(min(e, 0.1), rel=1e-5)


def test_cheap_schedule():
    def run(quantities):
        torch.manual_seed(6)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        with Monitor(model, opt, quantities=quantities) as mon:
            for _ in range(12):
                opt.zero_grad()
                F.cross_entropy(model(torch.randn(8, 5)), torch.randint(0, 3, (8,))).backward()
                opt.step()
        return mon.result()

    every = run(EVERY_STEP).series("update_norm/0")
    cheap = run("cheap").series("update_norm/0")
    assert torch.isfinite(cheap[[0, 10]]).all() and torch.isnan(cheap[1:10]).all() and torch.isnan(cheap[11])
    torch.testing.assert_close(cheap[[0, 10]], every[[0, 10]])


def test_log_refuses_own_names_bad_values_and_closed_monitor():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, opt, quantities="cheap")
    with pytest.raises(ValueError, match="records itself"):
        mon.log(grad_norm=1.0)
    with pytest.raises(ValueError, match="records itself"):
        mon.log(**{"update_ratio/x": 1.0})
    with pytest.raises(ValueError, match="one-element"):
        mon.log(lr=torch.ones(2))
    with pytest.raises(ValueError, match="number"):
        mon.log(lr="0.1")
    mon.log(lr=0.1, loss=torch.tensor(2.0))
    mon.close()
    with pytest.raises(ValueError, match="closed"):
        mon.log(loss=1.0)
