"""Deletion and insertion (Petsiuk et al. 2018): closed forms on a linear model, a slow loop on a CNN with
channels (pixels move with all their channels), chunking, and what a good map must beat."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_models import Linear1, tiny_cnn

import gradsense.evaluation as ev
from gradsense.targets import RegressionOutput
from helpers import CountingModule, assert_model_unchanged


def _x(n=4, d=7, seed=2):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _closed_form_curve(w, b, x, order, counts, mode):
    """f after removing (deletion) / keeping only (insertion) the first k features of ``order``, zero baseline."""
    out = []
    for k in counts:
        top = set(order[:k])
        keep = [j for j in range(len(x)) if (j not in top) == (mode == "deletion")]
        out.append(b + sum(w[j] * x[j] for j in keep))
    return np.array(out)


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_curves_of_a_known_map_on_a_linear_model_are_the_closed_form(mode):
    model, x = Linear1(7), _x()
    a = x * model.w.detach()  # the exact contribution of each feature
    fn = ev.deletion if mode == "deletion" else ev.insertion
    r = fn(model, x, a, target=RegressionOutput(0), probability=False, baseline="zeros")
    w, b = model.w.detach().numpy(), float(model.b.detach())
    counts = list(range(8))  # steps = min(D, 50) = 7: one feature per step
    for i in range(x.shape[0]):
        order = list(np.argsort(-a[i].numpy(), kind="stable"))
        want = _closed_form_curve(w, b, x[i].numpy(), order, counts, mode)
        torch.testing.assert_close(r.curves[i], torch.from_numpy(want), rtol=1e-12, atol=1e-12)
        fr = np.array(counts) / 7
        auc = float(np.sum((want[1:] + want[:-1]) / 2 * np.diff(fr)))  # trapezoid, written out
        assert abs(float(r.values[i]) - auc) < 1e-12
    torch.testing.assert_close(r.fractions, torch.arange(8, dtype=torch.float64) / 7)
    assert r.higher_is_better == (mode == "insertion")


def test_steps_coarser_than_units_remove_rounded_counts():
    model, x = Linear1(7), _x(n=2)
    a = x * model.w.detach()
    r = ev.deletion(model, x, a, target=RegressionOutput(0), probability=False, steps=3)
    counts = [round(t * 7 / 3) for t in range(4)]  # 0, 2, 5, 7
    w, b = model.w.detach().numpy(), float(model.b.detach())
    for i in range(2):
        order = list(np.argsort(-a[i].numpy(), kind="stable"))
        want = _closed_form_curve(w, b, x[i].numpy(), order, counts, "deletion")
        torch.testing.assert_close(r.curves[i], torch.from_numpy(want), rtol=1e-12, atol=1e-12)


def test_pixels_are_removed_with_all_their_channels_against_a_slow_loop():
    model = tiny_cnn()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64)
    a = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    r = ev.deletion(model, x, a, target=y, steps=16, chunk_size=5)
    with torch.no_grad():
        for i in range(3):
            pix = a[i].sum(0).reshape(-1)
            order = torch.sort(-pix, stable=True).indices.tolist()
            for k in range(17):
                xi = x[i].clone().reshape(2, -1)
                xi[:, order[:k]] = 0.0
                p = torch.softmax(model(xi.reshape(1, 2, 4, 4)), 1)[0, y[i]]
                assert abs(float(r.curves[i, k]) - float(p)) < 1e-12


def test_insertion_starts_from_a_blurred_image_and_ends_at_the_input():
    model = tiny_cnn()
    x = torch.rand(2, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([1, 0])
    a = torch.rand_like(x)
    r = ev.insertion(model, x, a, target=y)
    from gradsense.attribution import make_baseline

    with torch.no_grad():
        p_in = torch.softmax(model(x), 1)[torch.arange(2), y]
        p_blur = torch.softmax(model(make_baseline("blur", x)), 1)[torch.arange(2), y]
    torch.testing.assert_close(r.curves[:, -1], p_in, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.curves[:, 0], p_blur, rtol=1e-12, atol=1e-12)


def test_the_true_contributions_beat_their_reverse_order():
    model, x = Linear1(7), _x(n=6)
    a = x * model.w.detach()
    good = ev.deletion(model, x, a, target=RegressionOutput(0), probability=False)
    bad = ev.deletion(model, x, -a, target=RegressionOutput(0), probability=False)
    assert bool((good.values < bad.values).all())


def test_chunked_equals_unchunked_and_model_unchanged(cnn_case):
    c = cnn_case
    a = torch.randn(c.x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with assert_model_unchanged(c.model):
        full = ev.deletion(c.model, c.x, a, target=c.y)
        small = ev.deletion(c.model, c.x, a, target=c.y, chunk_size=7)
    torch.testing.assert_close(small.curves, full.curves, rtol=1e-12, atol=1e-14)


def test_cam_shaped_maps_are_accepted():
    model = tiny_cnn()
    x = torch.rand(2, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = torch.rand(2, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.tensor([1, 0])
    full = ev.deletion(model, x, a.sum(1, keepdim=True).expand_as(x) / 2, target=y)
    cam = ev.deletion(model, x, a.sum(1), target=y)  # (N, H, W), as Grad-CAM returns
    torch.testing.assert_close(cam.curves, full.curves, rtol=1e-12, atol=1e-14)


def test_bad_input_is_refused_before_any_forward():
    model, x = Linear1(7), _x()
    counting = CountingModule(model)
    with pytest.raises(ValueError, match="steps=9 is more than the 7 features"):
        ev.deletion(counting, x, x, target=RegressionOutput(0), steps=9)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        ev.insertion(counting, x, x, target=RegressionOutput(0), steps=0)
    with pytest.raises(ValueError, match="unit must be"):
        ev.deletion(counting, x, x, target=RegressionOutput(0), unit="patch")
    with pytest.raises(ValueError, match="unit='pixel' needs images"):
        ev.deletion(counting, x, x, target=RegressionOutput(0), unit="pixel")
    with pytest.raises(ValueError, match="attributions have shape"):
        ev.deletion(counting, x, x[:, :2], target=RegressionOutput(0))
    assert counting.sizes == []
