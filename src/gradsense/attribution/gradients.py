"""Plain gradient methods: Saliency and Input x Gradient.

- Saliency (Simonyan, Vedaldi & Zisserman 2014, "Deep Inside Convolutional Networks: Visualising
  Image Classification Models and Saliency Maps"): ``d target / d x``; ``abs=True`` gives the
  paper's absolute value.
- Input x Gradient (Shrikumar et al. 2016, "Not Just a Black Box"): ``x * d target / d x``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from gradsense.attribution.base import Attribution, register
from gradsense.core.targets import Target

__all__ = ["InputXGradient", "Saliency"]


@register("saliency", "gradient")
class Saliency(Attribution):
    """Gradient of the target w.r.t. the input (signed by default).

    Args:
        model: The module to explain.
        abs: Return ``|gradient|`` as in Simonyan et al. 2014 (default False: signed gradient).
        **kwargs: See :class:`~gradsense.attribution.base.Attribution`.

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> a = Saliency(lin).attribute(torch.randn(4, 3), target=1)
        >>> torch.allclose(a.attributions, lin.weight[1].expand(4, 3))
        True
    """

    def __init__(self, model: nn.Module, *, abs: bool = False, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.abs = bool(abs)
        self.signed = not self.abs

    def settings(self) -> dict[str, Any]:
        return {"abs": self.abs}

    def _compute(
        self, inputs: Tensor, target: Target, index: Tensor, n_examples: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        g, scores = self._gradients(inputs, target, index, n_examples)
        return (g.abs() if self.abs else g), {"scores": scores}


@register("input_x_gradient", "inputxgradient")
class InputXGradient(Attribution):
    """Input times gradient, ``x * d target / d x`` (Shrikumar et al. 2016).

    Example:
        >>> lin = nn.Linear(3, 1)
        >>> x = torch.randn(4, 3)
        >>> a = InputXGradient(lin).attribute(x, target=0)
        >>> torch.allclose(a.attributions, x * lin.weight[0])
        True
    """

    def _compute(
        self, inputs: Tensor, target: Target, index: Tensor, n_examples: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        g, scores = self._gradients(inputs, target, index, n_examples)
        return inputs * g, {"scores": scores}
