"""Regression: inputs that do not fit the model give one clear error before any work, in every analysis.

These used to surface as tracebacks from inside torch ("Input type (double) and bias type (float) should
be the same", a conv2d rank error), as a silent NaN loss surface, or as a ``FloatingPointError`` after all
the Hessian-vector products had run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import gradsense as gs
from cases import make_cnn_case
from gradsense.core.distributed import iterate
from helpers import CountingModule, assert_model_unchanged

CE = F.cross_entropy

class CastsItsInputs(torch.nn.Module):
    """A float64 model that converts what it is given: float32 inputs are fine for it."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.double())


ANALYSES = {
    "attribute": lambda m, x, y: gs.attribute(m, x, target=y, method="saliency"),
    "eigs": lambda m, x, y: gs.hessian_eigs(m, CE, (x, y), k=1, seed=0),
    "trace": lambda m, x, y: gs.hessian_trace(m, CE, (x, y), rtol=0.2, seed=0),
    "density": lambda m, x, y: gs.spectral_density(m, CE, (x, y), steps=4, probes=1, seed=0),
    "surface": lambda m, x, y: gs.loss_surface(m, CE, (x, y), steps=3, seed=0),
    "sharpness": lambda m, x, y: gs.sharpness(m, CE, (x, y), kind="sam", seed=0),
}


@pytest.fixture
def case():
    return make_cnn_case()  # float64 BatchNorm CNN on (N, 1, 5, 5)


@pytest.mark.parametrize("what", list(ANALYSES))
def test_wrong_dtype_names_both_dtypes(case, what):
    with assert_model_unchanged(case.model), pytest.raises(TypeError, match=r"float32 but the model's parameters are torch.float64"):
        ANALYSES[what](case.model, case.x.float(), case.y)


@pytest.mark.parametrize("what", list(ANALYSES))
def test_a_model_that_casts_its_inputs_is_not_refused(case, what):
    ANALYSES[what](CastsItsInputs(case.model), case.x.float(), case.y)


@pytest.mark.parametrize("what", list(ANALYSES))
def test_wrong_shape_names_the_shape_and_runs_nothing_else(case, what):
    counting = CountingModule(case.model)
    flat = case.x.reshape(case.x.shape[0], -1)
    with pytest.raises(ValueError, match=r"the model failed on inputs of shape \(10, 25\)") as info:
        ANALYSES[what](counting, flat, case.y)
    # the one failing forward; when it ran a two-row probe, one rerun of the caller's batch names its shapes
    assert counting.sizes in ([10], [2, 10])
    assert "2x25" not in str(info.value)  # torch's message names the caller's batch, never the probe's


@pytest.mark.parametrize("what", [w for w in ANALYSES if w != "attribute"])
def test_nan_in_data_is_refused_before_any_work(case, what):
    x = case.x.clone()
    x[3, 0, 2, 2] = float("nan")
    counting = CountingModule(case.model)
    with pytest.raises(ValueError, match=r"1 NaN/Inf input values"):
        ANALYSES[what](counting, x, case.y)
    assert counting.sizes == []  # not one forward (.sizes: a list, which ModelState does not restore)


def test_nan_in_a_dataset_names_the_batch():
    x = torch.zeros(6, 2, dtype=torch.float64)
    x[5, 1] = float("inf")
    batches = iterate(TensorDataset(x, torch.zeros(6, dtype=torch.long)), batch_size=2)
    next(batches), next(batches)
    with pytest.raises(ValueError, match=r"batch 2 of data holds 1 NaN/Inf"):
        next(batches)


@pytest.mark.parametrize("what", ["surface", "sharpness", "eigs"])
def test_per_example_loss_is_refused(case, what):
    def per_example(out, y):
        return F.cross_entropy(out, y, reduction="none")

    fn = {
        "surface": lambda: gs.loss_surface(case.model, per_example, (case.x, case.y), steps=3, seed=0),
        "sharpness": lambda: gs.sharpness(case.model, per_example, (case.x, case.y), kind="sam", seed=0),
        "eigs": lambda: gs.hessian_eigs(case.model, per_example, (case.x, case.y), seed=0),
    }[what]
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar .* got a tensor of shape \(\d+,\)"):
        fn()
