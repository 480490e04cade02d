"""Quantus' own expected values for the localisation metrics and the similarity functions gradsense shares.

Source: understandable-machine-intelligence-lab/Quantus (commit 85bc29d) ``tests/metrics/test_localisation_metrics.py``
(fixtures ``all_in_gt_*``, ``none_in_gt_*``, ``half_in_gt_*``, ``all_in_gt_seg_bigger_*``) and
``tests/functions/test_similarity_func.py``. Quantus draws its fixtures' background noise unseeded
(``np.random``); here it is seeded, and 3 examples stand for Quantus' 10. Region indices and sizes are Quantus'.

Conventions that differ (and the option that matches Quantus):

- ``RelevanceMassAccuracy`` (our ``attribution_mass``) defaults to the signed map divided by its maximum; ours to
  ``|map|``. Quantus' fixtures are non-negative, where the two agree.
- ``PointingGame``: Quantus counts a hit if *any* unit tied for the maximum lies in the mask (``ties="any"``);
  our default ``ties="all"`` needs every tied unit inside, so a constant map cannot point. On the ``half_in_gt``
  fixtures (the maximum is a plateau half inside the mask) Quantus says True and our default says 0.
- ``ssim``: Quantus passes the maps as they are with the pair's joint value range (``normalize=False``); ours
  min-max scales each map by default (Adebayo et al.), which makes two constant maps identical.
- An empty mask gives NaN in both libraries.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradsense as gs
from gradsense.evaluation import spearman, ssim

MODEL = nn.Identity()  # the localisation metrics only fingerprint the model
N = 3
RNG = np.random.default_rng(0)


def _fixture(shape: tuple[int, ...], s_region, a_region, *, noise: bool, channels: int = 3):
    """Quantus' fixture builder: s = 1 on ``s_region``, a = 1 on ``a_region`` over zeros or U(0, 0.1) noise."""
    s = np.zeros((N, 1, *shape))
    a = RNG.uniform(0, 0.1, size=(N, 1, *shape)) if noise else np.zeros((N, 1, *shape))
    s[(slice(None), slice(None), *s_region)] = 1.0
    a[(slice(None), slice(None), *a_region)] = 1.0
    x = torch.from_numpy(RNG.standard_normal((N, channels, *shape)))
    return x, torch.from_numpy(a), torch.from_numpy(s)


ALL_1D, ALL_2D = ((slice(50, 150),), (slice(50, 150),)), ((slice(50, 150),) * 2, (slice(50, 150),) * 2)
NONE_1D = ((slice(0, 100),), (slice(100, 200),))
NONE_2D = ((slice(0, 100),) * 2, (slice(100, 200),) * 2)
HALF_1D = ((slice(50, 100),), (slice(0, 100),))
HALF_2D = ((slice(0, 50), slice(50, 100)), (slice(0, 100), slice(75, 100)))
BIGGER_1D = ((slice(0, 150),), (slice(50, 150),))
BIGGER_2D = ((slice(0, 150),) * 2, (slice(50, 150),) * 2)


def _shape(region) -> tuple[int, ...]:
    return (224,) * len(region[0])


@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize(("regions", "expected"), [
    (ALL_1D, 1.0), (ALL_2D, 1.0), (NONE_1D, 0.0), (NONE_2D, 0.0), (HALF_1D, 0.5), (HALF_2D, 0.5)],
    ids=["all_in_gt_zeros_1d_3ch", "all_in_gt_zeros_2d_3ch", "none_in_gt_zeros_1d_3ch", "none_in_gt_zeros_2d_3ch",
         "half_in_gt_zeros_1d_3ch", "half_in_gt_zeros_2d_3ch"])
def test_relevance_mass_accuracy(regions, expected, absolute):
    # test_localisation_metrics.py::test_relevance_mass_accuracy: RelevanceMassAccuracy on the *_zeros fixtures
    # (a = 1 on its region, 0 elsewhere) -> 1.0 / 0.0 / 0.5 (Quantus compares round(s, 2)).
    x, a, s = _fixture(_shape(regions), *regions, noise=False)
    r = gs.evaluate(MODEL, x, a, target=None, metric="attribution_mass", mask=s, absolute=absolute)
    torch.testing.assert_close(r.values, torch.full((N,), expected, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("regions", [BIGGER_1D, BIGGER_2D], ids=["all_in_gt_seg_bigger_1d_3ch",
                                                                  "all_in_gt_seg_bigger_2d_3ch"])
def test_relevance_mass_accuracy_mask_bigger_than_the_map(regions):
    # test_localisation_metrics.py::test_relevance_mass_accuracy on all_in_gt_seg_bigger_*: expected in (0.5, 1.0).
    x, a, s = _fixture(_shape(regions), *regions, noise=True)
    r = gs.evaluate(MODEL, x, a, target=None, metric="attribution_mass", mask=s)
    assert bool(((r.values > 0.5) & (r.values < 1.0)).all()), r.values
    # and the value itself: mass inside / total, from the fixture's own arrays
    inside, total = (a * s).reshape(N, -1).sum(1), a.reshape(N, -1).sum(1)
    torch.testing.assert_close(r.values, inside / total, rtol=1e-12, atol=0)


@pytest.mark.parametrize(("regions", "quantus", "ours_default"), [
    (ALL_1D, 1.0, 1.0), (ALL_2D, 1.0, 1.0), (NONE_1D, 0.0, 0.0), (NONE_2D, 0.0, 0.0),
    (HALF_1D, 1.0, 0.0), (HALF_2D, 1.0, 0.0)],
    ids=["all_in_gt_1d_3ch", "all_in_gt_2d_3ch", "none_in_gt_1d_3ch", "none_in_gt_2d_3ch", "half_in_gt_1d_3ch",
         "half_in_gt_2d_3ch"])
def test_pointing_game(regions, quantus, ours_default):
    # test_localisation_metrics.py::test_pointing_game: PointingGame on the noisy fixtures -> True / False / True.
    # The maximum (1.0) is a plateau over the map's region: Quantus' hit is "any unit of the plateau in the
    # mask" (ties="any"). Our default needs all of it inside: the half_in_gt plateaus are half outside.
    x, a, s = _fixture(_shape(regions), *regions, noise=True)
    r_any = gs.evaluate(MODEL, x, a, target=None, metric="pointing_game", mask=s, ties="any")
    torch.testing.assert_close(r_any.values, torch.full((N,), quantus, dtype=torch.float64), rtol=0, atol=0)
    r_all = gs.evaluate(MODEL, x, a, target=None, metric="pointing_game", mask=s)
    torch.testing.assert_close(r_all.values, torch.full((N,), ours_default, dtype=torch.float64), rtol=0, atol=0)


def test_empty_mask_gives_nan():
    # Quantus' RelevanceMassAccuracy.evaluate_batch and PointingGame.evaluate_batch: "Return NaN if segmentation
    # is empty" (mass_accuracy[s_sums] = np.nan; hit[s_batch.sum(axis=-1) == 0] = np.nan).
    x, a, s = _fixture((224,), *ALL_1D, noise=True)
    s[1] = 0.0
    for metric in ("attribution_mass", "pointing_game"):
        v = gs.evaluate(MODEL, x, a, target=None, metric=metric, mask=s).values
        assert bool(torch.isnan(v[1])) and bool((v[[0, 2]] > 0.9).all()), (metric, v)


# ------------------------------------------------------------------------------------------- similarity functions
def _same(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a = rng.uniform(0, 0.1, size=10)
    return a, a


SPEARMAN_CASES = {  # test_similarity_func.py fixtures -> test_correlation_spearman's expected value
    "atts_same": (lambda r: _same(r), 1.0),
    "atts_same_linear": (lambda r: (lambda a: (a, a * 3))(r.uniform(0, 0.1, size=10)), 1.0),
    "atts_diff": (lambda r: (np.array([0, 1, 0, 1]), np.array([1, 2, 1, 0])), 0.0),
    "atts_half": (lambda r: (np.array([-1, 1, 1]), np.array([0, 0, 2])), 0.5),
    "atts_inverse": (lambda r: (lambda a: (a, a * -3))(r.uniform(0, 0.1, size=10)), -1.0),
}


@pytest.mark.parametrize("case", list(SPEARMAN_CASES))
def test_correlation_spearman(case):
    # test_similarity_func.py::test_correlation_spearman: round(spearman(a, b), 2) == expected.
    make, expected = SPEARMAN_CASES[case]
    a, b = make(np.random.default_rng(1))
    rho = spearman(torch.as_tensor(a, dtype=torch.float64)[None], torch.as_tensor(b, dtype=torch.float64)[None])
    assert round(float(rho[0]), 2) == expected
    assert abs(float(rho[0]) - expected) < 1e-12  # these are exact


def test_ssim_same_and_different():
    # test_similarity_func.py::test_ssim: atts_ssim_same (a 1-D map of 10 values against itself) -> 1.0;
    # atts_ssim_diff (zeros(16, 16) against ones(16, 16)) -> 0.0. Quantus uses the maps as they are with the
    # pair's joint value range: our normalize=False. A 1-D map is (N, 1, D) here.
    a = torch.from_numpy(np.random.default_rng(2).uniform(0, 0.1, size=10))[None, None]
    for normalize in (False, True):
        assert round(float(ssim(a, a, normalize=normalize)[0]), 2) == 1.0
    zeros, ones = torch.zeros(1, 16, 16), torch.ones(1, 16, 16)
    assert round(float(ssim(zeros, ones, normalize=False)[0]), 2) == 0.0
    # documented difference: min-max scaling makes both constant maps all-zero, hence identical
    assert float(ssim(zeros, ones)[0]) == 1.0


@pytest.mark.peer
@pytest.mark.parametrize("shape", [(2, 28, 28), (2, 9, 11), (2, 1, 30)], ids=["28x28", "9x11", "1-D"])
def test_ssim_equals_skimage(shape):
    """Live: ``skimage.metrics.structural_similarity(..., gaussian_weights=True, use_sample_covariance=True)``
    (what Quantus' ``ssim`` and Adebayo et al.'s code call) on min-max scaled maps, and on raw maps with the
    joint data range (Quantus' call)."""
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(*shape, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.rand(*shape, generator=g, dtype=torch.float64) - 0.5
    squeeze = (lambda t: t[0]) if shape[1] == 1 else (lambda t: t)

    def sk(x: torch.Tensor, y: torch.Tensor, data_range: float) -> float:
        return float(metrics.structural_similarity(squeeze(x).numpy(), squeeze(y).numpy(), win_size=7,
                                                   gaussian_weights=True, use_sample_covariance=True,
                                                   data_range=data_range))

    def scale(m: torch.Tensor) -> torch.Tensor:
        return (m - m.min()) / (m.max() - m.min())

    want = torch.tensor([sk(scale(a[i]), scale(b[i]), 1.0) for i in range(shape[0])], dtype=torch.float64)
    torch.testing.assert_close(ssim(a, b), want, rtol=0, atol=1e-12)
    rng = [float(torch.cat([a[i], b[i]]).max() - torch.cat([a[i], b[i]]).min()) for i in range(shape[0])]
    want_raw = torch.tensor([sk(a[i], b[i], rng[i]) for i in range(shape[0])], dtype=torch.float64)
    torch.testing.assert_close(ssim(a, b, normalize=False), want_raw, rtol=0, atol=1e-12)
