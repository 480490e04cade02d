"""Quantiser closed forms, the exact knapsack against brute force, HAWQ-V2 allocation vs uniform bits."""

from __future__ import annotations

import itertools

import pytest
import torch
from importance_cases import CE, conv_chain

from gradsense.importance import apply, importance, quantize
from gradsense.importance.bits import allocate, quantization_errors
from helpers import assert_model_unchanged


def test_quantize_closed_form():
    w = torch.tensor([[0.9, -0.3, 0.1, 0.4], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    # 3 bits: q_max = 3, scale 0.3 -> levels k * 0.3
    torch.testing.assert_close(quantize(w, 3), torch.tensor([[0.9, -0.3, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0]],
                                                            dtype=torch.float64), rtol=0, atol=1e-15)
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for b in (2, 4, 8):
        q = quantize(x, b)
        scale = x.abs().amax(1, keepdim=True) / (2 ** (b - 1) - 1)
        levels = q / scale
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-9)
        assert float(((q - x).abs() / scale).max()) <= 0.5 + 1e-9  # round to nearest
    errs = quantization_errors(x)
    assert bool((errs[1:] <= errs[:-1] + 1e-15).all())  # more bits, less error
    with pytest.raises(ValueError, match="between 2 and 16"):
        quantize(x, 1)


def test_allocation_is_the_brute_force_optimum():
    g = torch.Generator().manual_seed(1)
    names = [f"l{i}" for i in range(5)]
    sizes = {n: int(s) for n, s in zip(names, torch.randint(5, 50, (5,), generator=g))}
    sens = {n: float(s) for n, s in zip(names, torch.rand(5, generator=g) * 10)}
    errors = {n: torch.rand(15, generator=g, dtype=torch.float64).sort(descending=True).values for n in names}
    choices = (2, 3, 4, 8)
    for mean_bits in (2, 3.3, 4, 5.5, 8):
        bits, obj, exact = allocate(sens, errors, sizes, mean_bits, choices)
        budget = mean_bits * sum(sizes.values())
        best = min(
            (sum(sens[n] * float(errors[n][b - 2]) for n, b in zip(names, plan)), plan)
            for plan in itertools.product(choices, repeat=5)
            if sum(sizes[n] * b for n, b in zip(names, plan)) <= budget + 1e-9
        )
        assert exact and obj == pytest.approx(best[0], rel=1e-12)
        assert sum(sizes[n] * bits[n] for n in names) <= budget + 1e-9


def test_hawq_allocation_from_hessian_traces_beats_uniform_at_the_same_budget():
    case = conv_chain(n=16)
    held = conv_chain(seed=7, n=16)
    with assert_model_unchanged(case.model):
        res = importance(case.model, CE, (case.x, case.y), method="hessian", granularity="layer", rtol=0.05,
                         heldout=(held.x, held.y))
        alloc = res.allocate_bits(4)
    assert set(alloc) == {"0.weight", "3.weight", "6.weight"} and set(alloc.values()) <= {2, 3, 4, 8}
    assert alloc.meta["achieved_mean_bits"] <= 4 + 1e-9
    assert alloc.meta["objective"] <= alloc.meta["uniform_objective"] + 1e-15
    # the objective is what the docstring says: sum_l Tr(H_l)/n_l ||Q(W_l) - W_l||^2
    params = dict(case.model.named_parameters())
    obj = sum(float(res.tensors[f"curvature/{n}"]) / params[n].numel() * float(((quantize(params[n].detach(), b) - params[n].detach()) ** 2).sum())
              for n, b in alloc.items())
    assert obj == pytest.approx(alloc.meta["objective"], rel=1e-9)
    # measured: the fake-quantised copy's held-out loss, for the allocation and for uniform 4 bits
    q = apply(case.model, alloc)
    with torch.no_grad():
        measured = float(CE(q(held.x), held.y))
        uniform = float(CE(apply(case.model, dict.fromkeys(alloc, 4))(held.x), held.y))
    assert alloc.measured["loss_after"] == pytest.approx(measured, rel=1e-12)
    assert alloc.meta["uniform_measured"]["loss_after"] == pytest.approx(uniform, rel=1e-12)


def test_bad_bit_requests():
    case = conv_chain()
    res = importance(case.model, CE, (case.x, case.y), method="fisher")
    with pytest.raises(ValueError, match="outside the choices"):
        res.allocate_bits(9)
    with pytest.raises(ValueError, match="between 2 and 16"):
        res.allocate_bits(4, choices=(1, 4))
    with pytest.raises(TypeError, match="choices"):
        res.allocate_bits(4, choices=4)
    no_curv = importance(case.model, CE, (case.x, case.y), method="taylor")
    with pytest.raises(ValueError, match="curvature"):
        no_curv.allocate_bits(4)
    with pytest.raises(ValueError, match="between 2 and 16"):
        apply(case.model, {"0.weight": 17})
    fisher_bits = res.allocate_bits(3.5, choices=(2, 4))
    assert fisher_bits.meta["uniform_bits"] is None and set(fisher_bits.values()) <= {2, 4}
