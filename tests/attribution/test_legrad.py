"""LeGrad against slow per-example, per-layer twins (a hand-written TinyViT forward with each attention
map an explicit leaf; a Hugging Face ViT differentiated directly), an explicit bilinear upsampling,
batching and chunking, a localisation property on the trained digits ViT, early refusal of non-ViTs,
and the caller's model left exactly as it was (Hugging Face's lazily installed capture hooks included)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradsense as gs
from gradsense.attribution.base import METHODS
from gradsense.attribution.legrad import NON_VIT_METHODS, LeGrad, find_vit_structure
from gradsense.core.targets import Probability
from gradsense.zoo.models import TinyViT
from helpers import CountingModule, assert_model_unchanged, hooks_on

EXACT = {"rtol": 1e-9, "atol": 1e-12}  # two float64 routes to the same numbers
HF_FLAG = "_output_capturing_hooks_installed"


# ------------------------------------------------------------------------------ seeded models and data
def make_tiny_vit(seed: int = 0, depth: int = 3) -> TinyViT:
    """The zoo TinyViT (8x8 input, 2x2 patches: CLS + 16 tokens), dim 16, 2 heads, float64, with weights
    pushed away from the near-uniform-attention initialisation so every map is non-trivial."""
    torch.manual_seed(seed)
    model = TinyViT(image_size=8, patch_size=2, dim=16, depth=depth, heads=2, num_classes=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.double().eval()


class MeanPooledViT(TinyViT):
    """TinyViT whose head reads the mean of all tokens instead of the CLS token."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.tokens(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h.mean(1)))


def images(n: int = 4, size: int = 8, channels: int = 1, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g, dtype=torch.float64)


def make_hf_vit(seed: int = 0):  # -> transformers.ViTForImageClassification
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=3,
        num_attention_heads=2, intermediate_size=64, num_labels=4, attn_implementation="eager",
    )
    model = transformers.ViTForImageClassification(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.double().eval()


# ------------------------------------------------------------------------------ the twins
def minmax_rows(m: Tensor) -> Tensor:
    flat = m.reshape(m.shape[0], -1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo)).reshape(m.shape)


def bilinear(grid: Tensor, size: int) -> Tensor:
    """Bilinear resize of one square (g, g) map with half-pixel centres (align_corners=False), by hand."""
    g = grid.shape[0]

    def taps(i: int) -> tuple[int, int, float]:
        src = max((i + 0.5) * g / size - 0.5, 0.0)
        i0 = min(math.floor(src), g - 1)
        return i0, min(i0 + 1, g - 1), src - i0

    out = torch.empty(size, size, dtype=grid.dtype)
    for r in range(size):
        r0, r1, wr = taps(r)
        for c in range(size):
            c0, c1, wc = taps(c)
            top = (1 - wc) * grid[r0, c0] + wc * grid[r0, c1]
            bottom = (1 - wc) * grid[r1, c0] + wc * grid[r1, c1]
            out[r, c] = (1 - wr) * top + wr * bottom
    return out


def twin_tiny_vit(model: TinyViT, x: Tensor, classes: Tensor, layers: list[int], pool: str = "cls") -> Tensor:
    """Per example and per layer ``l``: recompute the forward block by block from the weights, the
    attention of block ``l`` an explicit leaf, score ``s^l = head(norm(z^l))[class]`` and differentiate
    it w.r.t. that leaf. Returns the un-normalised maps ``(N, L, 16)`` (ReLU, mean over heads and query
    rows, the CLS key column dropped)."""
    d = model.pos_embed.shape[-1]
    heads = model.blocks[0].attn.num_heads
    hd = d // heads
    pe = model.patch_embed
    out = torch.zeros(x.shape[0], len(layers), model.num_patches, dtype=x.dtype)
    for i in range(x.shape[0]):
        for j, layer in enumerate(layers):
            h = F.conv2d(x[i : i + 1], pe.weight, pe.bias, stride=model.patch_size).flatten(2).transpose(1, 2)
            h = torch.cat([model.cls_token, h], dim=1) + model.pos_embed  # (1, T, d)
            t = h.shape[1]
            leaf = None
            for k in range(layer + 1):
                blk = model.blocks[k]
                y = F.layer_norm(h, (d,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
                q, key, v = F.linear(y, blk.attn.qkv.weight, blk.attn.qkv.bias).split(d, dim=-1)
                q, key, v = (u.reshape(1, t, heads, hd).transpose(1, 2) for u in (q, key, v))
                attn = torch.softmax(q @ key.transpose(-2, -1) / math.sqrt(hd), dim=-1)
                if k == layer:
                    attn = attn.detach().requires_grad_(True)
                    leaf = attn
                mixed = (attn @ v).transpose(1, 2).reshape(1, t, d)
                h = h + F.linear(mixed, blk.attn.proj.weight, blk.attn.proj.bias)
                y = F.layer_norm(h, (d,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
                h = h + F.linear(F.gelu(F.linear(y, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
            z = h[0, 0] if pool == "cls" else h[0].mean(0)
            z = F.layer_norm(z, (d,), model.norm.weight, model.norm.bias, model.norm.eps)
            s = F.linear(z, model.head.weight, model.head.bias)[int(classes[i])]
            (g,) = torch.autograd.grad(s, leaf)
            out[i, j] = g[0].clamp(min=0).mean(dim=(0, 1))[1:]
    return out


def twin_hf(model: nn.Module, x: Tensor, classes: Tensor) -> Tensor:
    """Per example and per layer: the model's own attentions and hidden states (output_attentions /
    output_hidden_states), ``s^l = classifier(vit.layernorm(CLS of hidden_states[l + 1]))[class]``,
    differentiated directly w.r.t. ``attentions[l]``. Returns ``(N, L, 16)``."""
    n_layers = model.config.num_hidden_layers
    out = torch.zeros(x.shape[0], n_layers, 16, dtype=x.dtype)
    for i in range(x.shape[0]):
        res = model(x[i : i + 1], output_attentions=True, output_hidden_states=True)
        assert all(a.requires_grad and a.grad_fn is not None for a in res.attentions)  # graph tensors
        for layer in range(n_layers):
            s = model.classifier(model.vit.layernorm(res.hidden_states[layer + 1][:, 0]))[0, int(classes[i])]
            if layer == n_layers - 1:
                torch.testing.assert_close(s, res.logits[0, int(classes[i])], **EXACT)
            (g,) = torch.autograd.grad(s, res.attentions[layer], retain_graph=True)
            out[i, layer] = g[0].clamp(min=0).mean(dim=(0, 1))[1:]
    return out


# ------------------------------------------------------------------------------ (1) zoo layout vs twin
def test_registry_and_structure():
    assert METHODS["legrad"] is LeGrad and METHODS["le_grad"] is LeGrad and LeGrad.name == "legrad"
    assert LeGrad.signed is False
    s = find_vit_structure(make_tiny_vit())
    assert (s.kind, s.n_layers, s.patch_size) == ("zoo", 3, (2, 2))
    assert s.block_names == ("blocks.0", "blocks.1", "blocks.2")


@pytest.mark.parametrize(
    ("layers", "resolved", "pool"),
    [("all", [0, 1, 2], "cls"), ([-1], [2], "cls"), ([2, 0], [0, 2], "cls"), ("all", [0, 1, 2], "mean")],
    ids=["all-cls", "last-cls", "first+last-cls", "all-mean"],
)
def test_tiny_vit_matches_the_hand_written_twin(layers, resolved, pool):
    model, x = make_tiny_vit(), images(n=4)
    classes = torch.tensor([0, 3, 1, 2])
    res = LeGrad(model, layers=layers, pool=pool).attribute(x, classes)
    per_layer = twin_tiny_vit(model, x, classes, resolved, pool=pool).reshape(4, len(resolved), 4, 4)
    # the comparison is not vacuous: most (example, layer) maps have positive entries (a map can be all
    # zero when every gradient of that layer is negative)
    assert float((per_layer > 0).any(dim=(2, 3)).double().mean()) >= 0.75
    torch.testing.assert_close(res.tensors["per_layer"], per_layer, **EXACT)
    merged = per_layer.mean(1)
    torch.testing.assert_close(res.tensors["raw"], minmax_rows(merged), rtol=0, atol=1e-10)
    up = torch.stack([bilinear(m, 8) for m in merged])
    torch.testing.assert_close(res.attributions, minmax_rows(up), rtol=0, atol=1e-10)
    assert res.attributions.shape == (4, 8, 8)
    assert res.meta["settings"]["pool"] == pool


def test_upsample_false_returns_the_grid_map():
    model, x = make_tiny_vit(), images(n=2)
    res = LeGrad(model, upsample=False).attribute(x, 1)
    assert res.attributions.shape == (2, 4, 4)
    torch.testing.assert_close(res.attributions, res.tensors["raw"], rtol=0, atol=0)


def test_other_targets_are_scored_on_the_intermediate_logits():
    """A probability target: ``s^l = softmax(head(norm(z^l)))[class]`` (the twin's chain rule, by hand:
    d p_c / d A = sum_k p_c (delta_ck - p_k) d y_k / d A, from per-class twins of the logits)."""
    model, x = make_tiny_vit(), images(n=2)
    classes = torch.tensor([2, 0])
    res = LeGrad(model, layers=[1]).attribute(x, Probability(classes))
    grads = []  # d y_k / d A^1 for every class k, ReLU-free, from a twin without the ReLU/mean
    for i in range(2):
        rows = []
        for k in range(4):
            rows.append(_signed_grad(model, x[i : i + 1], k, layer=1))
        grads.append(torch.stack(rows))  # (4, heads, T, T)
    with torch.no_grad():
        h = model.tokens(x)
        h = model.blocks[0](h)
        h = model.blocks[1](h)
        p = torch.softmax(model.head(model.norm(h[:, 0])), dim=1)
    expected = []
    for i in range(2):
        c = int(classes[i])
        coef = p[i, c] * (F.one_hot(torch.tensor(c), 4).double() - p[i])
        g = torch.einsum("k,khij->hij", coef, grads[i])
        expected.append(g.clamp(min=0).mean(dim=(0, 1))[1:].reshape(4, 4))
    torch.testing.assert_close(res.tensors["per_layer"][:, 0], torch.stack(expected), **EXACT)


def _signed_grad(model: TinyViT, x: Tensor, cls: int, layer: int) -> Tensor:
    """d head(norm(CLS after block ``layer``))[cls] / d A^layer through the model's own modules, with the
    attention map replaced by a leaf via a forward hook on its attn_map."""
    leaf: dict[str, Tensor] = {}

    def swap(_m: nn.Module, _i: tuple, out: Tensor) -> Tensor:
        leaf["a"] = out.detach().requires_grad_(True)
        return leaf["a"]

    handle = model.blocks[layer].attn.attn_map.register_forward_hook(swap)
    try:
        h = model.tokens(x)
        for k in range(layer + 1):
            h = model.blocks[k](h)
        s = model.head(model.norm(h[:, 0]))[0, cls]
        (g,) = torch.autograd.grad(s, leaf["a"])
    finally:
        handle.remove()
    return g[0]


def test_pool_must_match_the_model_head():
    torch.manual_seed(0)
    model = MeanPooledViT(image_size=8, patch_size=2, dim=16, depth=2, heads=2, num_classes=3).double().eval()
    x = images(n=2)
    with assert_model_unchanged(model), pytest.raises(ValueError, match="pool='mean'"):
        LeGrad(model).attribute(x, 0)
    res = LeGrad(model, pool="mean").attribute(x, torch.tensor([0, 2]))
    src = TinyViT(image_size=8, patch_size=2, dim=16, depth=2, heads=2, num_classes=3).double().eval()
    src.load_state_dict(model.state_dict())
    per_layer = twin_tiny_vit(src, x, torch.tensor([0, 2]), [0, 1], pool="mean")
    torch.testing.assert_close(res.tensors["per_layer"], per_layer.reshape(2, 2, 4, 4), **EXACT)


# ------------------------------------------------------------------------------ (2) Hugging Face ViT vs twin
def test_hf_vit_matches_the_autograd_twin():
    model = make_hf_vit()
    twin_model = copy.deepcopy(model)  # the twin's output_attentions calls may hook its own copy
    x = images(n=3, size=16, channels=3)
    classes = torch.tensor([1, 3, 0])
    res = LeGrad(model).attribute(x, classes)
    per_layer = twin_hf(twin_model, x, classes).reshape(3, 3, 4, 4)
    assert float((per_layer > 0).any(dim=(2, 3)).double().mean()) >= 0.75
    torch.testing.assert_close(res.tensors["per_layer"], per_layer, **EXACT)
    merged = per_layer.mean(1)
    torch.testing.assert_close(res.tensors["raw"], minmax_rows(merged), rtol=0, atol=1e-10)
    up = torch.stack([bilinear(m, 16) for m in merged])
    torch.testing.assert_close(res.attributions, minmax_rows(up), rtol=0, atol=1e-10)
    assert res.meta["settings"]["architecture"] == "hf-vit"


# ------------------------------------------------------------------------------ (3) batching and chunking
def test_batched_equals_per_example_and_chunked_equals_unchunked():
    model, x = make_tiny_vit(), images(n=5)
    classes = torch.tensor([0, 1, 2, 3, 1])
    full = LeGrad(model).attribute(x, classes)
    one = LeGrad(model, chunk_size=1).attribute(x, classes)
    two = LeGrad(model, chunk_size=2).attribute(x, classes)
    for key in ("attributions", "raw", "per_layer"):
        single = torch.cat([LeGrad(model).attribute(x[i : i + 1], int(classes[i])).tensors[key] for i in range(5)])
        torch.testing.assert_close(full.tensors[key], single, **EXACT)
        torch.testing.assert_close(one.tensors[key], full.tensors[key], **EXACT)
        torch.testing.assert_close(two.tensors[key], full.tensors[key], **EXACT)


def test_hf_chunked_equals_unchunked():
    model, x = make_hf_vit(), images(n=3, size=16, channels=3)
    with assert_model_unchanged(model):
        full = LeGrad(model, layers=[0, -1]).attribute(x, 2)
        one = LeGrad(model, layers=[0, -1], chunk_size=1).attribute(x, 2)
    torch.testing.assert_close(one.tensors["per_layer"], full.tensors["per_layer"], **EXACT)


def test_frozen_parameters_and_no_grad_context_give_the_same_maps():
    model, x = make_tiny_vit(), images(n=2)
    ref = LeGrad(model).attribute(x, 1).tensors["per_layer"]
    for p in model.parameters():
        p.requires_grad_(False)
    with assert_model_unchanged(model), torch.no_grad():
        frozen = LeGrad(model).attribute(x, 1).tensors["per_layer"]
    torch.testing.assert_close(frozen, ref, **EXACT)


def test_constant_target_gives_zeros_not_nan():
    model, x = make_tiny_vit(), images(n=2)
    with pytest.warns(UserWarning, match="exactly zero"):
        res = LeGrad(model).attribute(x, lambda out, batch: 0.0 * out[:, 0])
    assert bool((res.attributions == 0).all()) and bool((res.tensors["raw"] == 0).all())


# ------------------------------------------------------------------------------ (4) the trained digits ViT
def test_digits_vit_last_layer_map_prefers_the_digit_strokes():
    """Mean map value on ink pixels (input > 0.3) minus on background pixels, per digit, for the true class.

    Measured on the first 32 test digits (float32, the shipped weights): last block ``0.139`` (standard
    error ``0.027``, 25/32 digits positive); all three blocks (the default) only ``0.046 +- 0.045``.
    The assertion is that the last-block mean exceeds 3 standard errors of the per-digit differences,
    i.e. that it is clearly positive, not a fixed number tuned to the weights. The all-block map is not
    asserted: on this 3-block model the intermediate [CLS] scores ("logit lens" of blocks 0 and 1) are
    not the head's training input and their maps add little localisation (reported, not hidden).
    """
    model = gs.zoo.load("digits-vit")
    x, y = gs.zoo.dataset("digits", split="test")[:32]
    with assert_model_unchanged(model):
        res = LeGrad(model, layers=[-1]).attribute(x, y)
    a, ink = res.attributions, x[:, 0] > 0.3
    diff = torch.stack([a[i][ink[i]].mean() - a[i][~ink[i]].mean() for i in range(32)])
    se = diff.std() / math.sqrt(32)
    assert float(diff.mean()) > 3 * float(se), (float(diff.mean()), float(se))
    assert float((diff > 0).float().mean()) > 0.6


# ------------------------------------------------------------------------------ (5) refusing non-ViTs early
def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).double()


class BlocksWithoutMaps(nn.Module):
    """``blocks``/``norm``/``head`` like a ViT, but attention done by nn.MultiheadAttention (no attn_map)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)])
        self.norm, self.head = nn.LayerNorm(8), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks[0](x.flatten(2).transpose(1, 2).expand(-1, -1, 8))[:, 0]))


def test_non_vit_models_raise_before_any_forward():
    counting = CountingModule(small_cnn())
    x = images(n=2)
    with pytest.raises(ValueError, match="not a vision transformer") as err:
        LeGrad(counting)
    for name in NON_VIT_METHODS:
        assert name in str(err.value)
    assert set(NON_VIT_METHODS) == {"saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "gradcam"}
    with pytest.raises(ValueError, match="integrated_gradients"):
        gs.attribute(counting, x, target=0, method="legrad")
    counting_blocks = CountingModule(BlocksWithoutMaps())
    with pytest.raises(ValueError, match="not a vision transformer"):
        LeGrad(counting_blocks)
    with pytest.raises(ValueError, match="attn_map"):
        LeGrad(counting_blocks.inner)
    assert counting.calls == 0 and counting_blocks.calls == 0


def test_hf_models_without_eager_attention_or_head_raise_before_any_forward():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=4, attn_implementation="sdpa",
    )
    calls: list[int] = []
    sdpa = transformers.ViTForImageClassification(cfg).eval()
    handle = sdpa.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match="attn_implementation='eager'"):
            LeGrad(sdpa)
    finally:
        handle.remove()
    bare = transformers.ViTModel(cfg).eval()
    with pytest.raises(ValueError, match="classification head"):
        LeGrad(bare)
    with pytest.raises(ValueError, match="forward= is not supported"):
        LeGrad(make_hf_vit(), forward=lambda x: x)
    assert calls == []


def test_inputs_that_are_not_patchable_images_raise_before_any_forward():
    model = make_tiny_vit()
    calls: list[int] = []

    def forward(x: Tensor) -> Tensor:
        calls.append(1)
        return model(x)

    with pytest.raises(ValueError, match="images"):
        LeGrad(model, forward=forward).attribute(torch.rand(2, 64, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        LeGrad(model, forward=forward).attribute(torch.rand(2, 1, 8, 7, dtype=torch.float64), 0)
    assert calls == []


@pytest.mark.parametrize(
    ("layers", "error"),
    [([3], ValueError), ([0, -3], ValueError), ([], ValueError), ("last", ValueError), ([1.0], TypeError),
     (True, TypeError)],
    ids=["out-of-range", "same-block-twice", "empty", "unknown-string", "float", "bool"],
)
def test_bad_layers_are_refused_in_the_constructor(layers, error):
    with pytest.raises(error):
        LeGrad(make_tiny_vit(), layers=layers)


def test_bad_pool_and_upsample_are_refused():
    with pytest.raises(ValueError, match="pool"):
        LeGrad(make_tiny_vit(), pool="max")
    with pytest.raises(TypeError, match="upsample"):
        LeGrad(make_tiny_vit(), upsample="yes")
    with pytest.raises(ValueError, match="does not take option"):
        gs.attribute(make_tiny_vit(), images(n=1), target=0, method="legrad", steps=3)


# ------------------------------------------------------------------------------ (6) the caller's model
class RaiseOnCall:
    """A forward that runs the model and then raises on call number ``at`` (0-based)."""

    def __init__(self, model: nn.Module, at: int) -> None:
        self.model, self.at, self.calls = model, at, 0

    def __call__(self, x: Tensor) -> Tensor:
        out = self.model(x)
        self.calls += 1
        if self.calls - 1 == self.at:
            raise RuntimeError("forward failed")
        return out


def test_model_unchanged_and_no_hooks_after_normal_and_failing_calls():
    model, x = make_tiny_vit(), images(n=3)
    model.blocks[1].train()  # an unusual flag state that must survive
    with assert_model_unchanged(model):
        LeGrad(model, chunk_size=2).attribute(x, 1)
    model.eval()
    # call 0: the base class' target check; call 1: LeGrad's forward with its capture hooks installed
    failing = RaiseOnCall(model, at=1)
    with assert_model_unchanged(model), pytest.raises(RuntimeError, match="forward failed"):
        LeGrad(model, chunk_size=3, forward=failing).attribute(x, 1)
    assert failing.calls == 2
    calls: list[int] = []

    def target(out: Tensor, batch: object) -> Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("target failed")
        return out[:, 0]

    with assert_model_unchanged(model), pytest.raises(RuntimeError, match="target failed"):
        LeGrad(model).attribute(x, target)
    assert hooks_on(model) == {}


def test_hf_model_unchanged_and_still_returns_attentions_afterwards():
    """transformers >= 5 installs output-capturing hooks on first use of output_attentions and marks the
    model; LeGrad removes both, so the caller's model is exactly as before and still works."""
    model, x = make_hf_vit(), images(n=2, size=16, channels=3)
    marks = {n: HF_FLAG in m.__dict__ for n, m in model.named_modules()}
    with assert_model_unchanged(model):
        LeGrad(model).attribute(x, 1)
    calls: list[int] = []

    def target(out: Tensor, batch: object) -> Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("target failed")
        return out[:, 0]

    with assert_model_unchanged(model), pytest.raises(RuntimeError, match="target failed"):
        LeGrad(model).attribute(x, target)
    assert {n: HF_FLAG in m.__dict__ for n, m in model.named_modules()} == marks
    assert hooks_on(model) == {}
    out = model(x, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 3 and len(out.hidden_states) == 4
    # a model whose capture hooks the caller already installed keeps them
    before = hooks_on(model)
    with assert_model_unchanged(model):
        LeGrad(model).attribute(x, 1)
    assert hooks_on(model) == before
