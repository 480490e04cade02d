"""SmoothGrad, SmoothGrad^2 and VarGrad: any gradient method averaged over noisy copies of the input.

- SmoothGrad (Smilkov et al. 2017, "SmoothGrad: removing noise by adding noise"): mean of the base
  method's map over ``n_samples`` inputs ``x + N(0, sigma^2)``, with ``sigma`` given relative to each
  example's value range (``noise_level * (max(x) - min(x))``, default 15%, as in the paper).
- SmoothGrad^2 (Hooker et al. 2019, "A Benchmark for Interpretability Methods in Deep Neural
  Networks"): mean of the squared maps.
- VarGrad (Adebayo et al. 2018, "Local Explanation Methods for Deep Neural Networks Lack Sensitivity
  to Parameter Values"): variance of the maps.

Noise samples are a batch dimension: the base method sees all ``n_samples x N`` rows at once and
chunks them under the memory budget. Noise is drawn from a seeded CPU generator, so the same seed
gives the same numbers on every device.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradsense.attribution.base import Attribution, get_method, register
from gradsense.core.checks import check_positive_int
from gradsense.core.targets import Target

__all__ = ["SmoothGrad", "SmoothGradSquared", "VarGrad", "noisy_rows"]

Kind = Literal["smoothgrad", "smoothgrad_sq", "vargrad"]
KINDS = ("smoothgrad", "smoothgrad_sq", "vargrad")


def noisy_rows(
    inputs: Tensor, n_samples: int, *, noise_level: float = 0.15, sigma: float | None = None, seed: int | None = 0
) -> Tensor:
    """``n_samples`` noisy copies of every input as one batch ``(n_samples * N, ...)``, sample-major.

    The noise is Gaussian with standard deviation ``sigma`` (absolute) or ``noise_level`` times each
    example's value range, drawn from a seeded CPU generator (same seed, same rows on any device).
    """
    n = inputs.shape[0]
    if sigma is not None:
        sd = torch.full((n,), float(sigma), dtype=inputs.dtype, device=inputs.device)
    else:
        flat = inputs.reshape(n, -1)
        sd = noise_level * (flat.max(1).values - flat.min(1).values)
    g = torch.Generator().manual_seed(0 if seed is None else int(seed))
    noise = torch.randn((n_samples, *inputs.shape), generator=g, dtype=inputs.dtype).to(inputs.device)
    noise = noise * sd.reshape((1, n) + (1,) * (inputs.ndim - 1))
    return (inputs.unsqueeze(0) + noise).reshape(n_samples * n, *inputs.shape[1:])


@register("smoothgrad", "noise_tunnel")
class SmoothGrad(Attribution):
    """Average a gradient method over noisy inputs (Smilkov et al. 2017).

    Args:
        model: The module to explain.
        base: The wrapped method: a registered name (default ``"saliency"``) or an
            :class:`~gradsense.attribution.base.Attribution` subclass.
        base_options: Options of the wrapped method (e.g. ``{"steps": 16}`` for IG).
        n_samples: Noisy copies per example.
        noise_level: Noise standard deviation relative to each example's value range ``max - min``.
        sigma: Absolute standard deviation instead of ``noise_level`` (as captum's ``stdevs``).
        kind: ``"smoothgrad"`` (mean), ``"smoothgrad_sq"`` (mean of squares) or ``"vargrad"`` (variance).
        seed: Seed of the noise (default 0: the same call gives the same map).
        **kwargs: See :class:`~gradsense.attribution.base.Attribution`.

    Example:
        >>> lin = nn.Linear(3, 1)
        >>> a = SmoothGrad(lin, n_samples=10).attribute(torch.randn(2, 3), target=0)
        >>> torch.allclose(a.attributions, lin.weight[0].expand(2, 3))  # a linear model's gradient
        True
    """

    default_kind: str = "smoothgrad"
    clean_outputs = "outputs"

    def __init__(
        self,
        model: nn.Module,
        *,
        base: str | type[Attribution] = "saliency",
        base_options: dict[str, Any] | None = None,
        n_samples: int = 50,
        noise_level: float = 0.15,
        sigma: float | None = None,
        kind: Kind | None = None,
        seed: int | None = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        check_positive_int(n_samples, "n_samples")
        if not (isinstance(noise_level, (int, float)) and noise_level >= 0):
            raise ValueError(f"noise_level must be a number >= 0, got {noise_level!r}.")
        if sigma is not None and not (isinstance(sigma, (int, float)) and sigma >= 0):
            raise ValueError(f"sigma must be a number >= 0, got {sigma!r}.")
        kind = kind or self.default_kind
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
        base_cls = get_method(base) if isinstance(base, str) else base
        if not (isinstance(base_cls, type) and issubclass(base_cls, Attribution)) or issubclass(base_cls, SmoothGrad):
            raise ValueError(f"base must be a gradient attribution method (not SmoothGrad itself), got {base!r}.")
        self.inner = base_cls(model, **(base_options or {}), **kwargs)
        self.n_samples, self.noise_level, self.sigma = n_samples, float(noise_level), sigma
        self.kind, self.seed = kind, seed
        self.signed = kind == "smoothgrad" and self.inner.signed
        self.base_name = base_cls.name

    def settings(self) -> dict[str, Any]:
        return {
            "base": self.base_name,
            "base_settings": self.inner.settings(),
            "kind": self.kind,
            "n_samples": self.n_samples,
            "noise_level": None if self.sigma is not None else self.noise_level,
            "sigma": self.sigma,
        }

    def _compute(
        self, inputs: Tensor, target: Target, index: Tensor, n_examples: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        n, s = inputs.shape[0], self.n_samples
        rows = noisy_rows(inputs, s, noise_level=self.noise_level, sigma=self.sigma, seed=self.seed)
        maps, _ = self.inner._compute(rows, target, index.repeat(s), n_examples)
        maps = maps.reshape(s, n, *maps.shape[1:])
        if self.kind == "smoothgrad":
            out = maps.mean(0)
        elif self.kind == "smoothgrad_sq":
            out = (maps**2).mean(0)
        else:
            out = (maps**2).mean(0) - maps.mean(0) ** 2
        return out, {}


@register("smoothgrad_sq", "smoothgrad_squared")
class SmoothGradSquared(SmoothGrad):
    """SmoothGrad^2: the mean of squared maps over noisy inputs (Hooker et al. 2019)."""

    default_kind = "smoothgrad_sq"


@register("vargrad")
class VarGrad(SmoothGrad):
    """VarGrad: the variance of maps over noisy inputs (Adebayo et al. 2018)."""

    default_kind = "vargrad"
