"""CAM family (Grad-CAM, Grad-CAM++, Smooth Grad-CAM++, NormGrad, CF-CAM) against hand-derived closed
forms, slow per-example twins on split models and captum; the automatic layer; chunking, batching and
the caller's model left as it was."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradsense as gs
from gradsense.attribution.base import METHODS
from gradsense.attribution.cam import (
    CFCAM,
    GRADIENT_METHODS,
    GradCAM,
    GradCAMPlusPlus,
    NormGrad,
    SmoothGradCAMPlusPlus,
    find_cam_layer,
    tokens_to_grid,
    upsample,
)
from helpers import CountingModule, assert_model_unchanged, hooks_on

EXACT = {"rtol": 1e-10, "atol": 1e-12}  # two float64 routes to the same numbers
CAM_METHODS = ["gradcam", "gradcampp", "normgrad", "cfcam"]


# ------------------------------------------------------------------------------ tiny seeded models
def gap_model(channels: int = 4, stride: int = 1, seed: int = 0) -> nn.Module:
    """conv (the CAM layer, "0") -> global average pooling -> linear, so S_t = sum_c W_tc mean_ij A_cij + b_t
    and dS_t/dA_cij = W_tc / (h w) everywhere."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, channels, 3, stride=stride, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3)
    )
    return net.double().eval()


def small_cnn(seed: int = 0) -> nn.Module:
    """conv-softplus-conv(stride 2, the last conv "2")-tanh-linear on 1x6x6: the layer map is 3x3 and its
    gradient varies over space (tanh after the layer)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Softplus(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )
    return net.double().eval()


def split_layer(net: nn.Sequential, k: int, x: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
    """Activation after net[:k] and the gradient of the target logits w.r.t. it, one example at a time."""
    acts, grads = [], []
    for i in range(x.shape[0]):
        a = net[:k](x[i : i + 1]).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(net[k:](a)[0, classes[i]], a)
        acts.append(a[0].detach())
        grads.append(g[0])
    return torch.stack(acts), torch.stack(grads)


class TinyBlock(nn.Module):
    """Pre-LN transformer block with single-head attention written out."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        x = x + self.proj(att @ v)
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """CLS + 16 patch tokens (2x2 patches of an 8x8 image), ``blocks`` of TinyBlock, CLS-pooled head."""

    def __init__(self, d: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, d, 2, stride=2)
        self.cls = nn.Parameter(0.5 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.5 * torch.randn(1, 17, d))
        self.blocks = nn.ModuleList([TinyBlock(d) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 3)

    def embed(self, x: Tensor) -> Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1) + self.pos

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h)[:, 0])


def make_vit(seed: int = 0) -> TinyViT:
    torch.manual_seed(seed)
    return TinyViT().double().eval()


def data(n: int = 4, size: int = 6, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 1][:n])


# ------------------------------------------------------------------------------ Grad-CAM
def test_registry_names():
    expected = {
        GradCAM: ["gradcam", "grad_cam"],
        GradCAMPlusPlus: ["gradcam_plus_plus", "gradcampp", "gradcam_pp", "grad_cam_plus_plus"],
        SmoothGradCAMPlusPlus: ["smooth_gradcam_plus_plus", "smooth_gradcampp", "smooth_gradcam_pp", "smoothgradcampp"],
        NormGrad: ["normgrad", "norm_grad"],
        CFCAM: ["cfcam", "cf_cam"],
    }
    for cls, names in expected.items():
        assert cls.name == names[0]
        for name in names:
            assert METHODS[name] is cls


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "signed"])
def test_gradcam_on_gap_linear_is_cam_over_hw(relu):
    """With GAP + linear, dS_t/dA_c = W_tc/(hw), so Grad-CAM's raw map is CAM (Zhou et al.) over hw."""
    net, (x, y) = gap_model(), data()
    res = GradCAM(net, layer="0", relu=relu).attribute(x, y)
    with torch.no_grad():
        a = net[0](x)  # (N, C, 6, 6)
    hw = a.shape[2] * a.shape[3]
    w = net[3].weight.detach()[y] / hw  # (N, C)
    cam = sum(w[:, c, None, None] * a[:, c] for c in range(a.shape[1]))
    expected = cam.clamp_min(0) if relu else cam
    assert bool((cam < 0).any()) and bool((cam > 0).any())  # the ReLU matters here
    torch.testing.assert_close(res.tensors["raw"], expected, **EXACT)
    torch.testing.assert_close(res.tensors["weights"], w, **EXACT)
    torch.testing.assert_close(res.attributions, expected, **EXACT)  # same size: no resampling
    assert res.meta["signed"] is (not relu)


def test_upsample_is_half_pixel_bilinear_by_hand():
    """align_corners=False: output pixel i samples source x = (i + 0.5) * in/out - 0.5, clamped at the edges."""
    m = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)
    row = torch.tensor([0.0, 0.25, 0.75, 1.0], dtype=torch.float64)  # x = -0.25(->0), 0.25, 0.75, 1.25(->1)
    torch.testing.assert_close(upsample(m, (4, 4)), row.expand(1, 4, 4), **EXACT)


def test_gradcam_keeps_raw_map_and_upsamples_to_input_size():
    net, (x, y) = gap_model(stride=2), data()
    res = GradCAM(net).attribute(x, y)
    raw = res.tensors["raw"]
    assert raw.shape == (4, 3, 3) and res.attributions.shape == (4, 6, 6)
    ref = F.interpolate(raw[:, None], size=(6, 6), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(res.attributions, ref, **EXACT)


@pytest.mark.peer
def test_gradcam_agrees_with_captum_layergradcam():
    captum = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )
    with torch.no_grad():
        net.train()
        for _ in range(3):
            net(torch.randn(8, 1, 8, 8) + 0.3)
    net.eval()
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    ours = GradCAM(net).attribute(x, y)
    assert ours.meta["settings"]["layer"] == "3"  # the last Conv2d
    theirs = captum.LayerGradCam(net, net[3]).attribute(x, target=y, relu_attributions=True)  # (N, 1, 4, 4)
    theirs = theirs.detach()
    assert float(theirs.abs().max()) > 0
    torch.testing.assert_close(ours.tensors["raw"], theirs[:, 0], rtol=1e-5, atol=1e-6)
    up = captum.LayerAttribution.interpolate(theirs, (8, 8), "bilinear")[:, 0]  # F.interpolate, align_corners=False
    torch.testing.assert_close(ours.attributions, up, rtol=1e-5, atol=1e-6)


def test_layer_as_module_object_equals_layer_name():
    net, (x, y) = small_cnn(), data()
    a = GradCAM(net, layer=net[2]).attribute(x, y).attributions
    b = GradCAM(net, layer="2").attribute(x, y).attributions
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inplace_op_after_the_layer_gives_the_map_of_its_output():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(27, 2)).double()
    twin = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(27, 2)).double()
    twin.load_state_dict(net.state_dict())
    x = torch.randn(3, 1, 3, 3, dtype=torch.float64)
    ours = GradCAM(net, layer="0", relu=False).attribute(x, 1).tensors["raw"]
    torch.testing.assert_close(ours, GradCAM(twin, layer="1", relu=False).attribute(x, 1).tensors["raw"], **EXACT)


# ------------------------------------------------------------------------------ Grad-CAM++
def test_gradcampp_on_gap_linear_closed_form():
    """g = W_c/(hw) is constant, so alpha = 1 / (2 + W_c m_c) with m_c = mean(A_c), and
    w_c = sum_ij alpha ReLU(g) = ReLU(W_c) / (2 + W_c m_c)."""
    net, (x, y) = gap_model(), data()
    res = GradCAMPlusPlus(net, layer="0").attribute(x, y)
    with torch.no_grad():
        a = net[0](x)
    wt = net[3].weight.detach()[y]
    m = a.mean(dim=(2, 3))
    assert bool((2 + wt * m > 0).all()) and bool((wt < 0).any())
    w = wt.clamp_min(0) / (2 + wt * m)
    torch.testing.assert_close(res.tensors["weights"], w, **EXACT)
    torch.testing.assert_close(res.tensors["raw"], torch.einsum("nc,nchw->nhw", w, a).clamp_min(0), **EXACT)


def _gradcampp_twin(acts: Tensor, m1: Tensor, m2: Tensor, m3: Tensor) -> Tensor:
    """The paper's eq. 19 element by element: alpha = m2 / (2 m2 + sum_ab A_ab m3), w_c = sum alpha relu(m1)."""
    n, c, h, w = acts.shape
    maps = torch.zeros(n, h, w, dtype=acts.dtype)
    for i in range(n):
        for k in range(c):
            total_a = float(acts[i, k].sum())
            weight = 0.0
            for p in range(h):
                for q in range(w):
                    num = float(m2[i, k, p, q])
                    den = 2 * num + total_a * float(m3[i, k, p, q])
                    alpha = num / den if den != 0 else 0.0
                    weight += alpha * max(float(m1[i, k, p, q]), 0.0)
            maps[i] += weight * acts[i, k]
    return maps.clamp_min(0)


def test_gradcampp_matches_slow_twin_on_split_model():
    net, (x, y) = small_cnn(), data()
    res = GradCAMPlusPlus(net).attribute(x, y)
    a, g = split_layer(net, 3, x, y)
    expected = _gradcampp_twin(a, g, g**2, g**3)
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(res.tensors["raw"], expected, **EXACT)


# ------------------------------------------------------------------------------ Smooth Grad-CAM++
def test_smooth_gradcampp_without_noise_is_gradcampp():
    net, (x, y) = small_cnn(), data()
    smooth = SmoothGradCAMPlusPlus(net, n_samples=1, noise_level=0.0).attribute(x, y)
    plain = GradCAMPlusPlus(net).attribute(x, y)
    torch.testing.assert_close(smooth.attributions, plain.attributions, **EXACT)
    torch.testing.assert_close(smooth.tensors["raw"], plain.tensors["raw"], **EXACT)


def test_smooth_gradcampp_matches_twin_with_the_same_noise():
    """Moments of g over s noisy copies (noise as SmoothGrad draws it), clean activations, eq. 19."""
    net, (x, y) = small_cnn(), data(n=2)
    s, level, seed = 3, 0.2, 7
    res = SmoothGradCAMPlusPlus(net, n_samples=s, noise_level=level, seed=seed).attribute(x, y[:2])
    noise = torch.randn((s, *x.shape), generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    sigma = level * (x.flatten(1).max(1).values - x.flatten(1).min(1).values)
    moments = [torch.zeros(2, 4, 3, 3, dtype=x.dtype) for _ in range(3)]
    for k in range(s):
        _, g = split_layer(net, 3, x + noise[k] * sigma[:, None, None, None], y[:2])
        for j in range(3):
            moments[j] += g ** (j + 1) / s
    clean, _ = split_layer(net, 3, x, y[:2])
    torch.testing.assert_close(res.tensors["raw"], _gradcampp_twin(clean, *moments), **EXACT)


def test_smooth_gradcampp_chunked_equals_unchunked_and_is_seeded():
    net, (x, y) = small_cnn(), data()
    ref = SmoothGradCAMPlusPlus(net, n_samples=4, seed=3).attribute(x, y).attributions
    for chunk in (1, 5):
        out = SmoothGradCAMPlusPlus(net, n_samples=4, seed=3, chunk_size=chunk).attribute(x, y).attributions
        torch.testing.assert_close(out, ref, **EXACT)
    again = SmoothGradCAMPlusPlus(net, n_samples=4, seed=3).attribute(x, y).attributions
    torch.testing.assert_close(again, ref, rtol=0, atol=0)
    other = SmoothGradCAMPlusPlus(net, n_samples=4, seed=4).attribute(x, y).attributions
    assert not torch.allclose(other, ref)


# ------------------------------------------------------------------------------ NormGrad
def test_normgrad_one_layer_by_hand():
    net, (x, y) = small_cnn(), data()
    res = NormGrad(net, layer="2").attribute(x, y)
    a, g = split_layer(net, 3, x, y)
    raw = a.pow(2).sum(1).sqrt() * g.pow(2).sum(1).sqrt()
    torch.testing.assert_close(res.tensors["raw"], raw, **EXACT)
    torch.testing.assert_close(res.attributions, upsample(raw, (6, 6)), **EXACT)


def test_normgrad_all_layers_sums_upsampled_maps():
    net, (x, y) = small_cnn(), data()
    res = NormGrad(net, layer="all").attribute(x, y)
    assert res.meta["settings"]["layer"] == ["0", "2"]
    maps = []
    for k in (1, 3):  # outputs of the two Conv2d layers
        a, g = split_layer(net, k, x, y)
        maps.append(upsample(a.norm(dim=1) * g.norm(dim=1), (6, 6)))
    torch.testing.assert_close(res.tensors["per_layer"], torch.stack(maps, 1), **EXACT)
    torch.testing.assert_close(res.attributions, maps[0] + maps[1], **EXACT)


# ------------------------------------------------------------------------------ CF-CAM
def cf_model(noise_w: float = 0.3, noise_b: float = 0.2) -> nn.Module:
    """1x1 conv with 8 channels + GAP + linear: channels 0-1 strong (key), 2-5 identical (one dense
    cluster), 6-7 weak and unlike anything else (DBSCAN noise)."""
    net = gap_model(channels=8)
    with torch.no_grad():
        net[0] = nn.Conv2d(1, 8, 1).double()
        net[0].weight.copy_(torch.tensor([2.0, 1.5, 1.0, 1.0, 1.0, 1.0, noise_w, -0.4]).reshape(8, 1, 1, 1))
        net[0].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, noise_b, 0.1]))
        net[3].weight.copy_(torch.tensor([2.0, 1.8, 0.5, 0.5, 0.5, 0.5, 0.05, -0.07]).expand(3, 8))
    return net


def test_cfcam_clusters_and_drops_noise_channels_by_hand():
    """Labels: key (-2) for the two largest ||a_c A_c||, one cluster for the identical channels, -1 for the
    rest. Gradients are constant W_c/36, which Gaussian filtering keeps, so the map is Grad-CAM over
    channels 0-5 only."""
    net, (x, y) = cf_model(), data()
    res = CFCAM(net, layer="0").attribute(x, y)
    expected_labels = torch.tensor([-2, -2, 0, 0, 0, 0, -1, -1]).expand(4, 8)
    assert torch.equal(res.tensors["clusters"], expected_labels)
    with torch.no_grad():
        a = net[0](x)
    w = net[3].weight.detach()[y] / 36
    w[:, 6:] = 0
    torch.testing.assert_close(res.tensors["weights"], w, **EXACT)
    torch.testing.assert_close(res.tensors["raw"], torch.einsum("nc,nchw->nhw", w, a).clamp_min(0), **EXACT)


def test_cfcam_map_ignores_changes_to_dropped_noise_channels():
    """A channel DBSCAN drops has weight 0, so rewiring it changes nothing (Grad-CAM's map does change)."""
    (x, y) = data()
    a, b = cf_model(), cf_model(noise_w=-0.9, noise_b=-0.5)
    ra, rb = CFCAM(a, layer="0").attribute(x, y), CFCAM(b, layer="0").attribute(x, y)
    assert torch.equal(ra.tensors["clusters"], rb.tensors["clusters"])
    torch.testing.assert_close(ra.attributions, rb.attributions, **EXACT)
    assert not torch.allclose(GradCAM(a, layer="0").attribute(x, y).attributions,
                              GradCAM(b, layer="0").attribute(x, y).attributions)


def test_cfcam_without_clustering_is_gradcam():
    """keep_quantile=0 makes every channel a key channel: nothing is clustered, filtered or dropped."""
    net, (x, y) = small_cnn(), data()
    ours = CFCAM(net, keep_quantile=0.0).attribute(x, y)
    assert bool((ours.tensors["clusters"] == -2).all())
    torch.testing.assert_close(ours.attributions, GradCAM(net).attribute(x, y).attributions, **EXACT)


def test_cfcam_runs_deterministically_on_random_channels():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 3)).double().eval()
    x, y = data()
    r1, r2 = CFCAM(net, sigma=1.0).attribute(x, y), CFCAM(net, sigma=1.0).attribute(x, y)
    assert r1.attributions.shape == (4, 6, 6) and r1.tensors["clusters"].shape == (4, 16)
    assert torch.equal(r1.attributions, r2.attributions)
    assert bool((r1.attributions >= 0).all()) and bool(torch.isfinite(r1.attributions).all())


# ------------------------------------------------------------------------------ the automatic layer
def test_auto_layer_is_last_conv_of_a_cnn():
    assert find_cam_layer(small_cnn()) == ("2", False)
    assert GradCAM(small_cnn()).layers == ["2"]

    class ConvStages(nn.Module):  # `blocks` of conv stages is not a transformer
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.Conv2d(2, 2, 3)))
            self.head = nn.Linear(2, 2)

    assert find_cam_layer(ConvStages()) == ("blocks.1.0", False)


def test_auto_layer_on_vit_is_the_last_blocks_input_as_an_8x8_map():
    vit, (x, y) = make_vit(), data(n=3, size=8)
    y = y[:3]
    res = GradCAM(vit).attribute(x, y)
    assert res.meta["settings"]["layer"] == "blocks.0"
    assert res.attributions.shape == (3, 8, 8) and res.tensors["raw"].shape == (3, 4, 4)
    # by hand: tokens after blocks[0], gradient through blocks[1] and the head; patch k at (k // 4, k % 4)
    h = vit.blocks[0](vit.embed(x)).detach().requires_grad_(True)
    out = vit.head(vit.norm(vit.blocks[1](h))[:, 0])
    (g,) = torch.autograd.grad(out[torch.arange(3), y].sum(), h)
    a_grid, g_grid = torch.zeros(3, 8, 4, 4, dtype=x.dtype), torch.zeros(3, 8, 4, 4, dtype=x.dtype)
    for k in range(16):
        a_grid[:, :, k // 4, k % 4] = h.detach()[:, 1 + k]
        g_grid[:, :, k // 4, k % 4] = g[:, 1 + k]
    expected = (g_grid.mean(dim=(2, 3))[:, :, None, None] * a_grid).sum(1).clamp_min(0)
    assert float(expected.max()) > 0
    torch.testing.assert_close(res.tensors["raw"], expected, **EXACT)


def test_last_block_output_has_no_patch_gradient_in_a_cls_pooled_vit():
    """Why the default is not the last block's output: the head reads only its CLS token."""
    vit, (x, _) = make_vit(), data(n=2, size=8)
    with pytest.warns(UserWarning, match="exactly zero"):
        res = GradCAM(vit, layer="blocks.1", relu=False).attribute(x, 0)
    assert torch.equal(res.tensors["raw"], torch.zeros(2, 4, 4, dtype=x.dtype))


def test_tokens_to_grid_and_reshape_override():
    tok = torch.arange(17.0).reshape(1, 17, 1).expand(2, 17, 3)
    grid = tokens_to_grid(tok)
    assert grid.shape == (2, 3, 4, 4) and float(grid[0, 0, 2, 1]) == 1 + 2 * 4 + 1
    with pytest.raises(ValueError, match="reshape="):
        tokens_to_grid(torch.zeros(1, 20, 3))  # 4 leftover tokens on a 4x4 grid
    vit, (x, y) = make_vit(), data(n=2, size=8)
    calls = []

    def grid_of(t: Tensor) -> Tensor:
        calls.append(t.shape)
        return tokens_to_grid(t)

    a = GradCAM(vit, reshape=grid_of).attribute(x, y[:2])
    assert len(calls) == 2  # activation and gradient
    torch.testing.assert_close(a.attributions, GradCAM(vit).attribute(x, y[:2]).attributions, rtol=0, atol=0)


@pytest.mark.parametrize("method,options", [("gradcam", {}), ("gradcampp", {}), ("smooth_gradcampp", {}),
                                            ("normgrad", {}), ("normgrad", {"layer": "all"}), ("cfcam", {})])
def test_mlp_raises_before_any_forward_and_names_gradient_methods(method, options):
    torch.manual_seed(0)
    counting = CountingModule(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double())
    with pytest.raises(ValueError, match="no spatial layer") as err:
        gs.attribute(counting, torch.randn(2, 4, dtype=torch.float64), target=0, method=method, **options)
    assert counting.calls == 0
    for name in GRADIENT_METHODS:
        assert name in str(err.value)


def test_non_spatial_layer_is_refused_with_advice():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    with pytest.raises(ValueError, match="reshape="):
        GradCAM(net, layer="2").attribute(torch.randn(2, 1, 6, 6, dtype=torch.float64), 0)


# ------------------------------------------------------------------------------ batching and hygiene
@pytest.mark.parametrize("method", CAM_METHODS)
def test_batched_equals_per_example_and_chunked_equals_unchunked(method):
    net, (x, y) = small_cnn(), data()
    full = gs.attribute(net, x, target=y, method=method)
    for chunk in (1, 3):
        part = gs.attribute(net, x, target=y, method=method, chunk_size=chunk)
        torch.testing.assert_close(part.attributions, full.attributions, **EXACT)
    single = torch.cat([gs.attribute(net, x[i : i + 1], target=[int(y[i])], method=method).attributions
                        for i in range(4)])
    torch.testing.assert_close(single, full.attributions, **EXACT)


@pytest.mark.parametrize("method", [*CAM_METHODS, "smooth_gradcampp"])
def test_model_unchanged_after_normal_and_failing_runs(method):
    net, (x, y) = small_cnn(), data()
    opts = {"n_samples": 2} if method == "smooth_gradcampp" else {}
    with assert_model_unchanged(net):
        gs.attribute(net, x, target=y, method=method, **opts)

    def boom(output: Tensor, batch: object) -> Tensor:
        raise RuntimeError("target failed")

    with assert_model_unchanged(net), pytest.raises(RuntimeError, match="target failed"):
        gs.attribute(net, x, target=boom, method=method, **opts)
    assert hooks_on(net) == {}


def test_frozen_model_still_gets_layer_gradients():
    net, (x, y) = small_cnn(), data()
    ref = GradCAM(net).attribute(x, y).attributions
    for p in net.parameters():
        p.requires_grad_(False)
    with assert_model_unchanged(net):
        out = GradCAM(net).attribute(x, y).attributions
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_bad_options_are_refused_before_work():
    net = small_cnn()
    with pytest.raises(ValueError, match="NormGrad"):
        GradCAM(net, layer="all")
    with pytest.raises(ValueError, match="not a submodule"):
        GradCAM(net, layer="nope")
    with pytest.raises(ValueError, match="eps"):
        CFCAM(net, eps=-1.0)
    with pytest.raises(ValueError, match="noise_level"):
        SmoothGradCAMPlusPlus(net, noise_level=-0.1)
