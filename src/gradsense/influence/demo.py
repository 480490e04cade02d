"""The training-data sections of ``gradsense demo`` (a few seconds on a CPU).

``demo_section(run, report)`` adds: a few test digits with their most helpful and most harmful training digits
(EK-FAC influence of the bundled digits CNN over the whole training split), and mislabelled training digits found
by self-influence (a logistic regression trained on the digits with 10% of the labels flipped).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["demo_section", "noisy_digits_model"]


def noisy_digits_model(fraction: float = 0.1, seed: int = 0, wd: float = 1e-3) -> tuple[nn.Module, Any, torch.Tensor]:
    """Logistic regression on the 8x8 digits, trained (L-BFGS, weight decay ``wd``) with ``fraction`` of the
    training labels flipped to another class.

    Returns:
        ``(model, (inputs, noisy_labels), flipped)`` with ``flipped`` the bool mask of the changed labels.
    """
    import gradsense as gs

    x, y = gs.zoo.dataset("digits", split="train")[:]
    g = torch.Generator().manual_seed(seed)
    n = y.shape[0]
    flip = torch.randperm(n, generator=g)[: round(fraction * n)]
    noisy = y.clone()
    noisy[flip] = (y[flip] + torch.randint(1, 10, (flip.numel(),), generator=g)) % 10
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[flip] = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=100, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = nn.functional.cross_entropy(model(x), noisy) + wd / 2 * sum((p**2).sum() for p in model.parameters())
        value.backward()
        return value

    opt.step(closure)
    for p in model.parameters():
        p.grad = None
    return model.eval(), (x, noisy), flipped


def demo_section(run: Any, report: Any, *, n_queries: int = 4) -> None:
    """Add the influence sections to a demo run.

    Args:
        run: A :class:`~gradsense.results.RunFolder`.
        report: A :class:`~gradsense.viz.report.Report`.
        n_queries: Test digits to explain.
    """
    import gradsense as gs

    loss = gs.losses.cross_entropy
    model = gs.zoo.load("digits-cnn")
    train = gs.zoo.dataset("digits", split="train")[:]
    test = gs.zoo.dataset("digits", split="test")[:n_queries]
    res = gs.influence.scores(model, loss, train, test, method="ekfac", name="zoo:digits-cnn")
    run.save_result(res, "influence-ekfac")
    report.add_result(res, title="Training data: which digits made these predictions?", text=(
        f"EK-FAC influence (Grosse et al. 2023) of each of the {res.n_train} training digits on {res.n_query} test "
        "digits, through the conv and linear layers of zoo:digits-cnn (factors fitted once on the training split, "
        "damping 0.1 x each layer's mean eigenvalue). Green: proponents - training on them lowers the test digit's "
        "loss; red: opponents - they raise it, mostly look-alike digits of another class. Removing a digit would "
        "change the test loss by about score / n."))

    lr_model, noisy, flipped = noisy_digits_model()
    selfres = gs.influence.self_influence(lr_model, loss, noisy, method="influence", damping=1e-3, flagged=flipped,
                                          name="digits logistic regression, 10% flipped labels")
    run.save_result(selfres, "influence-self")
    found = selfres.fraction_found(flipped, 0.1)
    report.add_result(selfres, title="Training data: finding mislabelled digits by self-influence", text=(
        f"A logistic regression trained on the digits with {int(flipped.sum())} of {flipped.numel()} training "
        "labels flipped at random. Self-influence g_z^T (H + lambda I)^-1 g_z (Koh & Liang 2017; exact Hessian by "
        f"conjugate gradients, lambda = the training weight decay) ranks the examples: the top 10% hold {found:.0%} "
        "of the flipped labels (chance: 10%). The most self-influential digits are shown with the label they were "
        "trained with; red = a flipped label."),
        plot_kwargs={"inputs": noisy[0], "labels": noisy[1]})
