"""Hessian-, Gauss-Newton- and Fisher-vector products.

- :func:`hvp`: ``H v`` of a scalar function of a parameter dict, forward-over-reverse
  (``jvp(grad(f))``, Pearlmutter 1994 via torch.func) with double backward as the fallback.
- :class:`CurvatureOperator`: the Hessian (``kind="hessian"``), generalised Gauss-Newton
  (``"ggn"``, ``J^T H_out J``; Schraudolph 2002) or empirical Fisher (``"fisher"``,
  ``mean_i g_i g_i^T``) of a model's loss over a whole dataset, as a linear operator on flat vectors,
  with ``matvec``, a counter of products and a SciPy ``LinearOperator`` view. The product over the
  dataset is the size-weighted mean of the per-batch products, so it does not depend on batching.

The caller's model is used as a template through ``torch.func.functional_call`` and never changed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from gradsense.core.batching import split_batch
from gradsense.core.checks import check_eval_mode
from gradsense.core.distributed import DataLike, all_reduce_sum, iterate, num_examples
from gradsense.core.functional import (
    ParamSpec,
    check_model,
    flatten,
    functional,
    unflatten,
)

__all__ = ["CurvatureOperator", "hvp"]

Params = dict[str, Tensor]
Kind = Literal["hessian", "ggn", "fisher"]
Method = Literal["auto", "forward-over-reverse", "double-backward"]


def _hvp_fwd_rev(f: Callable[[Params], Tensor], params: Params, v: Params) -> Params:
    return jvp(grad(f), (params,), (v,))[1]


def _hvp_double_backward(f: Callable[[Params], Tensor], params: Params, v: Params) -> Params:
    names = list(params)
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    with torch.enable_grad():
        value = f(leaves)
        g = torch.autograd.grad(value, [leaves[k] for k in names], create_graph=True, allow_unused=True)
        pairs = [(gi, leaves[k], v[k]) for gi, k in zip(g, names) if gi is not None]
        dot = sum((gi * vi).sum() for gi, _, vi in pairs)
        if not isinstance(dot, Tensor) or not dot.requires_grad:
            return {k: torch.zeros_like(p) for k, p in params.items()}
        hv = torch.autograd.grad(dot, [leaves[k] for k in names], allow_unused=True)
    return {k: torch.zeros_like(params[k]) if h is None else h.detach() for k, h in zip(names, hv)}


def hvp(
    f: Callable[[Params], Tensor],
    params: Params,
    v: Params,
    *,
    method: Method = "auto",
) -> Params:
    """Hessian-vector product ``(d^2 f / d params^2) v`` of a scalar function of a parameter dict.

    Args:
        f: ``params -> scalar``; must be a pure function of ``params``.
        params: Point at which the Hessian is taken.
        v: Direction, same keys and shapes as ``params``.
        method: ``"forward-over-reverse"`` (``jvp`` of ``grad``), ``"double-backward"``, or ``"auto"``
            (forward-over-reverse, falling back to double backward if an op lacks forward-mode AD).

    Returns:
        ``H v`` as a dict like ``params``.

    Raises:
        ValueError: If ``v`` does not match ``params``.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
        >>> f = lambda p: p["x"] @ A @ p["x"]
        >>> hv = hvp(f, {"x": torch.zeros(2)}, {"x": torch.tensor([1.0, 0.0])})
        >>> hv["x"].tolist()  # (A + A^T) v
        [4.0, 1.0]
    """
    if set(v) != set(params) or any(v[k].shape != params[k].shape for k in params):
        raise ValueError("hvp: v must have the same keys and shapes as params.")
    if method == "double-backward":
        return _hvp_double_backward(f, params, v)
    if method not in ("auto", "forward-over-reverse"):
        raise ValueError(f"hvp method must be 'auto', 'forward-over-reverse' or 'double-backward', got {method!r}.")
    try:
        return _hvp_fwd_rev(f, params, v)
    except (RuntimeError, NotImplementedError) as err:
        if method != "auto":
            raise
        warnings.warn(
            f"forward-over-reverse HVP failed ({type(err).__name__}: {str(err)[:120]}); "
            "falling back to double backward.",
            RuntimeWarning,
            stacklevel=2,
        )
        return _hvp_double_backward(f, params, v)




class CurvatureOperator:
    """Curvature of a model's loss over a dataset, as a linear operator on flat parameter vectors.

    The operator is taken at the model as it is when the operator is made: its buffers (BatchNorm statistics)
    are copied then, and its parameters are read from the module's own tensors, so change neither while you use
    the operator (make a new one after training further).

    Args:
        model: The module (never modified). Must be in eval mode if it has BatchNorm or Dropout,
            unless ``allow_train_mode=True``.
        loss_fn: ``(output, labels) -> scalar``, the mean loss of a batch.
        data: Tensor, ``(inputs, labels)``, Dataset or DataLoader; the operator averages over all of it.
        params: Which parameters span the space (see :data:`~gradsense.core.functional.ParamSpec`).
        kind: ``"hessian"``, ``"ggn"`` (generalised Gauss-Newton) or ``"fisher"`` (empirical Fisher).
        method: HVP method for ``kind="hessian"`` (see :func:`hvp`).
        batch_size: Batch size for tensors and Datasets.
        cache_data: Keep the batches in memory after the first pass (default True).
        allow_train_mode: Accept a train-mode model with BatchNorm/Dropout (its curvature is then that
            of the train-mode function, random for Dropout).
        max_rows: Split every batch into pieces of at most this many examples for the products (the memory
            knob: a product's activations grow with the rows it sees). The size-weighted mean over the
            pieces is the batch's mean for a ``loss_fn`` that averages over examples.

    Raises:
        ValueError: Unknown ``kind``, empty data, or a train-mode model with BatchNorm/Dropout.

    Attributes:
        n_matvec: Number of operator-vector products computed so far (each a pass over the data).
        numel: Dimension of the space.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: DataLike,
        *,
        params: ParamSpec = None,
        kind: Kind = "hessian",
        method: Method = "auto",
        batch_size: int = 256,
        cache_data: bool = True,
        allow_train_mode: bool = False,
        max_rows: int | None = None,
    ) -> None:
        check_model(model)
        if kind not in ("hessian", "ggn", "fisher"):
            raise ValueError(f"kind must be 'hessian', 'ggn' or 'fisher', got {kind!r}.")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (output, labels) -> scalar, got {type(loss_fn).__name__}.")
        if not allow_train_mode:
            check_eval_mode(model, "curvature", hint=" (or pass allow_train_mode=True)")
        self.model, self.loss_fn, self.kind, self.method = model, loss_fn, kind, method
        self.fm = functional(model, params)  # buffers are copies: a train-mode BatchNorm never moves the caller's
        self.params: Params = self.fm.params
        self.numel = self.fm.numel
        self.total = num_examples(data)
        if self.total == 0:
            raise ValueError("data is empty: need at least one example.")
        self._data, self._batch_size = data, batch_size
        self._cache: list[tuple[Tensor, Any]] | None = [] if cache_data else None
        self._cached = False
        self.n_matvec = 0
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"max_rows must be a positive int, got {max_rows!r}.")
        self.max_rows = max_rows
        p0 = next(iter(self.params.values()))
        self.dtype, self.device = p0.dtype, p0.device

    # --------------------------------------------------------------------------------- data
    def batches(self) -> list[tuple[Tensor, Any]] | Any:
        """The data batches, ``(inputs, labels)`` (cached after the first pass), each split into pieces of
        at most :attr:`max_rows` rows when that is set (views, no copies)."""
        if self._cache is not None and self._cached:
            source: Any = self._cache
        elif self._cache is None:
            source = iterate(self._data, batch_size=self._batch_size)
        else:
            self._cache = list(iterate(self._data, batch_size=self._batch_size))
            self._cached = True
            source = self._cache
        if self.max_rows is None:
            return source
        pieces = (piece for x, y in source for piece in split_batch(x, y, self.max_rows))
        return list(pieces) if isinstance(source, list) else pieces

    @property
    def shape(self) -> tuple[int, int]:
        """``(numel, numel)``."""
        return (self.numel, self.numel)

    def loss(self, params: Params | None = None) -> Tensor:
        """The dataset-average loss at ``params`` (default: the model's)."""
        p = self.params if params is None else params
        value = torch.zeros((), dtype=self.dtype, device=self.device)
        seen = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for x, y in self.batches():
                value += self.loss_fn(self.fm(p, x), y).detach() * x.shape[0]
                seen += x.shape[0]
        return all_reduce_sum(value) / float(all_reduce_sum(seen))

    # --------------------------------------------------------------------------------- products
    def _batch_product(self, x: Tensor, y: Any, v: Params) -> Params:
        fm, loss_fn = self.fm, self.loss_fn
        if self.kind == "hessian":
            return hvp(lambda p: loss_fn(fm(p, x), y), self.params, v, method=self.method)
        if self.kind == "ggn":
            out, jv = jvp(lambda p: fm(p, x), (self.params,), (v,))
            hjv = hvp(lambda d: loss_fn(d["z"], y), {"z": out.detach()}, {"z": jv}, method=self.method)["z"]
            _, pullback = vjp(lambda p: fm(p, x), self.params)
            return pullback(hjv)[0]
        # empirical Fisher: (1/n) sum_i g_i (g_i . v) for this batch
        def example_loss(p: Params, xi: Tensor, yi: Any) -> Tensor:
            return loss_fn(fm(p, xi.unsqueeze(0)), yi.unsqueeze(0)).reshape(())

        g = vmap(grad(example_loss), in_dims=(None, 0, 0))(self.params, x, y)
        coeff = sum((g[k].reshape(g[k].shape[0], -1) * v[k].reshape(1, -1)).sum(1) for k in g)
        return {k: torch.einsum("n,n...->...", coeff, g[k]) / x.shape[0] for k in g}

    def matvec_dict(self, v: Params) -> Params:
        """Operator applied to a direction given as a parameter dict."""
        acc = {k: torch.zeros_like(p) for k, p in self.params.items()}
        seen = torch.zeros((), dtype=torch.float64)
        for x, y in self.batches():
            hv = self._batch_product(x, y, v)
            for k in acc:
                acc[k] += hv[k].detach() * x.shape[0]
            seen += x.shape[0]
        self.n_matvec += 1
        total = float(all_reduce_sum(seen))
        return {k: all_reduce_sum(t) / total for k, t in acc.items()}

    def matvec(self, v: Tensor) -> Tensor:
        """Operator applied to a flat vector of length :attr:`numel` (returns a flat vector)."""
        if v.ndim != 1 or v.numel() != self.numel:
            raise ValueError(f"matvec: expected a vector of {self.numel} elements, got shape {tuple(v.shape)}.")
        v = v.to(self.device, self.dtype)
        return flatten(self.matvec_dict(unflatten(v, self.params)))

    __matmul__ = matvec

    def dense(self) -> Tensor:
        """The full matrix, one column per basis vector (only for tiny models and tests)."""
        if self.numel > 5000:
            raise ValueError(f"dense() refuses {self.numel} parameters (> 5000): use matvec instead.")
        eye = torch.eye(self.numel, dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(eye[i]) for i in range(self.numel)], dim=1)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out)."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x: Any) -> Any:
            t = torch.as_tensor(x.reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(t).detach().to("cpu", torch.float64).numpy()

        return LinearOperator(shape=self.shape, matvec=mv, dtype="float64")
