"""The public verbs: :func:`importance` (scores), :func:`prune` (masks), :func:`allocate_bits` (bit widths),
:func:`sweep` (methods x sparsities, measured), and the method registry :data:`METHODS`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradsense.core.checks import check_eval_mode, check_memory, suggest
from gradsense.core.distributed import DataLike
from gradsense.core.functional import ParamSpec, check_model, model_fingerprint, preserve_model
from gradsense.importance import masks as _masks
from gradsense.importance.alignment import check_gaprune, gaprune
from gradsense.importance.bits import allocate, check_choices, quantization_errors
from gradsense.importance.ecoflap import check_ecoflap, ecoflap
from gradsense.importance.engine import (
    GRANULARITIES,
    Context,
    LossFn,
    MethodOutput,
    check_train_mode,
    data_size,
    resolve_params,
)
from gradsense.importance.gblm import gblm, wanda
from gradsense.importance.hessian import check_hessian, hessian
from gradsense.importance.magnitude import magnitude
from gradsense.importance.measure import Measurer
from gradsense.importance.pqi import check_pqi, pqi
from gradsense.importance.sensitivity import serene
from gradsense.importance.structures import (
    UnitGroup,
    channel_groups,
    head_groups,
    layer_of,
    numel_of,
    unit_masks,
)
from gradsense.importance.taylor import fisher, taylor, taylor2
from gradsense.results.importance import (
    BitsResult,
    ImportanceResult,
    ImportanceVerbs,
    PruneResult,
    SweepResult,
    attach_verbs,
)

__all__ = ["METHODS", "MethodSpec", "allocate_bits", "importance", "prune", "sweep"]


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registered score: its function, the granularities it supports, its options' check, a description."""

    fn: Callable[..., MethodOutput]
    granularities: tuple[str, ...]
    description: str
    reference: str
    options: tuple[str, ...] = ()
    check: Callable[[dict[str, Any]], None] | None = None
    needs_data: bool = True


_ALL = GRANULARITIES
METHODS: dict[str, MethodSpec] = {
    "magnitude": MethodSpec(magnitude, _ALL, "|w| (global magnitude, with a per-layer floor when pruning)",
                            "Gupta et al. 2022, Is Complexity Required for Neural Network Pruning?", needs_data=False),
    "taylor": MethodSpec(taylor, _ALL, "first-order Taylor |g w|, summed over a structure",
                         "Ma et al. 2023, LLM-Pruner; Molchanov et al. 2019"),
    "taylor2": MethodSpec(taylor2, _ALL, "second-order Taylor |g w - 1/2 F w^2| with the Fisher diagonal",
                          "Ma et al. 2023, LLM-Pruner"),
    "fisher": MethodSpec(fisher, _ALL, "diagonal-Fisher saliency 1/2 F w^2", "LeCun et al. 1990; Theis et al. 2018"),
    "gblm": MethodSpec(gblm, _ALL, "|W| (||X|| + alpha ||G||), gradients over calibration samples",
                       "Das et al. 2023, Beyond Size: How Gradients Shape Pruning Decisions in LLMs", ("alpha",)),
    "wanda": MethodSpec(wanda, _ALL, "|W| ||X|| (forward passes only)", "Sun et al. 2024, Wanda"),
    "gaprune": MethodSpec(gaprune, _ALL, "domain Fisher x gradient alignment with general data",
                          "Tang & Yang 2025, GAPrune", ("reference", "gamma"), check_gaprune),
    "serene": MethodSpec(serene, ("channel", "layer"), "neuron sensitivity |dy/da| averaged over data",
                         "Tartaglione et al. 2021, SeReNe"),
    "hessian": MethodSpec(hessian, _ALL, "|-g.w + 1/2 Tr(H_S)/n_S ||w_S||^2| with Hutch++ traces",
                          "Dong et al. 2020, HAWQ-V2; Yu et al. 2022, Hessian-Aware Pruning",
                          ("probes", "rtol", "max_hvp"), check_hessian),
    "ecoflap": MethodSpec(ecoflap, ("weight", "layer"), "zeroth-order layer importance -> layer sparsity, Wanda within",
                          "Sung et al. 2024, ECoFLaP", ("probes", "mu", "lam"), check_ecoflap),
    "pqi": MethodSpec(pqi, _ALL, "|(Q(W) - W) * integral of the gradient along W -> Q(W)|",
                      "Yu et al. 2025, Identifying Sensitive Weights via Post-quantization Integral", ("bits", "steps"),
                      check_pqi),
}


def _groups(model: nn.Module, names: list[str], granularity: str) -> list[UnitGroup]:
    if granularity == "channel":
        return channel_groups(model, names)
    if granularity == "head":
        return head_groups(model, names)
    return []


def importance(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataLike,
    *,
    method: str,
    granularity: str = "weight",
    params: ParamSpec = None,
    heldout: DataLike | None = None,
    metric: Any = "auto",
    seed: int = 0,
    batch_size: int = 256,
    max_memory: int | str | None = None,
    chunk_size: int | None = None,
    name: str | None = None,
    **options: Any,
) -> ImportanceResult:
    """Score how much a model's weights, channels, heads or layers matter to its loss.

    Args:
        model: The module (never modified: parameters, ``requires_grad``, modes, hooks and buffers stay as they
            are, also when this raises). BatchNorm/Dropout must be in eval mode.
        loss_fn: ``(output, labels) -> scalar`` batch-mean loss (e.g. ``gs.losses.cross_entropy``).
        data: Calibration data: ``(inputs, labels)``, a Dataset or a DataLoader (``None`` is accepted for
            ``method="magnitude"``).
        method: A name from :data:`METHODS`: ``magnitude``, ``taylor``, ``taylor2``, ``fisher``, ``gblm``,
            ``wanda``, ``gaprune``, ``serene``, ``hessian``, ``ecoflap``, ``pqi`` (formulas and papers in each
            module's docstring).
        granularity: ``"weight"`` (param-shaped scores), ``"channel"`` (output channels of Linear/Conv layers),
            ``"head"`` (attention heads) or ``"layer"`` (one score per module).
        params: Which parameters to score (see :data:`gradsense.core.functional.ParamSpec`); default: every
            ``Linear``/``Conv`` weight.
        heldout: Held-out data; when given, every mask and bit allocation made from the result comes with the
            measured loss/metric change on it next to the predicted change.
        metric: Metric for the measurements (``"auto"``: accuracy for class logits; or ``(outputs, labels) -> float``).
        seed: Seed of every random probe (Hutchinson/Hutch++, zeroth-order directions).
        batch_size: Batch size for tensors and Datasets.
        max_memory: Memory budget of one vmap call and of one forward+backward piece (bytes or e.g. ``"1GB"``).
        chunk_size: Examples per vmap call for per-example gradients (default from the budget).
        name: Model name for the metadata.
        **options: Method options: ``alpha`` (gblm), ``reference``/``gamma`` (gaprune), ``probes``/``rtol``/
            ``max_hvp`` (hessian), ``probes``/``mu``/``lam`` (ecoflap), ``bits``/``steps`` (pqi).

    Returns:
        An :class:`~gradsense.results.importance.ImportanceResult` (``.scores``, ``.ranking()``,
        ``.prune(...)``, ``.allocate_bits(...)``).

    Raises:
        TypeError: ``model`` is not an nn.Module, ``loss_fn`` is not callable, an unknown option.
        ValueError: Unknown method or granularity, a granularity the method does not support, ``params`` that
            select nothing, BatchNorm/Dropout in train mode anywhere in the model, empty data or a DataLoader that
            yields no batch, inputs that do not fit the model, labels missing or out of range for its outputs (in
            ``data`` and ``heldout``), a loss that is not a scalar, a model without the structures asked for, bad
            option values. All before any computation.

    Example:
        >>> import gradsense as gs
        >>> model, digits = gs.zoo.load("digits-cnn"), gs.zoo.dataset("digits", split="test")
        >>> res = gs.importance.importance(model, gs.losses.cross_entropy, digits[:64], method="taylor")
        >>> masks = res.prune(0.5)
        >>> sum(int((~m).sum()) for m in masks.values()) == round(0.5 * res.meta["numel"])
        True
    """
    t0 = time.perf_counter()
    check_model(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (output, labels) -> scalar, got {type(loss_fn).__name__}.")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {sorted(METHODS)}.{suggest(method, METHODS)}")
    spec = METHODS[method]
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.{suggest(granularity, GRANULARITIES)}")
    if granularity not in spec.granularities:
        raise ValueError(f"method={method!r} supports granularity {spec.granularities}, not {granularity!r}.")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise TypeError(f"method={method!r} got unknown option(s) {unknown}; its options are {list(spec.options) or 'none'}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}.")
    if spec.check is not None:
        spec.check(options)
    check_memory(max_memory)
    if data is None and spec.needs_data:
        raise ValueError(f"method={method!r} needs calibration data (data=None given).")
    if data is not None:
        data_size(data)
    if heldout is not None:
        data_size(heldout)
    check_train_mode(model)
    chosen = resolve_params(model, params)
    names = list(chosen)
    groups = _groups(model, names, granularity)
    ctx = Context(model, loss_fn, data, names, batch_size=batch_size, max_memory=max_memory, chunk_size=chunk_size)
    measurer = None
    if heldout is not None:  # its batches are read and checked now, before any work
        measurer = Measurer(model, loss_fn, heldout, calibration=data, metric=metric, batch_size=batch_size)
    with preserve_model(model):
        if data is not None:
            ctx.check_loss()
        if measurer is not None:
            measurer.check()
        out = spec.fn(ctx, granularity, groups, seed=seed, **options)
    keys = list(out.scores)
    tensors: dict[str, Tensor] = {f"score/{k}": v.detach() for k, v in out.scores.items()}
    tensors.update({k: v.detach() for k, v in out.tensors.items()})
    for k, w in ctx.params.items():
        if w.ndim >= 1:
            tensors[f"qerr/{k}"] = quantization_errors(w)
    layers = {k: (layer_of(k) if granularity == "weight" else k) for k in keys}
    all_shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    extra_shapes = {part.param: all_shapes[part.param] for g in groups for part in g.parts if part.param not in chosen}
    cost = {"gradient batches": ctx.n_grad_batches, "per-example gradients": ctx.n_example_grads,
            "forward batches": ctx.n_forward_batches}
    if "n_hvp" in out.meta:
        cost["Hessian-vector products"] = out.meta["n_hvp"]
    settings = {k: v for k, v in options.items() if k != "reference"}
    settings.update(batch_size=batch_size)
    res = ImportanceResult.build(
        tensors,
        method=method,
        settings=settings,
        model=model_fingerprint(model, name),
        seed=seed,
        wall_time_s=time.perf_counter() - t0,
        granularity=granularity,
        keys=keys,
        layers=layers,
        param_names=names,
        param_shapes=[list(ctx.params[k].shape) for k in names],
        groups=[g.to_json() for g in groups],
        extra_shapes=extra_shapes,
        numel=sum(ctx.params[k].numel() for k in names),
        n_examples=ctx.n_examples if data is not None else 0,
        cost={k: v for k, v in cost.items() if v},
        **{k: v for k, v in out.meta.items() if k != "n_hvp"},
    )
    context = {"model": model, "loss_fn": loss_fn, "data": data, "heldout": heldout, "metric": metric,
               "batch_size": batch_size, "measurer": measurer}
    return dataclasses.replace(res, context=context)


# ------------------------------------------------------------------------------------------------ decisions
def _measurer(result: ImportanceResult, what: str) -> Callable[[Any], dict[str, Any]] | None:
    """The result's held-out measurement, after checking that the model is still the one that was scored."""
    ctx = result.context
    if not ctx or ctx.get("measurer") is None:
        return None
    model = ctx["model"]
    check_eval_mode(model, f"{what}: measuring on the held-out data",
                    hint=" (it was in eval mode when importance() scored it), or pass measure=False")
    scored = (result.meta.get("model") or {}).get("sha256")
    state = model_fingerprint(model)["sha256"]
    if scored is not None and state != scored:
        raise ValueError(
            f"{what}: the model's weights or buffers changed since importance() scored it, so the change measured "
            "on it would not be the change of these scores. Re-run importance() on the model as it is now, or pass "
            "measure=False (and measure the result later with .measure(model, loss_fn, data))."
        )
    measurer: Measurer = ctx["measurer"]
    return lambda change: measurer(change, state=state)


def _shapes(result: ImportanceResult) -> dict[str, torch.Size]:
    shapes = dict(zip(result.meta["param_names"], (torch.Size(s) for s in result.meta["param_shapes"])))
    # units also own parameters that were not scored (biases, BatchNorm): their shapes are in the meta
    shapes.update({n: torch.Size(s) for n, s in (result.meta.get("extra_shapes") or {}).items() if n not in shapes})
    return shapes


def prune(result: ImportanceResult, sparsity: float | None = None, *, structure: str = "unstructured",
          scope: str = "global", floor: int | float = 0, measure: bool = True) -> PruneResult:
    """Turn scores into pruning masks, and measure them when the result knows held-out data.

    Args:
        result: Scores from :func:`importance`.
        sparsity: Fraction in ``[0, 1)`` of weights (unstructured) or units (channel/head) to remove; for
            ``N:M`` it is implied (``1 - N/M``) and may be omitted.
        structure: ``"unstructured"``, ``"N:M"`` (e.g. ``"2:4"``), ``"channel"`` or ``"head"``.
        scope: ``"global"`` (one ranking across layers), ``"layer"`` (the same sparsity in every tensor/layer;
            for ``ecoflap`` scores, the per-layer sparsities from its zeroth-order allocation) or ``"row"`` (unstructured
            only: the same sparsity in every output row of every tensor, Wanda's comparison group).
        floor: Global unstructured scope: weights (int) or fraction (float in (0, 1)) every tensor keeps.
        measure: Measure the change on the result's held-out data (when it has some).

    Returns:
        A :class:`~gradsense.results.importance.PruneResult` (a mapping ``{parameter: bool mask}``).

    Raises:
        ValueError, TypeError: Sparsity outside ``[0, 1)``, an unknown structure or scope, N:M with an M that does
            not divide a layer's input dimension (naming the layer), a structure the scores' granularity cannot
            make (channel masks need channel scores...), a sparsity that would remove a whole layer; when measuring,
            a model whose BatchNorm/Dropout is now in train mode or whose weights or buffers changed since
            :func:`importance` scored it (pass ``measure=False`` to skip the measurement).
    """
    kind, nm = _masks.parse_structure(structure)
    if scope not in ("global", "layer", "row"):
        raise ValueError(f"scope must be 'global', 'layer' or 'row', got {scope!r}.")
    if scope == "row" and kind != "unstructured":
        raise ValueError(f"scope='row' is for unstructured pruning (each output row loses the same share); "
                         f"structure={structure!r} takes scope 'global' or 'layer'.")
    if kind == "nm":
        implied = 1 - nm[0] / nm[1]
        if sparsity is not None and abs(_masks.check_sparsity(sparsity) - implied) > 1e-12:
            raise ValueError(f"structure {structure!r} keeps {nm[0]} of every {nm[1]} weights (sparsity {implied:g}); "
                             f"sparsity={sparsity} contradicts it. Omit sparsity for N:M.")
        sparsity = implied
    elif sparsity is None:
        raise TypeError(f"prune(structure={structure!r}) needs a sparsity in [0, 1).")
    else:
        sparsity = _masks.check_sparsity(sparsity)
    floor = _masks.check_floor(floor)
    gran = result.granularity
    need = {"unstructured": "weight", "nm": "weight", "channel": "channel", "head": "head"}[kind]
    if gran != need:
        raise ValueError(
            f"structure={structure!r} needs {need}-level scores, these are {gran!r}: recompute with "
            f"importance(..., granularity={need!r})."
        )
    scores = result.scores
    shapes = _shapes(result)
    unit = "weights"
    meta_extra: dict[str, Any] = {}
    if kind == "unstructured":
        counts = None
        if scope == "layer" and result.meta.get("layer_allocation") == "ecoflap":
            counts = _ecoflap_counts(result, sparsity)
            meta_extra["allocation"] = "ecoflap (zeroth-order layer importance)"
        masks = _masks.unstructured_masks(scores, sparsity, scope, floor=floor if scope == "global" else 0, counts=counts)
        candidates = sum(v.numel() for v in scores.values())
        removed = sum(int((~m).sum()) for m in masks.values())
    elif kind == "nm":
        masks = _masks.nm_masks(scores, *nm)
        candidates = sum(v.numel() for v in scores.values() if v.ndim >= 2)
        removed = sum(int((~m).sum()) for m in masks.values())
    else:
        groups = [UnitGroup.from_json(g) for g in result.meta["groups"]]
        keep = _masks.unit_keep(scores, sparsity, scope)
        masks = unit_masks(groups, keep, shapes)
        candidates = sum(g.size for g in groups)
        removed = sum(int((~k).sum()) for k in keep.values())
        unit = "channels" if kind == "channel" else "heads"
        meta_extra["units_kept"] = {g: int(k.sum()) for g, k in keep.items()}
    per_tensor = {k: float((~m).sum()) / max(m.numel(), 1) for k, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    meta = {
        "structure": structure,
        "scope": scope,
        "sparsity": sparsity,
        "achieved": removed / max(candidates, 1),
        "candidates": candidates,
        "unit": unit,
        "weight_sparsity": sum(int((~m).sum()) for m in masks.values()) / max(total, 1),
        "per_tensor": per_tensor,
        "floor": floor,
        "granularity": gran,
        **meta_extra,
    }
    meas = _measurer(result, "prune") if measure else None
    if meas is not None:
        meta["measured"] = meas(masks)
    return PruneResult.build({f"mask/{k}": v for k, v in masks.items()}, method=result.method,
                             settings={"structure": structure, "scope": scope, "sparsity": sparsity},
                             model=result.meta.get("model"), seed=result.meta.get("seed"), **meta)


def _ecoflap_counts(result: ImportanceResult, sparsity: float) -> dict[str, int]:
    zo = {k: result.tensors[f"zo_score/{k}"] for k in result.scores}
    glob = _masks.unstructured_masks(zo, sparsity, "global")
    sizes = {k: v.numel() for k, v in zo.items()}
    ratios = {k: float((~m).sum()) / sizes[k] for k, m in glob.items()}
    lam = float(result.meta.get("lam", 0.2))
    lo = {k: max(0.0, sparsity - lam) for k in sizes}
    hi = {k: min(1.0 - 1.0 / sizes[k], sparsity + lam) for k in sizes}
    total = _masks.n_remove(sparsity, sum(sizes.values()))
    return _masks.exact_counts(sizes, ratios, total, lo, hi)


def allocate_bits(result: ImportanceResult, mean_bits: float, *, choices: Sequence[int] = (2, 3, 4, 8),
                  measure: bool = True) -> BitsResult:
    """HAWQ-V2 mixed precision: bits per tensor minimising ``sum_l Tr(C_l)/n_l ||Q(W_l) - W_l||^2`` under
    ``sum_l n_l b_l <= mean_bits * sum_l n_l`` (``C`` the Hessian or Fisher of the result), solved exactly.

    Compared with uniform bits at the same budget (``mean_bits`` for every tensor, when it is one of the choices):
    objective, and measured held-out loss when the result knows held-out data.

    Args:
        result: Scores with per-tensor curvature: ``method="hessian"`` (Hutch++ ``Tr(H_l)``; HAWQ-V2) or a Fisher
            method (``fisher``, ``taylor2``, ``gblm``, ``gaprune``: ``Tr(F_l)``).
        mean_bits: Average bits per weight.
        choices: Allowed widths (each 2..16).
        measure: Measure on the result's held-out data (when it has some).

    Returns:
        A :class:`~gradsense.results.importance.BitsResult` (a mapping ``{parameter: bits}``).

    Raises:
        ValueError, TypeError: Choices outside 2..16, ``mean_bits`` outside ``[min(choices), max(choices)]``, a
            result without curvature; when measuring, a model in train mode or changed since it was scored (as for
            :func:`prune`).
    """
    choices = check_choices(choices)
    if isinstance(mean_bits, bool) or not isinstance(mean_bits, (int, float)):
        raise TypeError(f"mean_bits must be a number, got {mean_bits!r}.")
    if not choices[0] <= mean_bits <= choices[-1]:
        raise ValueError(f"mean_bits={mean_bits} is outside the choices {choices}: pick an average between "
                         f"{choices[0]} and {choices[-1]} bits, or widen choices.")
    names = [n for n in result.meta["param_names"] if f"curvature/{n}" in result.tensors]
    if not names:
        raise ValueError(
            f"allocate_bits needs per-tensor curvature; method={result.method!r} has none. Use "
            "importance(..., method='hessian') (HAWQ-V2's Hutch++ traces) or a Fisher method ('fisher', 'taylor2')."
        )
    shapes = dict(zip(result.meta["param_names"], result.meta["param_shapes"]))
    sizes = {n: numel_of(shapes[n]) for n in names}
    sens = {n: max(float(result.tensors[f"curvature/{n}"]), 0.0) / max(sizes[n], 1) for n in names}
    errors = {n: result.tensors[f"qerr/{n}"] for n in names}
    bits, objective, exact = allocate(sens, errors, sizes, mean_bits, choices)
    uniform = int(mean_bits) if float(mean_bits).is_integer() and int(mean_bits) in choices else None
    uniform_obj = sum(sens[n] * float(errors[n][uniform - 2]) for n in names) if uniform is not None else None
    meta: dict[str, Any] = {
        "bits": bits, "mean_bits": mean_bits, "choices": list(choices), "objective": objective,
        "achieved_mean_bits": sum(bits[n] * sizes[n] for n in names) / sum(sizes.values()),
        "uniform_bits": uniform, "uniform_objective": uniform_obj, "exact": exact,
        "curvature": result.meta.get("curvature"), "sensitivity": sens,
    }
    meas = _measurer(result, "allocate_bits") if measure else None
    if meas is not None:
        meta["measured"] = meas(bits)
        if uniform is not None:
            meta["uniform_measured"] = meas(dict.fromkeys(bits, uniform))
    return BitsResult.build({}, method=result.method, settings={"mean_bits": mean_bits, "choices": list(choices)},
                            model=result.meta.get("model"), seed=result.meta.get("seed"), **meta)


def sweep(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataLike,
    heldout: DataLike,
    *,
    methods: Sequence[str] = ("magnitude", "taylor", "taylor2", "gblm"),
    sparsities: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    structure: str = "unstructured",
    scope: str = "global",
    params: ParamSpec = None,
    metric: Any = "auto",
    seed: int = 0,
    batch_size: int = 256,
    options: dict[str, dict[str, Any]] | None = None,
    name: str | None = None,
) -> SweepResult:
    """Methods x sparsities: prune with each method's scores at each sparsity and measure the held-out change.

    Args:
        model, loss_fn, data: As for :func:`importance` (``data`` = calibration).
        heldout: Where the loss and metric are measured.
        methods: Score methods to compare.
        sparsities: Target sparsities (each in ``[0, 1)``).
        structure: ``"unstructured"``, ``"channel"`` or ``"head"`` (granularity follows).
        scope: ``"global"``, ``"layer"`` or (unstructured) ``"row"``, as for :func:`prune`.
        params, metric, seed, batch_size, name: As for :func:`importance`.
        options: ``{method: options}`` passed to :func:`importance`.

    Returns:
        A :class:`~gradsense.results.importance.SweepResult` (``.table()``, ``.grid()``, ``.plot()``).

    Raises:
        ValueError: Bad methods, sparsities or structure (before any work), and whatever :func:`importance` and
            :func:`prune` raise.
    """
    t0 = time.perf_counter()
    methods = list(methods)
    if not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"methods must be names from {sorted(METHODS)}, got {methods!r}.")
    sparsities = [_masks.check_sparsity(s) for s in sparsities]
    if not sparsities:
        raise ValueError("sparsities is empty.")
    kind, _ = _masks.parse_structure(structure)
    if kind == "nm":
        raise ValueError("sweep varies the sparsity; N:M fixes it. Use prune(structure='2:4') instead.")
    if scope not in ("global", "layer", "row") or (scope == "row" and kind != "unstructured"):
        raise ValueError(f"scope must be 'global' or 'layer' ('row' for unstructured pruning), got {scope!r}.")
    granularity = {"unstructured": "weight", "channel": "channel", "head": "head"}[kind]
    data_size(heldout)
    meas = Measurer(model, loss_fn, heldout, calibration=data, metric=metric, batch_size=batch_size)
    check_model(model)
    check_train_mode(model)
    meas.check()
    state = model_fingerprint(model)["sha256"]  # the sweep does not change the model: one hash for every measurement
    shape = (len(methods), len(sparsities))
    t = {k: torch.full(shape, float("nan"), dtype=torch.float64)
         for k in ("loss", "metric", "predicted_first_order", "predicted_second_order", "achieved")}
    base = None
    for i, m in enumerate(methods):
        res = importance(model, loss_fn, data, method=m, granularity=granularity, params=params, seed=seed,
                         batch_size=batch_size, name=name, **(options or {}).get(m, {}))
        for j, s in enumerate(sparsities):
            masks = prune(res, s, structure=structure, scope=scope, measure=False)
            r = meas(masks.masks, state=state)
            base = r
            t["loss"][i, j] = r["loss_after"]
            t["metric"][i, j] = float("nan") if r["metric_after"] is None else r["metric_after"]
            t["predicted_first_order"][i, j] = r["predicted_first_order"]
            t["predicted_second_order"][i, j] = r["predicted_second_order"]
            t["achieved"][i, j] = masks.meta["achieved"]
    assert base is not None
    return SweepResult.build(t, method="sweep", settings={"structure": structure, "scope": scope},
                             model=model_fingerprint(model, name), seed=seed, wall_time_s=time.perf_counter() - t0,
                             methods=methods, sparsities=sparsities, structure=structure, scope=scope,
                             loss_before=base["loss_before"], metric_before=base["metric_before"])


attach_verbs(ImportanceVerbs(prune=prune, allocate_bits=allocate_bits, measurer=Measurer))
