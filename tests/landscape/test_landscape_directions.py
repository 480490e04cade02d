"""landscape.directions: filter/layer normalisation (Li et al. 2018), determinism, direction checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradsense.landscape import check_directions, filter_normalize, random_directions
from helpers import assert_model_unchanged

TIGHT = {"rtol": 1e-12, "atol": 1e-12}


def _conv_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3),
    ).double().eval()


def test_each_filter_of_the_direction_has_the_norm_of_the_models_filter():
    model = _conv_net()
    with assert_model_unchanged(model):
        (d,) = random_directions(model, n=1, seed=0)
    conv_w, lin_w = model[0].weight.detach(), model[4].weight.detach()
    # conv: one filter per output channel; linear: one per output row
    torch.testing.assert_close(d["0.weight"].flatten(1).norm(dim=1), conv_w.flatten(1).norm(dim=1), **TIGHT)
    torch.testing.assert_close(d["4.weight"].norm(dim=1), lin_w.norm(dim=1), **TIGHT)
    # biases and BatchNorm parameters are zero by default (Li et al. 2018, Sec. 4)
    for name in ("0.bias", "1.weight", "1.bias", "4.bias"):
        assert torch.count_nonzero(d[name]) == 0, name
    # and the direction is not just a copy of the weights
    assert not torch.allclose(d["0.weight"], conv_w)


def test_include_bias_bn_moves_each_one_dimensional_parameter_along_itself():
    # the paper's code (net_plotter.normalize_directions_for_weights): d.copy_(w) when d.dim() <= 1
    model = _conv_net()
    (d,) = random_directions(model, n=1, seed=0, include_bias_bn=True)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            torch.testing.assert_close(d[name], p.detach(), rtol=0, atol=0)


def test_layer_normalisation_rescales_each_tensor_as_a_whole():
    model = _conv_net()
    (d,) = random_directions(model, n=1, seed=0, normalization="layer")
    for name in ("0.weight", "4.weight"):
        p = dict(model.named_parameters())[name].detach()
        torch.testing.assert_close(d[name].norm(), p.norm(), **TIGHT)
    # per filter the norms now differ from the model's (it is not filter normalisation)
    assert not torch.allclose(d["4.weight"].norm(dim=1), model[4].weight.detach().norm(dim=1))


def test_filter_normalize_closed_form_and_zero_filters():
    w = {"weight": torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)}
    d = filter_normalize({"weight": torch.tensor([[1.0, 1.0], [2.0, -1.0]], dtype=torch.float64)}, w)
    expected = torch.tensor([[5 / 2**0.5, 5 / 2**0.5], [0.0, 0.0]], dtype=torch.float64)  # zero filter -> zero
    torch.testing.assert_close(d["weight"], expected, **TIGHT)


def test_directions_are_deterministic_given_the_seed_and_differ_across_seeds():
    model = _conv_net()
    a = random_directions(model, n=2, seed=7)
    b = random_directions(model, n=2, seed=7)
    c = random_directions(model, n=2, seed=8)
    for da, db in zip(a, b):
        for k in da:
            assert torch.equal(da[k], db[k])
    assert not torch.equal(a[0]["4.weight"], c[0]["4.weight"])
    assert not torch.equal(a[0]["4.weight"], a[1]["4.weight"])  # two different directions


def test_seed_none_follows_torch_manual_seed():
    model = _conv_net()
    torch.manual_seed(11)
    a = random_directions(model, n=1)
    torch.manual_seed(11)
    b = random_directions(model, n=1)
    assert torch.equal(a[0]["0.weight"], b[0]["0.weight"])


def test_params_restricts_the_directions_to_the_selected_parameters():
    model = _conv_net()
    (d,) = random_directions(model, n=1, seed=0, params="^4\\.")
    assert set(d) == {"4.weight", "4.bias"}


# ------------------------------------------------------------------------------------------- bad input
def test_check_directions_names_the_parameter_whose_shape_differs():
    ref = {"a.weight": torch.zeros(3, 2), "a.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"'a.weight'.*\(2, 3\).*\(3, 2\)"):
        check_directions([{"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(3)}], ref)


def test_check_directions_missing_extra_flat_nonfinite_and_types():
    ref = {"a.weight": torch.zeros(3, 2), "a.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"missing \['a.bias'\]"):
        check_directions([{"a.weight": torch.zeros(3, 2)}], ref)
    with pytest.raises(ValueError, match="not parameters of the model"):
        check_directions([{"a.weight": torch.zeros(3, 2), "a.bias": torch.zeros(3), "b": torch.zeros(1)}], ref)
    with pytest.raises(ValueError, match="1-D vector of 9 elements"):
        check_directions([torch.zeros(8)], ref)
    with pytest.raises(ValueError, match="NaN/Inf"):
        check_directions([{"a.weight": torch.full((3, 2), float("nan")), "a.bias": torch.zeros(3)}], ref)
    with pytest.raises(TypeError, match="dict or a flat tensor"):
        check_directions([[1.0, 2.0]], ref)
    flat = check_directions([torch.arange(9.0)], ref)[0]  # a flat vector in parameter order
    assert flat["a.bias"].tolist() == [6.0, 7.0, 8.0]


def test_random_directions_bad_arguments():
    model = _conv_net()
    with pytest.raises(ValueError, match="normalization"):
        random_directions(model, normalization="model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive int"):
        random_directions(model, n=0)
    with pytest.raises(TypeError, match="seed"):
        random_directions(model, seed=1.5)  # type: ignore[arg-type]
