"""Bundled small models: accuracy of the shipped weights, loading contract, architecture contracts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

import gradsense.zoo as zoo
from gradsense.zoo.models import Attention, TinyViT
from gradsense.zoo.registry import WEIGHTS_DIR

SMALL = ["block-digits-cnn", "breast-cancer-mlp", "digits-cnn", "digits-vit", "photos-cnn", "photos-lenet"]
DATASET = {"block-digits-cnn": "block-digits", "breast-cancer-mlp": "breast-cancer", "digits-cnn": "digits",
           "digits-vit": "digits", "photos-cnn": "photos", "photos-lenet": "photos"}
THRESHOLD = {"block-digits-cnn": 0.97, "breast-cancer-mlp": 0.95, "digits-cnn": 0.97, "digits-vit": 0.90,
             "photos-cnn": 0.35, "photos-lenet": 0.25}  # photos: 8 location classes, chance 0.125


@torch.no_grad()
def _accuracy(model: nn.Module, data: zoo.ZooDataset) -> float:
    return (model(data.inputs).argmax(-1) == data.labels).double().mean().item()


def test_available_names():
    assert zoo.available() == ["block-digits-cnn", "breast-cancer-mlp", "digits-cnn", "digits-vit", "minilm",
                               "photos-cnn", "photos-lenet"]


@pytest.mark.parametrize("name", SMALL)
def test_shipped_weights_reach_accuracy_threshold(name):
    model = zoo.load(name)
    data = zoo.dataset(DATASET[name], "test")
    acc = _accuracy(model, data)
    assert acc >= THRESHOLD[name], f"{name}: test accuracy {acc:.4f} < {THRESHOLD[name]}"
    # the metadata reports what the weights actually do (up to one example of float noise)
    meta = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
    assert abs(meta["test_accuracy"] - acc) <= 1.0 / len(data) + 1e-12
    assert zoo.info(name) == meta


@pytest.mark.parametrize("name", SMALL)
def test_shipped_files_are_small_and_described(name):
    weights = WEIGHTS_DIR / f"{name}.safetensors"
    assert weights.stat().st_size < 512 * 1024
    meta = zoo.info(name)
    for key in ("arch", "test_accuracy", "epochs", "seed", "torch_version", "dataset", "train_config"):
        assert key in meta
    assert meta["dataset"] == DATASET[name]


@pytest.mark.parametrize("name", SMALL)
def test_load_returns_fresh_eval_float32_models(name):
    a, b = zoo.load(name), zoo.load(f"zoo:{name}")
    assert a is not b
    for model in (a, b):
        assert not model.training
        assert all(not m.training for m in model.modules())
        assert all(p.dtype == torch.float32 for p in model.state_dict().values() if p.is_floating_point())
        assert all(p.requires_grad for p in model.parameters())
        assert model.zoo_name == name
    pa, pb = next(a.parameters()), next(b.parameters())
    assert torch.equal(pa, pb)
    with torch.no_grad():
        pa.add_(1.0)
    assert not torch.equal(pa, pb)  # no shared storage between loads


def test_load_leaves_global_rng_untouched():
    state = torch.get_rng_state()
    zoo.load("digits-vit")
    assert torch.equal(torch.get_rng_state(), state)


def test_unknown_model_lists_available():
    with pytest.raises(ValueError, match=r"breast-cancer-mlp.*digits-cnn.*digits-vit.*minilm"):
        zoo.load("resnet50")
    with pytest.raises(ValueError, match="available"):
        zoo.info("zoo:nope")


def test_non_string_name_is_a_type_error():
    with pytest.raises(TypeError, match="str"):
        zoo.load(3)


@pytest.mark.parametrize("name", SMALL)
def test_deepcopy_gives_identical_outputs(name):
    model = zoo.load(name)
    x, _ = zoo.dataset(DATASET[name])[:8]
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)


def test_cnn_last_conv_is_the_4x4_feature_map():
    model = zoo.load("digits-cnn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    last = convs[-1]
    assert last is model.features[7]
    seen = {}
    handle = last.register_forward_hook(lambda mod, inp, out: seen.setdefault("out", out))
    try:
        x, _ = zoo.dataset("digits")[:5]
        model(x)
    finally:
        handle.remove()
    assert seen["out"].shape == (5, 64, 4, 4)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 3


def test_vit_attention_maps_and_their_gradients_are_hookable():
    model = zoo.load("digits-vit")
    x, y = zoo.dataset("digits")[:6]
    maps: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []

    def capture(module, inputs, output):
        maps.append(output.detach())
        output.register_hook(lambda g: grads.append(g))

    handles = [blk.attn.attn_map.register_forward_hook(capture) for blk in model.blocks]
    try:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    assert isinstance(model.blocks, nn.ModuleList)
    assert len(maps) == len(grads) == len(model.blocks)
    heads = model.blocks[0].attn.num_heads
    for attn, g in zip(maps, grads):
        assert attn.shape == (6, heads, 17, 17)
        assert g.shape == attn.shape
        assert bool((attn >= 0).all())
        torch.testing.assert_close(attn.sum(-1), torch.ones(6, heads, 17), rtol=0, atol=1e-5)
        assert float(g.abs().sum()) > 0
    assert all(not blk.attn.attn_map._forward_hooks for blk in model.blocks)


def test_vit_attention_matches_a_loop_over_heads():
    torch.manual_seed(0)
    attn = Attention(dim=8, heads=2).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    q, k, v = attn.qkv(x).split(8, dim=-1)
    outs = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / 2.0, dim=-1)
        outs.append(w @ v[..., sl])
    want = attn.proj(torch.cat(outs, dim=-1))
    torch.testing.assert_close(attn(x), want)


def test_vit_structure_cls_token_goes_through_norm_and_head():
    model = zoo.load("digits-vit")
    x, _ = zoo.dataset("digits")[:4]
    seen = {}
    handle = model.blocks[-1].register_forward_hook(lambda mod, inp, out: seen.setdefault("h", out))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    h = seen["h"]
    assert h.shape == (4, 1 + model.num_patches, model.pos_embed.shape[-1])
    assert model.num_patches == 16
    with torch.no_grad():
        torch.testing.assert_close(model.head(model.norm(h)[:, 0]), logits)
    assert 3 <= len(model.blocks) <= 4


def test_vit_rejects_bad_shapes():
    with pytest.raises(ValueError, match="patch_size"):
        TinyViT(image_size=8, patch_size=3)
    with pytest.raises(ValueError, match="heads"):
        Attention(dim=10, heads=4)


@pytest.mark.parametrize("name", SMALL)
def test_per_example_gradients_under_vmap_match_a_loop(name):
    model = zoo.load(name)
    x, y = zoo.dataset(DATASET[name])[:4]
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_fn(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    batched = vmap(grad(loss_fn), in_dims=(None, 0, 0))(params, x, y)
    for i in range(4):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(batched[k][i], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", SMALL)
def test_forward_over_reverse_hvp_matches_double_backward(name):
    model = zoo.load(name).double()
    x, y = zoo.dataset(DATASET[name])[:8]
    x = x.double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    gen = torch.Generator().manual_seed(0)
    vec = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}

    def loss_fn(p):
        return nn.functional.cross_entropy(functional_call(model, (p, buffers), (x,)), y)

    _, hvp_fwd = jvp(grad(loss_fn), (params,), (vec,))

    names = list(params)
    leaves = [params[k].clone().requires_grad_(True) for k in names]
    loss = loss_fn(dict(zip(names, leaves)))
    g = torch.autograd.grad(loss, leaves, create_graph=True)
    dot = sum((gi * vec[k]).sum() for gi, k in zip(g, names))
    hvp_rev = torch.autograd.grad(dot, leaves)
    for k, h in zip(names, hvp_rev):
        torch.testing.assert_close(hvp_fwd[k], h, rtol=1e-7, atol=1e-9)
