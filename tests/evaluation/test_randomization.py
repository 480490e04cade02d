"""Randomisation sanity check (Adebayo et al. 2018), SAM hyperparameter sensitivity (Bansal et al. 2020) and
the similarity measures they use: Spearman against scipy, SSIM against a slow window-by-window twin."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import gradsense as gs
import gradsense.evaluation as ev
from gradsense.evaluation.similarity import average_ranks
from helpers import CountingModule, assert_model_unchanged


# ------------------------------------------------------------------------------------------- similarity
def test_spearman_matches_scipy_including_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (6, 20), generator=g).double()  # many ties
    b = torch.randn(6, 20, generator=g, dtype=torch.float64)
    b[:, :5] = 0.0
    ours = ev.spearman(a, b)
    for i in range(6):
        assert abs(float(ours[i]) - spearmanr(a[i].numpy(), b[i].numpy()).statistic) < 1e-12
    from scipy.stats import rankdata

    torch.testing.assert_close(average_ranks(a), torch.from_numpy(rankdata(a.numpy(), axis=1)), rtol=0, atol=0)


def _slow_ssim(a: np.ndarray, b: np.ndarray, size: int = 7, sigma: float = 1.5) -> float:
    """SSIM of two maps with the same conventions (min-max scaled, skimage's Gaussian-weighted variant: local
    statistics from scipy's gaussian_filter with reflected borders, sample covariance, borders cropped)."""
    from scipy.ndimage import gaussian_filter

    def scale(m):
        lo, hi = m.min(), m.max()
        return (m - lo) / (hi - lo) if hi > lo else m - lo

    a, b = scale(a), scale(b)
    size = min(size, *a.shape)
    size = size if size % 2 else size - 1

    def filt(t):
        return gaussian_filter(t, sigma, truncate=3.5, mode="reflect")

    corr = size * size / (size * size - 1)
    ma, mb = filt(a), filt(b)
    va, vb = corr * (filt(a * a) - ma * ma), corr * (filt(b * b) - mb * mb)
    cov = corr * (filt(a * b) - ma * mb)
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    pad = (size - 1) // 2
    return float(s[pad:s.shape[0] - pad, pad:s.shape[1] - pad].mean())


def test_ssim_matches_a_scipy_filter_twin_and_is_one_for_equal_maps():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3, 9, 11, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.rand(3, 9, 11, generator=g, dtype=torch.float64)
    ours = ev.ssim(a, b)
    for i in range(3):
        assert abs(float(ours[i]) - _slow_ssim(a[i].numpy(), b[i].numpy())) < 1e-12
    torch.testing.assert_close(ev.ssim(a, 2 * a + 1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert math.isnan(float(ev.ssim(a[:, :1, :2], b[:, :1, :2])[0]))  # no side of 3 or more: no window


# ------------------------------------------------------------------------------------------- randomisation
def test_saliency_passes_and_the_callers_model_is_untouched(cnn_case):
    c = cnn_case
    rng = torch.get_rng_state()
    with assert_model_unchanged(c.model):
        r = ev.randomization(c.model, c.x, None, target=c.y, explainer="saliency")
    assert torch.equal(torch.get_rng_state(), rng)
    assert r.layers == ev.parameter_layers(c.model) == ["4", "1", "0"]  # output first
    assert r.spearman.shape == (3, c.x.shape[0]) and r.ssim.shape == (3, c.x.shape[0])
    assert r.passed and r.mean < 0.5
    # step 1 randomises only the output layer: the maps of a different class mix already differ from step 0
    assert float(r.spearman[-1].mean()) < 0.9


def test_a_map_that_ignores_the_model_fails(cnn_case):
    c = cnn_case

    def edge_detector(model, inputs, target):  # looks only at the image
        return (inputs - inputs.roll(1, dims=-1)).abs()

    r = ev.randomization(c.model, c.x, None, target=c.y, explainer=edge_detector)
    torch.testing.assert_close(r.spearman, torch.ones_like(r.spearman), rtol=0, atol=1e-12)
    torch.testing.assert_close(r.ssim, torch.ones_like(r.ssim), rtol=0, atol=1e-12)
    assert not r.passed


def test_cascading_randomises_cumulatively_and_independent_one_at_a_time(mlp_case):
    c = mlp_case
    seen: list[list[bool]] = []
    original = {n: p.detach().clone() for n, p in c.model.named_parameters()}

    def probe(model, inputs, target):  # records which layers differ from the trained weights
        seen.append([not torch.equal(p, original[n]) for n, p in model.named_parameters()])
        return gs.attribute(model, inputs, target=target, method="saliency").attributions

    ev.randomization(c.model, c.x, None, target=c.y, explainer=probe, mode="cascading")
    # names: 0.weight 0.bias 2.weight 2.bias 4.weight 4.bias; layers randomised output first
    assert seen == [[False] * 6, [False] * 4 + [True] * 2, [False] * 2 + [True] * 4, [True] * 6]
    seen.clear()
    ev.randomization(c.model, c.x, None, target=c.y, explainer=probe, mode="independent")
    assert seen == [[False] * 6, [False] * 4 + [True] * 2, [False, False, True, True, False, False],
                    [True, True] + [False] * 4]


def test_randomization_bad_input(mlp_case):
    c = mlp_case
    counting = CountingModule(c.model)
    with pytest.raises(ValueError, match="mode must be"):
        ev.randomization(counting, c.x, None, target=c.y, explainer="saliency", mode="top")
    with pytest.raises(ValueError, match=r"layers \['fc'\] are not modules with parameters"):
        ev.randomization(counting, c.x, None, target=c.y, explainer="saliency", layers=["fc"])
    with pytest.raises(ValueError, match="explainer="):
        ev.randomization(counting, c.x, torch.zeros_like(c.x), target=c.y)
    assert counting.sizes == []


# ------------------------------------------------------------------------------------------- SAM
def test_a_deterministic_method_is_perfectly_stable_over_seeds(mlp_case):
    c = mlp_case
    r = ev.hyperparameter_sensitivity(c.model, c.x, None, target=c.y, explainer="saliency", seeds=3)
    torch.testing.assert_close(r.values, torch.ones(10, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(r.tensors["spread"], torch.zeros(10, dtype=torch.float64), rtol=0, atol=1e-12)


def test_grid_spread_matches_a_loop_of_attribute_calls_and_scipy(cnn_case):
    c = cnn_case
    grid = {"steps": [2, 8], "baseline": ["zeros", "blur"]}
    r = ev.hyperparameter_sensitivity(c.model, c.x, None, target=c.y, explainer="integrated_gradients", grid=grid,
                                      explainer_options={"rule": "riemann_middle"})
    maps = [gs.attribute(c.model, c.x, target=c.y, method="ig", rule="riemann_middle", steps=s, baseline=b)
            .attributions.sum(1).abs() for s in (2, 8) for b in ("zeros", "blur")]
    assert r.meta["settings_list"] == [{"steps": s, "baseline": b} for s in (2, 8) for b in ("zeros", "blur")]
    for i in range(c.x.shape[0]):
        rho = [spearmanr(maps[p][i].reshape(-1).numpy(), maps[q][i].reshape(-1).numpy()).statistic
               for p in range(4) for q in range(p + 1, 4)]
        assert abs(float(r.values[i]) - float(np.mean(rho))) < 1e-12


def test_smoothgrad_seeds_are_a_batch_and_differ(mlp_case):
    c = mlp_case
    counting = CountingModule(c.model)
    r = ev.hyperparameter_sensitivity(counting, c.x, None, target=c.y, explainer="smoothgrad", seeds=4,
                                      explainer_options={"n_samples": 3, "noise_level": 0.5})
    assert 0.0 < float(r.values.mean()) < 1.0
    assert max(counting.sizes) > 10  # the 4 seeds x 10 examples x 3 samples went through as batched rows
    with pytest.raises(ValueError, match="at least two maps"):
        ev.hyperparameter_sensitivity(c.model, c.x, None, target=c.y, explainer="saliency")
    with pytest.raises(ValueError, match=r"grid\['steps'\] is empty"):
        ev.hyperparameter_sensitivity(c.model, c.x, None, target=c.y, explainer="ig", grid={"steps": []})
    with pytest.raises(ValueError, match="does not take option"):
        ev.hyperparameter_sensitivity(c.model, c.x, None, target=c.y, explainer="saliency", grid={"steps": [1, 2]})
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        ev.hyperparameter_sensitivity(c.model, c.x, None, target=c.y, explainer="saliency", seeds=0)
