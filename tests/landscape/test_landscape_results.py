"""results.landscape: save/load round trips, summaries and figures (matplotlib Figures, labelled axes)."""

from __future__ import annotations

import pytest
import torch
from landscape_models import make_mlp
from matplotlib.figure import Figure

import gradsense.losses as losses
from gradsense.landscape import interpolate, loss_surface
from gradsense.results import Result


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g)


def test_surface_roundtrip_keeps_tensors_meta_and_directions(tmp_path, data):
    s = loss_surface(make_mlp(), losses.cross_entropy, data, steps=5, seed=0)
    back = Result.load(s.save(tmp_path / "surface"))
    assert type(back).__name__ == "SurfaceResult"
    for k, v in s.tensors.items():
        assert torch.equal(back.tensors[k], v), k
    assert back.center_loss == s.center_loss and back.meta["seed"] == 0
    for da, db in zip(s.directions, back.directions):
        assert set(da) == set(db) and all(torch.equal(da[k], db[k]) for k in da)
    assert back.directions[0]["0.weight"].shape == (5, 4)


def test_surface_summary_names_the_grid_the_model_loss_and_the_minimum(data):
    s = loss_surface(make_mlp(), losses.cross_entropy, data, steps=5, span=0.5, seed=0)
    rows = dict(s.summary())
    assert rows["grid"] == "5 x 5 (25 points), span ±0.5"
    assert rows["loss at the model"] == f"{s.center_loss:.6g}"
    lo, _, _ = s.minimum()
    assert lo == float(s.losses.min()) and rows["grid minimum"].startswith(f"{lo:.6g}")
    assert "accuracy at the model" in rows and rows["directions"] == "filter, biases/BN fixed"


@pytest.mark.parametrize(("kind", "labels"), [("all", ["contour", "surface", "slices"]), ("contour", ["contour"]),
                                              ("surface", ["surface"]), ("slices", ["slices"])])
def test_surface_figures(data, kind, labels):
    s = loss_surface(make_mlp(), losses.cross_entropy, data, steps=5, seed=0)
    fig = s.plot(kind)
    assert isinstance(fig, Figure)
    assert [ax.get_label() for ax in fig.axes if ax.get_label() in labels] == labels
    if "contour" in labels:
        contour = next(ax for ax in fig.axes if ax.get_label() == "contour")
        marks = {line.get_label().split(" ")[0] for line in contour.get_lines()}
        assert {"grid", "model"} <= marks  # the minimum (star) and the model (cross) are marked


def test_one_dimensional_surface_is_a_line_with_accuracy(data):
    s = loss_surface(make_mlp(), losses.cross_entropy, data, steps=7, dims=1, seed=0)
    fig = s.plot()
    assert len(fig.axes) == 2  # loss and accuracy on a twin axis
    with pytest.raises(ValueError, match="kind must be one of"):
        s.plot("heatmap")


def test_interpolation_roundtrip_summary_and_plot(tmp_path, data):
    r = interpolate(make_mlp(0), make_mlp(1), losses.cross_entropy, data, steps=5, names=("init", "final"))
    back = Result.load(r.save(tmp_path / "line"))
    assert type(back).__name__ == "InterpolationResult" and torch.equal(back.losses, r.losses)
    rows = dict(back.summary())
    assert rows["loss at init (t=0)"] == f"{r.meta['loss_a']:.6g}" and "loss barrier" in rows
    fig = back.plot()
    assert fig.axes[0].get_label() == "interpolation"
    assert "<img" in back._repr_html_()
