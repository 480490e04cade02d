"""Recognising numbers in table cells, so that neither the HTML report nor the terminal ever breaks one."""

from __future__ import annotations

import re

__all__ = ["is_number_like"]

_NUMBER = re.compile(r"[~<>≈]?[+-]?(\d[\d,]*\.?\d*|\.\d+)([eE][+-]?\d+)?%?x?")
_JOINERS = frozenset({"±", "+-", "->", "→", "/", "x", "×"})


def is_number_like(text: object) -> bool:
    """A number (``0.725``, ``-1.2e-05``, ``98.9%``, ``24,170``), or numbers joined by ``±``/``+-``/``->``/``/``
    (``0.936 +- 0.0057``): a cell that must stay on one line.

    Example:
        >>> is_number_like("0.936 +- 0.0057"), is_number_like("integrated_gradients")
        (True, False)
    """
    tokens = str(text).split()
    if not tokens or len(tokens) > 5:
        return False
    numbers = [bool(_NUMBER.fullmatch(t)) for t in tokens]
    return any(numbers) and all(n or t in _JOINERS for n, t in zip(numbers, tokens))
