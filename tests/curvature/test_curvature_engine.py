"""The batched products behind every curvature analysis: cached gradient graph == recomputed
forward-over-reverse == the dense Hessian, batched == one row at a time, over one batch or several; and
the parameter groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from gradsense.curvature import RowProducts, operator, parameter_groups
from helpers import assert_model_unchanged
from oracles import dense_ggn, dense_hessian

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

CE = F.cross_entropy
EXACT = {"rtol": 1e-9, "atol": 1e-11}


@pytest.mark.parametrize("cache_graph", [True, False], ids=["cached-graph", "forward-over-reverse"])
@pytest.mark.parametrize("probe_batch", [1, 3, 8])
def test_products_equal_the_dense_hessian(case, cache_graph, probe_batch):
    h = dense_hessian(case.model, CE, case.x, case.y)
    rows = torch.randn(5, h.shape[0], dtype=torch.float64)
    with assert_model_unchanged(case.model):
        op = operator(case.model, CE, DataLoader(TensorDataset(case.x, case.y), batch_size=4))  # 3 batches
        prod = RowProducts(op, probe_batch=probe_batch, cache_graph=cache_graph)
        out = prod(rows)
        again = prod(rows[:1])
    assert prod.cached is cache_graph and prod.n_hvp == 6
    torch.testing.assert_close(out, rows @ h, **EXACT)
    torch.testing.assert_close(again, out[:1], **EXACT)
    prod.release()
    torch.testing.assert_close(prod(rows[:2]), out[:2], **EXACT)  # rebuilt after release


def test_default_caches_the_graph_for_small_data_and_gauss_newton_does_not(mlp_case):
    data = (mlp_case.x, mlp_case.y)
    assert RowProducts(operator(mlp_case.model, CE, data)).cached
    ggn = operator(mlp_case.model, CE, data, kind="ggn")
    prod = RowProducts(ggn)
    assert not prod.cached
    rows = torch.randn(2, ggn.numel, dtype=torch.float64)
    torch.testing.assert_close(prod(rows), rows @ dense_ggn(mlp_case.model, CE, *data), **EXACT)
    with pytest.raises(ValueError, match="cache_graph=True needs"):
        RowProducts(ggn, cache_graph=True)
    with pytest.raises(ValueError, match="expected rows"):
        prod(torch.zeros(3))


def test_parameter_groups(cnn_case):
    model = cnn_case.model
    params = dict(model.named_parameters())
    layer = parameter_groups(model, params, "layer")
    assert layer.names == ["0", "1", "4"] and layer.numel == [20, 4, 57]
    assert torch.equal(torch.cat(layer.index), torch.arange(81))
    per_param = parameter_groups(model, params, "parameter")
    assert per_param.names == list(params) and sum(per_param.numel) == 81
    custom = parameter_groups(model, params, {"weights": "weight$", "head": ["4"]})
    assert custom.members == [["0.weight", "1.weight", "4.weight"], ["4.weight", "4.bias"]]
    assert len(parameter_groups(model, params, None)) == 0
    with pytest.raises(ValueError, match="per must be"):
        parameter_groups(model, params, "neuron")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="per must be"):
        parameter_groups(model, params, 3)  # type: ignore[arg-type]
