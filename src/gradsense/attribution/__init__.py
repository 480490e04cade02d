"""Input attribution: which pixels, tokens or features drive a prediction."""

from gradsense.attribution.base import METHODS, Attribution, attribute, get_method, register
from gradsense.attribution.gradients import InputXGradient, Saliency
from gradsense.attribution.noise import SmoothGrad, SmoothGradSquared, VarGrad
from gradsense.attribution.path import ExpectedGradients, IntegratedGradients, make_baseline, quadrature
from gradsense.attribution.tokens import (
    TokenAttribution,
    TokenAttributionResult,
    attribute_tokens,
    similarity_target,
)

__all__ = [
    "METHODS",
    "Attribution",
    "ExpectedGradients",
    "InputXGradient",
    "IntegratedGradients",
    "Saliency",
    "SmoothGrad",
    "SmoothGradSquared",
    "TokenAttribution",
    "TokenAttributionResult",
    "VarGrad",
    "attribute",
    "attribute_tokens",
    "get_method",
    "make_baseline",
    "quadrature",
    "register",
    "similarity_target",
]
