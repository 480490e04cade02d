"""gradsense: what is your model sensitive to?

One API over gradients and curvature: input attribution, curvature, landscapes and importance,
each checked against independent oracles.

Example:
    >>> import gradsense as gs
    >>> model, data = gs.zoo.load("digits-cnn"), gs.zoo.dataset("digits", split="test")
    >>> x, y = data[:16]
    >>> a = gs.attribute(model, x, target=y, method="saliency")
    >>> eig = gs.hessian_eigs(model, gs.losses.cross_entropy, data[:128], k=2, seed=0)
    >>> surf = gs.loss_surface(model, gs.losses.cross_entropy, data[:128], steps=5, seed=0)
"""

__version__ = "0.1.0"

from gradsense import (
    attribution,
    core,
    curvature,
    evaluation,
    importance,
    landscape,
    losses,
    monitor,
    results,
    targets,
    viz,
    zoo,
)
from gradsense.attribution import attribute, attribute_tokens
from gradsense.curvature import hessian_eigs, hessian_trace, spectral_density
from gradsense.evaluation import evaluate, global_sensitivity
from gradsense.landscape import interpolate, loss_surface, sharpness
from gradsense.results import AttributionResult, Result

__all__ = [
    "AttributionResult",
    "Result",
    "__version__",
    "attribute",
    "attribute_tokens",
    "attribution",
    "core",
    "curvature",
    "evaluate",
    "evaluation",
    "global_sensitivity",
    "hessian_eigs",
    "hessian_trace",
    "importance",
    "interpolate",
    "landscape",
    "loss_surface",
    "losses",
    "monitor",
    "results",
    "sharpness",
    "spectral_density",
    "targets",
    "viz",
    "zoo",
]
