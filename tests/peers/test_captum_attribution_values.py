"""captum's own expected attribution values, checked against gradsense (captum itself is not needed).

Every test names the captum test it ports (pytorch/captum at commit faac087, 2025-10-02) and uses captum's
hand-set models from ``captum/testing/helpers/basic_models.py`` (re-implemented in ``captum_models.py``).
Tolerances are captum's own (``assertTensorAlmostEqual(delta=..., mode=...)``) unless a closed form allows a
tighter one. Conventions that differ, and the gradsense option that matches captum:

- Saliency: captum's default is ``abs=True``; gradsense's is the signed gradient (``abs=True`` matches).
- NoiseTunnel ``stdevs`` is an absolute standard deviation: gradsense's ``sigma=`` (``noise_level`` is relative).
- ``riemann_trapezoid``: same points, but captum's weights sum to ``(n-1)/n`` and gradsense's to 1 (documented in
  :func:`gradsense.attribution.quadrature`); every other rule has captum's points and weights.
- LayerGradCam: captum's default is the signed map (``relu_attributions=False``): gradsense ``relu=False``;
  captum's ``attribute_to_layer_input=True`` is the output of an ``nn.Identity`` placed before the layer.
- Multi-input models take one tensor here (:class:`captum_models.Packed`); a constant forward argument that is
  one tensor per example becomes extra input columns whose IG baseline is the value itself, so the path never
  moves them and their attribution is exactly 0.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from captum_models import (
    BasicModel,
    BasicModel2,
    BasicModel3,
    BasicModel4_MultiArgs,
    BasicModel5_MultiArgs,
    BasicModel6_MultiTensor,
    BasicModel_ConvNet_One_Conv,
    BasicModel_MultiLayer,
    Packed,
)
from torch import nn

import gradsense as gs
from gradsense.attribution import quadrature
from gradsense.targets import RegressionOutput

OUT = RegressionOutput()  # captum's target=None on a (n,) output
RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def _max_close(actual: torch.Tensor, expected, delta: float) -> None:
    """captum's ``assertTensorAlmostEqual(actual, expected, delta, mode="max")``: every element within delta."""
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert float((actual - expected).abs().max()) <= delta, (actual, expected)


def _ig(model: nn.Module, x: torch.Tensor, rule: str, steps: int = 500, target=OUT, **options):
    return gs.attribute(model, x, target=target, method="integrated_gradients", steps=steps, rule=rule, **options)


# ------------------------------------------------------------------------------------ saliency, input x gradient
def test_saliency_basic_config_abs():
    # tests/attr/test_saliency.py::test_saliency_test_basic_vanilla (get_basic_config: BasicModel, grads
    # [-0, -0, -0, 1, 1, -0], expected |grads|, delta 0.5 mode max); captum's Saliency defaults to abs=True.
    x = torch.tensor([1.0, 2.0, 3.0, 0.0, -1.0, 7.0]).reshape(6, 1)
    expected = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.0]).reshape(6, 1)
    a = gs.attribute(BasicModel(), x, target=OUT, method="saliency", abs=True)
    _max_close(a.attributions, expected, 0.5)
    torch.testing.assert_close(a.attributions, expected, rtol=0, atol=0)  # exact: piecewise-linear model


def test_input_x_gradient_basic_config():
    # tests/attr/test_input_x_gradient.py::test_input_x_gradient_test_basic_vanilla: expected grads * input
    # (delta 0.05 mode max) = [0, 0, 0, 0, -1, 0].
    x = torch.tensor([1.0, 2.0, 3.0, 0.0, -1.0, 7.0]).reshape(6, 1)
    a = gs.attribute(BasicModel(), x, target=OUT, method="input_x_gradient")
    _max_close(a.attributions, torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0, 0.0]).reshape(6, 1), 0.05)


@pytest.mark.filterwarnings("ignore:.*every attribution is exactly zero")  # an all-zero map is expected here
@pytest.mark.parametrize("kind", ["smoothgrad", "vargrad"])
def test_saliency_noise_tunnel_basic_config(kind):
    # tests/attr/test_saliency.py::test_saliency_test_basic_smoothgrad / _vargrad: NoiseTunnel(Saliency),
    # nt_samples=10, stdevs=2e-7 (absolute: our sigma=). captum checks only the shape; away from the kink at
    # x = 1 the noise cannot change the gradient, so the map is the plain |gradient| (smoothgrad) or 0 (vargrad).
    x = torch.tensor([2.0, 3.0, 0.0, -1.0, 7.0]).reshape(5, 1)
    a = gs.attribute(BasicModel(), x, target=OUT, method=kind, n_samples=10, sigma=2e-7,
                     base_options={"abs": True})
    expected = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0]).reshape(5, 1) if kind == "smoothgrad" else torch.zeros(5, 1)
    torch.testing.assert_close(a.attributions, expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ integrated gradients
def test_quadrature_points_and_weights_match_captum_riemann_builders():
    # tests/attr/test_approximation_methods.py::test_riemann_2 / _3 / _4 (delta 0.05 mode max; ours exact).
    expected = {
        2: ([0.5, 0.5], [0.25, 0.25], [0.0, 0.5], [0.5, 1.0], [0.25, 0.75], [0.0, 1.0]),
        3: ([1 / 3] * 3, [1 / 6, 1 / 3, 1 / 6], [0.0, 1 / 3, 2 / 3], [1 / 3, 2 / 3, 1.0], [1 / 6, 0.5, 5 / 6],
            [0.0, 0.5, 1.0]),
        4: ([1 / 4] * 4, [1 / 8, 1 / 4, 1 / 4, 1 / 8], [0.0, 0.25, 0.5, 0.75], [0.25, 0.5, 0.75, 1.0],
            [0.125, 0.375, 0.625, 0.875], [0.0, 1 / 3, 2 / 3, 1.0]),
    }
    for n, (w_lrm, w_trap, left, right, middle, trap) in expected.items():
        for rule, alphas in (("riemann_left", left), ("riemann_right", right), ("riemann_middle", middle)):
            a, w = quadrature(rule, n)
            torch.testing.assert_close(torch.from_numpy(a), torch.tensor(alphas, dtype=torch.float64))
            torch.testing.assert_close(torch.from_numpy(w), torch.tensor(w_lrm, dtype=torch.float64))
        a, w = quadrature("riemann_trapezoid", n)
        torch.testing.assert_close(torch.from_numpy(a), torch.tensor(trap, dtype=torch.float64))
        # deliberate difference: captum's trapezoid weights sum to (n-1)/n; ours are captum's times n/(n-1),
        # the trapezoid rule on n points over [0, 1] (weights sum to 1, a constant integrand is exact)
        torch.testing.assert_close(torch.from_numpy(w), torch.tensor(w_trap, dtype=torch.float64) * n / (n - 1))
        assert abs(float(w.sum()) - 1.0) < 1e-15


@pytest.mark.parametrize("model_cls", [BasicModel2, BasicModel3])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("multiply_by_inputs", [True, False])
def test_ig_sundararajan_examples(model_cls, rule, multiply_by_inputs):
    # tests/attr/test_integrated_gradients_basic.py::test_multivariable_vanilla (riemann_right) and
    # ::test_multivariable_vanilla_wo_mutliplying_by_inputs: inputs (3, 1), baselines (0, 0), n_steps=500,
    # expected [1.5, -0.5] ([0.5, -0.5] without the input factor), delta 0.05 mode max, |convergence delta|
    # < 0.07. Run here for every rule (captum's other tests use the other rules on the same models).
    model = Packed(model_cls(), [1, 1], scalar=True)
    r = _ig(model, torch.tensor([[3.0, 1.0]]), rule, multiply_by_inputs=multiply_by_inputs)
    expected = [[1.5, -0.5]] if multiply_by_inputs else [[0.5, -0.5]]
    _max_close(r.attributions, expected, 0.05)
    assert float(r.tensors["delta"].abs().max()) < 0.07
    if rule != "riemann_left":  # the left rule puts a point on the kink at alpha = 1/2, where relu' = 0
        _max_close(r.attributions, expected, 1e-5)


def test_ig_implementation_invariance_of_the_two_examples():
    # tests/attr/test_integrated_gradients_basic.py::_assert_multi_variable: "Verifies implementation
    # invariance" - BasicModel2 and BasicModel3 are the same function, so the attribution sums are equal.
    x = torch.tensor([[3.0, 1.0]])
    s2 = _ig(Packed(BasicModel2(), [1, 1], scalar=True), x, "riemann_right").attributions.sum()
    s3 = _ig(Packed(BasicModel3(), [1, 1], scalar=True), x, "riemann_right").attributions.sum()
    torch.testing.assert_close(s2, s3)


@pytest.mark.filterwarnings("ignore:.*every attribution is exactly zero")  # an all-zero map is expected here
@pytest.mark.parametrize("rule", RULES)
def test_ig_univariable_completeness(rule):
    # tests/attr/test_integrated_gradients_basic.py::test_univariable_vanilla (and its rule variants):
    # BasicModel at x = 1 (baseline 0), x = 0 (baseline 0), x = -1 (baseline 1e-5); |delta| < 0.07.
    model = BasicModel()
    for x, b in ((1.0, 0.0), (0.0, 0.0), (-1.0, 0.00001)):
        r = _ig(model, torch.tensor([[x]]), rule, baseline=b)
        assert float(r.tensors["delta"].abs().max()) < 0.07, (rule, x, r.tensors["delta"])


@pytest.mark.filterwarnings("ignore:.*every attribution is exactly zero")  # captum's case is flat there
@pytest.mark.parametrize("rule", RULES)
def test_ig_multi_argument_completeness(rule):
    # tests/attr/test_integrated_gradients_basic.py::test_multi_argument_vanilla (and its rule variants):
    # BasicModel4_MultiArgs and BasicModel5_MultiArgs, n_steps=500, |delta| < 0.07 for every example.
    x1 = torch.tensor([[1.5, 2.0, 34.3]])
    x2 = torch.tensor([[3.0, 3.5, 23.2]])
    # case 1: one example, additional_forward_args = arange(1, 4) as (1, 3), baselines (0, zeros)
    x3 = torch.arange(1.0, 4.0).reshape(1, 3)
    m4 = Packed(BasicModel4_MultiArgs(), [3, 3, 3])  # x3 rides along as fixed columns
    r = _ig(m4, torch.cat([x1, x2, x3], 1), rule, baseline=torch.cat([torch.zeros(1, 6), x3], 1))
    assert float(r.tensors["delta"].abs().max()) < 0.07
    assert float(r.attributions[:, 6:].abs().max()) == 0.0
    # case 2: two examples, additional args (arange(1, 7) as (2, 3), 1), baselines (zeros, 0)
    x1 = torch.tensor([[1.5, 2.0, 34.3], [3.4, 1.2, 2.0]])
    x2 = torch.tensor([[3.0, 3.5, 23.2], [2.3, 1.2, 0.3]])
    x3 = torch.arange(1.0, 7.0).reshape(2, 3)
    m4b = Packed(BasicModel4_MultiArgs(), [3, 3, 3], extra=lambda: (1,))
    r = _ig(m4b, torch.cat([x1, x2, x3], 1), rule, baseline=torch.cat([torch.zeros(2, 6), x3], 1))
    assert float(r.tensors["delta"].abs().max()) < 0.07
    # cases 3-4: BasicModel5_MultiArgs with ([2, 3], 1); baselines (0, 1e-5) and (zeros(1, 3), 1e-5)
    m5 = Packed(BasicModel5_MultiArgs(), [3, 3], extra=lambda: ([2, 3], 1))
    base = torch.cat([torch.zeros(1, 3), torch.full((1, 3), 0.00001)], 1)
    r = _ig(m5, torch.cat([x1, x2], 1), rule, baseline=base)
    assert float(r.tensors["delta"].abs().max()) < 0.07


@pytest.mark.parametrize("rule", RULES)
def test_ig_multi_tensor_and_batched_completeness(rule):
    # tests/attr/test_integrated_gradients_basic.py::test_multi_tensor_input_vanilla (BasicModel6_MultiTensor)
    # and ::test_batched_input_vanilla / ::test_batched_multi_input_vanilla (BasicModel_MultiLayer, target 0):
    # |delta| < 0.07, zero baselines, n_steps=500.
    m6 = Packed(BasicModel6_MultiTensor(), [3, 3])
    r = _ig(m6, torch.tensor([[1.5, 2.0, 3.3, 3.0, 3.5, 2.2]]), rule)
    assert float(r.tensors["delta"].abs().max()) < 0.07
    net = BasicModel_MultiLayer()
    x = torch.tensor([[1.5, 2.0, 1.3], [0.5, 0.1, 2.3], [1.5, 2.0, 1.3]])
    r = _ig(net, x, rule, target=0)
    assert float(r.tensors["delta"].abs().max()) < 0.07
    two = Packed(nn.Identity(), [3, 3])  # (x1, x2) -> BasicModel_MultiLayer(x1, add_input=x2)
    two.inner = _TwoInput(net)
    x1 = torch.tensor([[1.5, 2.1, 1.9], [0.5, 0.0, 0.7], [1.5, 2.1, 1.1]])
    x2 = torch.tensor([[0.3, 1.9, 2.4], [0.5, 0.6, 2.1], [1.2, 2.1, 0.2]])
    r = _ig(two, torch.cat([x1, x2], 1), rule, target=0)
    assert float(r.tensors["delta"].abs().max()) < 0.07


class _TwoInput(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.net(x1, x2)


def test_ig_batched_equals_per_example():
    # tests/attr/test_integrated_gradients_basic.py::_compute_attribution_batch_helper_evaluate: attributions of
    # a batch equal those of each example alone (delta 0.05 mode max); sums of |delta| agree within 0.005.
    net = BasicModel_MultiLayer()
    x = torch.tensor([[1.5, 2.0, 1.3], [0.5, 0.1, 2.3], [1.5, 2.0, 1.3]])
    for chunk in (None, 10, 20):  # captum's internal_batch_size in [None, 10, 20]
        batch = _ig(net, x, "gausslegendre", steps=100, target=0, chunk_size=chunk)
        total = 0.0
        for i in range(3):
            one = _ig(net, x[i:i + 1], "gausslegendre", steps=100, target=0, chunk_size=chunk)
            _max_close(batch.attributions[i:i + 1], one.attributions, 0.05)
            total += float(one.tensors["delta"].abs().sum())
        assert abs(float(batch.tensors["delta"].abs().sum()) - total) < 0.005


@pytest.mark.filterwarnings("ignore:.*every attribution is exactly zero")  # an all-zero map is expected here
@pytest.mark.parametrize("kind,expected", [("smoothgrad", [[1.5, -0.5]]), ("smoothgrad_sq", [[2.25, 0.25]]),
                                           ("vargrad", [[0.0, 0.0]])])
def test_noise_tunnel_of_ig_with_tiny_noise(kind, expected):
    # tests/attr/test_integrated_gradients_basic.py::test_multivariable_smoothgrad / _smoothgrad_sq / _vargrad:
    # NoiseTunnel(IG), nt_samples=5, stdevs=2e-8 (our sigma=), n_steps=500 on BasicModel2 at (3, 1). captum
    # checks each sample's delta (< 0.07); with noise this small every sample is the vanilla map [1.5, -0.5],
    # so the mean, the mean of squares and the variance are known.
    model = Packed(BasicModel2(), [1, 1], scalar=True)
    a = gs.attribute(model, torch.tensor([[3.0, 1.0]]), target=OUT, method=kind, n_samples=5, sigma=2e-8,
                     base="integrated_gradients", base_options={"steps": 500, "rule": "riemann_right"})
    _max_close(a.attributions, expected, 1e-4)


def test_noise_tunnel_of_ig_without_input_factor():
    # tests/attr/test_integrated_gradients_basic.py::test_batched_input_smoothgrad_wo_mutliplying_by_inputs:
    # NoiseTunnel(IG(multiply_by_inputs=False)) * inputs == NoiseTunnel(IG), stdevs=0.0, 5 samples, 500 steps.
    net = BasicModel_MultiLayer()
    x = torch.tensor([[1.5, 2.0, 1.3], [0.5, 0.1, 2.3], [1.5, 2.0, 1.3]])
    opts = {"n_samples": 5, "sigma": 0.0, "base": "integrated_gradients"}
    plain = gs.attribute(net, x, target=0, method="smoothgrad", base_options={"steps": 500}, **opts)
    avg = gs.attribute(net, x, target=0, method="smoothgrad",
                       base_options={"steps": 500, "multiply_by_inputs": False}, **opts)
    torch.testing.assert_close(avg.attributions * x, plain.attributions)


def test_expected_gradients_as_gradient_shap_without_noise():
    # tests/attr/test_gradient_shap.py::test_basic_relu_multi_input: GradientShap on BasicModel2 at (3, 1) with
    # baselines (0, 0) equals IG within 0.05 (mode max) and its mean convergence delta is below 0.008.
    # GradientShap with stdevs=0 is Expected Gradients (one random baseline and alpha per sample). captum uses
    # 20000 samples; the delta bound is 1.1 standard errors there, so 200000 samples are drawn here (3.6).
    model = Packed(BasicModel2(), [1, 1], scalar=True)
    x = torch.tensor([[3.0, 1.0]])
    eg = gs.attribute(model, x, target=OUT, method="expected_gradients", references=torch.zeros(1, 2),
                      n_samples=200_000, seed=0)
    _max_close(eg.attributions, [[1.5, -0.5]], 0.05)
    f_x, f_0 = model(x), model(torch.zeros(1, 2))
    assert abs(float(eg.attributions.sum() - (f_x - f_0).sum())) < 0.008


# ------------------------------------------------------------------------------------ layer Grad-CAM
def _flat(t: torch.Tensor) -> torch.Tensor:
    """A Linear layer's (n, C) output as (n, C, 1, 1): captum's LayerGradCam treats it the same way."""
    return t[:, :, None, None]


def test_layer_gradcam_non_conv():
    # tests/attr/layer/test_grad_cam.py::test_simple_input_non_conv: linear0 of BasicModel_MultiLayer,
    # input [0, 100, 0], target 0 -> [[400.0]] (delta 0.01).
    net = BasicModel_MultiLayer()
    r = gs.attribute(net, torch.tensor([[0.0, 100.0, 0.0]]), target=0, method="gradcam", layer="linear0",
                     reshape=_flat, relu=False)
    _max_close(r.tensors["raw"], [[[400.0]]], 0.01)


def test_layer_gradcam_on_a_tuple_output_takes_its_first_tensor():
    # tests/attr/layer/test_grad_cam.py::test_simple_multi_input_non_conv: layer multi_relu returns two tensors;
    # captum's maps are ([[21.0]], [[21.0]]). gradsense reads a layer's first output tensor: [[21.0]].
    net = BasicModel_MultiLayer(multi_input_module=True)
    r = gs.attribute(net, torch.tensor([[0.0, 6.0, 0.0]]), target=0, method="gradcam", layer="multi_relu",
                     reshape=_flat, relu=False)
    _max_close(r.tensors["raw"], [[[21.0]]], 0.01)


CONV_INPUT = torch.arange(16).view(1, 1, 4, 4).float()


@pytest.mark.parametrize("frozen", [False, True])
def test_layer_gradcam_conv(frozen):
    # tests/attr/layer/test_grad_cam.py::test_simple_input_conv and ::test_simple_input_conv_no_grad (parameters
    # with requires_grad=False): conv1 of BasicModel_ConvNet_One_Conv, arange(16) as 4x4, target 0 ->
    # [[11.25, 13.5], [20.25, 22.5]] (delta 0.01).
    net = BasicModel_ConvNet_One_Conv()
    if frozen:
        for p in net.parameters():
            p.requires_grad_(False)
    r = gs.attribute(net, CONV_INPUT, target=0, method="gradcam", layer="conv1", relu=False)
    _max_close(r.tensors["raw"], [[[11.25, 13.5], [20.25, 22.5]]], 0.01)
    assert all(not p.requires_grad for p in net.parameters()) == frozen  # the caller's flags are kept


def test_layer_gradcam_conv_split_channels():
    # tests/attr/layer/test_grad_cam.py::test_simple_input_conv_split_channels (attr_dim_summation=False): the
    # per-channel terms w_c * A_c. gradsense returns the channel weights w (``weights``); A is conv1's output.
    net = BasicModel_ConvNet_One_Conv()
    r = gs.attribute(net, CONV_INPUT, target=0, method="gradcam", layer="conv1", relu=False)
    with torch.no_grad():
        acts = net.conv1(CONV_INPUT)
    per_channel = r.tensors["weights"][:, :, None, None] * acts
    expected = [[[[-3.75, 3.0], [23.25, 30.0]], [[15.0, 10.5], [-3.0, -7.5]]]]
    _max_close(per_channel, expected, 0.01)


def test_layer_gradcam_relu_layer():
    # tests/attr/layer/test_grad_cam.py::test_simple_input_conv_relu: layer relu1 -> [[0, 4], [28, 32.5]].
    net = BasicModel_ConvNet_One_Conv()
    r = gs.attribute(net, CONV_INPUT, target=0, method="gradcam", layer="relu1", relu=False)
    _max_close(r.tensors["raw"], [[[0.0, 4.0], [28.0, 32.5]]], 0.01)


@pytest.mark.parametrize("relu", [False, True])
def test_layer_gradcam_layer_input(relu):
    # tests/attr/layer/test_grad_cam.py::test_simple_input_conv_without_final_relu and
    # ::test_simple_input_conv_fc_with_final_relu: attribute_to_layer_input=True at conv1 (= the model input),
    # input with a -4 at (1, 1): 0.5625 * input, and with relu_attributions=True the negative entry is 0.
    inp = CONV_INPUT.clone()
    inp[0, 0, 1, 1] = -4.0
    wrapped = nn.Sequential(nn.Identity(), BasicModel_ConvNet_One_Conv())  # output of "0" = conv1's input
    r = gs.attribute(wrapped, inp, target=0, method="gradcam", layer="0", relu=relu)
    expected = 0.5625 * inp[:, 0]
    if relu:
        expected[0, 1, 1] = 0.0
    _max_close(r.tensors["raw"], expected, 0.01)


def test_layer_gradcam_two_inputs():
    # tests/attr/layer/test_grad_cam.py::test_simple_multi_input_conv: inputs (arange(16), ones) summed by the
    # model -> [[14.5, 19.0], [32.5, 37.0]]. The second input enters through forward=.
    net = BasicModel_ConvNet_One_Conv()
    r = gs.attribute(net, CONV_INPUT, target=0, method="gradcam", layer="conv1", relu=False,
                     forward=lambda x: net(x, torch.ones_like(x)))
    _max_close(r.tensors["raw"], [[[14.5, 19.0], [32.5, 37.0]]], 0.01)


def test_layer_gradcam_unused_layer_output_is_zero():
    # tests/attr/layer/test_grad_cam.py::test_relu_gradcam_with_unused_layer: net.relu is called but its output
    # is unused -> attribution sum 0 (captum needs grad_kwargs materialize_grads; gradsense gives 0 and warns).
    net = BasicModel_MultiLayer(multi_input_module=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = gs.attribute(net, torch.tensor([[0.0, 6.0, 0.0]]), target=0, method="gradcam", layer="relu",
                         reshape=_flat, relu=False)
    assert r.tensors["raw"].shape == (1, 1, 1) and float(r.tensors["raw"].abs().sum()) == 0.0
    assert any("exactly zero" in str(w.message) for w in caught)


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "integrated_gradients", "smoothgrad"])
def test_inputs_grad_unchanged(method):
    # tests/attr/test_saliency.py::test_saliency_grad_unchanged: an input that requires grad and already holds a
    # .grad keeps it bit for bit (delta=0.0).
    x = torch.tensor([1.0, 2.0, 3.0, 0.0, -1.0, 7.0]).reshape(6, 1).requires_grad_(True)
    x.grad = torch.randn_like(x)
    before = x.grad.detach().clone()
    gs.attribute(BasicModel(), x, target=OUT, method=method)
    torch.testing.assert_close(x.grad, before, rtol=0, atol=0)
    assert x.requires_grad
