"""What the curvature analyses share: checked set-up, parameter groups, seeds, and batched products.

- :func:`operator`: the loss Hessian (or Gauss-Newton, or empirical Fisher) of a model over a dataset as
  a :class:`~gradsense.core.hvp.CurvatureOperator`, after the checks every analysis here makes.
- :func:`parameter_groups`: ``per="layer"`` / ``"block"`` / ``"parameter"`` or your own mapping, as
  named groups of parameters and their coordinates in the flat parameter vector.
- :class:`RowProducts`: the operator applied to a block of vectors (rows) at once - forward-over-reverse
  Hessian-vector products ``jvp(grad(loss))`` under ``torch.func.vmap``, a chunk of rows per call - with a
  count of products. This is where the probe dimension becomes a batch dimension.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from gradsense.core.batching import (
    available_memory,
    chunk_size_for,
    chunks,
    default_budget,
    estimate_example_bytes,
    fit_budget_bytes,
    parse_memory,
)
from gradsense.core.checks import check_loss_batch, draw_seed
from gradsense.core.distributed import DataLike, all_reduce_sum
from gradsense.core.functional import ParamSpec, check_model, select_parameters
from gradsense.core.hvp import CurvatureOperator

__all__ = [
    "Groups",
    "Kind",
    "PerSpec",
    "RowProducts",
    "budget_bytes",
    "draw_seed",
    "operator",
    "parameter_groups",
    "vector_budget",
]

Kind = Literal["hessian", "ggn", "fisher"]
PerSpec = Union[None, Literal["layer", "block", "parameter"], Mapping[str, ParamSpec]]
"""How to split the selected parameters into groups:

- ``None``: no groups;
- ``"layer"``: one group per module that owns parameters (``features.0`` = its weight and bias);
- ``"block"``: one group per top-level child module (``layer1`` of a ResNet, ``features`` of a CNN);
- ``"parameter"``: one group per parameter tensor;
- a mapping ``{group name: ParamSpec}`` of your own (groups may overlap).
"""


# ------------------------------------------------------------------------------------------ groups
@dataclasses.dataclass(frozen=True)
class Groups:
    """Named groups of the selected parameters.

    Attributes:
        names: Group names, in model order.
        members: For each group, its parameter names.
        index: For each group, the positions of its coordinates in the flat parameter vector.
    """

    names: list[str]
    members: list[list[str]]
    index: list[Tensor]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def numel(self) -> list[int]:
        """Number of scalars in each group."""
        return [int(i.numel()) for i in self.index]


def parameter_groups(model: nn.Module, params: Mapping[str, Tensor], per: PerSpec) -> Groups:
    """Split the selected parameters into named groups.

    Args:
        model: The module (for custom group specs).
        params: The selected ``{name: tensor}`` in flat-vector order.
        per: See :data:`PerSpec`.

    Returns:
        :class:`Groups` (empty for ``per=None``).

    Raises:
        ValueError: An unknown ``per`` string, or a custom group that selects none of the selected parameters.
        TypeError: ``per`` of an unsupported type.
    """
    names = list(params)
    offsets, pos = {}, 0
    for n in names:
        offsets[n] = (pos, pos + params[n].numel())
        pos += params[n].numel()
    grouped: dict[str, list[str]] = {}
    if per is None:
        return Groups([], [], [])
    if isinstance(per, str):
        if per not in ("layer", "block", "parameter"):
            raise ValueError(f"per must be None, 'layer', 'block', 'parameter' or a mapping, got {per!r}.")
        for n in names:
            if per == "parameter":
                key = n
            elif per == "layer":
                key = n.rsplit(".", 1)[0] if "." in n else "(root)"
            else:
                key = n.split(".", 1)[0] if "." in n else "(root)"
            grouped.setdefault(key, []).append(n)
    elif isinstance(per, Mapping):
        if not per:
            raise ValueError("per: the mapping of groups is empty.")
        for key, spec in per.items():
            chosen = [n for n in select_parameters(model, spec) if n in offsets]
            if not chosen:
                raise ValueError(f"per: group {key!r} ({spec!r}) selects none of the selected parameters.")
            grouped[str(key)] = chosen
    else:
        raise TypeError(f"per must be None, 'layer', 'block', 'parameter' or a mapping, got {type(per).__name__}.")
    index = [torch.cat([torch.arange(*offsets[n]) for n in members]) for members in grouped.values()]
    return Groups(list(grouped), [list(m) for m in grouped.values()], index)


# ------------------------------------------------------------------------------------------ set-up
def _check_loss(op: CurvatureOperator, probe: int | None = None) -> None:
    batches = op.batches()
    first = next(iter(batches), None)
    if first is None:
        raise ValueError(
            "data yielded no batches (a DataLoader with drop_last=True and a batch larger than the dataset?)."
        )
    x, y = first
    rest = [b[1] for b in batches[1:]] if isinstance(batches, list) else []  # every cached batch's labels
    check_loss_batch(lambda r: op.fm(op.params, r), op.loss_fn, x, y, what="curvature", model=op.model,
                     probe=probe, more_labels=rest)


def operator(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: DataLike,
    *,
    params: ParamSpec = None,
    kind: Kind = "hessian",
    batch_size: int = 256,
    method: Literal["auto", "forward-over-reverse", "double-backward"] = "auto",
    max_memory: int | str | None = None,
) -> CurvatureOperator:
    """The curvature of a model's loss over a dataset as a linear operator on flat parameter vectors.

    ``kind="hessian"``: the loss Hessian, by forward-over-reverse products ``jvp(grad(loss))``
    (Pearlmutter 1994) with double backward as the fallback; ``"ggn"``: the generalised Gauss-Newton
    ``J^T H_out J`` (Schraudolph 2002); ``"fisher"``: the empirical Fisher ``mean_i g_i g_i^T``. The product
    is the size-weighted mean over all batches of ``data``. The operator has ``matvec`` (flat vectors),
    ``matvec_dict`` (parameter dicts), ``n_matvec``, ``dense()`` (tiny models) and ``to_scipy()`` (a
    ``scipy.sparse.linalg.LinearOperator``, e.g. for ``eigsh``).

    Args:
        model: The module (never modified). BatchNorm/Dropout must be in eval mode.
        loss_fn: ``(output, labels) -> scalar``, the mean loss of a batch.
        data: ``(inputs, labels)``, a Dataset or a DataLoader.
        params: Which parameters span the space (see :data:`~gradsense.core.functional.ParamSpec`).
        kind: ``"hessian"``, ``"ggn"`` or ``"fisher"``.
        batch_size: Batch size for tensors and Datasets.
        method: Hessian-vector product method (see :func:`gradsense.core.hvp.hvp`).
        max_memory: Memory budget (bytes or e.g. ``"8GB"``; default a quarter of free memory). Batches are
            split so that one product's activations take at most half of it (``op.max_rows``).

    Returns:
        A :class:`~gradsense.core.hvp.CurvatureOperator`.

    Raises:
        TypeError: ``model`` is not an nn.Module, or ``loss_fn`` is not callable.
        ValueError: ``params`` selects nothing; a train-mode model with BatchNorm/Dropout; empty data or
            data that yields no batch; ``loss_fn`` does not return a scalar; unknown ``kind``.

    Example:
        >>> import gradsense as gs
        >>> model, digits = gs.zoo.load("digits-cnn"), gs.zoo.dataset("digits", split="test")
        >>> H = gs.curvature.operator(model, gs.losses.cross_entropy, digits[:64])
        >>> H.matvec(torch.ones(H.numel)).shape == (H.numel,)
        True
    """
    check_model(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (output, labels) -> scalar, got {type(loss_fn).__name__}.")
    if max_memory is not None:
        parse_memory(max_memory)
    op = CurvatureOperator(model, loss_fn, data, params=params, kind=kind, batch_size=batch_size, method=method)
    if not all(p.is_floating_point() for p in op.params.values()):
        raise ValueError("the selected parameters must be floating-point tensors.")
    # first: nothing else runs on inputs that do not fit. The check runs the first batch (no gradient), or two
    # rows of it under an explicit budget that the whole batch may not fit
    _check_loss(op, probe=None if max_memory is None else 2)
    _fit_budget(op, max_memory)
    return op


HVP_FACTOR = 3.0
"""A forward-over-reverse product holds about this many times the memory of a forward+backward (the primal
and tangent activations, and the backward of both); measured on GPT-2 and BERT blocks on CPU."""


budget_bytes = fit_budget_bytes


PARAM_COPIES = 8
"""A forward-over-reverse product also holds about this many parameter-sized tensors whatever the rows (gradient,
its tangent, the result, dense embedding gradients, transposed weights): measured 7.2 on GPT-2 on CPU."""


def _fit_budget(op: CurvatureOperator, max_memory: int | float | str | None) -> None:
    """Split the data batches so that one product (its activations, ``HVP_FACTOR`` times a forward+backward's,
    and its ``PARAM_COPIES`` parameter-sized tensors) takes at most half of the budget (the other half is for the
    solvers' vectors); records ``op.budget`` and ``op.example_bytes``."""
    op.budget = budget_bytes(max_memory, op.device)  # type: ignore[attr-defined]
    op.max_memory = max_memory  # type: ignore[attr-defined]
    first = next(iter(op.batches()), None)
    if first is None:
        return  # no data: the check that follows says so
    x = first[0]
    try:
        per = estimate_example_bytes(op.model, x[:1].detach(), forward=lambda r: op.fm(op.params, r))
    except Exception:  # an estimate only: assume something large
        per = 64 * 1024**2
    op.example_bytes = per  # type: ignore[attr-defined]
    item = next(iter(op.params.values())).element_size()
    room = op.budget // 2 - PARAM_COPIES * op.numel * item  # type: ignore[attr-defined]
    rows = max(1, int(room // max(int(per * HVP_FACTOR), 1)))
    if rows < max(int(b[0].shape[0]) for b in op.batches()):
        op.max_rows = rows


def vector_budget(op: CurvatureOperator) -> int:
    """How many parameter-sized vectors the solvers may keep: half of the operator's budget."""
    item = next(iter(op.params.values())).element_size()
    return max(1, int(getattr(op, "budget", budget_bytes(None, op.device)) // 2 // max(op.numel * item, 1)))


# ------------------------------------------------------------------------------------------ products
class RowProducts:
    """A :class:`~gradsense.core.hvp.CurvatureOperator` applied to each row of an ``(m, n)`` block.

    Two ways to compute Hessian-vector products, both exact:

    - **cached graph** (``cache_graph=True``; the default when it fits in memory): the gradient of each
      data batch is computed once with ``create_graph=True`` and kept; every product is then one reverse
      pass through that graph, ``grad(g, theta, v)`` (Pearlmutter 1994; PyHessian does the same for one
      batch). The solvers here make tens to hundreds of products at one point, so the forward and first
      backward are paid once: measured on CPU, about 2 U (U = one forward+backward) per product against
      3.5-4 U for recomputing ``jvp(grad(loss))``. It holds the batches' activation graphs in memory.
    - **forward-over-reverse** (``cache_graph=False``): ``jvp(grad(loss))`` recomputed for every product
      (the engine's default, :func:`gradsense.core.hvp.hvp`), no memory held between products.

    Either way a block of rows goes through in chunks of ``probe_batch`` rows as a batch dimension
    (``vmap`` of the forward-over-reverse product, or ``is_grads_batched`` through the cached graph), which
    pays where one product is small; where that fails (an op without a batching rule) it falls back to
    one row at a time, with a warning. Gauss-Newton and Fisher operators use ``matvec`` per row.

    Args:
        op: The operator.
        probe_batch: Rows per batched call (``None``: from the memory budget, at most 8).
        max_memory: Memory budget of one batched call (bytes or e.g. ``"1GB"``).
        cache_graph: Keep the gradient graph (``None``: when ``kind="hessian"``, the HVP method is not
            forced to forward-over-reverse, and the graph fits in a quarter of free memory).

    Raises:
        ValueError: ``cache_graph=True`` for a Gauss-Newton/Fisher operator or with
            ``method="forward-over-reverse"``.

    Attributes:
        n_hvp: Products computed so far (one per row).
        cached: Whether products go through a cached gradient graph.
    """

    def __init__(self, op: CurvatureOperator, *, probe_batch: int | None = None,
                 max_memory: int | str | None = None, cache_graph: bool | None = None) -> None:
        self.op = op
        self.n_hvp = 0
        self.names = list(op.params)
        self.shapes = [p.shape for p in op.params.values()]
        self.sizes = [p.numel() for p in op.params.values()]
        hessian = op.kind == "hessian"
        if cache_graph and (not hessian or op.method == "forward-over-reverse"):
            raise ValueError("cache_graph=True needs kind='hessian' and an HVP method other than forward-over-reverse.")
        self._per_example = getattr(op, "example_bytes", None) or self._example_bytes()
        self._given = max_memory is not None or getattr(op, "max_memory", None) is not None
        if max_memory is None and getattr(op, "max_memory", None) is not None:
            max_memory = op.budget // 2  # type: ignore[attr-defined]  # the other half is for the solvers' vectors
        if cache_graph is None:
            graph_bytes = 2 * self._per_example * op.total
            room = parse_memory(max_memory) if max_memory is not None else available_memory(op.device) // 4
            cache_graph = hessian and op.method != "forward-over-reverse" and graph_bytes <= room
        self.cached = bool(cache_graph)
        self._batched = (hessian and op.method != "double-backward") or self.cached
        self._graphs: list[tuple[int, list[Tensor | None]]] | None = None
        self._leaves: list[Tensor] = []
        if probe_batch is None:
            probe_batch = self._default_probe_batch(max_memory)
        self.probe_batch = chunk_size_for(1, chunk_size=probe_batch)

    def _example_bytes(self) -> int:
        x, _ = next(iter(self.op.batches()))
        try:
            return estimate_example_bytes(self.op.model, x[:1].detach(), forward=lambda r: self.op.fm(self.op.params, r))
        except Exception:  # an estimate only: assume something large
            return 64 * 1024**2

    def _default_probe_batch(self, max_memory: int | str | None) -> int:
        if not self._batched:
            return 1
        x, _ = next(iter(self.op.batches()))
        item = self.op.params[self.names[0]].element_size()
        factor = HVP_FACTOR if self._given and not self.cached else 2
        copies = PARAM_COPIES if self._given and not self.cached else 4
        per_probe = int(factor * self._per_example * x.shape[0]) + copies * sum(self.sizes) * item
        if max_memory is None and self.cached:
            # through a cached graph, batching pays only where one product is small (measured on CPU)
            max_memory = min(default_budget(self.op.device), 64 * 1024**2)
        return chunk_size_for(per_probe, max_memory=max_memory, total=8, device=self.op.device)

    @property
    def numel(self) -> int:
        """Dimension of the space."""
        return int(self.op.numel)

    def release(self) -> None:
        """Drop the cached gradient graphs (they are rebuilt on the next product)."""
        self._graphs, self._leaves = None, []

    def _split(self, rows: Tensor) -> dict[str, Tensor]:
        parts = torch.split(rows, self.sizes, dim=1)
        return {n: t.reshape(rows.shape[0], *s) for n, t, s in zip(self.names, parts, self.shapes)}

    def _rows_loop(self, rows: Tensor) -> Tensor:
        return torch.stack([self.op.matvec(r) for r in rows])

    def _rows_vmap(self, rows: Tensor) -> Tensor:
        op = self.op
        fm, loss_fn, params = op.fm, op.loss_fn, op.params
        acc = torch.zeros_like(rows)
        seen = torch.zeros((), dtype=torch.float64)
        for x, y in op.batches():
            def f(p: dict[str, Tensor], x: Tensor = x, y: Any = y) -> Tensor:
                return loss_fn(fm(p, x), y)

            def product(d: dict[str, Tensor], f: Callable[[dict[str, Tensor]], Tensor] = f) -> dict[str, Tensor]:
                return jvp(grad(f), (params,), (d,))[1]

            batched = vmap(product)
            for sl in chunks(rows.shape[0], self.probe_batch):
                hv = batched(self._split(rows[sl]))
                acc[sl] += torch.cat([hv[n].reshape(sl.stop - sl.start, -1) for n in self.names], dim=1).detach() * x.shape[0]
            seen += x.shape[0]
        total = float(all_reduce_sum(seen))
        return all_reduce_sum(acc) / total

    def _build_graphs(self) -> None:
        op = self.op
        self._leaves = [p.detach().requires_grad_(True) for p in op.params.values()]
        leaves = dict(zip(self.names, self._leaves))
        graphs = []
        for x, y in op.batches():
            with torch.enable_grad():
                loss = op.loss_fn(op.fm(leaves, x), y)
                g = torch.autograd.grad(loss, self._leaves, create_graph=True, allow_unused=True)
            graphs.append((int(x.shape[0]), [gi if gi is not None and gi.requires_grad else None for gi in g]))
        self._graphs = graphs

    def _rows_cached(self, rows: Tensor) -> Tensor:
        if self._graphs is None:
            self._build_graphs()
        assert self._graphs is not None
        acc = torch.zeros_like(rows)
        seen = torch.zeros((), dtype=torch.float64)
        for size, g in self._graphs:
            seen += size
            live = [i for i, gi in enumerate(g) if gi is not None]
            if not live:
                continue
            for sl in chunks(rows.shape[0], self.probe_batch):
                parts = torch.split(rows[sl], self.sizes, dim=1)
                m = sl.stop - sl.start
                if m == 1:
                    outs = [parts[i].reshape(self.shapes[i]) for i in live]
                else:
                    outs = [parts[i].reshape(m, *self.shapes[i]) for i in live]
                hv = torch.autograd.grad([g[i] for i in live], self._leaves, grad_outputs=outs, retain_graph=True,
                                         allow_unused=True, is_grads_batched=m > 1)
                flat = [torch.zeros(m, s, dtype=rows.dtype, device=rows.device) if h is None else h.reshape(m, -1)
                        for h, s in zip(hv, self.sizes)]
                acc[sl] += torch.cat(flat, dim=1).detach() * size
        total = float(all_reduce_sum(seen))
        return all_reduce_sum(acc) / total

    def __call__(self, rows: Tensor) -> Tensor:
        """``(m, n)`` rows -> their ``(m, n)`` products with the operator."""
        if rows.ndim != 2 or rows.shape[1] != self.numel:
            raise ValueError(f"expected rows of shape (m, {self.numel}), got {tuple(rows.shape)}.")
        rows = rows.to(self.op.device, self.op.dtype)
        if self.cached:
            if self._graphs is None:
                self._build_graphs()  # errors of the model or loss propagate from here, not retried
            try:
                out = self._rows_cached(rows)
            except (RuntimeError, NotImplementedError) as err:
                if self.probe_batch == 1:
                    raise
                warnings.warn(
                    f"batched products through the cached graph failed ({type(err).__name__}: {str(err)[:120]}); "
                    "computing one product at a time.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.probe_batch = 1
                out = self._rows_cached(rows)
        elif rows.shape[0] == 1 or not self._batched:
            out = self._rows_loop(rows)
        else:
            try:
                out = self._rows_vmap(rows)
            except (RuntimeError, NotImplementedError) as err:
                warnings.warn(
                    f"batched Hessian-vector products under vmap failed ({type(err).__name__}: {str(err)[:120]}); "
                    "computing one product at a time.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._batched = False
                out = self._rows_loop(rows)
        self.n_hvp += rows.shape[0]
        return out
