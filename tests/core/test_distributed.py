"""core.distributed with world size 1: every data form yields every example once, in order."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from gradsense.core.distributed import (
    all_reduce_sum,
    is_main_process,
    iterate,
    materialize,
    num_examples,
    world,
)

N = 10


@pytest.fixture
def xy():
    x = torch.arange(N * 3, dtype=torch.float64).reshape(N, 3)
    y = torch.arange(N) * 7
    return x, y


class _ListDataset(Dataset):
    """Items are (x, y, extra) triples: only the first two are read."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], "extra"


def _forms(x, y):
    return {
        "pair": (x, y),
        "list-pair": [x, y],
        "tensor-dataset": TensorDataset(x, y),
        "custom-dataset": _ListDataset(x, y),
        "dataloader": DataLoader(TensorDataset(x, y), batch_size=4),
    }


@pytest.mark.parametrize("form", ["pair", "list-pair", "tensor-dataset", "custom-dataset", "dataloader"])
@pytest.mark.parametrize("batch_size", [1, 3, 10, 64])
def test_iterate_yields_everything_once_in_order(xy, form, batch_size):
    x, y = xy
    data = _forms(x, y)[form]
    assert num_examples(data) == N
    batches = list(iterate(data, batch_size=batch_size))
    xs = torch.cat([b[0] for b in batches])
    ys = torch.cat([b[1] for b in batches])
    torch.testing.assert_close(xs, x, rtol=0, atol=0)
    torch.testing.assert_close(ys, y, rtol=0, atol=0)
    expected_batch = 4 if form == "dataloader" else batch_size  # a DataLoader keeps its own
    assert [b[0].shape[0] for b in batches[:-1]] == [expected_batch] * (len(batches) - 1)


@pytest.mark.parametrize("form", ["tensor", "single-tensor-dataset", "dataloader-of-tensor"])
def test_iterate_inputs_without_labels(xy, form):
    x, _ = xy
    data = {
        "tensor": x,
        "single-tensor-dataset": TensorDataset(x),
        "dataloader-of-tensor": DataLoader(x, batch_size=3),
    }[form]
    batches = list(iterate(data, batch_size=4))
    assert all(b[1] is None for b in batches)
    torch.testing.assert_close(torch.cat([b[0] for b in batches]), x, rtol=0, atol=0)


def test_materialize(xy):
    x, y = xy
    mx, my = materialize(TensorDataset(x, y), batch_size=3)
    torch.testing.assert_close(mx, x, rtol=0, atol=0)
    torch.testing.assert_close(my, y, rtol=0, atol=0)
    mx, my = materialize(x, batch_size=3)
    assert my is None
    torch.testing.assert_close(mx, x, rtol=0, atol=0)


@pytest.mark.parametrize(
    "data",
    [
        torch.zeros(0, 3),
        (torch.zeros(0, 3), torch.zeros(0)),
        TensorDataset(torch.zeros(0, 3)),
        torch.tensor(1.0),
    ],
    ids=["empty-tensor", "empty-pair", "empty-dataset", "0d-tensor"],
)
def test_empty_data_is_a_value_error(data):
    with pytest.raises(ValueError, match="data is empty"):
        next(iterate(data))


def test_mismatched_and_malformed_data(xy):
    x, y = xy
    with pytest.raises(ValueError, match="10 inputs but 9 labels"):
        next(iterate((x, y[:9])))
    with pytest.raises(TypeError, match=r"\(inputs, labels\), two tensors; got 3 items"):
        next(iterate((x, y, y)))
    with pytest.raises(TypeError, match="two tensors"):
        next(iterate((x, [0] * N)))
    with pytest.raises(TypeError, match="got dict"):
        next(iterate({"x": x}))
    with pytest.raises(TypeError, match="cannot read"):
        next(iterate(DataLoader(TensorDataset(x), batch_size=2, collate_fn=lambda items: 3.0)))


def test_single_process_world():
    assert world() == (0, 1)
    assert is_main_process()
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t) is t
    torch.testing.assert_close(t, torch.tensor([1.0, 2.0]), rtol=0, atol=0)


def test_single_process_helpers_are_identities(monkeypatch):
    from gradsense.core.distributed import all_gather_cat, broadcast_seed, launched, process_group

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert not launched()
    with process_group() as (rank, size):  # not launched: nothing is initialised
        assert (rank, size) == (0, 1)
        assert not torch.distributed.is_initialized()
    t = torch.arange(6.0).reshape(3, 2)
    assert all_gather_cat(t) is t
    assert broadcast_seed(123) == 123


def test_launched_reads_torchruns_environment(monkeypatch):
    from gradsense.core.distributed import launched

    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert launched()
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc-per-node 1: one process, no group needed
    assert not launched()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR")
    assert not launched()
