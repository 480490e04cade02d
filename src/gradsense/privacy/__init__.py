"""What does a shared gradient give away? Gradient-inversion attacks, client-side defences, and an audit.

- :func:`reconstruct`: one attack on what a client shared (a gradient, or a :class:`WeightUpdate` after local
  steps): ``"idlg"`` labels, ``"dlg"`` (L2 matching, L-BFGS), ``"inverting"`` (cosine + total variation, signed
  Adam, restarts), ``"analytic"`` (a Linear first layer's gradients give the inputs exactly).
- :func:`audit`: attacks x defences x batch sizes -> PSNR, SSIM, label accuracy (mean, worst case) and, with
  ``heldout=``, each defence's accuracy cost measured by a fine-tune.
- Defences: :class:`Prune`, :class:`DPNoise`, :class:`Quantize`, :class:`LocalSteps`; :func:`dp_epsilon`.
- :func:`client_gradient`, :func:`client_update`: what an honest client sends.
- :mod:`gradsense.privacy.metrics`: PSNR, SSIM, batch matching, label accuracy.

Example:
    >>> import gradsense as gs
    >>> model, data = gs.zoo.load("photos-lenet"), gs.zoo.dataset("photos", split="train")
    >>> x, y = data[:1]
    >>> shared = gs.privacy.client_gradient(model, gs.losses.cross_entropy, x, y)
    >>> rec = gs.privacy.reconstruct(model, gs.losses.cross_entropy, shared, attack="inverting", truth=(x, y))
    >>> rec.labels, rec.psnr
"""

from gradsense.privacy.api import ATTACKS, audit, reconstruct, score
from gradsense.privacy.defenses import (
    DPNoise,
    LocalSteps,
    NoDefense,
    Prune,
    Quantize,
    clip_and_noise,
    dp_epsilon,
    parse_defense,
    prune_gradient,
    quantize_gradient,
)
from gradsense.privacy.labels import recover_labels
from gradsense.privacy.metrics import label_accuracy, match, psnr, ssim
from gradsense.privacy.shared import WeightUpdate, as_shared, client_gradient, client_update

__all__ = [
    "ATTACKS",
    "DPNoise",
    "LocalSteps",
    "NoDefense",
    "Prune",
    "Quantize",
    "WeightUpdate",
    "as_shared",
    "audit",
    "client_gradient",
    "client_update",
    "clip_and_noise",
    "dp_epsilon",
    "label_accuracy",
    "match",
    "parse_defense",
    "prune_gradient",
    "psnr",
    "quantize_gradient",
    "reconstruct",
    "recover_labels",
    "score",
    "ssim",
]
