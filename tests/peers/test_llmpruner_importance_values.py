"""LLM-Pruner's Taylor importance against its reference code, on a tiny classifier.

Source: horseee/LLM-Pruner (commit 128a07d) ``hf_prune.py`` (the calibration loop: per example,
``grad * grad / num_examples`` accumulated into ``acc_grad``; then one backward of the batch loss) and
``LLMPruner/pruner/hf_llama_pruner.py::TaylorImportance.__call__`` (``param_first``: ``W * grad``; ``param_mix``:
``W * grad - 0.5 * W * acc_grad * W``; ``param_second``: ``W * acc_grad * W``; element scores are ``|salience|``).
LLM-Pruner has no test suite with numbers; its procedure is re-implemented below with ``.grad`` and
``loss.backward()`` as there, on a deep copy, and gives the expected values.

gradsense's ``taylor`` is ``param_first``, ``taylor2`` is ``param_mix``, and ``fisher`` (``1/2 F w^2``, optimal brain
damage) is half of ``param_second``. Channel scores differ by design: LLM-Pruner's dependency groups add the
consumer layer's input columns and leave the bias out; gradsense's channel owns its weight row, bias (and a
following BatchNorm) - the parameters that removing it zeroes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradsense as gs


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double().eval()
    x = torch.randn(12, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (12,))
    return model, x, y


def _llm_pruner_saliences(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    m = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()
    num_examples = x.shape[0]
    acc_grad: dict[str, torch.Tensor] = {}
    m.zero_grad()
    for j in range(num_examples):  # hf_prune.py: "for j in range(args.num_examples)"
        loss = loss_fn(m(x[j].unsqueeze(0)), y[j].unsqueeze(0))
        loss.backward()
        for name, p in m.named_parameters():
            p.grad = p.grad * p.grad / num_examples
            acc_grad[name] = acc_grad[name] + p.grad if name in acc_grad else copy.deepcopy(p.grad)
        m.zero_grad()
    loss_fn(m(x), y).backward()
    out: dict[str, dict[str, torch.Tensor]] = {"param_first": {}, "param_mix": {}, "param_second": {}}
    for name, p in m.named_parameters():
        if not name.endswith("weight"):
            continue
        w = p.detach()
        salience = w * p.grad
        out["param_first"][name] = salience.abs()
        out["param_mix"][name] = (salience - 0.5 * w * acc_grad[name] * w).abs()
        out["param_second"][name] = (w * acc_grad[name] * w).abs()
    return out


@pytest.mark.parametrize(("method", "taylor", "factor"), [("taylor", "param_first", 1.0),
                                                           ("taylor2", "param_mix", 1.0),
                                                           ("fisher", "param_second", 0.5)])
def test_weight_scores_equal_llm_pruner(method, taylor, factor):
    model, x, y = _setup()
    want = _llm_pruner_saliences(model, x, y)[taylor]
    for batch_size in (12, 5):  # one batch, and batches of 5, 5, 2
        res = gs.importance(model, gs.losses.cross_entropy, (x, y), method=method, batch_size=batch_size)
        assert set(res.scores) == set(want)
        for k in want:
            torch.testing.assert_close(res.scores[k], want[k] * factor, rtol=1e-10, atol=1e-14)
