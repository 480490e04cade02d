"""The engine: every analysis stands on it, and it stands on torch alone."""

from gradsense.core import batching, checks, distributed, functional, grad, hooks, hvp, losses, targets
from gradsense.core.batching import chunk_size_for, default_budget, progress
from gradsense.core.functional import (
    FunctionalModel,
    ModelState,
    flatten,
    model_fingerprint,
    preserve_model,
    select_parameters,
    unflatten,
)
from gradsense.core.grad import input_gradients, loss_gradient, per_example_grads
from gradsense.core.hooks import Capture, capture
from gradsense.core.hvp import CurvatureOperator
from gradsense.core.hvp import hvp as hessian_vector_product
from gradsense.core.targets import Batch, Target, as_target

__all__ = [
    "Batch",
    "Capture",
    "CurvatureOperator",
    "FunctionalModel",
    "ModelState",
    "Target",
    "as_target",
    "batching",
    "capture",
    "checks",
    "chunk_size_for",
    "default_budget",
    "distributed",
    "flatten",
    "functional",
    "grad",
    "hessian_vector_product",
    "hooks",
    "hvp",
    "input_gradients",
    "loss_gradient",
    "losses",
    "model_fingerprint",
    "per_example_grads",
    "preserve_model",
    "progress",
    "select_parameters",
    "targets",
    "unflatten",
]
