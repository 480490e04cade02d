"""Small seeded float64 models for the monitor tests: every per-example rule, sequences, a siamese call."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Scale(nn.Module):
    """A module with a parameter of its own and no closed-form rule (the vmap fallback)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.s)


class Zoo(nn.Module):
    """Conv2d (groups, reflect padding), GroupNorm, BatchNorm (eval), Conv1d, Linear, LayerNorm, RMSNorm, Scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect", groups=2)
        self.gn = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 3, 2, stride=2, dilation=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv1d = nn.Conv1d(3, 4, 3, padding="same")
        self.ln = nn.LayerNorm(4)
        self.rms = nn.RMSNorm(4)
        self.scale = Scale(4)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.gn(self.conv(x)))
        h = torch.tanh(self.bn(self.conv2(h)))  # (B, 3, 2, 2)
        h = self.conv1d(h.flatten(2))  # (B, 4, 4)
        h = self.scale(self.rms(self.ln(h.transpose(1, 2))))  # (B, 4, 4)
        return self.head(h.flatten(1))


class TextModel(nn.Module):
    """Embedding (padding_idx) -> MultiheadAttention (seq-first) -> Linear on sequences -> mean -> Linear."""

    def __init__(self, vocab: int = 7, dim: int = 4, batch_first: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=batch_first)
        self.batch_first = batch_first
        self.proj = nn.Linear(dim, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)  # (B, T, d)
        if self.batch_first:
            h, _ = self.attn(h, h, h)
        else:
            h = h.transpose(0, 1)
            h, _ = self.attn(h, h, h)
            h = h.transpose(0, 1)
        return self.out(torch.tanh(self.proj(h)).mean(1))


class Siamese(nn.Module):
    """Calls the same encoder on both halves of each example (the examples' contributions add up per call)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

    def forward(self, x: Tensor) -> Tensor:
        return (self.enc(x[:, 0]) * self.enc(x[:, 1])).sum(1, keepdim=True)


def zoo_model() -> Zoo:
    torch.manual_seed(1)
    m = Zoo().double()
    with torch.no_grad():
        m.train()
        for _ in range(2):
            m(torch.randn(8, 2, 4, 4, dtype=torch.float64))
        m.bn.weight.uniform_(0.5, 1.5)
    return m.eval()


def mlp(width: int = 6, out: int = 3, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, out)).to(dtype)
