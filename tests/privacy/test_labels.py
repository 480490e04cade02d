"""Label recovery: iDLG's sign rule for every class on several architectures; label counts for batches."""

from __future__ import annotations

import pytest
import torch
from privacy_cases import C, bn_cnn, images, relu_mlp, relu_nobias_head, sigmoid_cnn
from torch import nn

import gradsense as gs
from gradsense.privacy.labels import recover_labels, round_counts
from gradsense.privacy.shared import as_shared
from helpers import assert_model_unchanged

CE = gs.losses.cross_entropy
ARCHS = {"sigmoid-cnn": sigmoid_cnn, "relu-mlp": relu_mlp, "relu-cnn-no-bias-head": relu_nobias_head, "bn-cnn-eval": bn_cnn}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_idlg_recovers_every_class_of_one_example(arch):
    """Cross-entropy on softmax: only the true class's last-layer gradient is negative (bias, or weight-row sums
    behind non-negative features)."""
    model = ARCHS[arch]()
    x = images(C, seed=3)
    for c in range(C):
        g = gs.privacy.client_gradient(model, CE, x[c : c + 1], torch.tensor([c]))
        with assert_model_unchanged(model):
            rec = gs.privacy.reconstruct(model, CE, g, attack="idlg", batch_size=1)
        assert rec.labels.tolist() == [c], (arch, c)
        assert rec.inputs is None and rec.n_evaluations == 0


def _constant_prediction_model(with_bias: bool) -> nn.Module:
    """Features and predictions that do not depend on the input: the label counts are identifiable exactly.

    First layer: zero weights, positive bias (constant ReLU features h); last layer: zero weights, so every example
    gets p = softmax(b2) (or uniform without a bias) and the same feature sum.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 5), nn.ReLU(), nn.Linear(5, 6, bias=with_bias)).double().eval()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.uniform_(0.5, 1.5)
        model[3].weight.zero_()
        if with_bias:
            model[3].bias.normal_()
    return model


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "weight-rows"])
@pytest.mark.parametrize("labels", [[0, 0, 0, 1, 2, 2, 5, 5], [3, 3, 3, 3], [0, 1, 2, 3, 4, 5, 1, 1, 4, 4, 4, 2]])
def test_count_method_is_exact_on_identifiable_batches(with_bias, labels):
    model = _constant_prediction_model(with_bias)
    y = torch.tensor(labels)
    x = images(len(labels), seed=4)
    g = gs.privacy.client_gradient(model, CE, x, y)
    rec = gs.privacy.reconstruct(model, CE, g, attack="idlg", batch_size=len(labels), input_shape=(1, 6, 6),
                                 bounds=(0.0, 1.0), label_method="count")
    assert rec.labels.tolist() == sorted(labels)


def test_count_method_from_a_weight_update():
    """A FedAvg update after one step is -lr * gradient: the counts come out the same."""
    model = _constant_prediction_model(True)
    y = torch.tensor([1, 1, 4, 0])
    upd = gs.privacy.client_update(model, CE, images(4), y, local_steps=1, lr=0.3)
    labels = recover_labels(model, as_shared(model, upd), 4, method="count", probes=images(8, seed=9))
    assert labels.tolist() == [0, 1, 1, 4]


def test_batch_counts_leak_from_untrained_networks():
    """Untrained networks predict nearly uniformly, so the counts are nearly identifiable (Wainakh et al. 2022 report
    near-perfect label accuracy there): at least 7 of 8 labels, repeats included, over 5 seeded batches."""
    model = sigmoid_cnn(seed=2, classes=6)
    accs = []
    for s in range(5):
        y = torch.randint(0, 6, (8,), generator=torch.Generator().manual_seed(s))
        x = images(8, seed=10 + s)
        g = gs.privacy.client_gradient(model, CE, x, y)
        rec = gs.privacy.reconstruct(model, CE, g, attack="idlg", batch_size=8, input_shape=(1, 6, 6),
                                     bounds=(0.0, 1.0), label_method="count", truth=(x, y))
        accs.append(rec.label_accuracy)
    assert min(accs) >= 7 / 8, accs


@pytest.mark.parametrize("method", ["count", "llg"])
def test_distinct_labels_are_exactly_the_negative_rows(method):
    """With distinct labels and B < C on an untrained network (p_c ~ 1/C < 1/B), the classes present are exactly
    those with a negative last-layer gradient (LLG's first stage; the counts agree)."""
    model = sigmoid_cnn(seed=5, classes=6)
    for s in range(4):
        y = torch.randperm(6, generator=torch.Generator().manual_seed(s))[:3]
        g = gs.privacy.client_gradient(model, CE, images(3, seed=20 + s), y)
        rec = gs.privacy.reconstruct(model, CE, g, attack="idlg", batch_size=3, input_shape=(1, 6, 6),
                                     bounds=(0.0, 1.0), label_method=method)
        assert rec.labels.tolist() == sorted(y.tolist())


def test_round_counts_keeps_the_total_and_the_nearest_integers():
    assert round_counts(torch.tensor([2.6, 0.3, 1.1]), 4).tolist() == [3, 0, 1]
    assert round_counts(torch.tensor([-0.5, 2.2, 1.9]), 4).tolist() == [0, 2, 2]
    assert int(round_counts(torch.rand(7), 11).sum()) == 11


def test_idlg_refuses_batches_and_models_without_a_classifier():
    model = sigmoid_cnn()
    g = gs.privacy.client_gradient(model, CE, images(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one example"):
        gs.privacy.reconstruct(model, CE, g, attack="idlg", batch_size=2, label_method="idlg")
    conv = nn.Sequential(nn.Conv2d(1, 4, 6), nn.Flatten()).double()
    g = gs.privacy.client_gradient(conv, CE, images(1), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"last nn\.Linear"):
        gs.privacy.reconstruct(conv, CE, g, attack="idlg")
