"""Curvature: how sharp is the minimum, and where? Hessian eigenpairs, trace and spectral density.

- :func:`hessian_eigs`: extreme eigenpairs by thick-restart Lanczos with full reorthogonalisation
  (Wu & Simon 2000), stopping on the Ritz residual; per-group top eigenvalues and the gradient's overlap
  with the top-k eigenspace (Gur-Ari, Roberts & Dyer 2018).
- :func:`hessian_trace`: adaptive Hutch++ (Meyer, Musco, Musco & Woodruff 2021) or Hutchinson, stopping on
  the standard error; per-layer traces ``Tr(H_l)`` (HAWQ-V2, Dong et al. 2020).
- :func:`trace_samples`: Hutchinson samples from a fixed number of probes, in resumable shards (``out=``,
  ``resume=True``).
- :func:`spectral_density`: stochastic Lanczos quadrature (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao
  2019), Gaussian-broadened.
- :func:`operator`: the Hessian, Gauss-Newton or empirical Fisher as a linear operator (``matvec``,
  ``to_scipy()``).

Every function takes ``data`` as an ``(inputs, labels)`` pair, a Dataset or a DataLoader and averages over
all of it; ``params=`` restricts to some parameters, ``per=`` adds per-group quantities in the same call,
``seed=`` makes the run repeatable. The solvers in :mod:`~gradsense.curvature.lanczos` and
:mod:`~gradsense.curvature.hutchpp` work on any symmetric operator given as a product with rows.

Example:
    >>> import gradsense as gs
    >>> model, digits = gs.zoo.load("digits-cnn"), gs.zoo.dataset("digits", split="test")
    >>> loss = gs.losses.cross_entropy
    >>> eig = gs.curvature.hessian_eigs(model, loss, digits[:128], k=2, seed=0)
    >>> tr = gs.curvature.hessian_trace(model, loss, digits[:128], rtol=0.05, per="layer", seed=0)
    >>> bool(eig.eigenvalues[0] > 0 and tr.value > 0)
    True
"""

from gradsense.curvature.density import gaussian_density, spectral_density
from gradsense.curvature.eigs import gradient_overlap, hessian_eigs
from gradsense.curvature.engine import RowProducts, operator, parameter_groups
from gradsense.curvature.hutchpp import TraceEstimate, hutchpp
from gradsense.curvature.lanczos import (
    EigenPairs,
    LanczosQuadrature,
    ThickRestartLanczos,
    lanczos_eigs,
    lanczos_quadrature,
)
from gradsense.curvature.samples import trace_samples
from gradsense.curvature.trace import hessian_trace
from gradsense.results.curvature import DensityResult, EigenResult, TraceResult

__all__ = [
    "DensityResult",
    "EigenPairs",
    "EigenResult",
    "LanczosQuadrature",
    "RowProducts",
    "ThickRestartLanczos",
    "TraceEstimate",
    "TraceResult",
    "gaussian_density",
    "gradient_overlap",
    "hessian_eigs",
    "hessian_trace",
    "hutchpp",
    "lanczos_eigs",
    "lanczos_quadrature",
    "operator",
    "parameter_groups",
    "spectral_density",
    "trace_samples",
]
