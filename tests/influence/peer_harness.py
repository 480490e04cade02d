"""Run the peer libraries (captum TracInCP, kronfluence EK-FAC, dattri) on a model and data, the same way
everywhere: the peer tests and ``bench/bench_influence.py`` import these functions.

Every function takes ``(inputs, labels)`` tensors, works on a deep copy of the model (kronfluence wraps modules
in place), and returns ``(n_query, n_train)`` scores with the peer's own sign (all three: positive = the training
example lowers the query loss, as gradsense).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def captum_tracin(model: nn.Module, train: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor],
                  states: Sequence[dict[str, Tensor]], lrs: Sequence[float], loss: str = "ce") -> Tensor:
    """captum's TracInCP over checkpoint files written from ``states`` (learning rate from the load function)."""
    from captum.influence import TracInCP

    work = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (s, lr) in enumerate(zip(states, lrs)):
            p = f"{tmp}/checkpoint-{i}.pt"
            torch.save({"state": s, "lr": lr}, p)
            paths.append(p)

        def load(m: nn.Module, path: str) -> float:
            ck = torch.load(path, weights_only=True)
            m.load_state_dict(ck["state"])
            return float(ck["lr"])

        fn = nn.CrossEntropyLoss(reduction="none") if loss == "ce" else nn.MSELoss(reduction="none")
        tracin = TracInCP(work, TensorDataset(*train), checkpoints=paths, checkpoints_load_func=load, loss_fn=fn,
                          batch_size=len(train[1]))
        return tracin.influence(query, show_progress=False).detach()


def kronfluence_scores(model: nn.Module, train: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor], *,
                       strategy: str = "ekfac", empirical: bool = True, damping: float | None = None,
                       batch_size: int = 256, self_influence: bool = False) -> Tensor:
    """kronfluence pairwise scores ``(n_query, n_train)`` (or self-influence ``(n_train,)``)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class ClsTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if not sample:
                return F.cross_entropy(logits, y, reduction="sum")
            with torch.no_grad():
                sampled = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, sampled, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    work = copy.deepcopy(model).eval()
    task = ClsTask()
    work = prepare_model(work, task)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("gs", work, task, cpu=True, disable_tqdm=True, output_dir=tmp, log_level=40)
        fargs = FactorArguments(strategy=strategy, use_empirical_fisher=empirical)
        train_ds = TensorDataset(*train)
        analyzer.fit_all_factors("f", train_ds, per_device_batch_size=batch_size, factor_args=fargs,
                                 overwrite_output_dir=True)
        sargs = ScoreArguments(damping_factor=damping)
        if self_influence:
            analyzer.compute_self_scores("s", "f", train_ds, per_device_train_batch_size=batch_size,
                                         score_args=sargs, overwrite_output_dir=True)
            return analyzer.load_self_scores("s")["all_modules"].detach()
        analyzer.compute_pairwise_scores("s", "f", TensorDataset(*query), train_ds,
                                         per_device_query_batch_size=len(query[1]),
                                         per_device_train_batch_size=batch_size, score_args=sargs,
                                         overwrite_output_dir=True)
        return analyzer.load_pairwise_scores("s")["all_modules"].detach()


def dattri_scores(model: nn.Module, train: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor], *,
                  method: str = "cg", regularization: float = 1e-3, proj_dim: int | None = 512,
                  **kwargs: object) -> Tensor:
    """dattri attributors (``"explicit"``, ``"cg"``, ``"lissa"``, ``"tracin"`` (grad-dot),
    ``"trak"``) -> ``(n_query, n_train)``; dattri returns ``(n_train, n_query)``, transposed here."""
    from dattri.algorithm import (
        IFAttributorCG,
        IFAttributorExplicit,
        IFAttributorLiSSA,
        TracInAttributor,
        TRAKAttributor,
    )
    from dattri.task import AttributionTask

    work = copy.deepcopy(model).eval()

    def f(params, data):
        x, y = data
        return F.cross_entropy(torch.func.functional_call(work, params, x), y.long())

    full = DataLoader(TensorDataset(*train), batch_size=len(train[1]))
    qloader = DataLoader(TensorDataset(*query), batch_size=len(query[1]))
    def one(params, data):
        x, y = data
        return F.cross_entropy(torch.func.functional_call(work, params, x.unsqueeze(0)), y.long().reshape(1))

    if method == "trak":
        def margin(params, data):
            x, y = data
            logp = torch.log_softmax(torch.func.functional_call(work, params, x.unsqueeze(0))[0], -1)
            lp = logp.gather(0, y.long().reshape(1))[0]
            return lp - torch.log1p(-torch.exp(lp))

        def prob(params, data):
            return torch.exp(-one(params, data))

        # margin gradients on both sides, as in the TRAK paper (a loss target_func would flip the sign)
        task = AttributionTask(loss_func=margin, model=work, checkpoints=work.state_dict())
        att = TRAKAttributor(task=task, correct_probability_func=prob, device="cpu",
                             projector_kwargs={"proj_dim": proj_dim, "device": "cpu"}, regularization=regularization)
        att.cache(full)
        return att.attribute(qloader).detach().T
    if method == "tracin":
        task = AttributionTask(loss_func=one, model=work, checkpoints=work.state_dict())
        att = TracInAttributor(task=task, weight_list=torch.ones(1), normalized_grad=False, device="cpu")
        if proj_dim is None:  # dattri always projects to 512 dimensions; None here means exact gradients
            att.projector_kwargs = None
        else:
            att.projector_kwargs = {**att.projector_kwargs, "proj_dim": proj_dim}
        return att.attribute(full, qloader).detach().T
    task = AttributionTask(loss_func=f, model=work, checkpoints=work.state_dict())
    if method == "lissa":
        att = IFAttributorLiSSA(task=task, device="cpu", damping=regularization, **kwargs)
    else:
        cls = {"explicit": IFAttributorExplicit, "cg": IFAttributorCG}[method]
        att = cls(task=task, device="cpu", regularization=regularization, **kwargs)
    att.cache(full)
    return att.attribute(full, qloader).detach().T
