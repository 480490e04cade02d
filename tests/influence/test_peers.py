"""Agreement with the peer libraries on the same model and data, and captum's own TracIn XOR test, ported.

Tests marked ``peer`` are skipped when the peer is not installed (``pip install captum kronfluence dattri``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from influence_cases import CE, logreg_problem, mlp_problem
from torch import nn

import gradsense as gs
from gradsense.influence.lds import spearman_columns

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # kronfluence's torch.cuda.amp.GradScaler


class BasicLinearNet(nn.Module):
    """captum's tests/influence/_utils/common.py BasicLinearNet: tanh(linear2(tanh(linear1(x))))."""

    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(2, 2)
        self.linear2 = nn.Linear(2, 1)

    def forward(self, x):
        return torch.tanh(self.linear2(torch.tanh(self.linear1(x))))


# the eight checkpoints of captum's test_tracin_xor.py, (linear1.weight, linear1.bias, linear2.weight, linear2.bias)
XOR_CHECKPOINTS = [
    ([[-1.2956, -1.4465], [-0.3890, -0.7420]], [1.2924, 0.0021], [[-1.2013, 0.7174]], [0.5880]),
    ([[-1.3238, -1.4899], [-0.4544, -0.7448]], [1.3185, -0.0317], [[-1.2342, 0.7741]], [0.6234]),
    ([[-1.3546, -1.5288], [-0.5250, -0.7591]], [1.3432, -0.0684], [[-1.2490, 0.8534]], [0.6749]),
    ([[-1.4022, -1.5485], [-0.5688, -0.7607]], [1.3740, -0.1571], [[-1.3412, 0.9013]], [0.6468]),
    ([[-1.4464, -1.5890], [-0.6348, -0.7665]], [1.3791, -0.2008], [[-1.3818, 0.9586]], [0.6954]),
    ([[-1.5217, -1.6242], [-0.6644, -0.7842]], [1.3500, -0.2418], [[-1.4304, 0.9980]], [0.7567]),
    ([[-1.5551, -1.6631], [-0.7420, -0.8025]], [1.3508, -0.2618], [[-1.4272, 1.0772]], [0.8427]),
    ([[-1.5893, -1.6656], [-0.7863, -0.8369]], [1.3949, -0.3215], [[-1.4555, 1.1600]], [0.8730]),
]
XOR_POINTS = [[1, 1], [2, 1], [1, 2], [1, 5], [0.01, 1], [5, 1], [1, 0.01], [-1, -1], [-2, -1], [-1, -2], [-1, -5],
              [-5, -1], [1, -1], [2, -1], [1, -2], [1, -5], [0.01, -1], [5, -1], [-1, 1], [-2, 1], [-1, 2], [-1, 5],
              [-5, 1], [-1, 0.01]]


def test_captum_tracin_xor_ported():
    """captum's test_tracin_xor: every test point's five strongest proponents share its label."""
    states = [{"linear1.weight": torch.tensor(w1), "linear1.bias": torch.tensor(b1), "linear2.weight": torch.tensor(w2),
               "linear2.bias": torch.tensor(b2)} for w1, b1, w2, b2 in XOR_CHECKPOINTS]
    x = F.normalize(torch.tensor(XOR_POINTS, dtype=torch.float32))
    y = torch.cat([torch.ones(12, 1), -torch.ones(12, 1)])
    g = torch.Generator().manual_seed(0)
    xq = F.normalize(torch.empty(100, 2).normal_(mean=0, std=0.5, generator=g), dim=1)
    yq = torch.where(~torch.logical_xor(xq[:, 0] > 0, xq[:, 1] > 0), 1.0, -1.0).unsqueeze(1)
    net = BasicLinearNet().eval()
    res = gs.influence.scores(net, F.mse_loss, (x, y), (xq, yq), method="tracin", checkpoints=states)
    idx = torch.argsort(res.scores, dim=1, descending=True)[:, :5]
    assert torch.all(y[idx, 0] == yq)


@pytest.mark.peer
def test_captum_tracincp_equal():
    pytest.importorskip("captum")
    from peer_harness import captum_tracin

    model, train, test = mlp_problem()
    g = torch.Generator().manual_seed(2)
    states = [{k: v + 0.2 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in model.state_dict().items()}
              for _ in range(3)]
    lrs = [0.3, 0.2, 0.1]
    ours = gs.influence.scores(model, CE, train, test, method="tracin", checkpoints=states, lrs=lrs)
    theirs = captum_tracin(model, train, test, states, lrs)
    torch.testing.assert_close(ours.scores, theirs.double(), rtol=1e-8, atol=1e-10)


@pytest.mark.peer
def test_kronfluence_ekfac_pairwise_scores_agree():
    pytest.importorskip("kronfluence")
    from peer_harness import kronfluence_scores

    model = gs.zoo.load("digits-cnn")
    train = gs.zoo.dataset("digits", split="train")[:160]
    test = gs.zoo.dataset("digits", split="test")[:6]
    ours = gs.influence.scores(model, CE, train, test, method="ekfac")
    theirs = kronfluence_scores(model, train, test, strategy="ekfac", empirical=True)
    rho = spearman_columns(ours.scores.T.double(), theirs.T.double())
    assert float(rho.min()) > 0.99, rho  # the same estimator: agreement up to float32
    torch.testing.assert_close(ours.scores, theirs.to(ours.scores.dtype), rtol=2e-3, atol=2e-3 * float(theirs.abs().max()))


@pytest.mark.peer
def test_dattri_explicit_influence_agrees():
    pytest.importorskip("dattri")
    from peer_harness import dattri_scores

    model, train, test, wd = logreg_problem()
    model = model.float()
    train32 = (train[0].float(), train[1])
    test32 = (test[0].float(), test[1])
    ours = gs.influence.scores(model, CE, train32, test32, method="influence", curvature="hessian", solver="exact",
                               damping=wd)
    theirs = dattri_scores(model, train32, test32, method="explicit", regularization=wd)
    # dattri's sign: positive = proponent as ours
    torch.testing.assert_close(ours.scores, theirs.to(ours.scores.dtype), rtol=1e-3, atol=1e-4 * float(theirs.abs().max()))
