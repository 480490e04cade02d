"""Model-parameter randomisation sanity check (Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim 2018,
"Sanity Checks for Saliency Maps", NeurIPS).

A map that explains the *model* must change when the model's weights are destroyed. Cascading
randomisation re-initialises the layers one by one from the output towards the input (each step keeps the
earlier ones random); independent randomisation re-initialises one layer at a time. After each step the
explainer recomputes the maps on the randomised model and they are compared with the maps of the trained
model: Spearman rank correlation (of absolute values by default) and SSIM of the channel-summed maps. A
method *passes* when the maps of the fully randomised model no longer resemble the original (mean
Spearman below ``threshold``); an edge detector that ignores the model fails.

The caller's model is never touched: every randomisation happens on a ``copy.deepcopy``, with weights drawn
under a seeded, forked RNG (the caller's global RNG state is unchanged).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradsense.core.functional import preserve_model
from gradsense.core.targets import TargetLike
from gradsense.evaluation.base import (
    Explainer,
    build_result,
    check_attributions,
    check_number,
    explain_rows,
    generator,
    make_explainer,
    prepare,
    register_metric,
    resolve_target,
)
from gradsense.evaluation.similarity import map_2d, spearman, ssim
from gradsense.results.evaluation import RandomizationResult

__all__ = ["parameter_layers", "randomization", "randomize_layer"]

ADEBAYO = "Adebayo et al. 2018, Sanity Checks for Saliency Maps (NeurIPS)"


def parameter_layers(model: nn.Module) -> list[str]:
    """Names of the modules that own parameters directly, output first (reverse definition order)."""
    names = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    return names[::-1]


def randomize_layer(module: nn.Module, seed: int) -> None:
    """Re-initialise ``module``'s own parameters in place (``reset_parameters()`` when it has one, else a
    normal draw with each tensor's standard deviation), under a forked RNG seeded with ``seed``."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
            module.reset_parameters()
        else:
            gen = generator(seed)
            for p in module.parameters(recurse=False):
                sd = float(p.detach().double().std()) if p.numel() > 1 else 1.0
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) * (sd or 1.0))


@register_metric("randomization", "model_randomization", "parameter_randomization")
def randomization(
    model: nn.Module,
    inputs: Tensor,
    attributions: Any,
    *,
    target: TargetLike,
    explainer: Explainer | None = None,
    explainer_options: dict[str, Any] | None = None,
    mode: Literal["cascading", "independent"] = "cascading",
    layers: list[str] | None = None,
    absolute: bool = True,
    threshold: float = 0.5,
    seed: int | None = 0,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    show_progress: bool | None = False,
) -> RandomizationResult:
    """Cascading (or independent) parameter randomisation: do the maps depend on the weights?

    Args:
        model: The trained module (never modified; the randomisation runs on copies).
        inputs: ``(N, ...)`` inputs.
        attributions: An AttributionResult (names the explainer), a tensor (shape-checked) or None.
        target: What is explained (the same classes on the randomised models).
        explainer: Attribution method name or callable ``(model, inputs, target) -> maps``.
        explainer_options: Options of the named method.
        mode: ``"cascading"`` (layers from the output down, cumulatively) or ``"independent"`` (one at a time).
        layers: Module names to randomise, in order (default :func:`parameter_layers`: every module with its
            own parameters, output first).
        absolute: Compare absolute values of the maps (Adebayo et al. show both; absolute is their default).
        threshold: The check passes when the mean Spearman correlation with every layer randomised is below it.
        seed: Seed of the re-initialisation (layer ``l`` uses ``seed + l``).
        chunk_size, max_memory: Memory knobs of the explainer.
        show_progress: Progress bar.

    Returns:
        A :class:`~gradsense.results.RandomizationResult`.

    Raises:
        ValueError: Unknown mode or layer names, a model without parameters, no explainer.
    """
    model, inputs = prepare(model, inputs, "randomization", chunk_size, max_memory)
    if attributions is not None:
        check_attributions(attributions, inputs)
    if mode not in ("cascading", "independent"):
        raise ValueError(f"mode must be 'cascading' or 'independent', got {mode!r}.")
    check_number(threshold, "threshold", minimum=-1.0)
    all_layers = parameter_layers(model)
    if not all_layers:
        raise ValueError("randomization: the model has no parameters to randomise.")
    if layers is None:
        chosen = all_layers
    else:
        if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
            raise TypeError("layers must be a list of module names.")
        unknown = [n for n in layers if n not in all_layers]
        if unknown:
            raise ValueError(f"layers {unknown} are not modules with parameters; choose from {all_layers}.")
        if not layers:
            raise ValueError("layers is empty; give at least one module name.")
        chosen = list(layers)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}.")
    base_seed = 0 if seed is None else seed
    t0 = time.perf_counter()
    n = inputs.shape[0]
    x = inputs.detach()
    index = torch.arange(n, device=x.device)

    fn, name = make_explainer(explainer, attributions, explainer_options, chunk_size=chunk_size, max_memory=max_memory)

    def prep(m: Tensor) -> Tensor:
        m = map_2d(m, x.ndim)
        return m.abs() if absolute else m

    with preserve_model(model):
        resolved = resolve_target(model, x, target)
        original = prep(explain_rows(fn, model, x, resolved, index, n, x))
        sp, ss = [], []
        twin = copy.deepcopy(model)
        from gradsense.core.batching import progress

        for step, layer in progress(list(enumerate(chosen)), total=len(chosen), desc="randomization: layers",
                                    enabled=show_progress):
            if mode == "independent":
                twin = copy.deepcopy(model)
            randomize_layer(twin.get_submodule(layer), base_seed + step)
            maps = prep(explain_rows(fn, twin, x, resolved, index, n, x))
            sp.append(spearman(original, maps))
            ss.append(ssim(original, maps))  # 1-D maps (N, 1, D) get the 1-D SSIM
    spear = torch.stack(sp)
    values = spear[-1] if mode == "cascading" else spear.mean(0)
    final = values[torch.isfinite(values)]
    passed = bool(final.numel() and float(final.mean()) < threshold)
    settings = {"explainer": name, "explainer_options": explainer_options, "mode": mode, "absolute": absolute,
                "threshold": threshold}
    return build_result(
        RandomizationResult, {"values": values, "spearman": spear, "ssim": torch.stack(ss)},
        metric="randomization", model=model, settings=settings, higher_is_better=False, reference=ADEBAYO,
        t0=t0, seed=seed, layers=chosen, passed=passed, mode=mode, explained=name, target=resolved.describe(),
    )
