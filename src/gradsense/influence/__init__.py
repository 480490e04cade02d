"""Which training examples made this prediction? Per-example gradient features, influence, data selection and
gradient alignment.

- :func:`features`: per-example loss gradients, optionally projected (seeded, never stored whole), in chunks under
  a memory budget, streamed to a sharded run folder that resumes; reused across queries.
- :func:`scores`: ``grad_dot``, ``grad_cos``, ``tracin``, ``influence`` (CG/LiSSA/exact inverse curvature),
  ``ekfac``, ``trak`` -> :class:`~gradsense.results.influence.InfluenceResult`; **positive = proponent** (training on
  the example lowers the query loss) for every method.
- :func:`self_influence` (mislabels, outliers), :func:`select` (LESS-style data selection),
  :func:`fit_factors` (K-FAC/EK-FAC, saved and reused), :func:`gradient_alignment` (tasks, domains, objectives),
  :func:`retrain` and :func:`lds` (the linear datamodeling score).

Example:
    >>> import gradsense as gs
    >>> model = gs.zoo.load("digits-cnn")
    >>> train, test = gs.zoo.dataset("digits", split="train"), gs.zoo.dataset("digits", split="test")
    >>> inf = gs.influence.scores(model, gs.losses.cross_entropy, train[:300], test[:3], method="grad_cos")
    >>> top = inf.top(0, k=5)  # the five training digits that most help the first test digit
"""

from gradsense.influence.alignment import gradient_alignment
from gradsense.influence.checkpoints import Checkpoint, resolve_checkpoints
from gradsense.influence.features import FeatureMap, features, margin_loss
from gradsense.influence.inverse import SolveReport
from gradsense.influence.kfac import fit_factors, precondition
from gradsense.influence.lds import lds, retrain, subset_masks
from gradsense.influence.scores import METHODS, scores, select, self_influence
from gradsense.results.influence import (
    CONVENTIONS,
    AlignmentResult,
    CurvatureFactors,
    GradientFeatures,
    InfluenceResult,
    LDSResult,
    RetrainingResult,
    SelectionResult,
    SelfInfluenceResult,
)

__all__ = [
    "CONVENTIONS",
    "METHODS",
    "AlignmentResult",
    "Checkpoint",
    "CurvatureFactors",
    "FeatureMap",
    "GradientFeatures",
    "InfluenceResult",
    "LDSResult",
    "RetrainingResult",
    "SelectionResult",
    "SelfInfluenceResult",
    "SolveReport",
    "features",
    "fit_factors",
    "gradient_alignment",
    "lds",
    "margin_loss",
    "precondition",
    "resolve_checkpoints",
    "retrain",
    "scores",
    "select",
    "self_influence",
    "subset_masks",
]
