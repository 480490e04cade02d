"""The training-monitor section of ``gradsense demo``: a monitored run of the digits ViT with a provoked spike.

``demo_section(run, report)`` trains a freshly initialised tiny ViT (the bundled ``digits-vit`` architecture; AdamW,
warm-up, shifted digits) for 90 steps under the ``standard`` preset, measures the conflict between
two objectives (the loss on digits 0-4 and on digits 5-9) every few steps, and at one step multiplies the learning
rate of one layer's parameter group by 40: the alarm that follows names that layer at that step.
"""

from __future__ import annotations

from typing import Any

__all__ = ["demo_section"]


def demo_section(run: Any, report: Any, *, steps: int = 90, spike_step: int = 70, spike_layer: str = "blocks.1.mlp.fc1",
                 batch_size: int = 64, seed: int = 0) -> Any:
    """Add the monitored training run to a demo report.

    Args:
        run: A :class:`~gradsense.results.RunFolder` (the result is saved as ``monitor``).
        report: A :class:`~gradsense.viz.report.Report`.
        steps: Training steps.
        spike_step: The step whose learning rate is multiplied by 40 for ``spike_layer``.
        spike_layer: The layer (module name of the ViT) whose learning rate jumps.
        batch_size: Training examples per step.
        seed: Seed of the initial weights, the data order and the shifts.

    Returns:
        The :class:`~gradsense.results.MonitorResult`.
    """
    import torch
    import torch.nn.functional as F

    import gradsense as gs
    from gradsense.monitor import Monitor
    from gradsense.zoo.models import TinyViT
    from gradsense.zoo.train import random_shift

    data = gs.zoo.dataset("digits", split="train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyViT().train()
        gen = torch.Generator().manual_seed(seed)
        own = [p for n, p in model.named_parameters() if n.startswith(spike_layer + ".")]
        rest = [p for n, p in model.named_parameters() if not n.startswith(spike_layer + ".")]
        opt = torch.optim.AdamW([{"params": rest}, {"params": own}], lr=3e-3, weight_decay=1e-2)
        warmup = 40
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        quantities = {**gs.monitor.PRESETS["standard"], "gns": 5, "rotation": 10, "attention": 20, "conflict": 5}
        with Monitor(model, opt, quantities=quantities, name="digits-vit (fresh)", seed=seed) as mon:
            step = 0
            while step < steps:
                order = torch.randperm(len(data), generator=gen)
                for start in range(0, len(data) - batch_size + 1, batch_size):
                    idx = order[start:start + batch_size]
                    x, y = random_shift(data.inputs[idx], 1, gen), data.labels[idx]
                    out = model(x)
                    low = y < 5
                    loss_low = F.cross_entropy(out[low], y[low], reduction="sum") / len(y)
                    loss_high = F.cross_entropy(out[~low], y[~low], reduction="sum") / len(y)
                    mon.objectives(digits_0_4=loss_low, digits_5_9=loss_high)
                    loss = loss_low + loss_high
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if step == spike_step:
                        opt.param_groups[1]["lr"] *= 40.0
                    opt.step()
                    if step == spike_step:
                        opt.param_groups[1]["lr"] /= 40.0
                    sched.step()
                    mon.log(loss=loss.detach())
                    step += 1
                    if step >= steps:
                        break
        result = mon.result()
    run.save_result(result, "monitor")
    alarms = result.alarms
    located = [a for a in alarms if a.step == spike_step and a.layer == spike_layer]
    if located:
        found = f"The alarm is raised at step {spike_step} in {spike_layer}: " + "; ".join(
            a.describe().split(": ", 1)[1] for a in located) + "."
    else:
        found = f"No alarm was raised in {spike_layer} at step {spike_step}."
    others = [a for a in alarms if a not in located]
    if others:
        found += f" Other alarms: {'; '.join(a.describe() for a in others[:4])}."
    gns, se = result.noise_scale()
    result.report_section(report, title="Training monitor: a run with a provoked spike", text=(
        f"A fresh digits ViT (gs.zoo's TinyViT) trained for {steps} steps (AdamW, batch {batch_size}, warm-up over {warmup} steps) under "
        f"gs.monitor.Monitor with the 'standard' preset; the loss is the sum of two objectives (digits 0-4 and digits "
        f"5-9), whose gradients' conflict is measured every 5 steps. At step {spike_step} the learning rate of "
        f"{spike_layer}'s parameter group is multiplied by 40 for one step. {found} The noise scale B_simple at the end: "
        f"{gns:.3g} ± {se:.2g} examples (batch {batch_size})."))
    return result
