"""BackPACK's second-order problem settings, run through ``gs.curvature.operator``.

Source: f-dangel/backpack (commit 366bcd6) ``test/extensions/secondorder/secondorder_settings.py`` (the
``example``, the classification/regression settings and ``make_simple_act_setting`` /
``make_simple_pooling_setting`` from ``test/extensions/automated_settings.py``). BackPACK's tests hold no
numbers: each quantity is compared with a plain-autograd twin (``test/extensions/implementation/autograd.py``).
The same is done here with ``tests/oracles.py`` (dense Hessian, dense ``J^T H J``, per-example loop) - no BackPACK
needed - and, marked ``peer``, against BackPACK itself: ``DiagGGNExact``, ``DiagHessian``, ``SumGradSquared``,
``ggn_vector_product_from_plist`` and ``hessian_vector_product``.

Conventions that differ:

- BackPACK works on the parameters with ``requires_grad=True`` (its activation/pooling settings freeze the last
  Linear layer); so does gradsense's ``params=None`` (every parameter only when none trains).
- ``SumGradSquared`` squares the gradients of each example's *contribution* to the loss (``l_i / N`` under
  ``reduction="mean"``, ``l_i`` under ``"sum"``); ``kind="fisher"`` is ``(1/N) sum_i g_i g_i^T`` of the per-example
  losses ``l_i``: its diagonal is ``N * SumGradSquared`` (mean) or ``SumGradSquared / N`` (sum).
- The GGN and Hessian are those of the loss as given (``reduction="sum"`` included): same numbers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradsense as gs
from oracles import dense_empirical_fisher, dense_ggn, dense_hessian


def _frozen(linear: nn.Linear) -> nn.Linear:
    for p in linear.parameters():
        p.requires_grad_(False)
    return linear


def _targets(n: int, classes: int) -> torch.Tensor:
    return torch.randint(0, classes, (n,))


# (id, builder) -> (model, x, y, loss_fn); each builder is seeded, float64
SETTINGS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor, nn.Module]]] = {
    # "example": Linear(10, 5), CrossEntropyLoss(), rand(3, 10)
    "example": lambda: (nn.Sequential(nn.Linear(10, 5)), torch.rand(3, 10), _targets(3, 5), nn.CrossEntropyLoss()),
    # Linear(10, 7) -> Linear(7, 5), CrossEntropyLoss(reduction="mean")
    "linear-linear-ce-mean": lambda: (nn.Sequential(nn.Linear(10, 7), nn.Linear(7, 5)), torch.rand(3, 10),
                                      _targets(3, 5), nn.CrossEntropyLoss(reduction="mean")),
    # Linear(10, 7) -> ReLU -> Linear(7, 5), CrossEntropyLoss(reduction="sum")
    "relu-ce-sum": lambda: (nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 5)), torch.rand(3, 10),
                            _targets(3, 5), nn.CrossEntropyLoss(reduction="sum")),
    # Linear(10, 7) -> Sigmoid -> Linear(7, 5), MSELoss(reduction="mean"), regression targets (3, 5)
    "sigmoid-mse-mean": lambda: (nn.Sequential(nn.Linear(10, 7), nn.Sigmoid(), nn.Linear(7, 5)), torch.rand(3, 10),
                                 torch.rand(3, 5), nn.MSELoss(reduction="mean")),
    # make_simple_act_setting(Tanh, bias=True): Conv2d(3, 2, 2) -> Tanh -> Flatten -> frozen Linear(72, 5)
    "act-tanh-bias": lambda: (nn.Sequential(nn.Conv2d(3, 2, 2), nn.Tanh(), nn.Flatten(), _frozen(nn.Linear(72, 5))),
                              torch.rand(3, 3, 7, 7), _targets(3, 5), nn.CrossEntropyLoss()),
    # make_simple_act_setting(LogSigmoid, bias=False)
    "act-logsigmoid-nobias": lambda: (nn.Sequential(nn.Conv2d(3, 2, 2, bias=False), nn.LogSigmoid(), nn.Flatten(),
                                                    _frozen(nn.Linear(72, 5))),
                                      torch.rand(3, 3, 7, 7), _targets(3, 5), nn.CrossEntropyLoss()),
    # make_simple_pooling_setting((3, 3, 7, 7), Conv2d, MaxPool2d, (2, 1, 0, 2)): conv -> ReLU -> MaxPool2d(2, 1,
    # dilation 2) -> Flatten -> frozen Linear, CrossEntropyLoss(reduction="sum")
    "maxpool-dilated-ce-sum": lambda: (nn.Sequential(nn.Conv2d(3, 2, 2), nn.ReLU(), nn.MaxPool2d(2, 1, 0, 2),
                                                     nn.Flatten(), _frozen(nn.Linear(32, 5))),
                                       torch.rand(3, 3, 7, 7), _targets(3, 5), nn.CrossEntropyLoss(reduction="sum")),
}


def _setting(name: str):
    torch.manual_seed(0)
    model, x, y, loss_fn = SETTINGS[name]()
    return model.double().eval(), x.double(), (y.double() if y.is_floating_point() else y), loss_fn


def _trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _operator(model, loss_fn, x, y, kind: str):
    return gs.curvature.operator(model, loss_fn, (x, y), kind=kind, params=lambda n, p: p.requires_grad)


def _oracles(model, loss_fn, x, y, names) -> dict[str, torch.Tensor]:
    return {"hessian": dense_hessian(model, loss_fn, x, y, names), "ggn": dense_ggn(model, loss_fn, x, y, names),
            "fisher": dense_empirical_fisher(model, loss_fn, x, y, names)}


def _split(flat: torch.Tensor, model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    parts = torch.split(flat, [named[n].numel() for n in names])
    return {n: t.reshape(named[n].shape) for n, t in zip(names, parts)}


def _probes(p: int, k: int = 3) -> torch.Tensor:
    """``(P, k)`` Gaussian directions: ``A v == B v`` for a random ``v`` means ``A == B`` (up to tolerance)."""
    return torch.randn(p, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.filterwarnings("ignore:forward-over-reverse HVP failed")  # nn.MSELoss's mean under jvp: torch#123996
@pytest.mark.parametrize("name", list(SETTINGS))
def test_curvature_products_equal_the_autograd_twins(name):
    """What BackPACK's tests compare (``AutogradExtensions``: Hessian, GGN, per-example gradients by plain
    autograd), as products of the operators with random directions against the dense twins of ``tests/oracles.py``.
    """
    model, x, y, loss_fn = _setting(name)
    names = _trainable(model)
    dense = _oracles(model, loss_fn, x, y, names)
    v = _probes(dense["hessian"].shape[0])
    for kind, matrix in dense.items():
        op = _operator(model, loss_fn, x, y, kind)
        ours = torch.stack([op.matvec(v[:, i]) for i in range(v.shape[1])], dim=1)
        torch.testing.assert_close(ours, matrix @ v, rtol=1e-9, atol=1e-12)


def test_default_parameters_are_the_trainable_ones_as_in_backpack():
    """Without ``params=``, the frozen Linear of the activation settings is left out, as BackPACK and PyHessian do;
    a fully frozen model falls back to all of its parameters."""
    model, x, y, loss_fn = _setting("act-tanh-bias")
    op = gs.curvature.operator(model, loss_fn, (x, y))
    assert op.numel == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert op.numel < sum(p.numel() for p in model.parameters())
    frozen = copy.deepcopy(model).requires_grad_(False)
    assert gs.curvature.operator(frozen, loss_fn, (x, y)).numel == sum(p.numel() for p in model.parameters())


@pytest.mark.peer
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # BackPACK's hooks, no input needs a gradient
@pytest.mark.filterwarnings("ignore:forward-over-reverse HVP failed")
@pytest.mark.parametrize("name", list(SETTINGS))
def test_diagonals_and_products_equal_backpack(name):
    """Live BackPACK 1.7, on a deep copy (``extend`` adds hooks and attributes to the module it is given): its
    diagonals equal those of the dense twins (which the test above ties to our operators), and its GGN- and
    Hessian-vector products equal ours."""
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import DiagGGNExact, DiagHessian, SumGradSquared
    from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist
    from backpack.hessianfree.hvp import hessian_vector_product

    model, x, y, loss_fn = _setting(name)
    names = _trainable(model)
    twin = backpack.extend(copy.deepcopy(model))
    lossf = backpack.extend(copy.deepcopy(loss_fn))
    with backpack.backpack(DiagGGNExact(), DiagHessian(), SumGradSquared()):
        lossf(twin(x), y).backward()
    tp = dict(twin.named_parameters())
    dense = _oracles(model, loss_fn, x, y, names)
    n = x.shape[0]
    scale = n if loss_fn.reduction == "mean" else 1.0 / n  # our Fisher vs SumGradSquared (module docstring)
    for kind, attr, factor in (("ggn", "diag_ggn_exact", 1.0), ("hessian", "diag_h", 1.0),
                               ("fisher", "sum_grad_squared", scale)):
        diag = _split(torch.diagonal(dense[kind]), model, names)
        for k in names:
            torch.testing.assert_close(diag[k], getattr(tp[k], attr) * factor, rtol=1e-9, atol=1e-12)
    v_flat = _probes(dense["hessian"].shape[0], 1)[:, 0]
    v = list(_split(v_flat, model, names).values())
    out = twin(x)
    ggnv = ggn_vector_product_from_plist(lossf(out, y), out, [tp[k] for k in names], v)
    hv = hessian_vector_product(lossf(twin(x), y), [tp[k] for k in names], v)
    for kind, theirs in (("ggn", ggnv), ("hessian", hv)):
        ours = _operator(model, loss_fn, x, y, kind).matvec(v_flat)
        torch.testing.assert_close(ours, torch.cat([t.reshape(-1) for t in theirs]), rtol=1e-9, atol=1e-12)
