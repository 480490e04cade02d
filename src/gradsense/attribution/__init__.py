"""Input attribution: which pixels, tokens or features drive a prediction."""

from gradsense.attribution.base import METHODS, Attribution, attribute, get_method, register
from gradsense.attribution.gradients import InputXGradient, Saliency

__all__ = ["METHODS", "Attribution", "InputXGradient", "Saliency", "attribute", "get_method", "register"]
