"""The public verbs: :func:`reconstruct` (one attack on one shared message) and :func:`audit` (attacks x
defences x batch sizes, with the accuracy cost of each defence), and the attack registry :data:`ATTACKS`."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradsense.core.batching import chunk_size_for, chunks, estimate_example_bytes, progress
from gradsense.core.checks import check_labels_fit, check_module_batch, check_positive_int, draw_seed, suggest
from gradsense.core.distributed import DataLike, materialize
from gradsense.core.functional import (
    ParamSpec,
    any_module_training,
    check_model,
    model_device_dtype,
    model_fingerprint,
    preserve_model,
    training_stochastic_layers,
)
from gradsense.privacy.analytic import linear_layer_inputs
from gradsense.privacy.attacks import DISTANCES, GradientMatcher, run_dlg, run_inverting
from gradsense.privacy.defenses import Defense, DPNoise, LocalSteps, NoDefense, dp_epsilon, parse_defenses
from gradsense.privacy.labels import LABEL_METHODS, find_last_layer, recover_labels
from gradsense.privacy.metrics import label_accuracy, match, psnr, ssim
from gradsense.privacy.shared import WeightUpdate, as_shared
from gradsense.results.privacy import AuditResult, ReconstructionResult

__all__ = ["ATTACKS", "AttackSpec", "audit", "reconstruct", "score"]

LossFn = Callable[[Any, Tensor], Tensor]


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """A registered attack: what it does, its paper, its default settings."""

    description: str
    reference: str
    defaults: dict[str, Any]


ATTACKS: dict[str, AttackSpec] = {
    "idlg": AttackSpec("labels from the sign (one example) or size (a batch) of the last layer's gradient",
                       "Zhao et al. 2020, iDLG; Wainakh et al. 2022, LLG", {}),
    "dlg": AttackSpec("L2 gradient matching by L-BFGS from random inputs",
                      "Zhu et al. 2019, Deep Leakage from Gradients",
                      {"distance": "l2", "steps": 100, "lr": 1.0, "tv": 0.0, "restarts": 1}),
    "inverting": AttackSpec("cosine gradient matching + total variation, signed Adam, restarts",
                            "Geiping et al. 2020, Inverting Gradients",
                            {"distance": "cosine", "steps": 1000, "lr": 0.1, "tv": 1e-2, "restarts": 1}),
    "analytic": AttackSpec("inputs read off a Linear first layer's weight and bias gradients",
                           "Phong et al. 2017; Geiping et al. 2020 Prop. 3.1; Fowl et al. 2022", {}),
}

#: The audit's budgets where ``attack_options`` says nothing: one attack of each kind per cell must stay cheap,
#: since an audit runs attacks x defences x batch sizes of them.
AUDIT_BUDGETS: dict[str, dict[str, Any]] = {"inverting": {"steps": 300}, "dlg": {"steps": 20}}
# what audit() passes to reconstruct() itself: attack_options may set any other of reconstruct's options
_AUDIT_SETS = {"model", "loss_fn", "shared", "attack", "batch_size", "input_shape", "bounds", "truth", "seed",
               "show_progress", "name"}

ASSUMPTIONS = {
    "bn_eval": "BatchNorm in eval mode: running statistics, identical for the client and the attacker.",
    "bn_train": "BatchNorm in train mode: the statistics of the batch, which the attacker's dummy batch reproduces "
                "(every restart updates its own copy of the running buffers).",
    "dropout_expected": "Dropout in train mode: the client's mask is unknown; the attacker uses the expected "
                        "network (dropout off).",
    "dropout_sample": "Dropout in train mode: the client's mask is unknown; the attacker draws a fresh mask at "
                      "every evaluation.",
    "update": "Weight update: the attacker knows the learning rate, the number of local steps and the local "
              "batch size, and that mini-batches were taken in order (Geiping et al. 2020, section 5).",
    "batch_size": "The number of examples in the client's batch is known to the server (FedSGD).",
}


def _check_loss(loss_fn: Any) -> None:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable (output, labels) -> scalar, e.g. gradsense.losses.cross_entropy; "
                        f"got {type(loss_fn).__name__}.")


def _zoo_input(model: nn.Module) -> tuple[tuple[int, ...], tuple[float, float]] | None:
    name = getattr(model, "zoo_name", None)
    if not isinstance(name, str):
        return None
    from gradsense.zoo import dataset
    from gradsense.zoo.registry import MODELS

    entry = MODELS.get(name)
    if entry is None:
        return None
    x = dataset(entry.dataset, split="test").inputs
    return tuple(x.shape[1:]), (float(x.min()), float(x.max()))


def _resolve_input(model: nn.Module, input_shape: Sequence[int] | None,
                   bounds: tuple[float, float] | None) -> tuple[tuple[int, ...] | None, tuple[float, float] | None]:
    zoo = _zoo_input(model)
    if input_shape is None:
        shape = getattr(model, "input_shape", None)
        input_shape = tuple(shape) if shape is not None else (zoo[0] if zoo else None)
    if input_shape is not None:
        if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape):
            raise ValueError(f"input_shape must be positive ints (one input, no batch dimension), got {input_shape!r}.")
        input_shape = tuple(int(s) for s in input_shape)
    if bounds is None and zoo is not None and input_shape == zoo[0]:
        bounds = zoo[1]
    if bounds is not None:
        try:
            lo, hi = (float(b) for b in bounds)
        except (TypeError, ValueError) as err:
            raise ValueError(f"bounds must be a pair (lo, hi), got {bounds!r}.") from err
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"bounds must be finite with lo < hi, got {bounds!r}.")
        bounds = (lo, hi)
    return input_shape, bounds


def _init(kind: str, shape: tuple[int, ...], bounds: tuple[float, float] | None, gen: torch.Generator,
          dtype: torch.dtype, device: torch.device) -> Tensor:
    if kind == "randn":
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif kind == "rand":
        lo, hi = bounds if bounds is not None else (0.0, 1.0)
        x = lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)
    elif kind == "zeros":
        x = torch.zeros(shape, dtype=torch.float64)
    else:
        raise ValueError(f"init must be 'randn', 'rand' or 'zeros', got {kind!r}.")
    return x.to(dtype=dtype, device=device)


def _check_truth(truth: Any, batch_size: int, input_shape: tuple[int, ...] | None) -> tuple[Tensor, Tensor | None] | None:
    if truth is None:
        return None
    x, y = (truth, None) if isinstance(truth, Tensor) else tuple(truth)
    if not isinstance(x, Tensor) or x.shape[0] != batch_size:
        raise ValueError(f"truth must be the client's (inputs, labels) with {batch_size} rows.")
    if input_shape is not None and tuple(x.shape[1:]) != input_shape:
        raise ValueError(f"truth inputs have shape {tuple(x.shape[1:])}, but input_shape is {input_shape}.")
    return x, y


def score(inputs: Tensor | None, labels: Tensor | None, truth_inputs: Tensor, truth_labels: Tensor | None, *,
          data_range: float) -> dict[str, Any]:
    """Compare a reconstruction with the client's batch: matched order, PSNR, SSIM, label accuracy.

    Returns:
        ``{"order", "psnr", "ssim" (per original, float64), "label_accuracy"}``; image entries are ``None``
        when no inputs were reconstructed, and SSIM is ``None`` for non-image inputs.
    """
    out: dict[str, Any] = {"order": None, "psnr": None, "ssim": None, "label_accuracy": math.nan}
    if inputs is not None:
        order = match(truth_inputs, inputs)
        aligned = inputs[order.clamp(min=0)]
        out["order"] = order
        out["psnr"] = psnr(truth_inputs, aligned, data_range)
        if truth_inputs.ndim in (3, 4) and min(truth_inputs.shape[-2:]) >= 5:
            out["ssim"] = ssim(truth_inputs, aligned, data_range)
    if truth_labels is not None and labels is not None:
        out["label_accuracy"] = label_accuracy(truth_labels, labels)
    return out


def reconstruct(
    model: nn.Module,
    loss_fn: LossFn,
    shared: Mapping[str, Tensor] | Sequence[Tensor] | WeightUpdate,
    *,
    attack: str = "inverting",
    labels: Tensor | str | None = None,
    batch_size: int = 1,
    input_shape: Sequence[int] | None = None,
    bounds: tuple[float, float] | None = None,
    steps: int | None = None,
    restarts: int | None = None,
    lr: float | None = None,
    tv: float | None = None,
    distance: str | None = None,
    signed: bool = True,
    init: str | None = None,
    label_method: str = "auto",
    layer: str | None = None,
    params: ParamSpec = None,
    dropout: str = "expected",
    line_search: str | None = "strong_wolfe",
    max_iter: int = 20,
    probes: int = 16,
    truth: tuple[Tensor, Tensor] | Tensor | None = None,
    seed: int | None = 0,
    max_memory: int | str | None = None,
    show_progress: bool | None = None,
    name: str | None = None,
) -> ReconstructionResult:
    """What can a server reconstruct from what a client shared?

    Args:
        model: The model the client trained (never modified: parameters, buffers, flags, hooks, ``.grad``).
        loss_fn: The client's ``(output, labels) -> scalar`` loss, averaged over its batch.
        shared: The client's gradient (``{name: tensor}``, or the sequence ``torch.autograd.grad`` returns in
            ``model.parameters()`` order) or a :class:`~gradsense.privacy.WeightUpdate` after local steps.
        attack: ``"idlg"`` (labels only), ``"dlg"``, ``"inverting"`` or ``"analytic"`` (see :data:`ATTACKS`).
        labels: ``None``: recovered from the gradient (``label_method``); a tensor: the labels, if the attacker
            knows them; ``"joint"``: optimised with the inputs (``"dlg"`` only, as in Zhu et al. 2019).
        batch_size: Number of examples behind ``shared``.
        input_shape: Shape of one input (default: ``model.input_shape``, or the zoo dataset's for zoo models).
        bounds: ``(lo, hi)`` of valid input values. Inverting keeps its candidates inside after every step and
            starts uniformly inside; every attack's final reconstruction is clipped to it. DLG optimises without
            constraints, as in the paper. Zoo models default to their data's range.
        steps: Iterations (Adam steps for inverting, L-BFGS iterations for DLG); default per attack.
        restarts: Independent random starts; the lowest objective wins (inverting: batched with ``vmap``).
        lr: Step size (default 0.1 inverting, 1.0 DLG).
        tv: Total-variation weight (default 0.01 inverting, 0 DLG).
        distance: ``"cosine"`` or ``"l2"`` (default per attack).
        signed: Inverting: step on the gradient's sign.
        init: ``"randn"``, ``"rand"`` (uniform in ``bounds``) or ``"zeros"``; default ``"randn"`` for DLG (as the
            paper), ``"rand"`` for inverting when ``bounds`` are known.
        label_method: ``"auto"``, ``"idlg"``, ``"count"`` or ``"llg"`` (see :mod:`gradsense.privacy.labels`).
        layer: The classifier layer (label recovery) or the first Linear layer (analytic attack), by name.
        params: Which parameters the client shares (default: every trainable one).
        dropout: ``"expected"`` or ``"sample"``: how the attacker treats train-mode dropout.
        line_search: DLG's L-BFGS line search (``None``: fixed step, as the paper's code).
        max_iter: DLG: objective evaluations per L-BFGS iteration at most.
        probes: Random inputs (uniform in ``bounds``, else standard normal) on which the ``"count"`` label method
            estimates the mean prediction.
        truth: The client's ``(inputs, labels)``, to score the reconstruction (PSNR, SSIM, label accuracy).
        seed: Seed of the random starts and probes (``None``: drawn, and recorded).
        max_memory: Memory budget (bytes or e.g. ``"2GB"``) for the restarts run at once (inverting); default a
            quarter of free memory, at most 128 MiB on a CPU (see :mod:`gradsense.core.batching`).
        show_progress: Progress bar (``None``: on a TTY).
        name: Model name for the metadata.

    Returns:
        A :class:`~gradsense.results.ReconstructionResult`: ``.inputs`` (``None`` for ``"idlg"``), ``.labels``,
        ``.loss_trace``, ``.n_evaluations`` (forward passes of the model on a candidate batch, each with its
        double backward), ``.relative_mismatch`` (``||g(x_hat) - g|| / ||g||``), ``meta["cosine_distance"]``
        (``1 - cos(g(x_hat), g)``) and, with ``truth``, the scores.

    Raises:
        TypeError, ValueError: Bad arguments or a ``shared`` that does not fit the model, before any work.

    Example:
        >>> shared = gs.privacy.client_gradient(model, gs.losses.cross_entropy, x[:1], y[:1])
        >>> rec = gs.privacy.reconstruct(model, gs.losses.cross_entropy, shared, attack="inverting", steps=200)
        >>> rec.labels, rec.inputs.shape
    """
    t0 = time.perf_counter()
    check_model(model)
    _check_loss(loss_fn)
    if not isinstance(attack, str) or attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose from {sorted(ATTACKS)}.{suggest(attack, ATTACKS)}")
    check_positive_int(batch_size, "batch_size")
    msg = as_shared(model, shared, params=params)
    shape, bounds = _resolve_input(model, input_shape, bounds)
    if shape is None and attack != "idlg":
        raise ValueError(f"attack {attack!r} needs the shape of one input: pass input_shape=(C, H, W) (or set "
                         "model.input_shape).")
    if label_method not in ("auto", *LABEL_METHODS):
        raise ValueError(f"label_method must be one of {('auto', *LABEL_METHODS)}, got {label_method!r}.")
    if dropout not in ("expected", "sample"):
        raise ValueError(f"dropout must be 'expected' or 'sample', got {dropout!r}.")
    joint = isinstance(labels, str)
    if joint and (labels != "joint" or attack != "dlg"):
        raise ValueError(f"labels={labels!r}: the only string is 'joint', and only for attack='dlg'.")
    if isinstance(labels, Tensor):
        if labels.shape != (batch_size,) or labels.is_floating_point():
            raise ValueError(f"labels must be an int tensor of shape ({batch_size},), got {labels.dtype} "
                             f"{tuple(labels.shape)}.")
    elif labels is not None and not joint:
        raise TypeError(f"labels must be None, an int tensor or 'joint', got {type(labels).__name__}.")
    if isinstance(labels, Tensor) and shape is not None:  # labels in range of the model's classes, before any work
        check_labels_fit(model, loss_fn, labels, shape, what="reconstruct")
    method = label_method if label_method != "auto" else ("idlg" if batch_size == 1 else "count")
    if labels is None:
        find_last_layer(model, msg, layer if attack != "analytic" else None)  # fails early if not identifiable
        if method == "count" and shape is None:
            raise ValueError("the 'count' label method needs input_shape= for its probe inputs (or pass labels=).")
    if msg.kind == "update" and msg.batch_size is not None and msg.batch_size > batch_size:
        raise ValueError(f"WeightUpdate.batch_size ({msg.batch_size}) exceeds batch_size ({batch_size}).")
    spec = ATTACKS[attack].defaults
    steps = spec.get("steps", 0) if steps is None else check_positive_int(steps, "steps")
    restarts = spec.get("restarts", 1) if restarts is None else check_positive_int(restarts, "restarts")
    lr = spec.get("lr", 0.0) if lr is None else float(lr)
    tv = spec.get("tv", 0.0) if tv is None else float(tv)
    distance = spec.get("distance", "cosine") if distance is None else distance
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}.")
    if attack in ("dlg", "inverting") and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}.")
    if not (math.isfinite(tv) and tv >= 0):
        raise ValueError(f"tv must be >= 0, got {tv!r}.")
    if init is None:
        init = "rand" if (attack == "inverting" and bounds is not None) else "randn"
    if init not in ("randn", "rand", "zeros"):
        raise ValueError(f"init must be 'randn', 'rand' or 'zeros', got {init!r}.")
    truth_pair = _check_truth(truth, batch_size, shape)
    seed = draw_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device, dtype = model_device_dtype(model)

    training = training_stochastic_layers(model)
    bn_train = any(isinstance(dict(model.named_modules())[n], nn.modules.batchnorm._BatchNorm) for n in training)
    has_dropout_train = any(isinstance(dict(model.named_modules())[n], nn.modules.dropout._DropoutNd)
                            for n in training)
    assumptions = [ASSUMPTIONS["batch_size"]]
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        assumptions.append(ASSUMPTIONS["bn_train" if bn_train else "bn_eval"])
    if has_dropout_train:
        assumptions.append(ASSUMPTIONS[f"dropout_{dropout}"])
    if msg.kind == "update":
        assumptions.append(ASSUMPTIONS["update"])

    tensors: dict[str, Tensor] = {}
    extra: dict[str, Any] = {}
    evaluations = 0
    rng_devices = [device] if device.type == "cuda" else []
    with preserve_model(model), torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)  # sampled dropout masks: reproducible, and the caller's RNG is left alone
        if has_dropout_train and dropout == "expected":
            for m in model.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.eval()
        rec_labels: Tensor | None
        if isinstance(labels, Tensor):
            rec_labels, label_source = labels.detach().to(device), "given"
        elif joint:
            rec_labels, label_source = None, "joint optimisation"
        else:
            probe_x = None
            if method == "count":
                probe_x = _init("rand" if bounds is not None else "randn", (probes, *shape), bounds, gen, dtype,
                                device)
                evaluations += 1
            rec_labels = recover_labels(model, msg, batch_size, method=method,
                                        layer=layer if attack != "analytic" else None, probes=probe_x).to(device)
            label_source = f"recovered ({method})"
        inputs = None
        trace = torch.zeros(0, 1, dtype=torch.float64)
        if attack == "analytic":
            inputs, info = linear_layer_inputs(model, msg, batch_size, shape, layer=layer)
            extra["analytic"] = info
            if bounds is not None:
                inputs = inputs.clamp(*bounds)
        elif attack in ("dlg", "inverting"):
            matcher = GradientMatcher(model, loss_fn, msg, distance=distance, tv=tv,
                                      batch_buffers=any_module_training(model), joint_labels=joint,
                                      randomness="different" if (has_dropout_train and dropout == "sample") else "error")
            x0 = _init(init, (restarts, batch_size, *shape), bounds, gen, dtype, device)
            if attack == "inverting":
                # restarts are independent: run them in groups that fit the memory budget
                per_restart = 4 * batch_size * estimate_example_bytes(model, x0[0, :1])  # double backward ~4x
                group = chunk_size_for(per_restart, max_memory=max_memory, total=restarts, device=device)
                parts = [run_inverting(matcher, x0[sl], rec_labels, steps=steps, lr=lr, signed=signed, bounds=bounds,
                                       show_progress=show_progress) for sl in chunks(restarts, group)]
                best_x, best_v = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
                trace = torch.cat([p[2] for p in parts], dim=1)
                extra["restart_groups"] = len(parts)
                best_y = None
            else:
                if joint:
                    num_classes = find_last_layer(model, msg, layer)[2]
                    y0 = torch.randn((restarts, batch_size, num_classes), generator=gen, dtype=torch.float64)
                    y0 = y0.to(dtype=dtype, device=device)
                else:
                    y0 = rec_labels
                tiny = (torch.finfo(dtype).eps * 1e-2) ** 2 * matcher.target_sq if distance == "l2" else None
                best_x, best_y, best_v, trace = run_dlg(matcher, x0, y0, steps=steps, lr=lr, max_iter=max_iter,
                                                        line_search=line_search, stop_mismatch=tiny,
                                                        show_progress=show_progress)
            evaluations += matcher.evaluations
            r = int(torch.argmin(torch.nan_to_num(best_v, nan=math.inf)))
            inputs = best_x[r]
            if joint:
                tensors["label_logits"] = best_y[r]
                rec_labels = best_y[r].argmax(dim=-1)
                label_source = "joint optimisation (argmax of the optimised soft labels)"
            mismatch, cosine = matcher.mismatch(inputs, best_y[r] if joint else rec_labels)
            extra["relative_mismatch"], extra["cosine_distance"] = mismatch, cosine
            if bounds is not None:  # the attacker knows the valid range: report the reconstruction inside it
                inputs = inputs.clamp(*bounds)
            extra["objective"] = float(best_v[r])
            extra["restart_chosen"] = r
            tensors["restart_values"] = best_v
    tensors["loss_trace"] = trace
    if inputs is not None:
        tensors["inputs"] = inputs.detach()
    if rec_labels is not None:
        tensors["labels"] = torch.sort(rec_labels.detach().cpu())[0] if attack == "idlg" else rec_labels.detach().cpu()
    if truth_pair is not None:
        tx, ty = truth_pair
        data_range = (bounds[1] - bounds[0]) if bounds is not None else float(tx.max() - tx.min()) or 1.0
        sc = score(inputs, tensors.get("labels"), tx.to(device=device), ty, data_range=data_range)
        tensors["originals"] = tx.detach()
        if ty is not None:
            tensors["true_labels"] = ty.detach()
        for key in ("order", "psnr", "ssim"):
            if sc[key] is not None:
                tensors[key] = sc[key]
        extra.update(data_range=data_range, label_accuracy=sc["label_accuracy"],
                     psnr_mean=None if sc["psnr"] is None else float(sc["psnr"].mean()),
                     ssim_mean=None if sc["ssim"] is None else float(sc["ssim"].mean()))
    settings: dict[str, Any] = {"attack": attack, "batch_size": batch_size, "input_shape": shape, "bounds": bounds,
                                "labels": label_source if rec_labels is not None or joint else None}
    if attack in ("dlg", "inverting"):
        settings.update(steps=steps, restarts=restarts, lr=lr, tv=tv, distance=distance, init=init)
        if attack == "inverting":
            settings["signed"] = signed
        else:
            settings.update(max_iter=max_iter, line_search=line_search)
    return ReconstructionResult.build(
        tensors, method=attack, settings=settings, model=model_fingerprint(model, name), seed=seed,
        wall_time_s=time.perf_counter() - t0, n_evaluations=evaluations, shared=msg.describe(),
        shared_kind=msg.kind, assumptions=assumptions, reference=ATTACKS[attack].reference, **extra)


# ----------------------------------------------------------------------------------------------- audit
def _applicable(attack: str, model: nn.Module, shape: tuple[int, ...]) -> str | None:
    """Why ``attack`` cannot run on this model (``None`` if it can)."""
    if attack == "analytic":
        first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
        if first is None or first.bias is None or first.in_features != math.prod(shape):
            return "the model's first layer is not a Linear layer on the flattened input"
    return None


def _accuracy(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> tuple[float, float, Tensor]:
    """Held-out accuracy, mean loss and the per-example correctness (bool) of ``model`` as it is."""
    with torch.no_grad():
        out = model(x)
        logits = out if isinstance(out, Tensor) else out.logits
        correct = (logits.argmax(-1) == y).cpu()
        return float(correct.double().mean()), float(loss_fn(out, y)), correct


def _finetune(model: nn.Module, loss_fn: LossFn, defense: Defense, x: Tensor, y: Tensor, *, steps: int, lr: float,
              batch_size: int, seed: int) -> nn.Module:
    """A copy of ``model`` after ``steps`` rounds in which a client shares with ``defense`` and the server applies it."""
    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.Generator().manual_seed(seed + 1)
    params = dict(m.named_parameters())
    with torch.random.fork_rng(devices=[]):  # train-mode dropout draws from the global RNG: seed it, restore it
        torch.manual_seed(seed)
        for _ in range(steps):
            idx = torch.randperm(x.shape[0], generator=gen)[:batch_size]
            msg = as_shared(m, defense.share(m, loss_fn, x[idx], y[idx], generator=noise))
            with torch.no_grad():
                for n, t in msg.tensors.items():
                    params[n].add_(t if msg.kind == "update" else -lr * t)
    return m


def audit(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataLike,
    *,
    attacks: Sequence[str] = ("idlg", "dlg", "inverting"),
    defenses: Sequence[str | Defense] = ("none", "prune", "dp", "int8", "local"),
    batch_sizes: Sequence[int] = (1, 4, 16),
    n_batches: int = 1,
    heldout: DataLike | None = None,
    attack_options: Mapping[str, Mapping[str, Any]] | None = None,
    input_shape: Sequence[int] | None = None,
    bounds: tuple[float, float] | None = None,
    finetune_steps: int = 50,
    finetune_lr: float = 0.01,
    finetune_batch_size: int = 32,
    delta: float = 1e-5,
    seed: int | None = 0,
    show_progress: bool | None = None,
    name: str | None = None,
) -> AuditResult:
    """If clients share gradients of this model, what can a server reconstruct, and what does each defence cost?

    For every batch size, ``n_batches`` batches of distinct examples are drawn from ``data`` (seeded); for every
    defence the client's message is computed on them; every attack runs on every message; reconstructions are
    scored against the batch (PSNR and SSIM after the best matching of the batch, label accuracy as
    multisets). With ``heldout=``, the accuracy cost of each defence is measured by training: a copy of the
    model is fine-tuned for ``finetune_steps`` rounds of federated SGD on batches of ``finetune_batch_size``
    examples from ``data``, each round's update computed by a client applying the defence and applied by the
    server with step ``finetune_lr`` (a ``local`` defence applies its own weight update), and its held-out
    accuracy compared with the same fine-tune without defence.

    Args:
        model: The model (never modified; the fine-tunes train copies).
        loss_fn: The clients' ``(output, labels) -> scalar`` classification loss (batch mean).
        data: The clients' examples with labels: a ``(inputs, labels)`` pair, a Dataset or a DataLoader.
        attacks: From :data:`ATTACKS`; ``"analytic"`` is skipped (and said so) where the first layer is not Linear.
        defenses: Names (see :func:`~gradsense.privacy.defenses.parse_defense`) or Defense objects.
        batch_sizes: Client batch sizes to audit.
        n_batches: Batches per batch size; mean and worst case (the most revealing image or batch) are over them.
        heldout: Held-out ``(inputs, labels)`` for the accuracy cost of each defence.
        attack_options: Per-attack keyword arguments for :func:`reconstruct`, e.g. ``{"inverting": {"steps": 1000}}``;
            the audit's defaults are :data:`AUDIT_BUDGETS` (300 inverting steps, 20 DLG iterations).
        input_shape, bounds: As in :func:`reconstruct`; ``bounds`` default to the data's min and max.
        finetune_steps, finetune_lr, finetune_batch_size: The fine-tune that measures accuracy costs.
        delta: The delta at which epsilon is reported for DP defences.
        seed: Seed of the batches, the defences' noise and the attacks' starts.
        show_progress: Progress bar.
        name: Model name for the metadata.

    Returns:
        An :class:`~gradsense.results.AuditResult` (``.rows``, ``.table()``, ``.plot()``).

    Raises:
        TypeError, ValueError: Bad arguments, data without labels, a batch size larger than the data, DP on a
            model with train-mode BatchNorm/Dropout, all before any work.
    """
    t0 = time.perf_counter()
    check_model(model)
    _check_loss(loss_fn)
    attacks = [attacks] if isinstance(attacks, str) else list(attacks)  # one name is one attack, not its letters
    if not attacks:
        raise ValueError("attacks is empty: name at least one of " + ", ".join(sorted(ATTACKS)) + ".")
    for a in attacks:
        if not isinstance(a, str) or a not in ATTACKS:
            raise ValueError(f"unknown attack {a!r}; choose from {sorted(ATTACKS)}.{suggest(a, ATTACKS)}")
    defs = parse_defenses(defenses)
    batch_sizes = [batch_sizes] if isinstance(batch_sizes, int) and not isinstance(batch_sizes, bool) else batch_sizes
    sizes = [check_positive_int(b, "batch_sizes entry") for b in batch_sizes]
    if not sizes:
        raise ValueError("batch_sizes is empty.")
    check_positive_int(n_batches, "n_batches")
    if heldout is not None:
        check_positive_int(finetune_steps, "finetune_steps")
        check_positive_int(finetune_batch_size, "finetune_batch_size")
    options = {k: {**AUDIT_BUDGETS.get(k, {}), **dict(v)} for k, v in (attack_options or {}).items()}
    options.update({k: dict(v) for k, v in AUDIT_BUDGETS.items() if k not in options})
    allowed = set(inspect.signature(reconstruct).parameters) - _AUDIT_SETS
    for k, opts in options.items():
        if k not in ATTACKS:
            raise ValueError(f"attack_options names unknown attack {k!r}; choose from {sorted(ATTACKS)}.{suggest(k, ATTACKS)}")
        bad = sorted(set(opts) - allowed)
        if bad:
            raise TypeError(f"attack_options[{k!r}] has unknown option(s) {bad}{suggest(bad[0], allowed)} "
                            f"Options: {sorted(allowed)}.")
    x_all, y_all = materialize(data)
    if y_all is None:
        raise ValueError("audit needs labelled data: pass (inputs, labels), or a Dataset of (input, label) pairs.")
    if max(sizes) * n_batches > x_all.shape[0]:
        raise ValueError(f"data holds {x_all.shape[0]} examples; {n_batches} batch(es) of {max(sizes)} need "
                         f"{max(sizes) * n_batches}.")
    training = training_stochastic_layers(model)
    if training and any(isinstance(d, DPNoise) for d in defs):
        raise ValueError(f"the DP defence clips per-example gradients, which needs eval-mode layers; the model has "
                         f"{', '.join(training)} in train mode. Call model.eval() first.")
    shape = tuple(x_all.shape[1:]) if input_shape is None else tuple(input_shape)
    if bounds is None:
        bounds = (float(x_all.min()), float(x_all.max()))
    shape, bounds = _resolve_input(model, shape, bounds)
    hx = hy = None
    if heldout is not None:
        hx, hy = materialize(heldout)
        if hy is None:
            raise ValueError("heldout must hold labels: (inputs, labels).")
    # the first forward, after every argument check: shapes, dtypes and every label in range, before any work
    check_module_batch(model, loss_fn, x_all, y_all, what="audit", more_labels=[y_all])
    if hx is not None:
        check_module_batch(model, loss_fn, hx, hy, what="audit (heldout)", more_labels=[hy])
    seed = draw_seed(seed)
    device, _ = model_device_dtype(model)
    gen = torch.Generator().manual_seed(seed)
    batches = {b: [torch.randperm(x_all.shape[0], generator=gen)[:b] for _ in range(n_batches)] for b in sizes}
    data_range = bounds[1] - bounds[0]

    cells: dict[tuple[str, int, int], dict[str, Any]] = {}
    tensors: dict[str, Tensor] = {}
    todo = [(b, j, di) for b in sizes for j in range(n_batches) for di in range(len(defs))]
    bar = progress(todo, total=len(todo), desc="privacy audit", enabled=show_progress)
    for b, j, di in bar:
        idx = batches[b][j]
        xb, yb = x_all[idx].to(device), y_all[idx].to(device)
        if j == 0 and di == 0:
            tensors[f"originals/b{b}"] = xb.detach().cpu()
            tensors[f"true_labels/b{b}"] = yb.detach().cpu()
        d = defs[di]
        noise = torch.Generator().manual_seed(seed + 7919 * (1 + di) + 104729 * (1 + j) + b)
        with preserve_model(model), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + j)  # train-mode dropout in the client's forward: reproducible
            message = d.share(model, loss_fn, xb, yb, generator=noise)
        for a in attacks:
            cell = cells.setdefault((a, di, b), {"psnr": [], "ssim": [], "labels": [], "evaluations": 0,
                                                 "seconds": 0.0, "skipped": None})
            why = _applicable(a, model, shape)
            if why is not None:
                cell["skipped"] = why
                continue
            opts = {**options.get(a, {})}
            rec = reconstruct(model, loss_fn, message, attack=a, batch_size=b, input_shape=shape, bounds=bounds,
                              truth=(xb, yb), seed=seed + j, show_progress=False, name=name, **opts)
            cell["evaluations"] += rec.n_evaluations
            cell["seconds"] += float(rec.meta["wall_time_s"])
            if rec.psnr is not None:
                cell["psnr"].extend(rec.psnr.tolist())
            if rec.ssim is not None:
                cell["ssim"].extend(rec.ssim.tolist())
            cell["labels"].append(float(rec.meta.get("label_accuracy", math.nan)))
            if j == 0 and rec.inputs is not None:
                tensors[f"recon/{a}/{di}/b{b}"] = rec.inputs[rec.tensors["order"].clamp(min=0)].detach().cpu()
                tensors[f"psnr/{a}/{di}/b{b}"] = rec.psnr.detach().cpu()

    def _stats(values: list[float]) -> tuple[float | None, float | None]:
        vals = [v for v in values if not math.isnan(v)]
        if not vals:
            return None, None
        finite = [min(v, 100.0) for v in vals]  # a perfect reconstruction has infinite PSNR: cap for the mean
        return sum(finite) / len(finite), max(vals)

    rows = []
    for (a, di, b), cell in cells.items():
        pm, pw = _stats(cell["psnr"])
        sm, sw = _stats(cell["ssim"])
        lm, lw = _stats(cell["labels"])
        rows.append({"attack": a, "defense": defs[di].label, "defense_index": di, "batch_size": b,
                     "psnr_mean": pm, "psnr_worst": pw, "ssim_mean": sm, "ssim_worst": sw,
                     "label_acc_mean": lm, "label_acc_worst": lw, "evaluations": cell["evaluations"],
                     "seconds": round(cell["seconds"], 3), "skipped": cell["skipped"]})

    finetune: dict[str, Any] | None = None
    if hx is not None:
        finetune = _measure_costs(model, loss_fn, defs, x_all, y_all, hx.to(device), hy.to(device),
                                  steps=finetune_steps, lr=finetune_lr, batch_size=finetune_batch_size, seed=seed,
                                  delta=delta, show_progress=show_progress)
    epsilons = []
    for d in defs:
        if isinstance(d, DPNoise):
            eps = dp_epsilon(d.noise_multiplier, 1.0, 1, delta)
            epsilons.append({"defense": d.label, "setting": f"one release of a batch gradient, delta={delta:g}",
                             "epsilon": None if eps is None else eps[0], "accountant": None if eps is None else eps[1]})
    settings = {"attacks": attacks, "defenses": [d.label for d in defs], "batch_sizes": sizes, "n_batches": n_batches,
                "bounds": bounds, "input_shape": shape,
                "attack_options": {a: {**ATTACKS[a].defaults, **options.get(a, {})} for a in attacks}}
    if hx is not None:
        settings["finetune"] = {"steps": finetune_steps, "lr": finetune_lr, "batch_size": finetune_batch_size}
    return AuditResult.build(
        tensors, method="audit", settings=settings, model=model_fingerprint(model, name), seed=seed,
        wall_time_s=time.perf_counter() - t0, rows=rows, data_range=data_range,
        defenses=[{"label": d.label, "description": d.describe(), **d.settings()} for d in defs],
        finetune=finetune, epsilon=epsilons, n_data=int(x_all.shape[0]),
        attack_references={a: ATTACKS[a].reference for a in attacks},
        assumptions=[ASSUMPTIONS["batch_size"]] + ([ASSUMPTIONS["update"]] if any(isinstance(d, LocalSteps) for d in defs)
                                                   else []))


def _measure_costs(model: nn.Module, loss_fn: LossFn, defs: list[Defense], x: Tensor, y: Tensor, hx: Tensor,
                   hy: Tensor, *, steps: int, lr: float, batch_size: int, seed: int, delta: float,
                   show_progress: bool | None) -> dict[str, Any]:
    """Held-out accuracy after the same fine-tune with each defence; the cost against no defence, with the
    standard error of the paired difference over the held-out examples."""
    acc0, loss0, _ = _accuracy(copy.deepcopy(model), hx, hy, loss_fn)
    out: dict[str, Any] = {"accuracy_before": acc0, "loss_before": loss0, "n_heldout": int(hy.shape[0]),
                           "defenses": []}
    plain = next((d for d in defs if d.name == "none"), None)
    todo = ([] if plain is not None else [NoDefense()]) + defs
    results = {}
    b = min(batch_size, x.shape[0])
    with preserve_model(model):
        for d in progress(todo, total=len(todo), desc="fine-tunes", enabled=show_progress):
            tuned = _finetune(model, loss_fn, d, x, y, steps=steps, lr=lr, batch_size=b, seed=seed)
            results[d.label] = _accuracy(tuned, hx, hy, loss_fn)
    ref_acc, _, ref_correct = results[(plain or NoDefense()).label]
    n = ref_correct.numel()
    for d in defs:
        acc, loss, correct = results[d.label]
        diff = ref_correct.double() - correct.double()
        se = float(diff.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
        entry: dict[str, Any] = {"defense": d.label, "accuracy": acc, "loss": loss, "accuracy_cost": ref_acc - acc,
                                 "cost_stderr": se}
        if isinstance(d, DPNoise):
            eps = dp_epsilon(d.noise_multiplier, b / x.shape[0], steps, delta)
            entry["epsilon"] = None if eps is None else eps[0]
            entry["epsilon_setting"] = (f"{steps} steps, sample rate {b / x.shape[0]:.3g} "
                                        f"(Poisson-subsampling accounting), delta={delta:g}"
                                        + ("" if eps is None else f", {eps[1]}"))
        out["defenses"].append(entry)
    out["reference_accuracy"] = ref_acc
    return out
