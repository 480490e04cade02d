"""landscape.loss_surface: the model on the grid, closed forms on a quadratic, vmap == loop == a slow twin,
chunking, the caller's model untouched, train mode, vmap fallback, Hessian axes, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradsense.losses as losses
from gradsense.landscape import LossEvaluator, grid_axis, loss_surface
from helpers import assert_model_unchanged

F64 = {"rtol": 1e-10, "atol": 1e-12}  # two exact routes (batched matmul vs matmul) in float64


# ------------------------------------------------------------------------------------------ fixtures
def quadratic_case(n: int = 40, d: int = 6, at_minimum: bool = False, seed: int = 0):
    """Least squares: model x -> w.x (no bias), L(w) = mean (x.w - y)^2, H = 2 X^T X / n exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double().eval()
    with torch.no_grad():
        if at_minimum:
            model.weight.copy_(torch.linalg.lstsq(x, y.unsqueeze(1)).solution.T)
        else:
            model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    w = model.weight.detach().reshape(-1)
    hess = 2 * x.T @ x / n
    grad = 2 * x.T @ (x @ w - y) / n
    loss0 = float(((x @ w - y) ** 2).mean())
    return model, x, y, w, hess, grad, loss0


def twin_grid(model: nn.Module, x, y, dirs, alphas, betas):
    """Slow, obviously correct oracle: a deep copy of the model moved with load_state_dict, point by point."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out_loss = torch.empty(len(alphas), len(betas), dtype=torch.float64)
    out_acc = torch.empty_like(out_loss)
    twin = copy.deepcopy(model)
    for i, a in enumerate(alphas.tolist()):
        for j, b in enumerate(betas.tolist()):
            moved = dict(state)
            for name in dirs[0]:
                moved[name] = state[name] + a * dirs[0][name] + b * dirs[1][name]
            twin.load_state_dict(moved)
            with torch.no_grad():
                logits = twin(x)
            out_loss[i, j] = F.cross_entropy(logits, y).item()
            out_acc[i, j] = (logits.argmax(1) == y).double().mean().item()
    return out_loss, out_acc


# ------------------------------------------------------------------------------------------ the grid
def test_grid_axis_is_symmetric_with_an_exact_zero():
    a = grid_axis(21, 1.0)
    assert a[10].item() == 0.0 and a[0].item() == -1.0 and a[-1].item() == 1.0
    assert torch.equal(a, -a.flip(0))
    assert 0.0 not in grid_axis(4, 2.0).tolist()


def test_grid_centre_is_the_models_own_loss_exactly(case):
    with torch.no_grad():
        own = F.cross_entropy(case.model(case.x), case.y).item()
    s = loss_surface(case.model, losses.cross_entropy, (case.x, case.y), steps=5, seed=0)
    assert s.losses[2, 2].item() == own
    assert s.center_loss == own
    line = loss_surface(case.model, losses.cross_entropy, (case.x, case.y), steps=7, dims=1, seed=0)
    assert line.losses.shape == (7,) and line.betas is None
    assert line.losses[3].item() == own


@pytest.mark.parametrize("vectorize", [False, True])
def test_engine_at_the_origin_runs_the_model_itself(case, vectorize):
    # independent of the centre overwrite: w + 0 * d is exactly w, so the one-at-a-time forward is exactly
    # the model's, and the vmapped one agrees to float64 rounding
    ev = LossEvaluator(case.model, losses.cross_entropy, (case.x, case.y))
    params = ev.params
    make = lambda sl: {k: v.unsqueeze(0) + 0.0 * torch.ones(sl.stop - sl.start, *v.shape, dtype=v.dtype)  # noqa: E731
                       for k, v in params.items()}
    pts = ev.evaluate(make, 2, moving=params, vectorize=vectorize)
    with torch.no_grad():
        own = F.cross_entropy(case.model(case.x), case.y).item()
    if vectorize:
        torch.testing.assert_close(pts.losses, torch.full((2,), own, dtype=torch.float64), **F64)
    else:
        assert pts.losses.tolist() == [own, own]


def test_quadratic_surface_matches_its_closed_form():
    model, x, y, w, hess, grad, loss0 = quadratic_case()
    s = loss_surface(model, losses.mse, (x, y), steps=7, span=1.5, seed=3, vectorize=True)
    d1, d2 = (d["weight"].reshape(-1) for d in s.directions)
    a, b = torch.meshgrid(s.alphas, s.betas, indexing="ij")
    expected = (loss0 + a * (grad @ d1) + b * (grad @ d2)
                + 0.5 * (a**2 * (d1 @ hess @ d1) + 2 * a * b * (d1 @ hess @ d2) + b**2 * (d2 @ hess @ d2)))
    torch.testing.assert_close(s.losses, expected, **F64)
    # a one-weight-row linear layer is one filter: the direction has the weight's norm
    torch.testing.assert_close(d1.norm(), w.norm(), **F64)


def test_custom_directions_are_used_as_given_and_flat_vectors_work():
    model, x, y, _, hess, grad, loss0 = quadratic_case()
    d1 = torch.randn(6, dtype=torch.float64)
    s = loss_surface(model, losses.mse, (x, y), steps=5, span=2.0, dims=1, directions=d1)
    expected = loss0 + s.alphas * (grad @ d1) + 0.5 * s.alphas**2 * (d1 @ hess @ d1)
    torch.testing.assert_close(s.losses, expected, **F64)
    assert s.method == "loss_surface/custom"


def test_vmapped_grid_equals_the_loop_and_a_slow_twin(case):
    kw = {"steps": 5, "span": 0.8, "seed": 1}
    vec = loss_surface(case.model, losses.cross_entropy, (case.x, case.y), vectorize=True, chunk_size=7, **kw)
    seq = loss_surface(case.model, losses.cross_entropy, (case.x, case.y), vectorize=False, **kw)
    assert vec.meta["vectorized"] and not seq.meta["vectorized"]
    torch.testing.assert_close(vec.losses, seq.losses, **F64)
    torch.testing.assert_close(vec.accuracy, seq.accuracy, rtol=0, atol=0)
    twin_loss, twin_acc = twin_grid(case.model, case.x, case.y, seq.directions, seq.alphas, seq.betas)
    torch.testing.assert_close(seq.losses, twin_loss, **F64)
    torch.testing.assert_close(seq.accuracy, twin_acc, rtol=0, atol=0)


@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_chunked_equals_unchunked(mlp_case, chunk_size):
    kw = {"steps": 5, "seed": 2, "vectorize": True}
    ref = loss_surface(mlp_case.model, losses.cross_entropy, (mlp_case.x, mlp_case.y), chunk_size=25, **kw)
    got = loss_surface(mlp_case.model, losses.cross_entropy, (mlp_case.x, mlp_case.y), chunk_size=chunk_size, **kw)
    torch.testing.assert_close(got.losses, ref.losses, **F64)
    if chunk_size is not None:
        assert got.meta["chunk_size"] == chunk_size


def test_max_memory_sets_the_chunk_size(mlp_case):
    small = loss_surface(mlp_case.model, losses.cross_entropy, (mlp_case.x, mlp_case.y), steps=5, seed=0,
                         vectorize=True, max_memory=1)
    assert small.meta["chunk_size"] == 1


def test_batches_of_a_dataloader_are_weighted_by_size(mlp_case):
    ref = loss_surface(mlp_case.model, losses.cross_entropy, (mlp_case.x, mlp_case.y), steps=3, seed=0)
    loader = DataLoader(TensorDataset(mlp_case.x, mlp_case.y), batch_size=4)  # 4 + 4 + 2
    got = loss_surface(mlp_case.model, losses.cross_entropy, loader, steps=3, seed=0)
    torch.testing.assert_close(got.losses, ref.losses, **F64)
    torch.testing.assert_close(got.accuracy, ref.accuracy, **F64)


def test_directions_deterministic_given_the_seed(mlp_case):
    data = (mlp_case.x, mlp_case.y)
    a = loss_surface(mlp_case.model, losses.cross_entropy, data, steps=3, seed=5)
    b = loss_surface(mlp_case.model, losses.cross_entropy, data, steps=3, seed=5)
    c = loss_surface(mlp_case.model, losses.cross_entropy, data, steps=3, seed=6)
    assert torch.equal(a.losses, b.losses) and torch.equal(a.tensors["direction_0"], b.tensors["direction_0"])
    assert not torch.equal(a.tensors["direction_0"], c.tensors["direction_0"])
    torch.manual_seed(0)
    d = loss_surface(mlp_case.model, losses.cross_entropy, data, steps=3)  # seed drawn and recorded
    e = loss_surface(mlp_case.model, losses.cross_entropy, data, steps=3, seed=d.meta["seed"])
    assert torch.equal(d.losses, e.losses)


# ------------------------------------------------------------------------------------------ the caller's model
def test_the_callers_model_is_unchanged(case):
    model = case.model
    model[0].weight.requires_grad_(False)  # a frozen parameter stays frozen
    handle = model.register_forward_hook(lambda m, i, o: None)  # the caller's own hook stays
    try:
        with assert_model_unchanged(model):
            loss_surface(model, losses.cross_entropy, (case.x, case.y), steps=3, seed=0, vectorize=True)
            loss_surface(model, losses.cross_entropy, (case.x, case.y), steps=3, seed=0, vectorize=False)
        assert all(p.grad is None for p in model.parameters())
    finally:
        handle.remove()


def test_parameters_are_the_same_objects_with_the_same_values_afterwards(mlp_case):
    # loss-landscapes' default (deepcopy_model=False) leaves the weights at the last grid point
    # (tests/landscape/test_landscape_peer.py shows it); here nothing writes to a parameter
    model = mlp_case.model
    before = {n: (p, p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}
    loss_surface(model, losses.cross_entropy, (mlp_case.x, mlp_case.y), steps=5, seed=0)
    for n, p in model.named_parameters():
        obj, value, ptr = before[n]
        assert p is obj and p.data_ptr() == ptr and torch.equal(p, value), n


def test_train_mode_batchnorm_is_refused_with_a_clear_error(bn_cnn):
    x, y = torch.randn(6, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    bn_cnn.train()
    with pytest.raises(ValueError, match=r"train mode.*model.eval\(\)"):
        loss_surface(bn_cnn, losses.cross_entropy, (x, y), steps=3)
    with assert_model_unchanged(bn_cnn):  # running statistics stay the caller's
        s = loss_surface(bn_cnn, losses.cross_entropy, (x, y), steps=3, seed=0, allow_train_mode=True)
    assert not s.meta["vectorized"]
    with pytest.raises(ValueError, match="vectorize=True"):
        loss_surface(bn_cnn, losses.cross_entropy, (x, y), steps=3, allow_train_mode=True, vectorize=True)


def test_train_mode_dropout_is_repeatable_given_the_seed(dropout_mlp):
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    dropout_mlp.train()
    state = torch.random.get_rng_state()
    a = loss_surface(dropout_mlp, losses.cross_entropy, (x, y), steps=3, seed=4, allow_train_mode=True)
    b = loss_surface(dropout_mlp, losses.cross_entropy, (x, y), steps=3, seed=4, allow_train_mode=True)
    assert torch.equal(a.losses, b.losses)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is not consumed


class ItemInForward(nn.Module):
    """A model vmap cannot run (it reads a parameter-dependent Python float in forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = float(self.lin.weight.abs().max())
        return self.lin(x) / scale


def test_vmap_failure_falls_back_to_one_point_at_a_time_with_a_warning():
    torch.manual_seed(0)
    model = ItemInForward().eval()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    seq = loss_surface(model, losses.cross_entropy, (x, y), steps=3, seed=0, vectorize=False,
                       include_bias_bn=True)
    with pytest.warns(RuntimeWarning, match="vmap could not run this model"):
        auto = loss_surface(model, losses.cross_entropy, (x, y), steps=3, seed=0, include_bias_bn=True)
    assert not auto.meta["vectorized"]
    assert torch.equal(auto.losses, seq.losses)
    with pytest.raises(RuntimeError):
        loss_surface(model, losses.cross_entropy, (x, y), steps=3, seed=0, vectorize=True, include_bias_bn=True)


# ------------------------------------------------------------------------------------------ Hessian axes
def test_hessian_axes_are_the_top_eigenvectors_and_follow_the_quadratic():
    model, x, y, _, hess, _, loss0 = quadratic_case(at_minimum=True)
    s = loss_surface(model, losses.mse, (x, y), steps=5, span=0.5, directions="hessian", seed=0)
    evals, evecs = torch.linalg.eigh(hess)
    torch.testing.assert_close(s.eigenvalues, evals.flip(0)[:2], rtol=1e-6, atol=0)
    for k, d in enumerate(s.directions):
        v = d["weight"].reshape(-1)
        assert abs(float(v @ evecs[:, -1 - k])) == pytest.approx(1.0, abs=1e-6)  # the same axis, up to sign
    # at the minimum the gradient is zero: L = L0 + (a^2 l1 + b^2 l2) / 2
    a, b = torch.meshgrid(s.alphas, s.betas, indexing="ij")
    l1, l2 = evals[-1], evals[-2]
    torch.testing.assert_close(s.losses, loss0 + 0.5 * (a**2 * l1 + b**2 * l2), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": 1}, ValueError, "steps must be >= 2"),
        ({"steps": 2.5}, TypeError, "steps must be an int"),
        ({"span": 0.0}, ValueError, "span must be a positive"),
        ({"span": -1.0}, ValueError, "span must be a positive"),
        ({"span": float("nan")}, ValueError, "span must be a positive"),
        ({"dims": 3}, ValueError, "dims must be 1 or 2"),
        ({"directions": "random"}, ValueError, "directions must be"),
        ({"directions": ({"0.weight": torch.zeros(2)},)}, ValueError, "dims=2 needs 2 direction"),
    ],
)
def test_bad_input(mlp_case, kwargs, error, match):
    with pytest.raises(error, match=match):
        loss_surface(mlp_case.model, losses.cross_entropy, (mlp_case.x, mlp_case.y), **kwargs)


def test_direction_that_does_not_match_the_parameters_names_the_parameter(mlp_case):
    model = mlp_case.model
    good = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    bad = dict(good, **{"2.weight": torch.zeros(3, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"\['2.weight'\] has shape \(3, 3\).*\(4, 5\)"):
        loss_surface(model, losses.cross_entropy, (mlp_case.x, mlp_case.y), steps=3, directions=(good, bad))
    with pytest.raises(ValueError, match="zero for every parameter"):
        loss_surface(model, losses.cross_entropy, (mlp_case.x, mlp_case.y), steps=3, directions=(good, good))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        loss_surface(lambda x: x, losses.cross_entropy, (mlp_case.x, mlp_case.y))  # type: ignore[arg-type]


def test_bias_only_model_needs_include_bias_bn():
    class BiasOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Parameter(torch.zeros(3, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.b

    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="include_bias_bn=True"):
        loss_surface(BiasOnly(), losses.cross_entropy, (x, y), steps=3)
