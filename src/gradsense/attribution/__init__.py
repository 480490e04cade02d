"""Input attribution: which pixels, tokens or features drive a prediction."""

from gradsense.attribution.base import METHODS, Attribution, attribute, get_method, register
from gradsense.attribution.cam import (
    CFCAM,
    GradCAM,
    GradCAMPlusPlus,
    NormGrad,
    SmoothGradCAMPlusPlus,
    find_cam_layer,
)
from gradsense.attribution.dataset import attribute_dataset
from gradsense.attribution.fullgrad import FullGrad
from gradsense.attribution.gradients import InputXGradient, Saliency
from gradsense.attribution.legrad import NON_VIT_METHODS, LeGrad, ViTStructure, find_vit_structure
from gradsense.attribution.noise import SmoothGrad, SmoothGradSquared, VarGrad
from gradsense.attribution.path import ExpectedGradients, IntegratedGradients, make_baseline, quadrature
from gradsense.attribution.tokens import (
    TokenAttribution,
    TokenAttributionResult,
    attribute_tokens,
    similarity_target,
)

__all__ = [
    "CFCAM",
    "METHODS",
    "NON_VIT_METHODS",
    "Attribution",
    "ExpectedGradients",
    "FullGrad",
    "GradCAM",
    "GradCAMPlusPlus",
    "InputXGradient",
    "IntegratedGradients",
    "LeGrad",
    "NormGrad",
    "Saliency",
    "SmoothGrad",
    "SmoothGradCAMPlusPlus",
    "SmoothGradSquared",
    "TokenAttribution",
    "TokenAttributionResult",
    "VarGrad",
    "ViTStructure",
    "attribute",
    "attribute_dataset",
    "attribute_tokens",
    "find_cam_layer",
    "find_vit_structure",
    "get_method",
    "make_baseline",
    "quadrature",
    "register",
    "similarity_target",
]
