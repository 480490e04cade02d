"""Monitoring never changes training: the same seed gives bitwise the same weights, buffers, optimizer state and
RNG state with and without a monitor (plain loop; the HF and Lightning versions are in their own files)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradsense as gs
from gradsense.monitor import Monitor
from gradsense.zoo.models import DigitsCNN


class DropCNN(nn.Module):
    """The bundled digits CNN (BatchNorm in train mode) with dropout before its head: RNG draws in every step."""

    def __init__(self) -> None:
        super().__init__()
        self.cnn = DigitsCNN()
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        feats = self.cnn.features(x)
        return self.cnn.head(self.drop(feats))


def run(quantities, steps=12, accumulate=2, **kw):
    torch.manual_seed(0)
    model = DropCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    data = gs.zoo.dataset("digits", split="train")
    held = gs.zoo.dataset("digits", split="test")[:32]
    mon = None
    if quantities is not None:
        mon = Monitor(model, opt, quantities=quantities, held_out=held, loss_fn=F.cross_entropy, **kw)
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            idx = torch.randint(0, len(data), (16,))
            x, y = data.inputs[idx], data.labels[idx]
            loss = F.cross_entropy(model(x), y) / accumulate
            loss.backward()
            if mon is not None:
                mon.log(loss=loss.detach() * accumulate)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
    if mon is not None:
        mon.close()
    return model, opt, torch.get_rng_state(), mon


def assert_same(a, b):
    ma, oa, ra, _ = a
    mb, ob, rb, _ = b
    for (k, v), (k2, w) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert k == k2 and torch.equal(v, w), k
    for sa, sb in zip(oa.state_dict()["state"].values(), ob.state_dict()["state"].values()):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k
    assert torch.equal(ra, rb)


@pytest.fixture(scope="module")
def reference():
    return run(None)


@pytest.mark.parametrize("quantities", ["cheap", "standard"])
def test_plain_loop_bitwise_identical(reference, quantities):
    out = run(quantities)
    assert_same(reference, out)
    assert out[3].result().steps.numel() == 12


def test_full_preset_with_curvature_and_per_example_every_step_bitwise_identical(reference):
    out = run({"grad_norm": 1, "update": 1, "gns": 1, "rotation": 5, "curvature": 6, "loss": 1}, curvature_hvp=16)
    assert_same(reference, out)
    s = out[3].result().scalars
    assert torch.isfinite(s["gns/trace"]).all() and torch.isfinite(s["curvature/top_eig"][[0, 6]]).all()
    assert out[3].result().meta["gns_coupled"]  # train-mode BatchNorm rows are named as coupled
