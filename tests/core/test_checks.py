"""core.checks: one clear TypeError/ValueError, naming what was expected and what was received."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradsense.core.checks import check_inputs, check_positive_int


@pytest.mark.parametrize(
    ("inputs", "kwargs", "error", "match"),
    [
        (
            np.zeros((2, 3)),
            {},
            TypeError,
            "inputs must be a torch.Tensor with a batch dimension first, got ndarray",
        ),
        ([[1.0, 2.0]], {}, TypeError, "got list"),
        (
            torch.zeros(3),
            {},
            ValueError,
            r"at least 2 dimensions, got shape \(3,\)\. For one example use x\.unsqueeze\(0\)",
        ),
        (torch.zeros(3, 4), {"min_ndim": 3}, ValueError, "at least 3 dimensions"),
        (torch.zeros(0, 3), {}, ValueError, r"empty \(batch size 0\)"),
        (
            torch.zeros(2, 3, dtype=torch.long),
            {},
            TypeError,
            "dtype torch.int64, but gradients need floating-point",
        ),
        (torch.zeros(2, 3, dtype=torch.bool), {}, TypeError, "torch.bool, but gradients need floating-point"),
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), {}, ValueError, "contains 1 NaN/Inf values"),
        (torch.tensor([[float("inf"), float("-inf")]]), {}, ValueError, "contains 2 NaN/Inf values"),
        (torch.zeros(3), {"name": "baselines"}, ValueError, "^baselines must have a batch dimension"),
    ],
    ids=["numpy", "list", "rank-1", "rank-2-of-3", "empty", "int64", "bool", "nan", "inf", "named"],
)
def test_check_inputs_errors(inputs, kwargs, error, match):
    with pytest.raises(error, match=match):
        check_inputs(inputs, **kwargs)


def test_check_inputs_accepts_and_returns_the_same_tensor():
    x = torch.zeros(2, 3, dtype=torch.float64)
    assert check_inputs(x) is x
    ids = torch.zeros(2, 5, dtype=torch.long)  # token ids are fine where no input gradient is needed
    assert check_inputs(ids, needs_grad=False) is ids
    z = torch.zeros(2, 3, dtype=torch.complex64)
    assert check_inputs(z) is z


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0, ValueError, "steps must be >= 1, got 0"),
        (True, TypeError, "got bool True"),
        (2.0, TypeError, "got float 2.0"),
        ("3", TypeError, "got str"),
    ],
)
def test_check_positive_int(value, error, match):
    with pytest.raises(error, match=match):
        check_positive_int(value, "steps")


def test_check_positive_int_minimum():
    assert check_positive_int(5, "n") == 5
    assert check_positive_int(0, "n", minimum=0) == 0
    with pytest.raises(ValueError, match="n must be >= 2, got 1"):
        check_positive_int(1, "n", minimum=2)
