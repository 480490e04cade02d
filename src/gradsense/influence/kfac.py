"""K-FAC and EK-FAC: Kronecker-factored curvature of Linear, Conv2d and Embedding layers, fitted once, saved, reused.

For a layer with per-example gradient matrix ``G = sum_t delta_t a_t^T`` (see :mod:`gradsense.core.layergrads`)
the Fisher/Gauss-Newton block ``E[vec(G) vec(G)^T]`` is approximated by ``S kron A`` (Martens & Grosse 2015;
Grosse & Martens 2016 for convolutions) with

- ``A = sum a_t a_t^T / (tokens)``: the input covariance (an Embedding's one-hot inputs make it diagonal: the
  token frequencies), and
- ``S = sum_i sum_t delta_t delta_t^T / n``: the output-gradient covariance, summed over the positions of an
  example and averaged over examples (so that ``S kron A`` has the scale of ``E[vec(G) vec(G)^T]`` for
  convolutions and sequences, as in KFC, Grosse & Martens 2016; with one position per example both are plain
  means),

each eigendecomposed, ``A = Q_A diag(l_A) Q_A^T``, ``S = Q_S diag(l_S) Q_S^T``. K-FAC's eigenvalues are
``l_S l_A^T``; EK-FAC (George et al. 2018; Grosse et al. 2023) replaces them with the second moment of the
gradients in that eigenbasis, ``Lambda = E_i[(Q_S^T G_i Q_A)^2]``, which is exact on the diagonal of the true
block in that basis. The damped inverse applied to a gradient matrix is then

    (F + lambda I)^-1 G = Q_S [ (Q_S^T G Q_A) / (Lambda + lambda) ] Q_A^T.

``fisher="empirical"`` uses the data's labels; ``"sampled"`` draws labels from the model's softmax (the true
Fisher, which equals the Gauss-Newton for cross-entropy; kronfluence's default), seeded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradsense.core.batching import (
    chunk_size_for,
    chunks,
    default_budget,
    estimate_example_bytes,
    parse_memory,
    progress,
)
from gradsense.core.checks import check_positive_int, draw_seed
from gradsense.core.functional import FunctionalModel, ParamSpec, functional, model_fingerprint
from gradsense.core.layergrads import Layer, LayerIO, check_mean_loss, find_layers, layer_io, shared_layers
from gradsense.core.ranges import take
from gradsense.influence.features import check_labelled
from gradsense.results.influence import CurvatureFactors

__all__ = ["fit_factors", "precondition", "resolve_damping"]

Strategy = Literal["kfac", "ekfac"]
Fisher = Literal["empirical", "sampled"]

#: kronfluence's heuristic damping: 0.1 x the mean eigenvalue of each layer.
HEURISTIC_DAMPING = 0.1


def _sampler(fisher: str, seed: int, chunk_index: int) -> Callable[[Any], Tensor] | None:
    if fisher == "empirical":
        return None

    def draw(output: Any) -> Tensor:
        z = output if isinstance(output, Tensor) else output.logits
        if z.ndim != 2:
            raise ValueError(f"fisher='sampled' needs (N, C) classification logits, got outputs of shape "
                             f"{tuple(z.shape)}; use fisher='empirical'.")
        g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + chunk_index)
        probs = torch.softmax(z.detach().double().cpu(), dim=1)
        return torch.multinomial(probs, 1, generator=g).squeeze(1).to(z.device)

    return draw


def _rotated(layer: Layer, io: LayerIO, qs: Tensor, qa: Tensor | None) -> Tensor:
    """``Q_S^T G_i Q_A`` for every example of the batch, ``(n, out, in)``, without forming ``G_i`` when T is 1."""
    d = io.grads[layer.name] @ qs  # (n, T, out) in the S eigenbasis
    a = io.inputs[layer.name]
    if layer.kind == "embedding":
        n = d.shape[0]
        g = torch.zeros(n, layer.in_dim, layer.out_dim, dtype=d.dtype, device=d.device)
        src = d * (a >= 0).unsqueeze(-1).to(d.dtype)
        g.scatter_add_(1, a.clamp_min(0).unsqueeze(-1).expand_as(src), src)
        return g.transpose(1, 2)
    return torch.einsum("nto,nti->noi", d, a @ qa)


def fit_factors(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    *,
    params: ParamSpec = None,
    strategy: Strategy = "ekfac",
    fisher: Fisher = "empirical",
    seed: int | None = 0,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    show_progress: bool | None = None,
    name: str | None = None,
) -> CurvatureFactors:
    """Fit K-FAC or EK-FAC factors of the model's Fisher/Gauss-Newton on ``data`` (two passes for EK-FAC).

    Args:
        model: The model (never modified; BatchNorm/Dropout in eval mode).
        loss_fn: ``(output, labels) -> scalar``, the mean of per-example losses.
        data: ``(inputs, labels)``, Dataset or DataLoader (no shuffling).
        params: Which layers: the Linear/Conv2d/Embedding layers whose weight is selected (default: all of them;
            parameters of other layers, e.g. BatchNorm, are left out, and so are layers whose input is shared by all
            examples, such as position embeddings; see ``meta["excluded_layers"]``).
        strategy: ``"ekfac"`` (eigenvalue-corrected, the default) or ``"kfac"``.
        fisher: ``"empirical"`` (the data's labels) or ``"sampled"`` (labels drawn from the model's softmax).
        seed: Seed of the sampled labels (``None``: drawn and recorded).
        chunk_size: Examples per forward/backward (default: from the memory budget).
        max_memory: Memory budget.
        show_progress: Progress bar.
        name: Model name for the result.

    Returns:
        :class:`~gradsense.results.influence.CurvatureFactors` (``.save(dir)``; reload with ``Result.load``).

    Raises:
        TypeError, ValueError: Bad arguments, data or model (before any work).

    Example:
        >>> import gradsense as gs
        >>> model, digits = gs.zoo.load("digits-cnn"), gs.zoo.dataset("digits", split="train")
        >>> f = gs.influence.fit_factors(model, gs.losses.cross_entropy, digits[:128])
        >>> sorted(f.layers)[:2]
        ['features.0', 'features.3']
    """
    t0 = time.perf_counter()
    if strategy not in ("kfac", "ekfac"):
        raise ValueError(f"strategy must be 'kfac' or 'ekfac', got {strategy!r}.")
    if fisher not in ("empirical", "sampled"):
        raise ValueError(f"fisher must be 'empirical' or 'sampled', got {fisher!r}.")
    seed = draw_seed(seed)
    n, x0, y0 = check_labelled(model, loss_fn, data, "data")
    fm = functional(model)
    exclude = shared_layers(fm, find_layers(model), x0) if params is None else []
    layers = find_layers(model, params, strict=params is not None, exclude=exclude)
    if isinstance(x0, Tensor):
        check_mean_loss(fm, loss_fn, x0, y0)
        if fisher == "sampled":
            if y0.is_floating_point():
                raise ValueError("fisher='sampled' draws class labels from the model's softmax: it needs classification "
                                 "logits and integer labels; these labels are floating point. Use fisher='empirical'.")
            _sampler(fisher, seed, 0)(fm(fm.params, x0))  # type: ignore[misc]
    if chunk_size is None:
        device = next(iter(model.parameters())).device
        budget = parse_memory(max_memory) if max_memory is not None else default_budget(device)
        per = 3 * estimate_example_bytes(model, x0[:1]) if isinstance(x0, Tensor) else 64 * 1024**2
        item = next(iter(model.parameters())).element_size()
        per += 3 * item * sum(layer.out_dim * layer.in_dim for layer in layers.values())  # rotated G and its square
        chunk_size = chunk_size_for(per, max_memory=budget, total=n)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    spans = list(chunks(n, chunk_size))
    dtype = torch.float64

    a_sum: dict[str, Tensor] = {}
    s_sum: dict[str, Tensor] = {}
    tokens: dict[str, float] = {k: 0.0 for k in layers}
    for ci, sl in enumerate(progress(spans, total=len(spans), desc="K-FAC covariances", enabled=show_progress)):
        io = _io(fm, loss_fn, data, sl, layers, fisher, seed, ci)
        for k, layer in layers.items():
            d = io.grads[k].reshape(-1, layer.out_dim).to(dtype)
            a = io.inputs[k]
            s_sum[k] = s_sum.get(k, 0) + d.T @ d  # type: ignore[assignment, operator]
            if layer.kind == "embedding":
                idx = a.reshape(-1)
                counts = torch.bincount(idx[idx >= 0], minlength=layer.in_dim).to(dtype)
                a_sum[k] = a_sum.get(k, 0) + counts  # type: ignore[assignment, operator]
            else:
                af = a.reshape(-1, layer.in_dim).to(dtype)
                a_sum[k] = a_sum.get(k, 0) + af.T @ af  # type: ignore[assignment, operator]
            tokens[k] += float(d.shape[0])

    tensors: dict[str, Tensor] = {}
    basis: dict[str, tuple[Tensor, Tensor | None]] = {}
    for k, layer in layers.items():
        s_cov = s_sum[k] / n
        s_vals, s_vecs = torch.linalg.eigh((s_cov + s_cov.T) / 2)
        tensors[f"S_vals/{k}"], tensors[f"S_vecs/{k}"] = s_vals.clamp_min(0), s_vecs.contiguous()
        if layer.kind == "embedding":
            tensors[f"A_diag/{k}"] = a_sum[k] / tokens[k]
            basis[k] = (tensors[f"S_vecs/{k}"], None)
        else:
            a_cov = a_sum[k] / tokens[k]
            a_vals, a_vecs = torch.linalg.eigh((a_cov + a_cov.T) / 2)
            tensors[f"A_vals/{k}"], tensors[f"A_vecs/{k}"] = a_vals.clamp_min(0), a_vecs.contiguous()
            basis[k] = (tensors[f"S_vecs/{k}"], tensors[f"A_vecs/{k}"])

    if strategy == "ekfac":
        lam: dict[str, Tensor] = {k: torch.zeros(layer.out_dim, layer.in_dim, dtype=dtype) for k, layer in layers.items()}
        for ci, sl in enumerate(progress(spans, total=len(spans), desc="EK-FAC eigenvalues", enabled=show_progress)):
            io = _io(fm, loss_fn, data, sl, layers, fisher, seed, ci)
            for k, layer in layers.items():
                qs, qa = basis[k]  # rotations in the model's dtype, their squares summed in float64
                work = io.grads[k].dtype
                rot = _rotated(layer, io, qs.to(work), None if qa is None else qa.to(work))
                lam[k] += (rot * rot).sum(0, dtype=dtype)
                del rot
        for k in layers:
            tensors[f"lambda/{k}"] = lam[k] / n

    info = {k: {"kind": layer.kind, "shape": list(layer.shape), "weight": layer.weight, "bias": layer.bias}
            for k, layer in layers.items()}
    return CurvatureFactors.build(
        tensors, method=strategy, settings={"strategy": strategy, "fisher": fisher, "chunk_size": chunk_size,
                                            "params": None if params is None else str(params)},
        model=model_fingerprint(model, name), seed=seed, wall_time_s=time.perf_counter() - t0,
        layers=info, strategy=strategy, fisher=fisher, n_examples=n, tokens=tokens, excluded_layers=exclude)


def _io(fm: FunctionalModel, loss_fn: Callable[[Any, Any], Tensor], data: Any, sl: slice, layers: dict[str, Layer],
        fisher: str, seed: int, ci: int) -> LayerIO:
    x, y = take(data, sl.start, sl.stop)
    return layer_io(fm, loss_fn, x, y, layers, sample_labels=_sampler(fisher, seed, ci))


def resolve_damping(factors: CurvatureFactors, damping: float | None) -> dict[str, float]:
    """Per-layer ``lambda``: the given value, or 0.1 x the layer's mean eigenvalue (kronfluence's heuristic)."""
    out = {}
    for k in factors.layers:
        if damping is None:
            out[k] = HEURISTIC_DAMPING * float(factors.eigenvalues(k).double().mean())
        else:
            out[k] = float(damping)
    return out


def precondition(factors: CurvatureFactors, mats: dict[str, Tensor], damping: float | None = None) -> dict[str, Tensor]:
    """``(F_l + lambda_l I)^-1 G`` for each layer's ``(n, out, in)`` gradient matrices (see the module docstring).

    Args:
        factors: From :func:`fit_factors`.
        mats: ``{layer: (n, out, in)}``; every fitted layer must be present.
        damping: ``lambda`` (absolute, all layers), or ``None`` for 0.1 x each layer's mean eigenvalue.

    Returns:
        ``{layer: (n, out, in)}`` in the dtype of the inputs.

    Raises:
        ValueError: A fitted layer missing from ``mats``, or a shape that differs.
    """
    lams = resolve_damping(factors, damping)
    out = {}
    for k, info in factors.layers.items():
        if k not in mats:
            raise ValueError(f"precondition: no gradient for layer {k!r}.")
        g = mats[k]
        if tuple(g.shape[1:]) != tuple(info["shape"]):
            raise ValueError(f"precondition: layer {k!r} gradient has shape {tuple(g.shape[1:])}, factors have "
                             f"{tuple(info['shape'])}.")
        dt = g.dtype
        qs = factors.tensors[f"S_vecs/{k}"].to(g.device, torch.float64)
        qa = factors.tensors.get(f"A_vecs/{k}")
        ev = factors.eigenvalues(k).to(g.device, torch.float64)
        rot = qs.T @ g.double()
        if qa is not None:
            rot = rot @ qa.to(g.device, torch.float64)
        rot = rot / (ev + lams[k])
        back = qs @ rot
        if qa is not None:
            back = back @ qa.to(g.device, torch.float64).T
        out[k] = back.to(dt)
    return out
