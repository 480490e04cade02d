"""``doctor``: what a model is, and which gradsense analyses apply to it.

Counts parameters, lists layer types, decides which analysis families apply (CAM methods need a
convolution or a patch-token layer, LeGrad needs attention maps exposed as a module output, token
attribution needs an embedding layer, per-example gradients need BatchNorm in eval mode), and
estimates the memory of one forward+backward pass at a given batch size by measuring the size of
every layer's output on one example.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn

from gradsense.core.batching import estimate_example_bytes
from gradsense.core.functional import (
    check_model,
    describe_training,
    model_fingerprint,
    preserve_model,
    training_stochastic_layers,
)
from gradsense.results.base import Result

__all__ = ["DoctorResult", "doctor"]



def _first_sentence(text: str) -> str:
    """The first sentence of a message, whole (never cut inside a word)."""
    m = re.search(r"[.;](\s+(?=[A-Z`'\"(])|$)", text)
    return text[: m.start() + 1].rstrip(";") if m else text


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclasses.dataclass(frozen=True, repr=False)
class DoctorResult(Result):
    """Support report of a model. Tensors: ``param_counts`` (per top-level layer type, aligned with
    ``meta['layer_types']``)."""

    kind = "doctor"

    @property
    def title(self) -> str:
        return f"Model: {self.meta.get('model', {}).get('name', '')}"

    def summary(self) -> list[tuple[str, str]]:
        m = self.meta
        rows = [
            ("model", str(m["model"].get("name"))),
            ("class", str(m["model"].get("class"))),
            ("parameters", f"{m['n_parameters']:,} ({m['n_trainable']:,} trainable)"),
            ("mode", "train" if m["training"] else "eval"),
            ("device / dtype", f"{m['device']} / {m['dtype']}"),
            ("layer types", ", ".join(f"{k} x{v}" for k, v in m["layer_types"].items())),
        ]
        if m.get("memory"):
            mem = m["memory"]
            rows.append((
                f"memory, fwd+bwd at batch {mem['batch_size']}",
                f"~{_fmt_bytes(mem['total_bytes'])} (activations {_fmt_bytes(mem['activation_bytes'])}, "
                f"weights+grads {_fmt_bytes(mem['parameter_bytes'])})",
            ))
        for name, (ok, why) in m["analyses"].items():
            rows.append((f"{name}", f"{'yes' if ok else 'no'}: {why}"))
        return rows

    def plot(self, **kwargs: Any) -> Any:
        from gradsense.viz.figures import bar_chart

        types = list(self.meta["layer_params"])
        values = [self.meta["layer_params"][t] for t in types]
        return bar_chart(types, values, title="Parameters by layer type", xlabel="parameters", log=False)


def doctor(
    model: nn.Module,
    example: Tensor | None = None,
    *,
    batch_size: int = 32,
    name: str | None = None,
) -> DoctorResult:
    """Describe ``model`` and say which analyses apply.

    Args:
        model: The module (never modified).
        example: One input with a batch dimension (``(1, ...)``); needed for the memory estimate.
        batch_size: Batch size for the memory estimate.
        name: Display name (default: the zoo name or class name).

    Returns:
        A :class:`DoctorResult`.

    Raises:
        TypeError: ``model`` is not an nn.Module.
        ValueError: ``batch_size`` < 1.
    """
    check_model(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    t0 = time.perf_counter()
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    n_train = sum(p.numel() for p in params if p.requires_grad)
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    layer_types = Counter(type(m).__name__ for _, m in leaves)
    layer_params: Counter[str] = Counter()
    for _, m in leaves:
        layer_params[type(m).__name__] += sum(p.numel() for p in m.parameters(recurse=False))
    layer_params = Counter({k: v for k, v in layer_params.items() if v})

    has_conv = any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in model.modules())
    attn_maps = [n for n, m in model.named_modules() if n.endswith("attn_map")]
    try:
        from gradsense.attribution.legrad import find_vit_structure

        vit = find_vit_structure(model)
        legrad_ok, legrad_why = True, f"a ViT ({getattr(vit, 'kind', 'zoo-style')}) with attention maps"
    except (ValueError, TypeError) as err:
        legrad_ok, legrad_why = False, _first_sentence(str(err)).removeprefix("legrad: ")
    has_mha = any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    has_embedding = any(isinstance(m, nn.Embedding) for m in model.modules())
    training_layers = training_stochastic_layers(model)
    analyses: dict[str, tuple[bool, str]] = {
        "gradient attribution": (True, "Saliency, Input x Gradient, SmoothGrad, Integrated Gradients"),
        "CAM family": (
            has_conv or bool(attn_maps),
            "a convolution layer to hook" if has_conv else (
                "patch tokens of a ViT block" if attn_maps else "needs a conv layer or ViT patch tokens"
            ),
        ),
        "LeGrad (ViT)": (legrad_ok, legrad_why if legrad_ok or not has_mha else
                         "nn.MultiheadAttention does not expose its maps as a module output"),
        "token attribution": (has_embedding, "an nn.Embedding layer" if has_embedding else "no embedding layer"),
        "per-example gradients": (
            not training_layers,
            f"{describe_training(training_layers)}: call model.eval()" if training_layers else "vmap over examples",
        ),
        "curvature / landscape / importance": (n_params > 0, f"{n_params:,} parameters"),
    }
    memory = None
    if example is not None:
        if not isinstance(example, Tensor) or example.ndim < 1:
            raise TypeError("example must be a tensor with a batch dimension, e.g. x[:1].")
        with preserve_model(model):
            act = estimate_example_bytes(model, example[:1], factor=1.0)
        param_bytes = sum(p.numel() * p.element_size() for p in params) * 2
        act_total = act * batch_size * 2  # kept for backward + their gradients
        memory = {
            "batch_size": batch_size,
            "activation_bytes": act_total,
            "parameter_bytes": param_bytes,
            "total_bytes": act_total + param_bytes,
        }
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params else torch.get_default_dtype()
    return DoctorResult.build(
        {"param_counts": torch.tensor([layer_params[k] for k in layer_params], dtype=torch.long)},
        method="doctor",
        settings={"batch_size": batch_size},
        model=model_fingerprint(model, name),
        wall_time_s=time.perf_counter() - t0,
        n_parameters=n_params,
        n_trainable=n_train,
        training=model.training,
        device=str(device),
        dtype=str(dtype),
        layer_types=dict(layer_types.most_common()),
        layer_params=dict(layer_params.most_common()),
        analyses={k: [v[0], v[1]] for k, v in analyses.items()},
        memory=memory,
    )
