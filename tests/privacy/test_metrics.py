"""PSNR and SSIM against scikit-image where installed, and against closed forms always."""

from __future__ import annotations

import math

import pytest
import torch

from gradsense.privacy.metrics import label_accuracy, match, psnr, ssim, ssim_sigma


def _pair(shape, seed=0, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=torch.float64)
    return a, (a + noise * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)


def test_psnr_closed_form():
    a = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    b = a + torch.tensor([0.1, 0.01], dtype=torch.float64).view(2, 1, 1, 1)
    torch.testing.assert_close(psnr(a, b), torch.tensor([20.0, 40.0], dtype=torch.float64))
    torch.testing.assert_close(psnr(a, b, data_range=2.0), torch.tensor([20 + 20 * math.log10(2), 40 + 20 * math.log10(2)],
                                                                      dtype=torch.float64))
    assert math.isinf(float(psnr(a, a)[0]))


def test_ssim_closed_forms():
    a, _ = _pair((3, 3, 16, 16))
    torch.testing.assert_close(ssim(a, a), torch.ones(3, dtype=torch.float64))
    # constant images: variances and covariance vanish, SSIM = (2 mx my + C1) / (mx^2 + my^2 + C1)
    x = torch.full((1, 1, 12, 12), 0.3, dtype=torch.float64)
    y = torch.full((1, 1, 12, 12), 0.7, dtype=torch.float64)
    c1 = (0.01 * 1.0) ** 2
    torch.testing.assert_close(ssim(x, y)[0], torch.tensor((2 * 0.21 + c1) / (0.09 + 0.49 + c1), dtype=torch.float64))
    assert ssim_sigma(32, 32) == 1.5 and ssim_sigma(8, 8) == 0.75 and ssim_sigma(6, 6) == 0.5


@pytest.mark.parametrize(("shape", "data_range"), [((3, 3, 32, 32), 1.0), ((2, 1, 8, 8), 1.0), ((2, 3, 11, 17), 2.0)])
def test_psnr_and_ssim_agree_with_scikit_image(shape, data_range):
    metrics = pytest.importorskip("skimage.metrics")
    a, b = _pair(shape)
    a, b = a * data_range, b * data_range
    sigma = ssim_sigma(*shape[-2:])
    ours_p, ours_s = psnr(a, b, data_range), ssim(a, b, data_range)
    for i in range(shape[0]):
        ref_p = metrics.peak_signal_noise_ratio(a[i].numpy(), b[i].numpy(), data_range=data_range)
        ref_s = metrics.structural_similarity(a[i].numpy(), b[i].numpy(), data_range=data_range, channel_axis=0,
                                              gaussian_weights=True, sigma=sigma, use_sample_covariance=False)
        assert abs(float(ours_p[i]) - ref_p) < 1e-10
        assert abs(float(ours_s[i]) - ref_s) < 1e-10


def test_match_undoes_a_permutation_and_labels_count_as_multisets():
    a, _ = _pair((5, 1, 6, 6))
    perm = torch.tensor([3, 0, 4, 1, 2])
    order = match(a, a[perm])
    assert torch.equal(a[perm][order], a)
    assert label_accuracy(torch.tensor([1, 1, 2, 3]), torch.tensor([3, 1, 2, 2])) == 0.75
    assert label_accuracy(torch.tensor([0, 0]), torch.tensor([0, 0])) == 1.0
    assert math.isnan(label_accuracy(torch.tensor([0]), None))


def test_metric_errors():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5))
    with pytest.raises(ValueError, match="at least 5x5"):
        ssim(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
