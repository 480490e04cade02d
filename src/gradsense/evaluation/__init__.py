"""Can the explanation be trusted? Explanation-quality metrics, a ground-truth testbed, and dataset-level
input sensitivity.

``gs.evaluate(model, inputs, attributions, target=..., metric=...)`` measures a map with one of
:data:`METRICS`:

=============================  ==========================================================================
``infidelity``                 Yeh et al. 2019: squared error of the map's linear account of perturbations
``max_sensitivity``            Yeh et al. 2019: how far the map moves under tiny input perturbations
``deletion`` / ``insertion``   Petsiuk et al. 2018: score as top units are removed / inserted, and the AUC
``randomization``              Adebayo et al. 2018: cascading layer randomisation; a passing map changes
``hyperparameter_sensitivity`` Bansal et al. 2020 (SAM): spread of maps over seeds and hyperparameters
``taylor``                     predicted (1st/2nd order) vs actual change over growing radii
``attribution_mass``           Shah et al. 2021: share of the map inside a ground-truth mask
``pointing_game``              Zhang et al. 2018: is the map's maximum inside the mask?
=============================  ==========================================================================

``gs.global_sensitivity(model, data, loss_fn=..., order=3)`` gives per-feature mean ``|d^k L/dx_j^k|``
over a dataset; :func:`method_table` ranks attribution methods on ``gs.zoo.dataset("block-digits")``.
"""

from gradsense.evaluation.base import METRICS, evaluate, get_metric, metric_names, register_metric
from gradsense.evaluation.deletion import deletion, insertion
from gradsense.evaluation.global_sensitivity import global_sensitivity, input_derivatives
from gradsense.evaluation.hyperparameters import hyperparameter_sensitivity
from gradsense.evaluation.infidelity import infidelity, max_sensitivity, perturbations
from gradsense.evaluation.localization import attribution_mass, default_methods, method_table, pointing_game
from gradsense.evaluation.randomization import parameter_layers, randomization
from gradsense.evaluation.similarity import spearman, ssim
from gradsense.evaluation.taylor import taylor
from gradsense.results.evaluation import (
    CurveResult,
    GlobalSensitivityResult,
    MethodTable,
    MetricResult,
    RandomizationResult,
    TaylorResult,
)

__all__ = [
    "METRICS",
    "CurveResult",
    "GlobalSensitivityResult",
    "MethodTable",
    "MetricResult",
    "RandomizationResult",
    "TaylorResult",
    "attribution_mass",
    "default_methods",
    "deletion",
    "demo_section",
    "evaluate",
    "get_metric",
    "global_sensitivity",
    "hyperparameter_sensitivity",
    "infidelity",
    "input_derivatives",
    "insertion",
    "max_sensitivity",
    "method_table",
    "metric_names",
    "parameter_layers",
    "perturbations",
    "pointing_game",
    "randomization",
    "register_metric",
    "spearman",
    "ssim",
    "taylor",
]


def demo_section(run: object, report: object) -> None:
    """Add the explanation-quality sections to the demo (a few seconds): see :mod:`gradsense.evaluation.demo`."""
    from gradsense.evaluation.demo import demo_section as _demo

    _demo(run, report)
