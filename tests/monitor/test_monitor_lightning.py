"""LightningCallback with the real lightning Trainer (CPU, tiny model): the same weights with and without it, the
loss Lightning backpropagates, clipping seen from the optimizer's gradients, objectives from training_step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning.pytorch")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import gradsense as gs  # noqa: E402


class Module(L.LightningModule):
    def __init__(self, objectives: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.2), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 3))
        self.objectives = objectives
        self.seen: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        if self.objectives:
            la, lb = F.cross_entropy(out[::2], y[::2]), F.cross_entropy(out[1::2], y[1::2])
            gs.monitor.objectives(self, even=la, odd=lb)
            loss = 0.5 * (la + lb)
        else:
            loss = F.cross_entropy(out, y)
        self.seen.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def fit(callbacks=(), objectives=False, accumulate=1):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 5), torch.randint(0, 3, (64,)))
    module = Module(objectives)
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, gradient_clip_val=0.05,
                        accumulate_grad_batches=accumulate, callbacks=list(callbacks))
    trainer.fit(module, DataLoader(data, batch_size=8, shuffle=True))
    return module


@pytest.fixture(scope="module")
def reference():
    return fit(accumulate=2)


def assert_same_weights(ref, module):
    for (k, v), (k2, w) in zip(ref.state_dict().items(), module.state_dict().items()):
        assert k == k2 and torch.equal(v, w), k


def test_lightning_bitwise_identical_cheap(reference):
    cb = gs.monitor.LightningCallback("cheap")
    assert_same_weights(reference, fit([cb], accumulate=2))
    assert cb.result().steps.numel() == 6


def test_lightning_bitwise_identical_loss_and_clipping(reference):
    ref = reference
    cb = gs.monitor.LightningCallback("standard")
    module = fit([cb], accumulate=2)
    assert_same_weights(ref, module)
    res = cb.result()
    assert res.steps.tolist() == list(range(6))
    seen = torch.tensor(module.seen, dtype=torch.float64).reshape(6, 2).mean(1)
    torch.testing.assert_close(res.series("loss"), seen, rtol=1e-6, atol=1e-7)
    clipped = res.series("grad_norm_clipped")
    assert torch.allclose(clipped, torch.full_like(clipped, 0.05), rtol=1e-5)  # norm-clipped by Lightning
    assert (res.series("clip_factor") < 1).all()
    # noise scale at step 0 (every 10 steps in "standard"): per-example norms (training_step calls submodules, not
    # the LightningModule itself) and the two micro-batches
    assert torch.isfinite(res.series("gns/trace")[0]) and torch.isfinite(res.series("gns2/trace")[0])
    assert float(res.series("gns/batch")[0]) == 16
    assert not any(p._post_accumulate_grad_hooks for p in module.parameters())


def test_lightning_objectives_from_training_step():
    cb = gs.monitor.LightningCallback("cheap")
    fit([cb], objectives=True)
    cos = cb.result().series("cos/even|odd")
    assert cos.numel() == 6 and torch.isfinite(cos).all()
