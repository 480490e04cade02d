"""Cross-checks against loss-landscapes 3.0.6 (marked ``peer``).

Their scaling, accounted for here: ``random_line(distance, steps)`` draws ``d`` uniform on [0, 1], filter-
normalises it (weights per filter like ours; each bias *element* to ``|w_j|``), rescales it to the model's
norm over ``distance * steps`` and evaluates ``w + k d / (distance * steps)`` for ``k = 1..steps``: in our
units a line of span ``1 / distance`` through their direction. ``random_plane`` centres the grid, so its
half-width is ``1 / (2 distance)``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from landscape_models import make_mlp

import gradsense.losses as losses
from gradsense.landscape import loss_surface
from helpers import assert_model_unchanged

ll = pytest.importorskip("loss_landscapes")
from loss_landscapes.metrics import Loss  # noqa: E402
from loss_landscapes.model_interface.model_parameters import orthogonal_to, rand_u_like  # noqa: E402
from loss_landscapes.model_interface.model_wrapper import wrap_model  # noqa: E402

pytestmark = pytest.mark.peer
TIGHT = {"rtol": 1e-9, "atol": 1e-12}


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)


def test_a_line_through_their_direction_gives_their_losses():
    model = make_mlp()
    x, y = _data()
    steps, distance = 10, 0.5
    work = copy.deepcopy(model)  # loss-landscapes moves the weights of what it is given
    start = {n: p.detach().clone() for n, p in work.named_parameters()}
    torch.manual_seed(0)
    theirs = ll.random_line(work, Loss(F.cross_entropy, x, y), distance=distance, steps=steps,
                            normalization="filter", deepcopy_model=False)
    # their direction, recovered from where they left the weights: w + steps * delta
    delta = {n: (p.detach() - start[n]) / steps for n, p in work.named_parameters()}
    d = {n: t * distance * steps for n, t in delta.items()}
    # it is filter-normalised: every weight filter has the norm of the model's filter, every bias element |w|
    for n, w in start.items():
        if w.ndim > 1:
            torch.testing.assert_close(d[n].norm(dim=1), w.norm(dim=1), rtol=1e-9, atol=1e-12)
        else:
            torch.testing.assert_close(d[n].abs(), w.abs(), rtol=1e-9, atol=1e-12)
    with assert_model_unchanged(model):
        ours = loss_surface(model, losses.cross_entropy, (x, y), dims=1, directions=(d,),
                            steps=2 * steps + 1, span=1 / distance)
    torch.testing.assert_close(ours.losses[steps + 1:], torch.as_tensor(theirs, dtype=torch.float64), **TIGHT)


def test_their_default_moves_the_callers_weights_and_ours_does_not():
    model = make_mlp()
    x, y = _data()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with assert_model_unchanged(model):
        loss_surface(model, losses.cross_entropy, (x, y), steps=5, seed=0)
    ll.random_plane(model, Loss(F.cross_entropy, x, y), distance=1, steps=4)  # deepcopy_model=False default
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    # every weight matrix is left at their last grid point (with an even grid their bias directions, all
    # |w_j| element by element, cancel on the way back: the biases happen to return)
    assert {n for n, t in before.items() if t.ndim > 1} <= set(moved)
    assert not any(p.requires_grad for p in model.parameters())  # and requires_grad switched off


def test_their_plane_shifts_every_other_column_by_one_step():
    # random_plane walks the grid in a zig-zag (down even columns, up odd ones) and fills odd columns with
    # insert(0): even columns hold beta offsets 1-s/2 .. s/2, odd ones -s/2 .. s/2-1. Checked against our
    # plane through the same two directions on the integer offsets -s/2 .. s/2.
    model = make_mlp()
    x, y = _data()
    s, distance = 6, 1.0
    start = wrap_model(copy.deepcopy(model)).get_module_parameters()
    torch.manual_seed(3)
    d1 = rand_u_like(start)
    d2 = orthogonal_to(d1)
    for d in (d1, d2):
        d.filter_normalize_(start)
        d.mul_(((start.model_norm() / distance) / s) / d.model_norm())
    torch.manual_seed(3)
    theirs = torch.as_tensor(ll.random_plane(copy.deepcopy(model), Loss(F.cross_entropy, x, y),
                                             distance=distance, steps=s), dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    dirs = tuple({n: t.detach().clone() for n, t in zip(names, d.parameters)} for d in (d1, d2))
    ours = loss_surface(model, losses.cross_entropy, (x, y), directions=dirs, steps=s + 1, span=s / 2).losses
    for i in range(s):
        if i % 2 == 0:
            torch.testing.assert_close(theirs[i], ours[i, 1:], **TIGHT)
        else:
            torch.testing.assert_close(theirs[i], ours[i, :-1], **TIGHT)
    assert not torch.allclose(theirs[1], ours[1, 1:])  # so their matrix is not a regular grid
