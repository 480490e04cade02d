"""captum's own expected values for ``captum.metrics.infidelity`` and ``sensitivity_max``, checked against
``gs.evaluate(metric="infidelity" | "max_sensitivity")`` (captum itself is not needed, except by the one test
marked ``peer``).

Source: pytorch/captum ``tests/metrics/test_infidelity.py`` and ``tests/metrics/test_sensitivity.py`` (commit
faac087). captum's tolerance is ``assertTensorAlmostEqual(infid, expected, 0.05)``: the *sum* of absolute
differences below 0.05 (``_sum_close``); where a closed form exists the value is also checked tightly.

How captum's arguments map onto gradsense's:

- captum's ``perturb_func`` returns ``(I, x_perturbed)``; gradsense takes the perturbations ``I`` (``(S, N, ...)``,
  sample-major) and evaluates ``f(x - I)``. captum's "global" perturbation functions return ``I = mask`` with
  ``x_perturbed = (1 - mask) * x``: the same numbers are gradsense's ``I = mask * x`` with
  ``multiply_by_inputs=True`` (the map is dotted with ``I / (x - baseline) = mask``).
- ``additional_forward_args`` that add a tensor to the input (``BasicModel_MultiLayer(x, add_input)``) are
  folded into the input (``x + add_input``): the maps, ``f(x)`` and ``f(x - I)`` are unchanged by the shift.
- Tuple targets ``(i, j, k)`` of a multi-dimensional output are a callable target.
"""

from __future__ import annotations

import pytest
import torch
from captum_models import (
    BasicModel2,
    BasicModel4_MultiArgs,
    BasicModel_ConvNet_One_Conv,
    BasicModel_MultiLayer,
    Packed,
)
from torch import nn

import gradsense as gs
from gradsense.targets import RegressionOutput

OUT = RegressionOutput()


def _sum_close(actual: torch.Tensor, expected, delta: float = 0.05) -> None:
    """captum's ``assertTensorAlmostEqual(actual, expected, delta)`` (mode ``"sum"``)."""
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert float((actual - expected).abs().sum()) < delta, (actual, expected)


def _repeat(per_example: torch.Tensor, s: int) -> torch.Tensor:
    """The same perturbation for each of ``s`` samples: ``(S, N, ...)``."""
    return per_example.unsqueeze(0).expand(s, *per_example.shape).clone()


class MultiDim(nn.Module):
    """``BasicModel_MultiLayer(x, None, multidim_output=True)``: output ``(n, 2, 2, 2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = BasicModel_MultiLayer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, None, True)


def tuple_target(targets: list[tuple[int, int, int]]):
    t = torch.tensor(targets)

    def pick(out: torch.Tensor, batch) -> torch.Tensor:
        i = t[batch.index]
        return out[torch.arange(out.shape[0]), i[:, 0], i[:, 1], i[:, 2]]

    return pick


TPL = [(0, 1, 1), (0, 1, 1), (1, 1, 1), (0, 1, 1)]


# ------------------------------------------------------------------------------------------- infidelity
@pytest.mark.parametrize("n", [1, 3])
def test_basic_infidelity_single_and_multiple(n):
    # test_infidelity.py::test_basic_infidelity_single / ::test_basic_infidelity_multiple: BasicModel2 at
    # (3, 1), IG attributions (captum's defaults: Gauss-Legendre, 50 steps), _local_perturb_func (I = 0.0009 on
    # input1, 0.0121 on input2), 10 samples; expected zeros. Closed form: IG = (1.5, -0.5) and
    # f(x) - f(x - I) = 1 - 1.0112, so every sample gives (-0.0047 + 0.0112)^2 = 4.225e-5.
    model = Packed(BasicModel2(), [1, 1], scalar=True)
    x = torch.tensor([[3.0, 1.0]]).repeat(n, 1)
    ig = gs.attribute(model, x, target=OUT, method="integrated_gradients").attributions
    pert = _repeat(torch.tensor([[0.0009, 0.0121]]).repeat(n, 1), 10)
    r = gs.evaluate(model, x, ig, target=OUT, metric="infidelity", n_perturbations=10, perturbation=pert)
    _sum_close(r.values, torch.zeros(n))
    torch.testing.assert_close(r.values, torch.full((n,), 0.0065**2), rtol=1e-3, atol=0)
    # "infid_w_common_func": captum divides the map by the input and dots it with I; gradsense's
    # multiply_by_inputs=True divides I by the input instead - the same dot product, (0.00045 - 0.00605), so
    # (-0.0056 + 0.0112)^2 = 3.136e-5; captum asserts it equals the first within 1e-4 (sum).
    r2 = gs.evaluate(model, x, ig, target=OUT, metric="infidelity", n_perturbations=10, perturbation=pert,
                     multiply_by_inputs=True)
    r3 = gs.evaluate(model, x, ig / x, target=OUT, metric="infidelity", n_perturbations=10, perturbation=pert)
    torch.testing.assert_close(r2.values, r3.values, rtol=1e-6, atol=0)
    torch.testing.assert_close(r2.values, torch.full((n,), 0.0056**2), rtol=1e-3, atol=0)
    _sum_close(r2.values, r.values, 1e-4)


def test_basic_infidelity_multiple_with_batching():
    # test_infidelity.py::test_basic_infidelity_multiple_with_batching: 20 examples, 5 samples, batches of 21
    # and 60 rows (our chunk_size) -> zeros, and the two agree within 0.01 (mode max).
    model = Packed(BasicModel2(), [1, 1], scalar=True)
    x = torch.tensor([[3.0, 1.0]]).repeat(20, 1)
    ig = gs.attribute(model, x, target=OUT, method="integrated_gradients").attributions
    pert = _repeat(torch.tensor([[0.0009, 0.0121]]).repeat(20, 1), 5)
    runs = [gs.evaluate(model, x, ig, target=OUT, metric="infidelity", n_perturbations=5, perturbation=pert,
                        chunk_size=c).values for c in (21, 60)]
    for v in runs:
        _sum_close(v, torch.zeros(20))
    assert float((runs[0] - runs[1]).abs().max()) <= 0.01


@pytest.mark.filterwarnings("ignore:.*every attribution is exactly zero")  # captum's case is flat there
def test_basic_infidelity_additional_forward_args():
    # test_infidelity.py::test_basic_infidelity_additional_forward_args1: BasicModel4_MultiArgs, inputs
    # ([[1.5, 2.0, 3.3]], [[3.0, 3.5, 2.2]]), args [[1, 3, 4]], IG, _global_perturb_func1 (every input to 0):
    # expected 0 for 1 and for 5 samples - the IG completeness gap, squared.
    x3 = torch.tensor([[1.0, 3.0, 4.0]])
    model = Packed(BasicModel4_MultiArgs(), [3, 3, 3])  # x3 rides along as fixed columns (IG baseline = x3)
    x = torch.tensor([[1.5, 2.0, 3.3, 3.0, 3.5, 2.2, 1.0, 3.0, 4.0]])
    base = torch.cat([torch.zeros(1, 6), x3], 1)
    ig = gs.attribute(model, x, target=OUT, method="integrated_gradients", baseline=base)
    vals = []
    for s in (1, 5):
        to_zero = _repeat(torch.cat([x[:, :6], torch.zeros(1, 3)], 1), s)  # I = x on the inputs, 0 on x3
        r = gs.evaluate(model, x, ig, target=OUT, metric="infidelity", n_perturbations=s, perturbation=to_zero,
                        multiply_by_inputs=True)
        _sum_close(r.values, torch.zeros(1))
        torch.testing.assert_close(r.values, ig.tensors["delta"] ** 2, rtol=1e-4, atol=1e-12)
        vals.append(r.values)
    torch.testing.assert_close(vals[0], vals[1], rtol=0, atol=0)  # captum: infidelity1 == infidelity2 (delta 0)


def test_classification_infidelity_tuple_target():
    # test_infidelity.py::test_classification_infidelity_tpl_target: Saliency maps of BasicModel_MultiLayer with
    # add_input = arange(1, 13), multidim_output=True, targets [(0,1,1), (0,1,1), (1,1,1), (0,1,1)], local
    # perturbation 0.0009 on every input, 10 samples -> zeros (the model is linear around these inputs); batches
    # of 2 give the same values within 1e-5 (mode max).
    model, target = MultiDim(), tuple_target(TPL)
    x = torch.arange(1.0, 13.0).view(4, 3) + torch.arange(1, 13).view(4, 3).float()  # x + add_input
    sal = gs.attribute(model, x, target=target, method="saliency", abs=True).attributions  # captum's abs=True
    pert = _repeat(torch.full((4, 3), 0.0009), 10)
    runs = [gs.evaluate(model, x, sal, target=target, metric="infidelity", n_perturbations=10, perturbation=pert,
                        chunk_size=c).values for c in (None, 2)]
    _sum_close(runs[0], torch.zeros(4))
    assert float((runs[0] - runs[1]).abs().max()) <= 1e-5


def test_classification_infidelity_tuple_target_with_baseline():
    # test_infidelity.py::test_classification_infidelity_tpl_target_w_baseline: IG (Gauss-Legendre, 50 steps)
    # with baseline ones, perturbation "every input to the baseline", 3 samples -> [0.10686, 0, 0, 0], and
    # infidelity == delta * delta (delta: IG's convergence delta).
    model, target = MultiDim(), tuple_target(TPL)
    add = torch.arange(1, 13).view(4, 3).float()
    x, base = torch.arange(1.0, 13.0).view(4, 3) + add, torch.ones(4, 3) + add
    ig = gs.attribute(model, x, target=target, method="integrated_gradients", steps=50, baseline=base)
    r = gs.evaluate(model, x, ig, target=target, metric="infidelity", n_perturbations=3,
                    perturbation=_repeat(x - base, 3), multiply_by_inputs=True, baseline=base)
    _sum_close(r.values, torch.tensor([0.10686, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(r.values, ig.tensors["delta"] ** 2, rtol=1e-4, atol=1e-4)
    assert abs(float(r.values[0]) - 0.10686) < 1e-4


def test_infidelity_normalized_is_scale_invariant():
    # test_infidelity.py::test_basic_infidelity_multiple_with_normalize: BasicModel2, 3 examples, IG maps and
    # 100x the maps give the same normalised infidelity, expected zeros.
    model = Packed(BasicModel2(), [1, 1], scalar=True)
    x = torch.tensor([[3.0, 1.0]]).repeat(3, 1)
    ig = gs.attribute(model, x, target=OUT, method="integrated_gradients").attributions
    pert = _repeat(torch.tensor([[0.0009, 0.0121]]).repeat(3, 1), 10)
    a, b = (gs.evaluate(model, x, m, target=OUT, metric="infidelity", n_perturbations=10, perturbation=pert,
                        normalize=True).values for m in (ig, 100 * ig))
    _sum_close(a, torch.zeros(3))
    _sum_close(a, b, 1e-4)


@pytest.mark.parametrize("masks", [
    [[0, 0, 1], [1, 0, 0], [0, 1, 0]],  # sensitivity-1 (_global_perturb_func3)
    [[0, 1, 1], [1, 1, 0], [1, 0, 1]],  # sensitivity-2 (_global_perturb_func2)
    [[1, 1, 1], [1, 1, 1], [1, 1, 1]],  # sensitivity-3 (_global_perturb_func1)
])
def test_sensitivity_n_with_ig(masks):
    # test_infidelity.py::test_sensitivity_n_ig: BasicModel_MultiLayer, input [[1.0, 2.5, 3.3]], target 0, IG;
    # sample s removes the features of mask row s (I = mask, x_perturbed = (1 - mask) * x) -> infidelity 0.
    net = BasicModel_MultiLayer()
    x = torch.tensor([[1.0, 2.5, 3.3]])
    ig = gs.attribute(net, x, target=0, method="integrated_gradients").attributions
    m = torch.tensor(masks, dtype=torch.float32).unsqueeze(1)  # (S=3, N=1, 3)
    r = gs.evaluate(net, x, ig, target=0, metric="infidelity", n_perturbations=3, perturbation=m * x,
                    multiply_by_inputs=True)
    _sum_close(r.values, torch.zeros(1))


# ------------------------------------------------------------------------------------------- max-sensitivity
def _captum_ratio_perturbation(x: torch.Tensor, s: int) -> torch.Tensor:
    """test_sensitivity.py::_perturb_func: every example moves by arange(-d // 2, d // 2) / 100 (d features)."""
    d = x[0].numel()
    step = (torch.arange(-d // 2, d // 2).view(x[0].shape).float() / 100).to(x.dtype)
    return step.expand(s, *x.shape).clone()


def test_sensitivity_max_multi_dim_ig():
    # test_sensitivity.py::test_sensitivity_max_multi_dim: IG on BasicModel_MultiLayer (multidim output), inputs
    # arange(1, 13) as (4, 3), tuple targets, one perturbation [-0.02, -0.01, 0] -> [0.006, 0.01, 0.001, 0.008].
    model, target = MultiDim(), tuple_target(TPL)
    x = torch.arange(1.0, 13.0).view(4, 3)
    r = gs.evaluate(model, x, None, target=target, metric="max_sensitivity", explainer="integrated_gradients",
                    n_perturbations=1, perturbation=_captum_ratio_perturbation(x, 1))
    _sum_close(r.values, torch.tensor([0.006, 0.01, 0.001, 0.008]))


@pytest.mark.peer
def test_sensitivity_max_multi_dim_ig_live_captum():
    """The same case run through captum 0.9's ``sensitivity_max``: equal to float32 rounding."""
    pytest.importorskip("captum.metrics")
    from captum.attr import IntegratedGradients
    from captum.metrics import sensitivity_max

    model, target = MultiDim(), tuple_target(TPL)
    x = torch.arange(1.0, 13.0).view(4, 3)
    ours = gs.evaluate(model, x, None, target=target, metric="max_sensitivity", explainer="integrated_gradients",
                       n_perturbations=1, perturbation=_captum_ratio_perturbation(x, 1)).values
    theirs = sensitivity_max(IntegratedGradients(model).attribute, x, target=TPL, n_perturb_samples=1,
                             perturb_func=lambda inp: inp + _captum_ratio_perturbation(inp, 1)[0])
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("s", [1, 5])
def test_basic_sensitivity_max_saliency(s):
    # test_sensitivity.py::test_basic_sensitivity_max_single (default_perturb_func: uniform in the 0.02 ball,
    # our default) and ::test_basic_sensitivity_max_multiple (20 examples, _perturb_func): Saliency on
    # BasicModel2 at (3, 1) -> zeros.
    model = Packed(BasicModel2(), [1, 1], scalar=True)
    r = gs.evaluate(model, torch.tensor([[3.0, 1.0]]), None, target=OUT, metric="max_sensitivity",
                    explainer="saliency", n_perturbations=s)
    _sum_close(r.values, torch.zeros(1))
    x = torch.tensor([[3.0, 1.0]]).repeat(20, 1)
    step = _repeat(torch.full((20, 2), -0.01), 5)  # d = 1 feature per captum input: arange(-1, 0) / 100
    for chunk in (21, 60):  # captum's max_examples_per_batch 21 and 60
        r = gs.evaluate(model, x, None, target=OUT, metric="max_sensitivity", explainer="saliency",
                        n_perturbations=5, perturbation=step, chunk_size=chunk)
        _sum_close(r.values, torch.zeros(20))


def test_sensitivity_max_convnet_multi_target():
    # test_sensitivity.py::test_convnet_multi_target: Saliency on BasicModel_ConvNet_One_Conv, 20 copies of
    # arange(1, 17) as 1x4x4, target 1, _perturb_func (arange(-8, 8) / 100 as 4x4), 10 samples -> zeros.
    net = BasicModel_ConvNet_One_Conv()
    x = torch.stack([torch.arange(1, 17).float()] * 20, dim=0).view(20, 1, 4, 4)
    r = gs.evaluate(net, x, None, target=torch.tensor([1] * 20), metric="max_sensitivity", explainer="saliency",
                    n_perturbations=10, perturbation=_captum_ratio_perturbation(x, 10))
    _sum_close(r.values, torch.zeros(20))


def test_sensitivity_max_multi_dim_batching():
    # test_sensitivity.py::test_sensitivity_max_multi_dim_batching: Saliency on BasicModel_MultiLayer with
    # add_input ones, target 0, inputs arange(1, 16) as (5, 3), _perturb_func; 1 sample and 10 samples (batches
    # of 10) -> zeros, equal to each other (delta 0).
    net = BasicModel_MultiLayer()
    x = torch.arange(1.0, 16.0).view(5, 3) + torch.ones(5, 3)
    one = gs.evaluate(net, x, None, target=0, metric="max_sensitivity", explainer="saliency", n_perturbations=1,
                      perturbation=_captum_ratio_perturbation(x, 1)).values
    ten = gs.evaluate(net, x, None, target=0, metric="max_sensitivity", explainer="saliency", n_perturbations=10,
                      perturbation=_captum_ratio_perturbation(x, 10), chunk_size=10).values
    _sum_close(one, torch.zeros(5))
    torch.testing.assert_close(one, ten, rtol=0, atol=0)
