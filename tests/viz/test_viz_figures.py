"""Figures: structure, colour scales, literal text, input checks and no pyplot state."""

from __future__ import annotations

import io

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle
from PIL import Image

from gradsense.viz import attribution_grid, bar_chart, fig_to_png, line_chart, token_heatmap
from gradsense.viz.figures import PNG_SIGNATURE


def _axes(fig: Figure, label: str) -> list:
    return [ax for ax in fig.axes if ax.get_label() == label]


def _heat(ax) -> AxesImage:
    """The attribution image of an axes: the last one drawn (it overlays the input)."""
    return ax.images[-1]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# --------------------------------------------------------------------------------------- images
@pytest.mark.parametrize(
    ("with_inputs", "colorbar", "expected"),
    [(True, True, 9), (True, False, 6), (False, True, 6), (False, False, 3)],
    ids=["inputs+colorbar", "inputs", "maps+colorbar", "maps"],
)
def test_image_grid_axes_count(gen, with_inputs, colorbar, expected):
    x = torch.rand(3, 1, 8, 8, generator=gen)
    a = torch.randn(3, 1, 8, 8, generator=gen)
    fig = attribution_grid(x if with_inputs else None, a, colorbar=colorbar)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == expected
    assert len(_axes(fig, "attribution")) == 3
    assert len(_axes(fig, "input")) == (3 if with_inputs else 0)


def test_signed_image_colour_limits_are_symmetric_per_example(gen):
    a = torch.randn(4, 1, 6, 6, generator=gen) * torch.tensor([0.1, 1.0, 5.0, 30.0]).view(4, 1, 1, 1)
    fig = attribution_grid(torch.rand(4, 1, 6, 6, generator=gen), a, signed=True)
    heat_axes = _axes(fig, "attribution")
    assert len(heat_axes) == 4
    for i, ax in enumerate(heat_axes):
        m = a[i].abs().max().item()
        vmin, vmax = _heat(ax).get_clim()
        assert vmin == pytest.approx(-m, rel=1e-12)
        assert vmax == pytest.approx(m, rel=1e-12)
        assert _heat(ax).get_cmap().name == "bwr"


def test_unsigned_image_limits_start_at_zero_and_sum_channels(gen):
    a = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)
    fig = attribution_grid(None, a, signed=False, colorbar=False)
    for i, ax in enumerate(_axes(fig, "attribution")):
        m = a[i].abs().sum(0).max().item()
        assert _heat(ax).get_clim() == pytest.approx((0.0, m), rel=1e-12)
        np.testing.assert_allclose(_heat(ax).get_array(), a[i].abs().sum(0).numpy(), rtol=1e-6)


def test_all_zero_map_gets_a_nondegenerate_scale():
    fig = attribution_grid(None, torch.zeros(1, 1, 4, 4), colorbar=False)
    assert _heat(fig.axes[0]).get_clim() == (-1.0, 1.0)
    assert fig_to_png(fig).startswith(PNG_SIGNATURE)


def test_rgb_and_grayscale_inputs_are_shown_as_such(gen):
    rgb = attribution_grid(torch.rand(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen))
    for ax in _axes(rgb, "input"):
        assert ax.images[0].get_array().shape == (8, 8, 3)
        assert 0.0 <= ax.images[0].get_array().min() and ax.images[0].get_array().max() <= 1.0
    gray = attribution_grid(torch.rand(2, 1, 8, 8, generator=gen), torch.randn(2, 1, 8, 8, generator=gen))
    for ax in _axes(gray, "input"):
        assert ax.images[0].get_array().shape == (8, 8)
        assert ax.images[0].get_cmap().name == "gray"


def test_low_resolution_map_is_stretched_over_the_input(gen):
    fig = attribution_grid(torch.rand(1, 3, 28, 28, generator=gen), torch.randn(1, 7, 7, generator=gen))
    (ax,) = _axes(fig, "attribution")
    assert _heat(ax).get_array().shape == (7, 7)
    assert _heat(ax).get_extent() == pytest.approx([-0.5, 27.5, 27.5, -0.5])


def test_max_items_and_titles(gen):
    fig = attribution_grid(None, torch.randn(12, 1, 4, 4, generator=gen), colorbar=False)
    assert len(fig.axes) == 8
    titles = [f"<b>{i}</b> $x_{i}$" for i in range(3)]
    fig = attribution_grid(None, torch.randn(3, 1, 4, 4, generator=gen), titles=titles, max_items=2)
    heat = _axes(fig, "attribution")
    assert len(heat) == 2
    assert heat[0].get_title() == r"<b>0</b> \$x_0\$"  # literal: the "$" cannot start mathtext
    fig_to_png(fig)


# --------------------------------------------------------------------------------------- features
def test_tabular_grid_shows_top_k_features_largest_on_top(gen):
    a = torch.randn(3, 12, generator=gen)
    names = [f"feat_{j}" for j in range(12)]
    fig = attribution_grid(None, a, feature_names=names, top_k=5)
    axes = _axes(fig, "attribution")
    assert len(fig.axes) == len(axes) == 3
    for i, ax in enumerate(axes):
        assert len(ax.patches) == 5
        labels = [t.get_text() for t in ax.get_yticklabels()]
        expected = [names[j] for j in a[i].abs().argsort(descending=True)[:5].tolist()][::-1]
        assert labels == expected
        widths = sorted(abs(p.get_width()) for p in ax.patches)
        np.testing.assert_allclose(widths, np.sort(a[i].abs().numpy())[-5:], rtol=1e-6)


def test_tabular_labels_show_input_values_and_single_example_is_accepted(gen):
    x = torch.tensor([0.5, -2.0, 3.25])
    fig = attribution_grid(x, torch.tensor([0.1, -0.9, 0.4]), feature_names=["a", "b", "c"])
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a = 0.5", "c = 3.25", "b = -2"]


@pytest.mark.parametrize(
    ("inputs", "attrs", "kwargs", "match"),
    [
        (torch.rand(2, 1, 4, 4), torch.rand(3, 1, 4, 4), {}, "same number of examples"),
        (None, torch.rand(2, 1, 1, 4, 4), {}, "token_heatmap"),
        (None, torch.rand(3, 1, 4, 4), {"titles": ["one"]}, "titles"),
        (None, torch.rand(2, 5), {"feature_names": ["a"]}, "feature_names"),
        (torch.rand(2, 4), torch.rand(2, 5), {}, "shape"),
        (None, torch.rand(2, 5), {"max_items": 0}, "max_items"),
        (None, torch.rand(2, 5), {"top_k": 0}, "top_k"),
    ],
    ids=["batch", "ndim", "titles", "feature-names", "feature-shape", "max-items", "top-k"],
)
def test_attribution_grid_rejects_bad_arguments(inputs, attrs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attribution_grid(inputs, attrs, **kwargs)


def test_non_float32_and_numpy_inputs_are_accepted(gen):
    a = torch.randn(2, 1, 4, 4, generator=gen)
    fig = attribution_grid(np.random.default_rng(0).random((2, 1, 4, 4)), a.to(torch.bfloat16))
    m = a[0].to(torch.bfloat16).abs().max().item()
    assert _heat(_axes(fig, "attribution")[0]).get_clim() == pytest.approx((-m, m))


# --------------------------------------------------------------------------------------- tokens
def test_token_heatmap_draws_one_box_per_token_literally():
    tokens = ["The", "price", "is", "$5", "or", "$\\frac{", "[SEP]"] * 4
    scores = torch.linspace(-1.0, 2.0, len(tokens))
    fig = token_heatmap(tokens, scores, title="tokens $")
    (ax,) = [a for a in fig.axes if a.get_label() == "tokens"]
    boxes = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(boxes) == len(tokens)
    assert [t.get_text() for t in ax.texts] == tokens
    # the largest score is the most saturated red of bwr, the colour scale is symmetric
    assert boxes[-1].get_facecolor() == pytest.approx(plt.get_cmap("bwr")(1.0))
    assert boxes[0].get_facecolor() == pytest.approx(plt.get_cmap("bwr")(0.25))
    assert fig_to_png(fig).startswith(PNG_SIGNATURE)  # "$\frac{" would break mathtext


def test_token_heatmap_wraps_long_text():
    tokens = ["token"] * 60
    fig = token_heatmap(tokens, np.ones(60), line_chars=40, colorbar=False)
    (ax,) = fig.axes
    lines = {round(p.get_y()) for p in ax.patches}
    assert len(lines) > 1
    assert max(p.get_x() + p.get_width() for p in ax.patches) <= 40


@pytest.mark.parametrize(
    ("tokens", "scores", "match"),
    [(["a", "b"], [1.0], "one score per token"), ([], [], "empty"), (["a"], [[1.0], [2.0]], "1-D")],
    ids=["length", "empty", "ndim"],
)
def test_token_heatmap_rejects_bad_arguments(tokens, scores, match):
    with pytest.raises(ValueError, match=match):
        token_heatmap(tokens, scores)


# --------------------------------------------------------------------------------------- charts
def test_bar_chart_bars_order_scale_and_errors():
    labels = ["layer1", "layer2.conv", "cost $5 $\\frac{", "fc"]
    fig = bar_chart(
        labels, [4.0, 2.0, 1.0, 0.5], title="importance", xlabel="score", log=True, errors=[0.1] * 4
    )
    (ax,) = fig.axes
    assert len(ax.patches) == 4
    assert [p.get_width() for p in ax.patches] == [4.0, 2.0, 1.0, 0.5]
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() == "score" and ax.get_title() == "importance"
    # first label at the top
    top = min(ax.patches, key=lambda p: p.get_y() if ax.yaxis_inverted() else -p.get_y())
    assert top.get_width() == 4.0
    assert fig_to_png(fig).startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"labels": ["a", "b"], "values": [1.0]}, "one value per label"),
        ({"labels": [], "values": []}, "at least one"),
        ({"labels": ["a", "b"], "values": [1.0, -1.0], "log": True}, "positive"),
        ({"labels": ["a", "b"], "values": [1.0, 2.0], "errors": [1.0]}, "errors"),
    ],
    ids=["length", "empty", "log-negative", "errors-shape"],
)
def test_bar_chart_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bar_chart(**kwargs)


def test_line_chart_one_line_per_series():
    x = np.arange(1, 11)
    fig = line_chart(
        x, {"train": x**2.0, "val $": torch.arange(1, 11)}, title="t", xlabel="step", ylabel="loss", logy=True
    )
    (ax,) = fig.axes
    assert len(ax.lines) == 2
    np.testing.assert_allclose(ax.lines[0].get_ydata(), x**2.0)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", r"val \$"]
    assert ax.get_yscale() == "log"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "loss")


def test_line_chart_rejects_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        line_chart([1, 2], {})
    with pytest.raises(ValueError, match="'b' has 3 values"):
        line_chart([1, 2], {"a": [1, 2], "b": [1, 2, 3]})


# --------------------------------------------------------------------------------------- PNG and state
def test_fig_to_png_is_a_valid_png():
    fig = bar_chart(["a", "b"], [1.0, 2.0])
    png = fig_to_png(fig, dpi=50)
    assert png.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(png)) as im:
        im.verify()
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.width > 50 and im.height > 20
    with Image.open(io.BytesIO(fig_to_png(fig, dpi=100))) as big:
        assert big.width > im.width  # dpi is honoured


def test_fig_to_png_rejects_bad_arguments():
    with pytest.raises(TypeError, match="Figure"):
        fig_to_png(b"not a figure")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dpi"):
        fig_to_png(Figure(), dpi=0)


def test_fig_to_png_close_releases_pyplot_figures():
    fig = plt.figure()
    fig.add_subplot().plot([1, 2, 3])
    assert fig.number in plt.get_fignums()
    fig_to_png(fig, close=True)
    assert fig.number not in plt.get_fignums()


def test_figure_functions_leave_no_pyplot_state(gen):
    before = plt.get_fignums()
    figs = [
        attribution_grid(torch.rand(2, 1, 4, 4, generator=gen), torch.randn(2, 1, 4, 4, generator=gen)),
        attribution_grid(None, torch.randn(2, 6, generator=gen)),
        token_heatmap(["a", "b"], [1.0, -1.0]),
        bar_chart(["a"], [1.0]),
        line_chart([0, 1], {"a": [0, 1]}),
    ]
    for fig in figs:
        fig_to_png(fig)
    assert plt.get_fignums() == before
