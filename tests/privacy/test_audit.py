"""The audit: the table it promises, defences measured, the fine-tune against plain SGD, files, errors first."""

from __future__ import annotations

import copy

import pytest
import torch
from privacy_cases import bn_cnn, images, relu_mlp, sigmoid_cnn

import gradsense as gs
from gradsense.privacy.api import _finetune
from helpers import CountingModule, assert_model_unchanged

CE = gs.losses.cross_entropy


def _data(n=24, seed=0):
    x = images(n, seed=seed)
    return x, torch.arange(n) % 4


@pytest.fixture(scope="module")
def audited():
    model = relu_mlp()
    x, y = _data()
    hx, hy = _data(16, seed=9)
    with assert_model_unchanged(model):
        res = gs.privacy.audit(model, CE, (x, y), attacks=("idlg", "inverting", "analytic"),
                               defenses=("none", "prune:0.3", "dp:3.0", "int8", "local:2:0.1"), batch_sizes=(1, 2),
                               heldout=(hx, hy), attack_options={"inverting": {"steps": 15}}, finetune_steps=4,
                               finetune_batch_size=8, seed=0)
    return model, res


def test_the_table_has_every_cell_and_measures_the_defences(audited):
    _, res = audited
    assert len(res.rows) == 3 * 5 * 2
    exact = res.row("analytic", "none", 1)
    assert exact["psnr_mean"] > 80 and exact["label_acc_mean"] == 1.0  # Linear first layer, one example: exact
    noisy = res.row("analytic", "DP σ=3 C=1", 1)
    assert noisy["psnr_worst"] < exact["psnr_worst"] - 40  # the defence measured, not assumed
    assert res.row("idlg", "none", 2)["psnr_mean"] is None  # labels only
    worst = res.row("inverting", "none", 2)
    assert worst["psnr_worst"] >= worst["psnr_mean"]  # worst case = the most revealing image
    _, rows = res.table()
    assert all(len("  ".join(r)) <= 80 for r in rows)


def test_fine_tune_costs_are_measured_against_the_same_fine_tune_without_defence(audited):
    _, res = audited
    ft = res.meta["finetune"]
    assert [d["defense"] for d in ft["defenses"]] == res.defenses
    assert ft["defenses"][0]["accuracy_cost"] == 0.0
    for d in ft["defenses"]:
        assert d["accuracy_cost"] == pytest.approx(ft["reference_accuracy"] - d["accuracy"])
    dp = next(d for d in ft["defenses"] if d["defense"].startswith("DP"))
    assert "4 steps" in dp["epsilon_setting"]
    if dp["epsilon"] is not None:  # an accountant (opacus or dp-accounting) is installed
        assert dp["epsilon"] > 0 and res.meta["epsilon"][0]["epsilon"] > 0


def test_fine_tune_without_defence_is_plain_sgd():
    model = sigmoid_cnn()
    x, y = _data(20)
    tuned = _finetune(model, CE, gs.privacy.NoDefense(), x, y, steps=3, lr=0.2, batch_size=5, seed=4)
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(twin.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        idx = torch.randperm(20, generator=gen)[:5]
        opt.zero_grad()
        CE(twin(x[idx]), y[idx]).backward()
        opt.step()
    for p, q in zip(tuned.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_audit_saves_loads_and_plots(audited, tmp_path):
    _, res = audited
    back = gs.Result.load(res.save(tmp_path / "audit"))
    assert back.rows == res.rows and back.defenses == res.defenses
    fig = back.plot()
    assert len([ax for ax in fig.axes if ax.images]) >= 2 * 1 + 1  # originals + one row per defence (batch of 1)
    trade = back.plot("tradeoff")
    assert "accuracy cost" in trade.axes[0].get_xlabel()
    assert back.cost_table() is not None


def test_attacks_that_do_not_apply_are_skipped_and_said_so():
    res = gs.privacy.audit(sigmoid_cnn(), CE, _data(), attacks=("idlg", "analytic"), defenses=("none",),
                           batch_sizes=(1,), seed=0)
    row = res.row("analytic", "none", 1)
    assert "not a Linear layer" in row["skipped"]
    assert ["analytic", "none", "1", "skipped", "", ""] in res.table()[1]


def test_audit_errors_come_before_any_work():
    model = CountingModule(sigmoid_cnn())
    x, y = _data()
    for kwargs, data, match in [({"attacks": ("rgap",)}, (x, y), "unknown attack"),
                                ({}, x, "labelled data"),
                                ({"batch_sizes": (32,)}, (x, y), "need 32"),
                                ({"defenses": ("prune:7",)}, (x, y), "prune"),
                                ({"attack_options": {"nope": {}}}, (x, y), "unknown attack")]:
        with pytest.raises((ValueError, TypeError), match=match):
            gs.privacy.audit(model, CE, data, **kwargs)
    assert model.calls == 0
    bn = bn_cnn().train()
    with pytest.raises(ValueError, match="train mode"):
        gs.privacy.audit(bn, CE, (x, y), defenses=("dp",))
