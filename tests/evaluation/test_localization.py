"""Localisation on ground truth (Shah et al. 2021): closed forms, random maps fail, the method table."""

from __future__ import annotations

import pytest
import torch

import gradsense as gs
import gradsense.evaluation as ev
from helpers import CountingModule, assert_model_unchanged


@pytest.fixture(scope="module")
def block():
    model = gs.zoo.load("block-digits-cnn")
    data = gs.zoo.dataset("block-digits", "test")
    x, y = data[:24]
    return model, x, y, data.masks[:24]


def test_mass_and_pointing_closed_forms():
    x = torch.zeros(3, 1, 2, 4, dtype=torch.float64)
    mask = torch.zeros_like(x)
    mask[..., :2] = 1  # left half
    a = torch.tensor([[[[1.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]],
                      [[[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]],
                      [[[-3.0, 0.0, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0]]]], dtype=torch.float64)
    model = torch.nn.Identity()
    m = ev.attribution_mass(model, x, a, mask=mask)
    torch.testing.assert_close(m.values, torch.tensor([3 / 4, 1 / 2, 3 / 5.5], dtype=torch.float64))
    torch.testing.assert_close(m.tensors["area"], torch.full((3,), 0.5, dtype=torch.float64))
    pos = ev.attribution_mass(model, x, a, mask=mask, absolute=False)
    torch.testing.assert_close(pos.values[2], torch.tensor(0.0, dtype=torch.float64))  # only positive mass counts
    p = ev.pointing_game(model, x, a, mask=mask)
    # max of ex. 0 at the left (2.0); ex. 1 is constant (ties across the mask: no hit); ex. 2 |-3| on the left
    torch.testing.assert_close(p.values, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))


def test_a_random_map_fails_localisation_and_the_models_gradient_does_not(block):
    model, x, y, mask = block
    rnd = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    r = ev.attribution_mass(model, x, rnd, mask=mask)
    assert abs(r.mean - 0.5) < 3 * r.stderr + 0.01  # the mask's area: chance level
    sal = gs.attribute(model, x, target=y, method="saliency")
    s = ev.evaluate(model, x, sal, target=y, metric="attribution_mass", mask=mask)
    assert s.mean > r.mean + 5 * (s.stderr + r.stderr)


def test_method_table_ranks_and_controls(block):
    model, x, y, mask = block
    x, y, mask = x[:8], y[:8], mask[:8]
    with assert_model_unchanged(model):
        t = ev.method_table(model, x, target=y, mask=mask, methods=["saliency", "gradcam", "eg"], steps=8)
    assert set(t.methods) == {"saliency", "gradcam", "random"}
    assert t.meta["skipped"] == {"expected_gradients": "needs references= (reference inputs)"}
    mass = t.column("mass")
    assert bool((mass[:-1] >= mass[1:]).all())  # ranked
    # each cell is the metric run on its own
    sal = gs.attribute(model, x, target=y, method="saliency")
    i = t.methods.index("saliency")
    assert abs(float(mass[i]) - ev.attribution_mass(model, x, sal, mask=mask).mean) < 1e-12
    d = ev.deletion(model, x, sal, target=y, steps=8)
    assert abs(float(t.column("deletion_auc")[i]) - d.mean) < 1e-6
    header, rows = t.table()
    assert header[:3] == ["rank", "method", "mass in mask"] and len(rows) == 3


def test_mask_errors_come_first(block):
    model, x, y, mask = block
    counting = CountingModule(model)
    a = torch.rand_like(x)
    with pytest.raises(ValueError, match="needs mask="):
        ev.attribution_mass(counting, x, a)
    with pytest.raises(ValueError, match="mask has shape"):
        ev.pointing_game(counting, x, a, mask=mask[:, :, :4])
    with pytest.raises(ValueError, match="only 0/1"):
        ev.attribution_mass(counting, x, a, mask=mask * 0.5)
    with pytest.raises(ValueError, match="unknown attribution method"):
        ev.method_table(counting, x, target=y, mask=mask, methods=["salience"])
    assert counting.sizes == []
