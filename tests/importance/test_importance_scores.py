"""Every score against an independent oracle: the exact loss change of removing each weight, the dense Hessian
(``torch.autograd.functional.hessian``), a per-example Python loop for Fisher/gradient statistics, explicit
patches for activation norms, and finite differences for neuron sensitivity."""

from __future__ import annotations

import copy

import pytest
import torch
from importance_cases import CE, conv_chain, mse, regression_case, remove_each_weight, tiny_vit, unused_case

from gradsense.importance import importance, quantize
from helpers import assert_model_unchanged
from oracles import dense_hessian, per_example_loop_grads

TIGHT = {"rtol": 1e-9, "atol": 1e-12}


def _diag_blocks(model, h: torch.Tensor) -> dict[str, torch.Tensor]:
    out, pos = {}, 0
    for n, p in model.named_parameters():
        out[n] = h.diagonal()[pos : pos + p.numel()].reshape(p.shape)
        pos += p.numel()
    return out


def test_taylor_and_hessian_scores_are_the_exact_loss_change_on_a_quadratic():
    """MSE of a linear model is exactly quadratic in the weights: removing weight k changes the loss by
    -g_k w_k + 1/2 H_kk w_k^2 exactly; the Hessian score equals it, Taylor is its first-order part."""
    case = regression_case()
    truth = remove_each_weight(copy.deepcopy(case.model), mse, case.x, case.y, "0.weight")
    hdiag = _diag_blocks(case.model, dense_hessian(case.model, mse, case.x, case.y))["0.weight"]
    w = case.model[0].weight.detach()
    with assert_model_unchanged(case.model):
        hess = importance(case.model, mse, (case.x, case.y), method="hessian", probes="exact")
        tay = importance(case.model, mse, (case.x, case.y), method="taylor")
    torch.testing.assert_close(hess.scores["0.weight"], truth.abs(), **TIGHT)
    # first order: the exact change minus its (exact) quadratic term
    torch.testing.assert_close(tay.scores["0.weight"], (truth - 0.5 * hdiag * w * w).abs(), **TIGHT)
    # and the Hessian diagonal it used is the dense one
    torch.testing.assert_close(hess.tensors["hdiag/0.weight"], hdiag, **TIGHT)


def test_taylor_is_exact_to_second_order_on_a_network():
    """On a tanh MLP, |Delta L_exact - (-g w)| = O(w^2): shrinking the removed weight's scale by 10 shrinks the
    first-order error by about 100 (the oracle removes w_k scaled by eps and compares)."""
    from cases import make_mlp_case

    case = make_mlp_case()
    res = importance(case.model, CE, (case.x, case.y), method="taylor")
    name = "2.weight"
    g = {n: v.sum(0) / case.x.shape[0] for n, v in per_example_loop_grads(case.model, CE, case.x, case.y).items()}[name]
    w = dict(case.model.named_parameters())[name].detach()
    torch.testing.assert_close(res.scores[name], (g * w).abs(), **TIGHT)
    errs = []
    for eps in (1e-2, 1e-3):
        m = copy.deepcopy(case.model)
        p = dict(m.named_parameters())[name]
        with torch.no_grad():
            base = float(CE(m(case.x), case.y))
            p.view(-1)[0] -= eps * w.view(-1)[0]
            exact = float(CE(m(case.x), case.y)) - base
        errs.append(abs(exact - (-g.view(-1)[0] * eps * w.view(-1)[0]).item()))
    assert 50 < errs[0] / errs[1] < 200, errs


def test_fisher_scores_against_a_per_example_loop(case):
    grads = per_example_loop_grads(case.model, CE, case.x, case.y)
    with assert_model_unchanged(case.model):
        t2 = importance(case.model, CE, (case.x, case.y), method="taylor2", params=None)
        fi = importance(case.model, CE, (case.x, case.y), method="fisher", chunk_size=3)
    for name, s in fi.scores.items():
        w = dict(case.model.named_parameters())[name].detach()
        f = (grads[name] ** 2).mean(0)
        g = grads[name].mean(0)
        torch.testing.assert_close(s, 0.5 * f * w * w, **TIGHT)
        torch.testing.assert_close(t2.scores[name], (g * w - 0.5 * f * w * w).abs(), **TIGHT)
        torch.testing.assert_close(fi.tensors[f"curvature/{name}"], f.sum(), **TIGHT)


def test_hutchinson_diagonal_and_hutchpp_traces_match_the_dense_hessian():
    case = conv_chain()
    names = ["0.weight", "3.weight", "6.weight"]
    h = dense_hessian(case.model, CE, case.x, case.y, params=names)
    sizes = [dict(case.model.named_parameters())[n].numel() for n in names]
    blocks = torch.split(torch.arange(h.shape[0]), sizes)
    # weights: Hutchinson diagonal, within 4 standard errors entry by entry (a few may stray: 99.5%)
    res = importance(case.model, CE, (case.x, case.y), method="hessian", params=names, probes=64, seed=1)
    diag = torch.cat([res.tensors[f"hdiag/{n}"].reshape(-1) for n in names])
    se = torch.cat([res.tensors[f"hdiag_stderr/{n}"].reshape(-1) for n in names])
    z = (diag - h.diagonal()) / se.clamp_min(1e-12)
    assert float((z.abs() <= 4).double().mean()) >= 0.99
    # layers: Hutch++ traces of the diagonal blocks, within 4 standard errors
    lay = importance(case.model, CE, (case.x, case.y), method="hessian", params=names, granularity="layer", rtol=0.02, seed=0)
    for n, idx in zip(names, blocks):
        layer = n.rsplit(".", 1)[0]
        truth = float(h[idx][:, idx].trace())
        est, err = float(lay.tensors[f"trace/{layer}"]), float(lay.tensors[f"trace_stderr/{layer}"])
        assert abs(est - truth) <= 4 * err + 1e-9 * abs(truth), (layer, est, truth, err)
    # channels: trace of each output channel's block
    ch = importance(case.model, CE, (case.x, case.y), method="hessian", params=names, granularity="channel", rtol=0.02)
    w0 = dict(case.model.named_parameters())["0.weight"].detach()
    traces = ch.tensors["trace/0"]
    for c in range(4):
        idx = blocks[0].reshape(w0.shape)[c].reshape(-1)
        truth = float(h[idx][:, idx].trace())
        assert abs(float(traces[c]) - truth) <= 4 * float(ch.tensors["trace_stderr/0"][c]) + 1e-9, (c, traces[c], truth)


def test_hessian_structure_score_formula_on_the_quadratic():
    """Layer score |-g.w + 1/2 Tr(H)/n ||w||^2| with the exact trace (the sketch spans the small space)."""
    case = regression_case()
    res = importance(case.model, mse, (case.x, case.y), method="hessian", granularity="layer", params=["0.weight"])
    h = dense_hessian(case.model, mse, case.x, case.y, params=["0.weight"])
    g = per_example_loop_grads(case.model, mse, case.x, case.y, ["0.weight"])["0.weight"].mean(0)
    w = case.model[0].weight.detach()
    expected = abs(float(-(g * w).sum()) + 0.5 * float(h.trace()) / w.numel() * float((w * w).sum()))
    assert float(res.scores["0"]) == pytest.approx(expected, rel=1e-9)


def _patches(x: torch.Tensor, k: int, pad: int) -> torch.Tensor:
    """Oracle: every k x k patch of a zero-padded (N, C, H, W) input, by explicit slicing."""
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = []
    for i in range(xp.shape[2] - k + 1):
        for j in range(xp.shape[3] - k + 1):
            rows.append(xp[:, :, i : i + k, j : j + k])
    return torch.stack(rows, 1)  # (N, L, C, k, k)


def test_gblm_and_wanda_against_explicit_activation_norms():
    case = conv_chain()
    m = case.model
    n = case.x.shape[0]
    grads = per_example_loop_grads(m, CE, case.x, case.y, ["0.weight", "6.weight"])
    with torch.no_grad():
        x3 = m[5](m[4](m[3](m[2](m[1](m[0](case.x))))))  # input of the linear layer
    x0 = (_patches(case.x, 3, 1) ** 2).sum((0, 1)) / n  # (C, k, k)
    norms = {"0.weight": x0.sqrt().unsqueeze(0), "6.weight": ((x3**2).sum(0) / n).sqrt().unsqueeze(0)}
    wanda = importance(m, CE, (case.x, case.y), method="wanda", params=["0.weight", "6.weight"])
    gblm = importance(m, CE, (case.x, case.y), method="gblm", params=["0.weight", "6.weight"], alpha=3.0)
    for name in norms:
        w = dict(m.named_parameters())[name].detach()
        torch.testing.assert_close(wanda.scores[name], w.abs() * norms[name], **TIGHT)
        g_norm = (grads[name] ** 2).mean(0).sqrt()
        torch.testing.assert_close(gblm.scores[name], w.abs() * (norms[name] + 3.0 * g_norm), **TIGHT)


def test_gaprune_against_per_example_loops_on_two_data_sets(mlp_case):
    from cases import make_mlp_case

    general = make_mlp_case(seed=5, n=14)
    dom = per_example_loop_grads(mlp_case.model, CE, mlp_case.x, mlp_case.y)
    gen = per_example_loop_grads(mlp_case.model, CE, general.x, general.y)
    res = importance(mlp_case.model, CE, (mlp_case.x, mlp_case.y), method="gaprune",
                     reference=(general.x, general.y), gamma=0.5)
    for name, s in res.scores.items():
        w = dict(mlp_case.model.named_parameters())[name].detach()
        fd, fg = (dom[name] ** 2).mean(0), (gen[name] ** 2).mean(0)
        a = dom[name].mean(0) * gen[name].mean(0) / (fd * fg).sqrt()
        torch.testing.assert_close(s, 0.5 * fd * w * w * torch.clamp(1 + 0.5 * a, min=0), **TIGHT)


def test_serene_sensitivity_against_finite_differences():
    case = conv_chain(n=5)
    m = case.model
    res = importance(m, CE, (case.x, case.y), method="serene", granularity="channel")
    eps = 1e-6
    for layer, idx in (("0", 0), ("3", 3)):
        sens = res.scores[layer]
        for c in range(sens.numel()):
            def shifted(delta: float, c: int = c, idx: int = idx) -> torch.Tensor:
                def hook(_m, _i, out):
                    out = out.clone()
                    out[:, c] += delta
                    return out

                h = m[idx].register_forward_hook(hook)
                try:
                    with torch.no_grad():
                        return m(case.x)
                finally:
                    h.remove()

            fd = (shifted(eps) - shifted(-eps)) / (2 * eps)  # (N, K): dy_k/da_c per example
            torch.testing.assert_close(sens[c], fd.abs().mean(), rtol=1e-6, atol=1e-9)


def test_pqi_integral_on_the_quadratic_and_completeness_on_a_network():
    case = regression_case()
    w = case.model[0].weight.detach()
    delta = quantize(w, 2) - w
    res = importance(case.model, mse, (case.x, case.y), method="pqi", bits=2, steps=4, params=["0.weight"])
    # quadratic: int_0^1 g(W + t D) dt = g + 1/2 H D exactly, and the trapezoid rule is exact for it
    h = dense_hessian(case.model, mse, case.x, case.y, params=["0.weight"])
    g = per_example_loop_grads(case.model, mse, case.x, case.y, ["0.weight"])["0.weight"].mean(0)
    avg = g + 0.5 * (h @ delta.reshape(-1)).reshape(w.shape)
    torch.testing.assert_close(res.scores["0.weight"], (delta * avg).abs(), **TIGHT)
    assert res.meta["integral"] == pytest.approx(res.meta["loss_change"], rel=1e-9)
    assert res.meta["taylor"] == pytest.approx(float((g * delta).sum()), rel=1e-9)
    # a network: the integral converges to the measured change as steps grow (trapezoid error O(1/steps^2))
    from cases import make_mlp_case

    c = make_mlp_case()
    gaps = [abs((r := importance(c.model, CE, (c.x, c.y), method="pqi", bits=2, steps=s)).meta["integral"]
                - r.meta["loss_change"]) for s in (2, 8)]
    assert gaps[1] < gaps[0] / 8


def test_unused_parameters_score_zero():
    case = unused_case()
    data = (case.x, case.y)
    gen = unused_case(seed=3)
    for method, opts in [("taylor", {}), ("taylor2", {}), ("fisher", {}), ("gblm", {}), ("wanda", {}),
                         ("hessian", {"probes": 8}), ("pqi", {}), ("gaprune", {"reference": (gen.x, gen.y)}),
                         ("ecoflap", {"probes": 4})]:
        res = importance(case.model, CE, data, method=method, **opts)
        assert torch.count_nonzero(res.scores["unused.weight"]) == 0, method
        assert torch.count_nonzero(res.scores["a.weight"]) > 0, method
    for gran in ("channel", "layer"):
        res = importance(case.model, CE, data, method="serene", granularity=gran)
        assert torch.count_nonzero(res.scores["unused"]) == 0
        assert torch.count_nonzero(res.scores["a"]) > 0
    lay = importance(case.model, CE, data, method="hessian", granularity="layer", rtol=0.05)
    assert float(lay.scores["unused"]) == pytest.approx(0.0, abs=1e-12)  # Hutch++: 0 up to rounding
    assert float(lay.tensors["trace/unused"]) == pytest.approx(0.0, abs=1e-12)


def test_head_scores_sum_the_head_slices():
    case = tiny_vit()
    res = importance(case.model, CE, (case.x, case.y), method="magnitude", granularity="head", params=None)
    attn = case.model.blocks[0].attn
    d = attn.head_dim
    qkv, proj = attn.qkv.weight.detach(), attn.proj.weight.detach()
    for h in range(2):
        rows = torch.cat([torch.arange(j * 8 + h * d, j * 8 + (h + 1) * d) for j in range(3)])
        expected = qkv[rows].abs().sum() + proj[:, h * d : (h + 1) * d].abs().sum()
        torch.testing.assert_close(res.scores["blocks.0.attn"][h], expected, **TIGHT)


def test_same_seed_same_scores_and_chunking_does_not_matter(cnn_case):
    data = (cnn_case.x, cnn_case.y)
    a = importance(cnn_case.model, CE, data, method="hessian", probes=8, seed=3)
    b = importance(cnn_case.model, CE, data, method="hessian", probes=8, seed=3)
    c = importance(cnn_case.model, CE, data, method="hessian", probes=8, seed=4)
    for k in a.scores:
        assert torch.equal(a.scores[k], b.scores[k])
    assert any(not torch.equal(a.scores[k], c.scores[k]) for k in a.scores)
    one = importance(cnn_case.model, CE, data, method="taylor2", chunk_size=1, batch_size=3)
    many = importance(cnn_case.model, CE, data, method="taylor2")
    for k in one.scores:
        torch.testing.assert_close(one.scores[k], many.scores[k], rtol=1e-10, atol=1e-13)
