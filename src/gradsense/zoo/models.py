"""Architectures of the bundled models: plain ``nn.Module`` subclasses, deep-copyable, no lambdas.

- :class:`DigitsCNN`: a small BatchNorm CNN for 8x8 digits; its last ``nn.Conv2d`` is the CAM layer.
- :class:`TinyViT`: a pre-LN vision transformer with explicit attention, whose attention
  probabilities pass through an ``nn.Identity`` named ``attn_map`` so hooks can read them.
- :class:`TabularMLP`: a ReLU MLP for standardised tabular features.
- :class:`LeNetZhu`: the sigmoid LeNet of Deep Leakage from Gradients (Zhu et al. 2019), for photo crops.
- :class:`ConvNetPool`: a small ReLU CNN with max-pooling, for photo crops.
- :class:`SentenceEncoder`: a mean-pooling wrapper around a Hugging Face encoder (MiniLM).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Attention",
    "Block",
    "ConvNetPool",
    "DigitsCNN",
    "FeedForward",
    "LeNetZhu",
    "SentenceEncoder",
    "TabularMLP",
    "TinyViT",
    "mean_pool",
]


class DigitsCNN(nn.Module):
    """Small CNN for ``(N, 1, 8, 8)`` digit images.

    ``features`` is conv-BN-ReLU, conv-BN-ReLU, max-pool (8x8 -> 4x4), conv-BN-ReLU; ``head`` is
    global average pooling, flatten and a linear classifier. The last ``nn.Conv2d`` in
    ``model.modules()`` is the last conv of ``features`` (a 4x4 map, the usual Grad-CAM layer).

    Args:
        in_channels: input channels.
        channels: output channels of the three conv layers.
        num_classes: number of output logits.
    """

    def __init__(
        self, in_channels: int = 1, channels: Sequence[int] = (16, 32, 64), num_classes: int = 10
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.BatchNorm2d(c3),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c3, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class Attention(nn.Module):
    """Multi-head self-attention written out explicitly.

    ``attn = softmax(q @ k^T * scale)`` of shape ``(B, heads, T, T)`` passes through
    ``self.attn_map`` (an ``nn.Identity``): a forward hook there sees the attention map, and
    ``output.register_hook`` on it sees the map's gradient.

    Args:
        dim: token width, divisible by ``heads``.
        heads: number of attention heads.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        self.num_heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_map = nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, T, head_dim)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        attn = self.attn_map(attn)
        out = (attn @ v).transpose(1, 2).reshape(b, t, d)
        return self.proj(out)


class FeedForward(nn.Module):
    """Token-wise MLP: linear, GELU, linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A tiny pre-LN vision transformer.

    Patches of ``patch_size`` pixels are embedded by a strided conv (``patch_embed``), a learned
    CLS token is prepended and learned positional embeddings (``pos_embed``, shape
    ``(1, 1 + num_patches, dim)``) added. The tokens pass through ``blocks`` (an
    ``nn.ModuleList`` of :class:`Block`), then ``norm``; the CLS token goes to ``head``.

    Args:
        image_size: side of the square input image.
        patch_size: side of a square patch (``image_size`` must be divisible by it).
        in_channels: input channels.
        num_classes: number of output logits.
        dim: token width.
        depth: number of blocks.
        heads: attention heads per block.
        mlp_ratio: hidden width of the block MLP relative to ``dim``.
    """

    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 2,
        in_channels: int = 1,
        num_classes: int = 10,
        dim: int = 48,
        depth: int = 3,
        heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size must be divisible by patch_size, got {image_size} and {patch_size}")
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def tokens(self, x: Tensor) -> Tensor:
        """Embedded input tokens ``(B, 1 + num_patches, dim)`` before the first block."""
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, P, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.pos_embed

    def forward(self, x: Tensor) -> Tensor:
        h = self.tokens(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)[:, 0])


class TabularMLP(nn.Module):
    """ReLU MLP for tabular features: ``net`` is linear-ReLU blocks and a final linear layer.

    Args:
        in_features: number of input features.
        hidden: widths of the hidden layers.
        num_classes: number of output logits.
    """

    def __init__(self, in_features: int = 30, hidden: Sequence[int] = (32, 16), num_classes: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class LeNetZhu(nn.Module):
    """The LeNet of Zhu et al. 2019 (Deep Leakage from Gradients): three 5x5 convs with sigmoids, one linear.

    ``body`` is conv(stride 2)-sigmoid, conv(stride 2)-sigmoid, conv(stride 1)-sigmoid with ``width`` channels;
    ``fc`` maps the flattened ``width x (image_size/4)^2`` map to the logits. Smooth activations and no pooling
    are what make it the easy case of gradient inversion.

    Args:
        in_channels: input channels.
        num_classes: number of output logits.
        image_size: side of the square input image (divisible by 4).
        width: channels of every conv.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 8, image_size: int = 32, width: int = 12) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {image_size}")
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        self.fc = nn.Linear(width * (image_size // 4) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x).flatten(1))


class ConvNetPool(nn.Module):
    """A small ReLU CNN: 3x3 conv-ReLU-maxpool blocks, flatten, one linear layer.

    Args:
        in_channels: input channels.
        channels: output channels of the conv blocks (each halves the image side).
        num_classes: number of output logits.
        image_size: side of the square input image (divisible by ``2 ** len(channels)``).
    """

    def __init__(
        self, in_channels: int = 3, channels: Sequence[int] = (16, 32, 32), num_classes: int = 8, image_size: int = 32
    ) -> None:
        super().__init__()
        if image_size % 2 ** len(channels):
            raise ValueError(f"image_size must be divisible by {2 ** len(channels)}, got {image_size}")
        layers: list[nn.Module] = []
        width = in_channels
        for c in channels:
            layers += [nn.Conv2d(width, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            width = c
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.fc = nn.Linear(width * side * side, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


def mean_pool(token_embeddings: Tensor, attention_mask: Tensor) -> Tensor:
    """Average token embeddings over the positions where ``attention_mask`` is 1.

    Args:
        token_embeddings: ``(B, T, D)``.
        attention_mask: ``(B, T)`` of 0/1.

    Returns:
        ``(B, D)`` sentence embeddings, as sentence-transformers' mean pooling computes them.
    """
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    summed = (token_embeddings * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return summed / counts


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder plus mean pooling: text in, one embedding per sentence out.

    ``forward(input_ids, attention_mask)`` returns un-normalised mean-pooled embeddings (the
    differentiable part); :meth:`encode` tokenises, runs without gradients and L2-normalises, as
    ``sentence-transformers`` does for all-MiniLM-L6-v2.

    Args:
        transformer: the Hugging Face model (e.g. ``BertModel``).
        tokenizer: its tokenizer.
        max_length: truncation length used by :meth:`tokenize`.
    """

    def __init__(self, transformer: nn.Module, tokenizer: Any, max_length: int = 256) -> None:
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def embeddings_layer(self) -> nn.Module:
        """The word-embedding module (``nn.Embedding``), e.g. for token attribution."""
        return self.transformer.get_input_embeddings()

    @property
    def embedding_dim(self) -> int:
        """Width of the sentence embeddings."""
        return int(self.transformer.config.hidden_size)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """Mean-pooled sentence embeddings ``(B, D)``.

        Args:
            input_ids: ``(B, T)`` token ids (or pass ``inputs_embeds`` instead).
            attention_mask: ``(B, T)`` 0/1 mask; all ones when omitted.
            token_type_ids: optional segment ids, passed through.
            inputs_embeds: ``(B, T, D)`` word embeddings in place of ``input_ids``.

        Returns:
            ``(B, D)`` embeddings, not normalised.

        Raises:
            ValueError: if neither or both of ``input_ids`` and ``inputs_embeds`` are given.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        ref = input_ids if input_ids is not None else inputs_embeds[..., 0]
        if attention_mask is None:
            attention_mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        kwargs: dict[str, Tensor] = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        else:
            kwargs["inputs_embeds"] = inputs_embeds
        out = self.transformer(**kwargs)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return mean_pool(hidden, attention_mask)

    def tokenize(self, sentences: str | Sequence[str]) -> dict[str, Tensor]:
        """Tokenise a batch with padding and truncation.

        Args:
            sentences: a sentence or a list of sentences.

        Returns:
            A plain dict with ``input_ids``, ``attention_mask`` (and ``token_type_ids``) tensors,
            on the model's device, ready for ``model(**batch)``.
        """
        if isinstance(sentences, str):
            sentences = [sentences]
        batch = self.tokenizer(
            list(sentences),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = self.embeddings_layer.weight.device
        return {k: v.to(device) for k, v in batch.items()}

    def encode(self, sentences: str | Sequence[str], normalize: bool = True, batch_size: int = 32) -> Tensor:
        """Embed sentences without tracking gradients.

        Args:
            sentences: a sentence or a list of sentences (a single string gives one row).
            normalize: L2-normalise each embedding (as the reference model does).
            batch_size: sentences per forward pass.

        Returns:
            ``(N, D)`` float tensor of sentence embeddings.
        """
        if isinstance(sentences, str):
            sentences = [sentences]
        sentences = list(sentences)
        chunks = []
        with torch.no_grad():
            for start in range(0, len(sentences), batch_size):
                chunks.append(self(**self.tokenize(sentences[start : start + batch_size])))
        emb = torch.cat(chunks) if chunks else torch.empty(0, self.embedding_dim)
        if normalize:
            emb = torch.nn.functional.normalize(emb, p=2, dim=-1)
        return emb
