"""gradsense: what is your model sensitive to?

One API over gradients and curvature: input attribution, curvature, landscapes and importance,
each checked against independent oracles.

Example:
    >>> import gradsense as gs
    >>> model, data = gs.zoo.load("digits-cnn"), gs.zoo.dataset("digits", split="test")
    >>> x, y = data[:16]
    >>> a = gs.attribute(model, x, target=y, method="saliency")
"""

__version__ = "0.1.0"

from gradsense import attribution, core, losses, results, targets, viz, zoo
from gradsense.attribution import attribute, attribute_tokens
from gradsense.results import AttributionResult, Result

__all__ = [
    "AttributionResult",
    "Result",
    "__version__",
    "attribute",
    "attribute_tokens",
    "attribution",
    "core",
    "losses",
    "results",
    "targets",
    "viz",
    "zoo",
]
