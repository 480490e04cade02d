"""Agreement with captum on the bundled digits CNN (float32), within 1e-5 relative, as issue 3 asks."""

from __future__ import annotations

import pytest
import torch

import gradsense as gs

captum = pytest.importorskip("captum.attr")
pytestmark = pytest.mark.peer


@pytest.fixture(scope="module")
def bundled():
    model = gs.zoo.load("digits-cnn")
    x, y = gs.zoo.dataset("digits", split="test")[:16]
    return model, x, y


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = theirs.detach().abs().max()
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-5 * float(scale))


def test_saliency_and_input_x_gradient(bundled):
    model, x, y = bundled
    _close(gs.attribute(model, x, target=y, method="saliency").attributions,
           captum.Saliency(model).attribute(x, target=y, abs=False))
    _close(gs.attribute(model, x, target=y, method="saliency", abs=True).attributions,
           captum.Saliency(model).attribute(x, target=y, abs=True))
    _close(gs.attribute(model, x, target=y, method="input_x_gradient").attributions,
           captum.InputXGradient(model).attribute(x, target=y))


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_left", "riemann_middle"])
def test_integrated_gradients(bundled, rule):
    model, x, y = bundled
    ours = gs.attribute(model, x, target=y, method="ig", steps=32, rule=rule, baseline="blur")
    base = gs.attribution.make_baseline("blur", x)
    theirs, delta = captum.IntegratedGradients(model).attribute(
        x, baselines=base, target=y, n_steps=32, method=rule, return_convergence_delta=True
    )
    _close(ours.attributions, theirs)
    torch.testing.assert_close(ours.delta, delta.float(), rtol=1e-3, atol=1e-4)


def test_layer_gradcam_before_and_after_upsampling(bundled):
    model, x, y = bundled
    ours = gs.attribute(model, x, target=y, method="gradcam")
    layer = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    raw = captum.LayerGradCam(model, layer).attribute(x, target=y, relu_attributions=True).squeeze(1)
    _close(ours.tensors["raw"], raw)
    up = captum.LayerAttribution.interpolate(raw.unsqueeze(1), x.shape[2:], "bilinear").squeeze(1)
    _close(ours.attributions, up)


def test_smoothgrad_matches_noise_tunnel_statistically(bundled):
    """Different noise draws: the two means agree within a band of their Monte Carlo standard errors."""
    model, x, y = bundled
    x, y = x[:4], y[:4]
    n, sigma = 400, 0.15
    ours = gs.attribute(model, x, target=y, method="smoothgrad", n_samples=n, sigma=sigma, seed=0)
    theirs = captum.NoiseTunnel(captum.Saliency(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=n, stdevs=sigma, target=y, abs=False, nt_samples_batch_size=100
    )
    # per-pixel sample standard deviation from our own noisy maps -> standard error of each mean
    sq = gs.attribute(model, x, target=y, method="smoothgrad_sq", n_samples=n, sigma=sigma, seed=0).attributions
    se = ((sq - ours.attributions**2).clamp_min(0) / n).sqrt()
    z = (ours.attributions - theirs).abs() / (se * 2**0.5 + 1e-12)
    assert float((z > 4).float().mean()) < 0.01  # fewer than 1% of pixels beyond 4 combined standard errors
