"""Influence scores against independent oracles: dense Hessians, per-example loops, leave-one-out retraining.

Sign convention under test: ``score = +g_q^T (H + lambda I)^-1 g_z = -I_up,loss`` (Koh & Liang), positive for
proponents; removing z raises the query loss by about ``score / n``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from influence_cases import CE, dense_curvature, fit_lbfgs, logreg_problem, loop_grads, mlp_problem
from safetensors.torch import save_file

import gradsense as gs
from gradsense.core.projection import RandomProjection
from helpers import assert_model_unchanged


@pytest.fixture(scope="module")
def logreg():
    return logreg_problem()


@pytest.fixture(scope="module")
def mlp():
    return mlp_problem()


def _oracle_influence(model, train, query, damping):
    h = dense_curvature(model, CE, *train)
    gz = loop_grads(model, CE, *train)
    gq = loop_grads(model, CE, *query)
    a = h + damping * torch.eye(h.shape[0], dtype=h.dtype)
    return gq @ torch.linalg.solve(a, gz.T)


@pytest.mark.parametrize("solver", ["exact", "cg", "lissa"])
def test_influence_equals_dense_damped_inverse_logreg(logreg, solver):
    model, train, test, wd = logreg
    expected = _oracle_influence(model, train, test, wd)
    with assert_model_unchanged(model):
        res = gs.influence.scores(model, CE, train, test, method="influence", curvature="hessian", solver=solver,
                                  damping=wd)
    torch.testing.assert_close(res.scores, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))
    assert res.meta["converged"] is True
    assert res.meta["damping"] == wd


def test_ggn_equals_hessian_for_a_linear_model(logreg):
    model, train, test, wd = logreg
    h = gs.influence.scores(model, CE, train, (test[0][:3], test[1][:3]), method="influence", curvature="hessian",
                            solver="exact", damping=wd)
    g = gs.influence.scores(model, CE, train, (test[0][:3], test[1][:3]), method="influence", curvature="ggn",
                            solver="cg", damping=wd)
    torch.testing.assert_close(g.scores, h.scores, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_influence_equals_dense_damped_inverse_mlp(mlp, solver):
    model, train, test = mlp
    damping = 0.3
    h = dense_curvature(model, CE, *train)
    assert float(torch.linalg.eigvalsh(h).min()) + damping > 0.05  # positive definite: CG is valid
    expected = _oracle_influence(model, train, test, damping)
    res = gs.influence.scores(model, CE, train, test, method="influence", curvature="hessian", solver=solver,
                              damping=damping)
    torch.testing.assert_close(res.scores, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))


def test_koh_liang_leave_one_out(logreg):
    """Predicted ``score / n`` against the query-loss change of retraining without z (L-BFGS to convergence)."""
    model, (x, y), (xq, yq), wd = logreg
    n = x.shape[0]
    queries = slice(0, 3)
    res = gs.influence.scores(model, CE, (x, y), (xq[queries], yq[queries]), method="influence",
                              curvature="hessian", solver="cg", damping=wd)
    base = F.cross_entropy(model(xq[queries]), yq[queries], reduction="none").detach()
    actual = torch.zeros(3, n, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for z in range(n):
        m = torch.nn.Linear(x.shape[1], 3).double()
        m.load_state_dict(state)
        w = torch.ones(n, dtype=torch.float64)
        w[z] = 0.0  # the objective (1/n) sum_{i != z} l_i + wd/2 |theta|^2: epsilon = -1/n
        fit_lbfgs(m, x, y, wd, weights=w, iters=100)
        with torch.no_grad():
            actual[:, z] = F.cross_entropy(m(xq[queries]), yq[queries], reduction="none") - base
    predicted = res.scores / n
    for q in range(3):
        r = torch.corrcoef(torch.stack([predicted[q], actual[q]]))[0, 1]
        assert r > 0.95, f"query {q}: correlation {float(r):.3f}"
        slope = float((predicted[q] * actual[q]).sum() / (predicted[q] ** 2).sum())
        assert 0.7 < slope < 1.3, slope  # same scale: score / n is the loss change


def test_grad_dot_and_cos_equal_loop(mlp):
    model, train, test = mlp
    gz, gq = loop_grads(model, CE, *train), loop_grads(model, CE, *test)
    dot = gs.influence.scores(model, CE, train, test, method="grad_dot")
    torch.testing.assert_close(dot.scores, gq @ gz.T, rtol=1e-10, atol=1e-12)
    cos = gs.influence.scores(model, CE, train, test, method="grad_cos")
    expected = (gq / gq.norm(dim=1, keepdim=True)) @ (gz / gz.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(cos.scores, expected, rtol=1e-10, atol=1e-12)
    assert float(cos.scores.abs().max()) <= 1 + 1e-12
    top = dot.top(0, 3)
    assert top.indices.tolist() == torch.argsort(gq[0] @ gz.T, descending=True)[:3].tolist()
    bottom = dot.bottom(1, 2)
    assert bottom.indices.tolist() == torch.argsort(gq[1] @ gz.T)[:2].tolist()


def test_projected_scores_are_products_of_the_projected_gradients(mlp):
    model, train, test = mlp
    gz, gq = loop_grads(model, CE, *train), loop_grads(model, CE, *test)
    res = gs.influence.scores(model, CE, train, test, method="grad_dot", proj_dim=16, seed=3)
    sizes = {k: p.numel() for k, p in model.named_parameters()}
    p = RandomProjection(sizes, 16, seed=3).dense().double()
    torch.testing.assert_close(res.scores, (gq @ p.T) @ (gz @ p.T).T, rtol=1e-9, atol=1e-12)


def _perturbed_states(model, k):
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(k):
        out.append({n: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for n, v in model.state_dict().items()})
    return out


def test_tracin_equals_lr_weighted_sum_over_checkpoints(mlp, tmp_path):
    model, train, test = mlp
    states = _perturbed_states(model, 3)
    lrs = [0.1, 0.05, 0.01]
    expected = torch.zeros(test[0].shape[0], train[0].shape[0], dtype=torch.float64)
    for s, lr in zip(states, lrs):
        m = mlp_problem()[0]
        m.load_state_dict(s)
        expected += lr * loop_grads(m, CE, *test) @ loop_grads(m, CE, *train).T
    with assert_model_unchanged(model):
        res = gs.influence.scores(model, CE, train, test, method="tracin", checkpoints=states, lrs=lrs)
    torch.testing.assert_close(res.scores, expected, rtol=1e-10, atol=1e-12)
    # the same checkpoints as files: safetensors and weights_only torch.save (with a learning_rate entry)
    paths = []
    for i, (s, lr) in enumerate(zip(states, lrs)):
        if i % 2:
            p = tmp_path / f"c{i}.safetensors"
            save_file({k: v.contiguous() for k, v in s.items()}, str(p))
        else:
            p = tmp_path / f"c{i}.pt"
            torch.save({"state_dict": s, "learning_rate": lr}, p)
        paths.append(p)
    res2 = gs.influence.scores(model, CE, train, test, method="tracin", checkpoints=paths, lrs=lrs)
    torch.testing.assert_close(res2.scores, expected, rtol=1e-10, atol=1e-12)


def test_pickled_checkpoint_is_refused_before_work(mlp, tmp_path):
    model, train, test = mlp

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    p = tmp_path / "evil.pt"
    torch.save({"obj": Evil()}, p)
    with pytest.raises(ValueError, match="weights_only"):
        gs.influence.scores(model, CE, train, test, method="tracin", checkpoints=[p])


def test_trak_equals_explicit_formula(logreg):
    model, train, test, _ = logreg

    def neg_margin(out, y, reduction="mean"):
        picked = out.gather(1, y[:, None]).squeeze(1)
        mine = torch.arange(out.shape[1])[None] == y[:, None]
        v = -(picked - torch.logsumexp(out.masked_fill(mine, float("-inf")), dim=1))
        return v.mean() if reduction == "mean" else v

    phi_z, phi_q = loop_grads(model, neg_margin, *train), loop_grads(model, neg_margin, *test)
    p = torch.softmax(model(train[0]), 1).gather(1, train[1][:, None]).squeeze(1).detach()
    lam = 0.01
    k = phi_z.T @ phi_z + lam * torch.eye(phi_z.shape[1], dtype=torch.float64)
    expected = phi_q @ torch.linalg.solve(k, phi_z.T) * (1 - p)[None]
    res = gs.influence.scores(model, CE, train, test, method="trak", damping=lam)
    torch.testing.assert_close(res.scores, expected, rtol=1e-8, atol=1e-10)


def test_features_reused_across_queries(mlp, tmp_path):
    model, train, test = mlp
    feats = gs.influence.features(model, CE, train)
    feats.save(tmp_path / "f")
    reloaded = gs.Result.load(tmp_path / "f")
    assert isinstance(reloaded, gs.influence.GradientFeatures) and torch.equal(reloaded.features(), feats.features())
    a = gs.influence.scores(model, CE, reloaded, test, method="grad_dot")
    b = gs.influence.scores(model, CE, train, test, method="grad_dot")
    # the same gradients; the streamed path multiplies them in other chunk shapes (1-ulp differences)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="margin"):
        gs.influence.scores(model, CE, feats, test, method="trak")
    with pytest.raises(ValueError, match="curvature_data"):
        gs.influence.scores(model, CE, feats, test, method="influence")
    c = gs.influence.scores(model, CE, feats, test, method="influence", curvature_data=train, damping=0.3,
                            curvature="hessian", solver="exact")
    torch.testing.assert_close(c.scores, _oracle_influence(model, train, test, 0.3), rtol=1e-6, atol=1e-10)


def test_self_influence_formulas(logreg):
    model, train, _, wd = logreg
    gz = loop_grads(model, CE, *train)
    h = dense_curvature(model, CE, *train)
    s = gs.influence.self_influence(model, CE, train, method="influence", curvature="hessian", solver="exact",
                                    damping=wd)
    a = h + wd * torch.eye(h.shape[0], dtype=h.dtype)
    torch.testing.assert_close(s.scores, (gz * torch.linalg.solve(a, gz.T).T).sum(1), rtol=1e-7, atol=1e-12)
    d = gs.influence.self_influence(model, CE, train, method="grad_dot")
    torch.testing.assert_close(d.scores, (gz * gz).sum(1), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="grad_cos"):
        gs.influence.self_influence(model, CE, train, method="grad_cos")


def test_self_influence_finds_flipped_labels():
    """Logistic regression trained on 10% flipped labels: the flipped examples rank high by self-influence."""
    from influence_cases import blobs

    x, y = blobs(200, 5, 3, seed=7, spread=2.0)
    g = torch.Generator().manual_seed(0)
    flip = torch.randperm(200, generator=g)[:20]
    y_noisy = y.clone()
    y_noisy[flip] = (y[flip] + 1 + torch.randint(0, 2, (20,), generator=g)) % 3
    model = fit_lbfgs(torch.nn.Linear(5, 3).double(), x, y_noisy, 0.01).eval()
    flagged = torch.zeros(200, dtype=torch.bool)
    flagged[flip] = True
    res = gs.influence.self_influence(model, CE, (x, y_noisy), method="influence", damping=0.01, flagged=flagged)
    assert res.fraction_found(flagged, 0.1) >= 0.7  # chance: 0.1
    assert "top 10%" in res.meta["found"]


def test_select_is_argmax_of_mean_cosine(mlp):
    model, train, test = mlp
    gz, gt = loop_grads(model, CE, *train), loop_grads(model, CE, *test)
    cos = (gz / gz.norm(dim=1, keepdim=True)) @ (gt / gt.norm(dim=1, keepdim=True)).T
    res = gs.influence.select(model, CE, train, test, k=5)
    torch.testing.assert_close(res.scores, cos.mean(1), rtol=1e-10, atol=1e-12)
    assert res.selected.tolist() == torch.argsort(cos.mean(1), descending=True)[:5].tolist()
    mg = gs.influence.select(model, CE, train, test, k=3, aggregate="mean_gradient")
    m = gt.mean(0)
    torch.testing.assert_close(mg.scores, (gz @ m) / (gz.norm(dim=1) * m.norm()), rtol=1e-10, atol=1e-12)


def test_bad_input_fails_before_work(mlp, tmp_path):
    model, train, test = mlp
    with pytest.raises(ValueError, match="unknown method"):
        gs.influence.scores(model, CE, train, test, method="nope")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffles"):
        gs.influence.scores(model, CE, loader, test)
    with pytest.raises(ValueError, match="no labels"):
        gs.influence.scores(model, CE, train[0], test)
    bn = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).double().train()
    with pytest.raises(ValueError, match="eval"):
        gs.influence.features(bn, CE, train)
    with pytest.raises(ValueError, match="proj_dim"):
        gs.influence.features(model, CE, train, projection="kronecker")
    with pytest.raises(ValueError, match="damping"):
        gs.influence.scores(model, CE, train, test, method="influence", damping=-1.0)
    out = tmp_path / "feats"
    with pytest.raises(ValueError, match=r"expects|failed"):
        gs.influence.features(model, CE, (torch.randn(5, 7, dtype=torch.float64), torch.zeros(5, dtype=torch.long)),
                              out=out)
    assert not out.exists()
    with assert_model_unchanged(model), pytest.raises(ValueError):
        gs.influence.scores(model, CE, train, test, method="ekfac", params=["0.weight", "2.bias"])
