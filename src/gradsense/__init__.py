"""gradsense: what is your model sensitive to?

One API over gradients and curvature: input attribution, explanation quality, curvature, loss
landscapes and weight importance, each checked against independent oracles.

Example:
    >>> import gradsense as gs
    >>> model, data = gs.zoo.load("digits-cnn"), gs.zoo.dataset("digits", split="test")
    >>> x, y = data[:16]
    >>> a = gs.attribute(model, x, target=y, method="saliency")
    >>> eig = gs.hessian_eigs(model, gs.losses.cross_entropy, data[:128], k=2, seed=0)
    >>> surf = gs.loss_surface(model, gs.losses.cross_entropy, data[:128], steps=5, seed=0)
    >>> model = gs.load_model("zoo:digits-cnn"); data = gs.load_data("zoo:digits")

Submodules and functions are imported on first use (PEP 562), so ``import gradsense`` and
``gradsense --version`` do not pay for torch, matplotlib or transformers until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it; a name whose module is itself is a subpackage
_SUBMODULES = (
    "attribution", "core", "curvature", "evaluation", "importance", "influence", "io", "landscape", "losses",
    "monitor", "privacy", "results", "targets", "viz", "zoo",
)
_FUNCTIONS = {
    "attribute": "gradsense.attribution",
    "attribute_dataset": "gradsense.attribution",
    "attribute_tokens": "gradsense.attribution",
    "hessian_eigs": "gradsense.curvature",
    "hessian_trace": "gradsense.curvature",
    "spectral_density": "gradsense.curvature",
    "evaluate": "gradsense.evaluation",
    "global_sensitivity": "gradsense.evaluation",
    "interpolate": "gradsense.landscape",
    "loss_surface": "gradsense.landscape",
    "sharpness": "gradsense.landscape",
    "gradient_alignment": "gradsense.influence",
    "load_model": "gradsense.io",
    "load_data": "gradsense.io",
    "AttributionResult": "gradsense.results",
    "DatasetAttribution": "gradsense.results",
    "Result": "gradsense.results",
}

__all__ = [
    "AttributionResult",
    "DatasetAttribution",
    "Result",
    "__version__",
    "attribute",
    "attribute_dataset",
    "attribute_tokens",
    "attribution",
    "core",
    "curvature",
    "evaluate",
    "evaluation",
    "global_sensitivity",
    "gradient_alignment",
    "hessian_eigs",
    "hessian_trace",
    "importance",
    "influence",
    "interpolate",
    "io",
    "landscape",
    "load_data",
    "load_model",
    "loss_surface",
    "losses",
    "monitor",
    "privacy",
    "results",
    "sharpness",
    "spectral_density",
    "targets",
    "viz",
    "zoo",
]

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports on first use
    from gradsense import (
        attribution,
        core,
        curvature,
        evaluation,
        importance,
        influence,
        io,
        landscape,
        losses,
        monitor,
        privacy,
        results,
        targets,
        viz,
        zoo,
    )
    from gradsense.attribution import attribute, attribute_dataset, attribute_tokens
    from gradsense.curvature import hessian_eigs, hessian_trace, spectral_density
    from gradsense.evaluation import evaluate, global_sensitivity
    from gradsense.influence import gradient_alignment
    from gradsense.io import load_data, load_model
    from gradsense.landscape import interpolate, loss_surface, sharpness
    from gradsense.results import AttributionResult, DatasetAttribution, Result


# result kind -> the analysis that hands its result types their verbs (e.g. ImportanceResult.prune): result
# modules never import analyses, so a loaded result asks the package root, which wires the layers, to load it
_VERB_PROVIDERS = {"importance": "gradsense.importance"}


def _attach_verbs(kind: str) -> None:
    """Import the analysis that attaches the verbs of ``kind``'s result types (a no-op once imported)."""
    importlib.import_module(_VERB_PROVIDERS[kind])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"gradsense.{name}")
        globals()[name] = module
        return module
    if name in _FUNCTIONS:
        value = getattr(importlib.import_module(_FUNCTIONS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradsense' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
