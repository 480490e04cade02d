"""The attribution family's shared machinery: one verb (``attribute``), a registry, the checks.

A method is a class with configuration in ``__init__`` and data in ``attribute(inputs, target)``.
Subclasses implement :meth:`Attribution._compute`, which gets checked inputs and a resolved
:class:`~gradsense.core.targets.Target` and returns the attribution tensor (plus optional extra
tensors such as ``delta``). The base class checks arguments before any work, keeps the caller's
model untouched (flags and hooks restored in ``finally``), times the run and builds the
:class:`~gradsense.results.AttributionResult`.
"""

from __future__ import annotations

import functools
import inspect
import time
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gradsense.core.batching import chunk_size_for, chunks, estimate_example_bytes, parse_memory
from gradsense.core.checks import check_inputs, check_names, explain_model_errors, first_forward, suggest
from gradsense.core.functional import check_model, model_fingerprint, preserve_model
from gradsense.core.grad import input_gradients, warn_if_train_mode
from gradsense.core.targets import Batch, Target, TargetLike, _output_tensor, as_target
from gradsense.results.attribution import AttributionResult

__all__ = ["METHODS", "Attribution", "accepted_options", "attribute", "get_method", "method_names", "register"]

METHODS: dict[str, type[Attribution]] = {}


def register(*names: str) -> Callable[[type[Attribution]], type[Attribution]]:
    """Class decorator adding an attribution method to the registry under ``names``."""

    def deco(cls: type[Attribution]) -> type[Attribution]:
        for n in names:
            METHODS[n] = cls
        cls.name = names[0]
        return cls

    return deco


def method_names() -> list[str]:
    """The canonical name of every registered method (aliases left out)."""
    return sorted({cls.name for cls in METHODS.values()})


def get_method(name: str) -> type[Attribution]:
    """The class registered as ``name``.

    Raises:
        ValueError: Unknown name (the message lists the known ones).
    """
    if not isinstance(name, str):
        raise TypeError(f"method must be a name (str), got {type(name).__name__}; available: {method_names()}.")
    key = name.lower().replace("-", "_").replace(" ", "_")
    if key not in METHODS:
        raise ValueError(f"unknown attribution method {name!r}; available: {method_names()}.{suggest(name, METHODS)}")
    return METHODS[key]


class Attribution:
    """Base class of input-attribution methods.

    Args:
        model: The module to explain (never modified; use ``model.eval()`` yourself).
        chunk_size: Rows (examples x samples) per forward/backward; default from ``max_memory``.
        max_memory: Memory budget, bytes or e.g. ``"2GB"``; default a quarter of free memory.
        forward: How to run the model on a batch of inputs (default ``model(x)``); for models whose
            call takes more than one argument.
        show_progress: Progress bar (``None``: only on a TTY).
    """

    name: ClassVar[str] = "attribution"
    signed: ClassVar[bool] = True
    #: What the method needs of the model's outputs on the clean inputs, which decides what the first
    #: forward (the shared input check) runs: ``"own"`` - it returns its own scores, the first forward is a
    #: two-row probe; ``"outputs"`` - the base computes the scores from the outputs, the first forward runs
    #: their first chunk and it is reused; ``"target"`` - it reads :meth:`_clean_scores` (IG's ``F(x)``), the
    #: first forward runs every row when they fit one chunk of at most 256, else it is a two-row probe.
    clean_outputs: ClassVar[str] = "own"

    def __init__(
        self,
        model: nn.Module,
        *,
        chunk_size: int | None = None,
        max_memory: int | str | None = None,
        forward: Callable[[Tensor], Any] | None = None,
        show_progress: bool | None = False,
    ) -> None:
        self.model = check_model(model)
        if max_memory is not None:
            parse_memory(max_memory)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
        self.chunk_size, self.max_memory = chunk_size, max_memory
        self.forward = forward
        self.show_progress = show_progress
        self._first_forward: tuple[Tensor, Any] | None = None  # set only inside attribute(), see _clean_scores

    # ------------------------------------------------------------------------------ helpers
    def _run(self, x: Tensor) -> Any:
        return (self.forward or self.model)(x)

    def _chunk(self, rows: Tensor) -> int:
        """Rows per forward/backward: ``chunk_size`` if given, else from the memory budget."""
        n = rows.shape[0]
        if self.chunk_size is not None:
            return chunk_size_for(1, chunk_size=self.chunk_size, total=n)
        return chunk_size_for(self._row_bytes(rows), max_memory=self.max_memory, total=n, device=rows.device)

    def _row_bytes(self, rows: Tensor) -> int:
        """Estimated bytes of one row's forward+backward (a two-row probe), measured once per call and row shape."""
        key = (tuple(rows.shape[1:]), rows.dtype, rows.device)
        cache = self.__dict__.setdefault("_row_bytes_cache", {})
        if key not in cache:
            cache[key] = estimate_example_bytes(self.model, rows[:2], forward=self._run)
        return cache[key]

    def _outputs(self, x: Tensor, first: Tensor | None = None) -> Tensor:
        """Model outputs on ``x`` without gradients, in chunks of ``chunk_size`` rows (default 256).

        ``first``: the outputs of the first chunk when they are known already (the first forward's).
        """
        size = self.chunk_size or 256
        with torch.no_grad():
            return torch.cat([
                first if first is not None and sl.start == 0 else _output_tensor(self._run(x[sl]))
                for sl in chunks(x.shape[0], size)
            ])

    def _clean_scores(self, inputs: Tensor, target: Target) -> Tensor | None:
        """The target on the clean inputs from the first forward, when that forward covered every row.

        Only set during :meth:`attribute`, for the inputs it passes to :meth:`_compute` (the very tensor):
        a method that needs ``F(x)`` reads it here instead of running the forward again. The values are
        those of one batch of all ``n <= 256`` rows, as a chunked forward of them would give.
        """
        known = getattr(self, "_first_forward", None)
        if known is None or known[0] is not inputs:
            return None
        with torch.no_grad():
            return target(known[1], Batch(inputs, torch.arange(inputs.shape[0], device=inputs.device)))

    def _gradients(
        self, rows: Tensor, target: Target, index: Tensor, n_examples: int, desc: str = "gradients",
        chunk: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Input gradients of ``rows``; ``chunk``: rows per pass when the caller sized them from the budget already."""
        return input_gradients(
            self.model,
            rows,
            target,
            index=index,
            forward=self.forward,
            chunk_size=chunk or self.chunk_size,
            max_memory=self.max_memory,
            n_examples=n_examples,
            show_progress=self.show_progress,
            desc=f"{self.name}: {desc}",
        )

    def settings(self) -> dict[str, Any]:
        """The method's configuration, for result metadata."""
        return {}

    def _check(self, inputs: Tensor) -> None:
        """Method-specific argument checks, run before any forward pass (override to add some)."""

    def _compute(
        self, inputs: Tensor, target: Target, index: Tensor, n_examples: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Attribute each row of ``inputs``; row ``i`` belongs to example ``index[i]``.

        Rows may be an expanded batch (noise samples of SmoothGrad); methods must treat rows
        independently and use ``index`` for anything per-example (targets, baselines).
        Returns ``(attributions like inputs, extra per-row tensors)``.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------------------ the verb
    def attribute(
        self,
        inputs: Tensor,
        target: TargetLike,
        *,
        titles: list[str] | None = None,
        feature_names: list[str] | None = None,
    ) -> AttributionResult:
        """Attribute the target's value to each input element.

        Args:
            inputs: ``(N, ...)`` floating-point inputs.
            target: What to explain: int class, one int per example, ``"predicted"``, a
                ``gs.targets`` object or a callable ``(output, batch) -> (n,)``.
            titles: Optional per-example titles for plots.
            feature_names: Optional names of the features (tabular inputs), for plots.

        Returns:
            An :class:`~gradsense.results.AttributionResult` with ``attributions`` shaped like ``inputs``.

        Raises:
            TypeError, ValueError: Bad inputs or target, before any work is done.
        """
        check_inputs(inputs)
        self._check(inputs)
        n = inputs.shape[0]
        titles = check_names(titles, n, "titles", "examples")
        if inputs.ndim == 2:  # tabular: one name per column
            feature_names = check_names(feature_names, inputs.shape[1], "feature_names", "features")
        model = self.model
        warn_if_train_mode(model, self.name)
        t0 = time.perf_counter()
        clean = inputs.detach()
        with preserve_model(model):
            cache: dict[str, Tensor] = {}
            rows = min(n, self.chunk_size or 256)

            def outputs() -> Tensor:  # one chunked forward, run only once the target's form is valid
                if "out" not in cache:
                    cache["out"] = self._outputs(clean, first=cache.get("first"))
                return cache["out"]

            with explain_model_errors(inputs, self.name, self.model, rerun=lambda: self._run(clean),
                                      probe_rows=rows):  # 'predicted' runs the first forward: named here
                resolved = as_target(target, n, predict=outputs)
            # otherwise the shared first-forward check: wrong shapes and dtypes are named here. It runs the
            # first chunk of the clean rows, which the scores (and IG's F(x)) then reuse: no extra probe pass
            raw = None
            if "out" in cache:
                first = cache["out"]
            else:
                whole = rows == n <= 256
                probe = rows if self.clean_outputs == "outputs" or (self.clean_outputs == "target" and whole) else 2
                raw = first_forward(self._run, clean, what=self.name, model=self.model, probe=probe)
                first = _output_tensor(raw)
                if probe == rows:
                    cache["first"] = first  # the first chunk of outputs(), not run again
                if not (self.clean_outputs == "target" and whole):
                    raw = None
            resolved.validate(first, n)
            # one batch of all the rows, as IG's own forward of them would be: handed on for F(x)
            self._first_forward = None if raw is None else (clean, raw)
            try:
                attributions, extra = self._compute(clean, resolved, torch.arange(n, device=inputs.device), n)
            finally:
                self._first_forward = None
                self.__dict__.pop("_row_bytes_cache", None)
            scores = extra.pop("scores", None)  # methods that run the clean inputs return their scores
            if scores is None or scores.shape != (n,):
                with torch.no_grad():
                    scores = resolved(outputs(), _batch_of(inputs))
        if bool((attributions == 0).all()):
            warnings.warn(
                f"{self.name}: every attribution is exactly zero; the target may not depend on the inputs "
                "(or the model saturates there).",
                UserWarning,
                stacklevel=2,
            )
        return AttributionResult.build(
            {"attributions": attributions.detach(), "inputs": inputs.detach(), "scores": scores, **extra},
            method=self.name,
            settings=self.settings(),
            model=model_fingerprint(model),
            seed=getattr(self, "seed", None),
            wall_time_s=time.perf_counter() - t0,
            target=resolved.describe(),
            signed=self.signed,
            titles=titles,
            feature_names=feature_names,
        )


def _batch_of(inputs: Tensor) -> Any:
    from gradsense.core.targets import Batch

    return Batch(inputs=inputs, index=torch.arange(inputs.shape[0], device=inputs.device))


@functools.cache
def accepted_options(cls: type[Attribution]) -> frozenset[str]:
    """The keyword-only ``__init__`` options of ``cls`` and its bases (parsed once per class)."""
    return frozenset(
        p.name
        for klass in cls.__mro__
        if "__init__" in vars(klass)
        for p in inspect.signature(vars(klass)["__init__"]).parameters.values()
        if p.kind == p.KEYWORD_ONLY
    )


def attribute(
    model: nn.Module,
    inputs: Tensor,
    *,
    target: TargetLike,
    method: str = "saliency",
    titles: list[str] | None = None,
    feature_names: list[str] | None = None,
    **options: Any,
) -> AttributionResult:
    """Attribute a model's output to its inputs with the named method.

    Args:
        model: The module to explain.
        inputs: ``(N, ...)`` floating-point inputs.
        target: What to explain (see :mod:`gradsense.core.targets`).
        method: A registered method name (``gradsense.attribution.METHODS``).
        titles: Optional per-example titles for plots.
        feature_names: Optional feature names for plots of tabular inputs.
        **options: The method's settings (its class's ``__init__`` keywords).

    Returns:
        An :class:`~gradsense.results.AttributionResult`.

    Raises:
        ValueError: Unknown method or option (the message lists the valid ones), bad inputs/target.

    Example:
        >>> a = gs.attribute(model, x, target=y, method="saliency")  # doctest: +SKIP
    """
    cls = get_method(method)
    accepted = accepted_options(cls)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"method {method!r} does not take option(s) {unknown}; it takes {sorted(accepted)}.")
    return cls(model, **options).attribute(inputs, target, titles=titles, feature_names=feature_names)
