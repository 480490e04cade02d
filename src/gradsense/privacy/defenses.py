"""Defences a client can apply before sharing, each a function of (model, loss, batch, seed) -> shared message.

- :class:`NoDefense`: the plain gradient of the batch's mean loss.
- :class:`Prune` (Zhu et al. 2019, section 6): keep the ``keep`` fraction of gradient entries with the largest
  magnitude, over all shared parameters together, and zero the rest; exactly ``round(keep * n)`` entries
  are kept (ties broken by position).
- :class:`DPNoise` (DP-SGD's mechanism, Abadi et al. 2016): every example's gradient (all shared parameters
  as one vector) is clipped to norm ``clip`` (``g_i / max(1, ||g_i|| / C)``), the clipped gradients are
  summed, Gaussian noise of standard deviation ``noise_multiplier * clip`` is added to every coordinate, and
  the sum is divided by the batch size. Per-example gradients come from ``vmap`` (eval-mode models).
- :class:`Quantize`: ``"fp16"`` rounds to half precision; ``"int8"`` to 255 symmetric levels per tensor,
  ``round(g / s) * s`` with ``s = max|g| / 127``.
- :class:`LocalSteps` (FedAvg, McMahan et al. 2017): ``steps`` steps of SGD with learning rate ``lr`` on
  mini-batches of ``batch_size`` (all examples when ``None``), and the weight update is shared.

:func:`parse_defense` reads names such as ``"prune"``, ``"prune:0.1"``, ``"dp:1.0"``, ``"int8"``, ``"local:4"``.
:func:`dp_epsilon` gives the epsilon of the Gaussian mechanism for a stated setting from Opacus' RDP accountant
or Google's ``dp-accounting``, when either is installed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradsense.core.checks import suggest
from gradsense.core.grad import per_example_grads
from gradsense.privacy.shared import WeightUpdate, client_gradient, client_update

__all__ = [
    "DEFENSES",
    "RDP_ORDERS",
    "DPNoise",
    "Defense",
    "LocalSteps",
    "NoDefense",
    "Prune",
    "Quantize",
    "clip_and_noise",
    "dp_epsilon",
    "parse_defense",
    "prune_gradient",
    "quantize_gradient",
]

#: Renyi orders at which epsilon is optimised: Opacus' defaults extended towards 1 (small noise multipliers have
#: their optimum there) and upwards.
RDP_ORDERS: tuple[float, ...] = (*(1 + k / 100 for k in range(1, 10)), *(1 + k / 10 for k in range(1, 100)),
                                 *range(12, 64), 128, 256, 512, 1024)

LossFn = Callable[[Any, Tensor], Tensor]


class Defense:
    """A client-side defence. Subclasses implement :meth:`share` and :attr:`label`."""

    name = "defense"

    @property
    def label(self) -> str:
        """Short name for tables, e.g. ``"prune 10%"``."""
        return self.name

    def describe(self) -> str:
        """One sentence on what the client does."""
        return self.label

    def settings(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return {"name": self.name, **dataclasses.asdict(self)} if dataclasses.is_dataclass(self) else {"name": self.name}

    def share(self, model: nn.Module, loss_fn: LossFn, inputs: Tensor, labels: Tensor, *,
              generator: torch.Generator | None = None) -> dict[str, Tensor] | WeightUpdate:
        """What the client sends for its batch."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class NoDefense(Defense):
    """The plain gradient."""

    name = "none"

    def describe(self) -> str:
        return "the plain gradient of the batch's mean loss"

    def share(self, model: nn.Module, loss_fn: LossFn, inputs: Tensor, labels: Tensor, *,
              generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return client_gradient(model, loss_fn, inputs, labels)


def prune_gradient(gradient: dict[str, Tensor], keep: float) -> dict[str, Tensor]:
    """Keep the ``round(keep * n)`` largest-magnitude entries of all tensors together (at least one)."""
    flat = torch.cat([g.reshape(-1) for g in gradient.values()])
    k = max(1, min(flat.numel(), round(keep * flat.numel())))
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[idx] = True
    out, offset = {}, 0
    for n, g in gradient.items():
        out[n] = torch.where(mask[offset : offset + g.numel()].view_as(g), g, torch.zeros_like(g))
        offset += g.numel()
    return out


@dataclasses.dataclass(frozen=True)
class Prune(Defense):
    """Gradient pruning: keep the ``keep`` fraction of entries with the largest magnitude."""

    keep: float = 0.1
    name = "prune"

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise ValueError(f"Prune.keep must be in (0, 1], got {self.keep!r}.")

    @property
    def label(self) -> str:
        return f"prune {self.keep:.0%}"

    def describe(self) -> str:
        return f"the gradient with all but the {self.keep:.0%} largest-magnitude entries set to zero"

    def share(self, model: nn.Module, loss_fn: LossFn, inputs: Tensor, labels: Tensor, *,
              generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return prune_gradient(client_gradient(model, loss_fn, inputs, labels), self.keep)


def clip_and_noise(per_example: dict[str, Tensor], clip: float, noise_multiplier: float,
                   generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """DP-SGD's mechanism on per-example gradients ``{name: (B, *shape)}``: clip, sum, add noise, average.

    Returns:
        ``{name: (sum_i g_i / max(1, ||g_i|| / clip) + N(0, (noise_multiplier * clip)^2)) / B}``.
    """
    b = next(iter(per_example.values())).shape[0]
    norms = torch.sqrt(sum(g.reshape(b, -1).pow(2).sum(dim=1) for g in per_example.values()))
    factor = 1.0 / torch.clamp(norms / clip, min=1.0)
    out = {}
    for n, g in per_example.items():
        summed = (g * factor.view(b, *([1] * (g.ndim - 1)))).sum(dim=0)
        if noise_multiplier > 0:
            noise = torch.randn(summed.shape, generator=generator, dtype=summed.dtype, device="cpu")
            summed = summed + noise_multiplier * clip * noise.to(summed.device)
        out[n] = summed / b
    return out


@dataclasses.dataclass(frozen=True)
class DPNoise(Defense):
    """DP-SGD's mechanism: per-example clipping to ``clip``, Gaussian noise ``noise_multiplier * clip``."""

    noise_multiplier: float = 1.0
    clip: float = 1.0
    name = "dp"

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"DPNoise.noise_multiplier must be >= 0, got {self.noise_multiplier!r}.")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"DPNoise.clip must be positive, got {self.clip!r}.")

    @property
    def label(self) -> str:
        return f"DP σ={self.noise_multiplier:g} C={self.clip:g}"

    def describe(self) -> str:
        return (f"per-example gradients clipped to norm {self.clip:g}, summed, Gaussian noise of std "
                f"{self.noise_multiplier:g} x {self.clip:g} added, divided by the batch size (DP-SGD)")

    def share(self, model: nn.Module, loss_fn: LossFn, inputs: Tensor, labels: Tensor, *,
              generator: torch.Generator | None = None) -> dict[str, Tensor]:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        per = per_example_grads(model, loss_fn, inputs, labels, params=names)
        return clip_and_noise(per, self.clip, self.noise_multiplier, generator)


def quantize_gradient(gradient: dict[str, Tensor], mode: str) -> dict[str, Tensor]:
    """Round every tensor to fp16 (``"fp16"``) or to symmetric int8 levels per tensor (``"int8"``)."""
    if mode == "fp16":
        return {n: g.half().to(g.dtype) for n, g in gradient.items()}
    if mode == "int8":
        out = {}
        for n, g in gradient.items():
            scale = g.abs().max() / 127
            out[n] = g if scale == 0 else torch.round(g / scale).clamp(-127, 127) * scale
        return out
    raise ValueError(f"quantisation mode must be 'fp16' or 'int8', got {mode!r}.")


@dataclasses.dataclass(frozen=True)
class Quantize(Defense):
    """Gradient quantisation to fp16 or int8."""

    mode: str = "int8"
    name = "quantize"

    def __post_init__(self) -> None:
        if self.mode not in ("fp16", "int8"):
            raise ValueError(f"Quantize.mode must be 'fp16' or 'int8', got {self.mode!r}.")

    @property
    def label(self) -> str:
        return self.mode

    def describe(self) -> str:
        return ("the gradient rounded to half precision" if self.mode == "fp16" else
                "the gradient rounded to 255 symmetric levels per tensor (int8)")

    def share(self, model: nn.Module, loss_fn: LossFn, inputs: Tensor, labels: Tensor, *,
              generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return quantize_gradient(client_gradient(model, loss_fn, inputs, labels), self.mode)


@dataclasses.dataclass(frozen=True)
class LocalSteps(Defense):
    """FedAvg: ``steps`` local SGD steps with ``lr`` on mini-batches of ``batch_size``; the update is shared."""

    steps: int = 4
    lr: float = 0.1
    batch_size: int | None = None
    name = "local"

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"LocalSteps.steps must be an int >= 1, got {self.steps!r}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"LocalSteps.lr must be positive, got {self.lr!r}.")

    @property
    def label(self) -> str:
        return f"{self.steps} local steps"

    def describe(self) -> str:
        per = "all examples" if self.batch_size is None else f"mini-batches of {self.batch_size}"
        return f"the weight update after {self.steps} SGD steps (lr {self.lr:g}, {per}), FedAvg"

    def share(self, model: nn.Module, loss_fn: LossFn, inputs: Tensor, labels: Tensor, *,
              generator: torch.Generator | None = None) -> WeightUpdate:
        return client_update(model, loss_fn, inputs, labels, local_steps=self.steps, lr=self.lr,
                             batch_size=self.batch_size)


DEFENSES: dict[str, Callable[..., Defense]] = {
    "none": NoDefense,
    "prune": Prune,
    "dp": DPNoise,
    "fp16": lambda: Quantize("fp16"),
    "int8": lambda: Quantize("int8"),
    "quantize": Quantize,
    "local": LocalSteps,
}


def parse_defense(spec: str | Defense) -> Defense:
    """A defence from a name: ``"none"``, ``"prune[:KEEP]"``, ``"dp[:SIGMA[:CLIP]]"``, ``"fp16"``, ``"int8"``,
    ``"local[:STEPS[:LR]]"``, or a :class:`Defense` instance (returned as it is).

    Raises:
        ValueError: An unknown name or a value that does not parse.
    """
    if isinstance(spec, Defense):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a defence is a name like 'prune:0.1' or a gradsense.privacy Defense, got {type(spec).__name__}.")
    name, *args = spec.strip().split(":")
    if name not in DEFENSES:
        raise ValueError(f"unknown defence {spec!r}; choose from 'none', 'prune[:KEEP]', 'dp[:SIGMA[:CLIP]]', "
                         f"'fp16', 'int8', 'local[:STEPS[:LR]]'.{suggest(name, DEFENSES)}")
    try:
        if name == "prune" and args:
            return Prune(keep=float(args[0]))
        if name == "dp" and args:
            return DPNoise(noise_multiplier=float(args[0]), clip=float(args[1]) if len(args) > 1 else 1.0)
        if name == "local" and args:
            return LocalSteps(steps=int(args[0]), lr=float(args[1]) if len(args) > 1 else 0.1)
        if args:
            raise ValueError(f"defence {name!r} takes no value")
    except ValueError as err:
        raise ValueError(f"cannot read defence {spec!r}: {str(err).rstrip('.')}.") from err
    return DEFENSES[name]()


def parse_defenses(specs: Sequence[str | Defense] | str | Defense) -> list[Defense]:
    """:func:`parse_defense` for each of ``specs`` (a single spec is allowed)."""
    items = [specs] if isinstance(specs, (str, Defense)) else list(specs)
    if not items:
        raise ValueError("defenses is empty: name at least one, e.g. ('none', 'prune', 'dp').")
    return [parse_defense(s) for s in items]


def dp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> tuple[float, str] | None:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian mechanisms (RDP accounting), or ``None``.

    Uses Opacus' ``RDPAccountant`` if installed, else ``dp_accounting``'s ``RdpAccountant``.

    Args:
        noise_multiplier: Noise std over the clipping norm.
        sample_rate: Probability that an example is in a step's batch (1.0 for one full-batch release).
        steps: Number of releases.
        delta: Target delta.

    Returns:
        ``(epsilon, accountant name)``, or ``None`` when no accountant is installed or sigma is 0.
    """
    if noise_multiplier <= 0:
        return None
    try:
        from opacus.accountants import RDPAccountant
    except ImportError:
        RDPAccountant = None
    if RDPAccountant is not None:
        acc = RDPAccountant()
        acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
        return float(acc.get_epsilon(delta=delta, alphas=list(RDP_ORDERS))), "opacus RDP accountant"
    try:
        import dp_accounting
    except ImportError:
        return None
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)
    acc = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    acc.compose(event)
    return float(acc.get_epsilon(delta)), "dp-accounting RDP accountant"
