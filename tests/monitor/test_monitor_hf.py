"""HFCallback with the real transformers.Trainer on a tiny randomly initialised BERT (CPU, no network): the same
weights with and without it, the gradient norm HF itself logs, attention entropy, objectives from the output."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch.utils.data import Dataset  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

import gradsense as gs  # noqa: E402


class Pairs(Dataset):
    def __init__(self, n: int = 24, length: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 50, (n, length), generator=g)
        self.mask = torch.ones(n, length, dtype=torch.long)
        self.mask[::3, -3:] = 0  # padded examples
        self.labels = (self.ids[:, 0] > 25).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, num_labels=2, attn_implementation="eager")
    return BertForSequenceClassification(cfg)


def train(tmp_path, callback=None, max_grad_norm=0.1, accumulation=2):
    model = tiny_bert()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=6,
                             learning_rate=1e-3, gradient_accumulation_steps=accumulation, max_grad_norm=max_grad_norm,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             seed=0, data_seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Pairs(), callbacks=[callback] if callback else [])
    trainer.train()
    return model, trainer


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train(tmp_path_factory.mktemp("ref"))[0]


def assert_same_weights(ref, model):
    for (k, v), (k2, w) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert k == k2 and torch.equal(v, w), k


def test_hf_trainer_bitwise_identical_cheap(tmp_path, reference):
    cb = gs.monitor.HFCallback("cheap")
    model, _ = train(tmp_path, cb)
    assert_same_weights(reference, model)
    assert cb.result().steps.numel() == 6


@pytest.mark.filterwarnings("ignore:per-example gradient norms:RuntimeWarning")
def test_hf_trainer_bitwise_identical_and_grad_norm_equals_hf(tmp_path, reference):
    cb = gs.monitor.HFCallback("standard", log_dir=tmp_path / "run")
    model, trainer = train(tmp_path / "b", cb)
    assert_same_weights(reference, model)
    res = gs.monitor.MonitorResult.read(tmp_path / "run")
    assert res.steps.tolist() == list(range(6)) and not res.meta["running"]
    hf = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    # HF logs clip_grad_norm_'s total norm: the norm before clipping
    assert len(hf) == 6
    torch.testing.assert_close(res.series("grad_norm"), torch.tensor(hf, dtype=torch.float64), rtol=1e-5, atol=0)
    clipped = res.series("grad_norm_clipped")
    assert torch.allclose(clipped, torch.full_like(clipped, 0.1), rtol=1e-5)  # all clipped to max_grad_norm
    hf_loss = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    torch.testing.assert_close(res.series("loss"), torch.tensor(hf_loss, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    # attention entropy per head of both BERT self-attention modules, between 0 and log(8 keys)
    ent = [c for c in res.columns if c.startswith("attn_entropy/") and c.endswith("/h1")]
    assert len(ent) == 2
    v = float(res.series(ent[0])[0])
    assert 0 < v <= math.log(8) + 1e-6
    assert math.isfinite(float(res.series("gns2/trace")[0]))  # two micro-batches per step
    assert "bert.encoder.layer.0.attention.self" in res.meta["attention_modules"]


class TwoHeads(torch.nn.Module):
    """A plain module for the Trainer returning a dict with two losses and their sum."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(4, 8)
        self.a, self.b = torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)

    def forward(self, x, y):
        h = torch.tanh(self.body(x))
        la = torch.nn.functional.mse_loss(self.a(h).squeeze(1), y)
        lb = torch.nn.functional.mse_loss(self.b(h).squeeze(1), -y)
        return {"loss": la + lb, "loss_a": la, "loss_b": lb}


class Regression(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(16, 4, generator=g), torch.randn(16, generator=g)

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i]}


def test_hf_objectives_from_the_model_output(tmp_path):
    model = TwoHeads()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=3,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False)
    cb = gs.monitor.HFCallback("cheap", objectives=("loss_a", "loss_b"))
    Trainer(model=model, args=args, train_dataset=Regression(), callbacks=[cb]).train()
    res = cb.result()
    cos = res.series("cos/loss_a|loss_b")
    assert cos.numel() == 3 and torch.isfinite(cos).all() and (cos.abs() <= 1).all()
    assert cb.monitor.closed and not any(p._post_accumulate_grad_hooks for p in model.parameters())
