"""captum's hand-set test models, re-implemented so that captum's expected values can be checked without captum.

Source: pytorch/captum ``captum/testing/helpers/basic_models.py`` (commit faac087, 2025-10-02). Each class keeps
captum's name and weights. Models of several input tensors (captum's ``BasicModel2(input1, input2)``) are
given here as one tensor whose feature columns are the inputs side by side (:class:`Packed`); an attribution
of the packed tensor is the captum attribution of each input, column block by column block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BasicModel(nn.Module):
    """``1 - relu(1 - x)``."""

    def forward(self, x: Tensor) -> Tensor:
        return 1 - F.relu(1 - x)


class BasicModel2(nn.Module):
    """Sundararajan et al. 2017, example 1: ``relu(relu(x1) - 1 - relu(x2))``."""

    def forward(self, input1: Tensor, input2: Tensor) -> Tensor:
        return F.relu(F.relu(input1) - 1 - F.relu(input2))


class BasicModel3(nn.Module):
    """Sundararajan et al. 2017, example 2: ``relu(relu(x1 - 1) - relu(x2))``."""

    def forward(self, input1: Tensor, input2: Tensor) -> Tensor:
        return F.relu(F.relu(input1 - 1) - F.relu(input2))


class BasicModel4_MultiArgs(nn.Module):
    """``relu(relu(x1 - 1) - relu(x2) / x3)[:, additional_input2]``."""

    def forward(self, input1: Tensor, input2: Tensor, additional_input1: Tensor | float,
                additional_input2: int = 0) -> Tensor:
        return F.relu(F.relu(input1 - 1) - F.relu(input2).div(additional_input1))[:, additional_input2]


class BasicModel5_MultiArgs(nn.Module):
    """``relu(relu(x1 - 1) * x3[0] - relu(x2) * x3[1])[:, additional_input2]``."""

    def forward(self, input1: Tensor, input2: Tensor, additional_input1: Sequence[int],
                additional_input2: int = 0) -> Tensor:
        out = F.relu(input1 - 1) * additional_input1[0] - F.relu(input2) * additional_input1[1]
        return F.relu(out)[:, additional_input2]


class BasicModel6_MultiTensor(nn.Module):
    """``1 - relu(1 - (x1 + x2))[:, 1]``."""

    def forward(self, input1: Tensor, input2: Tensor) -> Tensor:
        return 1 - F.relu(1 - (input1 + input2))[:, 1]


class MultiRelu(nn.Module):
    def forward(self, arg1: Tensor, arg2: Tensor) -> tuple[Tensor, Tensor]:
        return F.relu(arg1), F.relu(arg2)


class BasicModel_MultiLayer(nn.Module):
    """linear0 (identity) -> linear1 (ones, bias [-10, 1, 1, 1]) -> relu -> linear2 (ones, bias [-1, 1])."""

    def __init__(self, multi_input_module: bool = False) -> None:
        super().__init__()
        self.multi_input_module = multi_input_module
        self.linear0 = nn.Linear(3, 3)
        self.linear1 = nn.Linear(3, 4)
        self.linear1_alt = nn.Linear(3, 4)
        self.linear2 = nn.Linear(4, 2)
        with torch.no_grad():
            self.linear0.weight.copy_(torch.eye(3))
            self.linear0.bias.zero_()
            for lin in (self.linear1, self.linear1_alt):
                lin.weight.fill_(1.0)
                lin.bias.copy_(torch.tensor([-10.0, 1.0, 1.0, 1.0]))
            self.linear2.weight.fill_(1.0)
            self.linear2.bias.copy_(torch.tensor([-1.0, 1.0]))
        self.multi_relu = MultiRelu()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor, add_input: Tensor | None = None, multidim_output: bool = False) -> Tensor:
        inp = x if add_input is None else x + add_input
        lin1_out = self.linear1(self.linear0(inp))
        if self.multi_input_module:
            relu_out1, relu_out2 = self.multi_relu(lin1_out, self.linear1_alt(inp))
            relu_out = relu_out1 + relu_out2
            self.relu(lin1_out)  # called, output unused (captum's test of an unused layer)
        else:
            relu_out = self.relu(lin1_out)
        lin2_out = self.linear2(relu_out)
        if multidim_output:
            stack_mid = torch.stack((lin2_out, 2 * lin2_out), dim=2)
            return torch.stack((stack_mid, 4 * stack_mid), dim=3)
        return lin2_out


class BasicModel_ConvNet_One_Conv(nn.Module):
    """conv1 (ones 3x3, bias [-50, -75]) -> relu -> flatten (8) -> fc1 (ones x5, -ones x3, bias 0) -> relu."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, 1)
        self.relu1 = nn.ReLU()
        self.fc1 = nn.Linear(8, 4)
        self.relu2 = nn.ReLU()
        with torch.no_grad():
            self.conv1.weight.fill_(1.0)
            self.conv1.bias.copy_(torch.tensor([-50.0, -75.0]))
            self.fc1.weight.copy_(torch.cat([torch.ones(4, 5), -1 * torch.ones(4, 3)], dim=1))
            self.fc1.bias.zero_()

    def forward(self, x: Tensor, x2: Tensor | None = None) -> Tensor:
        if x2 is not None:
            x = x + x2
        x = self.relu1(self.conv1(x))
        return self.relu2(self.fc1(x.view(-1, 8)))


class Packed(nn.Module):
    """A model of several inputs as a model of one tensor: columns ``sizes[0]`` go to the first input, ...

    ``shape`` reshapes each block (``None``: keep ``(n, size)``; ``()``: one number per example, ``(n,)``).
    """

    def __init__(self, inner: nn.Module, sizes: Sequence[int], *, scalar: bool = False,
                 extra: Callable[[], tuple] | None = None) -> None:
        super().__init__()
        self.inner, self.sizes, self.scalar = inner, list(sizes), scalar
        self.extra = extra

    def forward(self, x: Tensor) -> Tensor:
        parts = list(torch.split(x, self.sizes, dim=1))
        if self.scalar:
            parts = [p.reshape(-1) for p in parts]
        args = self.extra() if self.extra is not None else ()
        return self.inner(*parts, *args)
