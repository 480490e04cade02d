"""Loss landscapes and sharpness: what happens to the loss when the weights move.

- :func:`loss_surface`: 1-D/2-D loss surfaces along filter-normalised random directions (Li et al. 2018),
  layer-normalised ones, Hessian eigenvectors, or your own; grid points run as a vmap batch.
- :func:`interpolate`: the loss on the line between two checkpoints (Goodfellow et al. 2015), with
  :func:`perturbed_copy` for a checkpoint and a perturbed copy of it.
- :func:`sharpness`: SAM's rho-sharpness (Foret et al. 2021), average-case sharpness and first-order
  flatness (GAM, Zhang et al. 2023), each with the number of evaluations it used.
- :func:`random_directions`, :func:`filter_normalize`, :func:`hessian_directions`: the directions.

The caller's model is never changed (loss-landscapes' default moves its weights to the last grid point).

Example:
    >>> import gradsense as gs
    >>> model, data = gs.zoo.load("digits-cnn"), gs.zoo.dataset("digits", split="test")
    >>> s = gs.landscape.loss_surface(model, gs.losses.cross_entropy, data[:256], steps=11, seed=0)
    >>> s.losses.shape
    torch.Size([11, 11])
"""

from gradsense.landscape.directions import (
    check_directions,
    filter_normalize,
    hessian_directions,
    random_directions,
)
from gradsense.landscape.engine import LossEvaluator, PointLosses
from gradsense.landscape.sharpness import sharpness
from gradsense.landscape.surface import grid_axis, interpolate, loss_surface, perturbed_copy
from gradsense.results.landscape import InterpolationResult, SharpnessResult, SurfaceResult

__all__ = [
    "InterpolationResult",
    "LossEvaluator",
    "PointLosses",
    "SharpnessResult",
    "SurfaceResult",
    "check_directions",
    "filter_normalize",
    "grid_axis",
    "hessian_directions",
    "interpolate",
    "loss_surface",
    "perturbed_copy",
    "random_directions",
    "sharpness",
]
