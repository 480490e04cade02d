"""Recognising numbers in table cells, so that neither the HTML report nor the terminal ever breaks one."""

from __future__ import annotations

import re

__all__ = ["is_number_like", "number_groups"]

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


_NUM = r"[~<>≈]?[+-]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][+-]?\d+)?%?"
_GROUP = re.compile(rf"{_NUM}(?:\s*(?:±|\+-|->|→)\s*{_NUM})*")


def number_groups(text: str) -> list[tuple[str, bool]]:
    """Split ``text`` into ``(part, is_number_group)`` pieces, where a number group is a number with what is
    joined to it by ``±``, ``+-`` or ``->`` (``0.05039 ± 0.0077``): the pieces a renderer keeps on one line.

    Example:
        >>> number_groups("trace 914.6 ± 17 (1 s.e.)")
        [('trace ', False), ('914.6 ± 17', True), (' (', False), ('1', True), (' s.e.)', False)]
    """
    out: list[tuple[str, bool]] = []
    pos = 0
    for m in _GROUP.finditer(text):
        start, end = m.span()
        if text[start] in "~<>≈" and start > 0 and not text[start - 1].isspace():
            start += 1  # "<b>1": the ">" closes something else, it does not qualify the number
        # a digit inside a word (Conv2d, features.0, x3) is part of that word, not a number
        if (start > 0 and (text[start - 1].isalnum() or text[start - 1] in "._")) or \
                (end < len(text) and (text[end].isalpha() or text[end] == "_")):
            continue
        if start > pos:
            out.append((text[pos:start], False))
        out.append((text[start:end], True))
        pos = end
    if pos < len(text):
        out.append((text[pos:], False))
    return out
