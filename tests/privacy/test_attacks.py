"""DLG and Inverting Gradients on tiny networks: reconstructions, gradient matching, the double backward,
BatchNorm/dropout/local-step replay, determinism, batched restarts, the caller's model untouched."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from privacy_cases import bn_cnn, dropout_mlp, images, sigmoid_cnn

import gradsense as gs
from gradsense.privacy.attacks import GradientMatcher, run_inverting
from gradsense.privacy.shared import as_shared
from helpers import assert_model_unchanged
from oracles import finite_difference_grad

CE = gs.losses.cross_entropy
SHAPE, BOUNDS = (1, 6, 6), (0.0, 1.0)


@pytest.fixture(scope="module")
def one():
    model = sigmoid_cnn()
    x, y = images(1, seed=1), torch.tensor([1])
    return model, x, y, gs.privacy.client_gradient(model, CE, x, y)


def test_dlg_recovers_one_example_and_matches_the_gradient(one):
    model, x, y, g = one
    with assert_model_unchanged(model):
        rec = gs.privacy.reconstruct(model, CE, g, attack="dlg", input_shape=SHAPE, bounds=BOUNDS, truth=(x, y))
    assert float(rec.psnr[0]) > 40
    assert rec.relative_mismatch < 1e-8
    assert rec.labels.tolist() == [1]
    trace = rec.loss_trace[:, 0]
    trace = trace[torch.isfinite(trace)]
    assert trace[-1] < 1e-12 * trace[0]
    assert bool((trace[1:] <= trace[:-1] * (1 + 1e-9)).all()), "L-BFGS with a Wolfe line search never goes up"


def test_inverting_recovers_one_example_and_its_loss_decreases(one):
    model, x, y, g = one
    with assert_model_unchanged(model):
        rec = gs.privacy.reconstruct(model, CE, g, attack="inverting", steps=300, tv=0.0, input_shape=SHAPE,
                                     bounds=BOUNDS, truth=(x, y))
    assert float(rec.psnr[0]) > 40
    assert rec.meta["cosine_distance"] < 1e-8
    assert float(rec.ssim[0]) > 0.999
    trace = rec.loss_trace[:, 0]
    quarters = [float(q.min()) for q in trace.chunk(4)]
    assert all(b < a for a, b in itertools.pairwise(quarters)), quarters
    assert rec.n_evaluations == 301


def test_strong_dp_noise_defeats_the_attack(one):
    """The defence measured: with sigma=1 noise the same attack falls from > 40 dB to < 15 dB."""
    model, x, y, _ = one
    noisy = gs.privacy.DPNoise(noise_multiplier=1.0, clip=1.0).share(model, CE, x, y,
                                                                    generator=torch.Generator().manual_seed(0))
    rec = gs.privacy.reconstruct(model, CE, noisy, attack="inverting", steps=300, tv=0.0, input_shape=SHAPE,
                                 bounds=BOUNDS, truth=(x, y))
    assert float(rec.psnr[0]) < 15


def test_same_seed_same_reconstruction(one):
    model, _, _, g = one
    kw = dict(attack="inverting", steps=40, input_shape=SHAPE, bounds=BOUNDS, restarts=2)
    a = gs.privacy.reconstruct(model, CE, g, seed=3, **kw)
    b = gs.privacy.reconstruct(model, CE, g, seed=3, **kw)
    c = gs.privacy.reconstruct(model, CE, g, seed=4, **kw)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.loss_trace, b.loss_trace)
    assert not torch.equal(a.inputs, c.inputs)
    assert a.meta["seed"] == 3


def test_batched_restarts_equal_separate_runs(one):
    """Restarts are a vmap dimension (torch.func): three restarts at once equal three single runs from the same
    starts (the autograd path)."""
    model, _, y, g = one
    matcher = GradientMatcher(model, CE, as_shared(model, g), distance="cosine", tv=1e-3)
    x0 = torch.rand(3, 1, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    together, _, trace = run_inverting(matcher, x0, y, steps=15, signed=False, bounds=BOUNDS)
    for r in range(3):
        alone, _, t = run_inverting(matcher, x0[r : r + 1], y, steps=15, signed=False, bounds=BOUNDS)
        torch.testing.assert_close(together[r], alone[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(trace[:, r], t[:, 0], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("path", ["torch.func", "autograd"])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_objective_gradient_equals_finite_differences(one, distance, path):
    """The double backward (gradient of the gradient-matching loss w.r.t. the inputs) against central differences,
    for both the transform path (vmapped restarts) and the autograd path (one restart)."""
    model, _, y, g = one
    matcher = GradientMatcher(model, CE, as_shared(model, g), distance=distance, tv=0.0)
    z = images(1, seed=5)
    single = matcher._single if path == "torch.func" else matcher._single_autograd
    grad_x, value = single(z, y, matcher.buffers)
    fd = finite_difference_grad(lambda v: matcher._objective(v, y, matcher.buffers), z)
    torch.testing.assert_close(grad_x, fd, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(value, matcher._objective(z, y, matcher.buffers))


def _replay_mismatch(model, shared, x, y):
    return GradientMatcher(model, CE, as_shared(model, shared), batch_buffers=True).mismatch(x, y)[0]


def test_train_mode_batchnorm_is_replayed_exactly_and_never_moved():
    """Train-mode BatchNorm: the client used its batch's statistics; the attacker's replay at the true batch gives
    the shared gradient back to rounding, and the caller's running statistics stay where they were."""
    model = bn_cnn().train()
    x, y = images(3, seed=2), torch.tensor([0, 2, 3])
    with assert_model_unchanged(model):
        g = gs.privacy.client_gradient(model, CE, x, y)
        assert _replay_mismatch(model, g, x, y) < 1e-12
        eval_g = gs.privacy.client_gradient(copy.deepcopy(model).eval(), CE, x, y)
        assert _replay_mismatch(model, eval_g, x, y) > 1e-3  # the mode matters
        rec = gs.privacy.reconstruct(model, CE, g, attack="inverting", steps=30, restarts=2, batch_size=3,
                                     input_shape=SHAPE, bounds=BOUNDS, truth=(x, y))
    assert any("BatchNorm in train mode" in a for a in rec.meta["assumptions"])
    assert rec.labels.tolist() == [0, 2, 3]


def test_eval_mode_batchnorm_uses_running_statistics():
    model = bn_cnn()
    x, y = images(2, seed=3), torch.tensor([1, 3])
    g = gs.privacy.client_gradient(model, CE, x, y)
    assert _replay_mismatch(model, g, x, y) < 1e-12
    rec = gs.privacy.reconstruct(model, CE, g, attack="dlg", steps=3, batch_size=2, input_shape=SHAPE)
    assert any("running statistics" in a for a in rec.meta["assumptions"])


@pytest.mark.parametrize("mode", ["expected", "sample"])
def test_train_mode_dropout_is_stated_and_the_model_untouched(mode):
    model = dropout_mlp()
    x, y = images(1, seed=4), torch.tensor([2])
    g = gs.privacy.client_gradient(copy.deepcopy(model).eval(), CE, x, y)
    with assert_model_unchanged(model):
        rec = gs.privacy.reconstruct(model, CE, g, attack="inverting", steps=20, input_shape=SHAPE, bounds=BOUNDS,
                                     dropout=mode)
    assert any("Dropout in train mode" in a and ("expected network" in a) == (mode == "expected")
               for a in rec.meta["assumptions"])
    assert all(m.training for m in model.modules())


def test_weight_update_after_local_steps_is_replayed_and_inverted(one):
    model, x, y, _ = one
    upd = gs.privacy.client_update(model, CE, x, y, local_steps=3, lr=0.5)
    assert _replay_mismatch(model, upd, x, y) < 1e-12
    rec = gs.privacy.reconstruct(model, CE, upd, attack="dlg", input_shape=SHAPE, bounds=BOUNDS, truth=(x, y))
    assert float(rec.psnr[0]) > 40 and rec.labels.tolist() == [1]
    assert any("local steps" in a for a in rec.meta["assumptions"])


def test_dlg_with_joint_labels_recovers_the_label(one):
    model, x, y, g = one
    rec = gs.privacy.reconstruct(model, CE, g, attack="dlg", labels="joint", steps=15, input_shape=SHAPE, truth=(x, y))
    assert rec.labels.tolist() == [1] and "label_logits" in rec.tensors
    assert float(rec.psnr[0]) > 30


def test_result_round_trips_and_plots(tmp_path, one):
    model, x, y, g = one
    rec = gs.privacy.reconstruct(model, CE, g, attack="inverting", steps=10, input_shape=SHAPE, bounds=BOUNDS,
                                 truth=(x, y))
    back = gs.Result.load(rec.save(tmp_path / "rec"))
    assert type(back).__name__ == "ReconstructionResult"
    assert torch.equal(back.inputs, rec.inputs) and back.n_evaluations == rec.n_evaluations
    fig = back.plot()
    assert len(fig.axes) == 2 and "dB" in fig.axes[1].get_title()
    assert any(k == "model evaluations" for k, _ in back.summary())


def test_restarts_are_grouped_under_the_memory_budget_with_the_same_result(one):
    model, _, _, g = one
    kw = dict(attack="inverting", steps=8, restarts=3, input_shape=SHAPE, bounds=BOUNDS, seed=1, signed=False)
    together = gs.privacy.reconstruct(model, CE, g, **kw)
    apart = gs.privacy.reconstruct(model, CE, g, max_memory=1, **kw)  # one restart per group (autograd path)
    # signed=False: sign() of rounding-level differences between the vmap and autograd paths would diverge
    assert together.meta["restart_groups"] == 1 and apart.meta["restart_groups"] == 3
    torch.testing.assert_close(apart.loss_trace, together.loss_trace, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(apart.inputs, together.inputs, rtol=1e-9, atol=1e-12)
