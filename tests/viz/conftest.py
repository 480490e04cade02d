"""Shared fixtures for the viz tests: a headless Chromium driver and a small HTML parser.

``chromium`` launches headless Chromium through selenium and chromedriver and always quits it.
It skips (with the reason) only when selenium, Chromium or chromedriver is not installed; any
other failure to start the browser is an error. Paths can be overridden with the environment
variables ``GRADSENSE_CHROMIUM`` and ``GRADSENSE_CHROMEDRIVER``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser

import matplotlib
import pytest

matplotlib.use("Agg")  # the tests import pyplot to check for leaks; never open a window

# --------------------------------------------------------------------------------------- HTML parsing
VOID_TAGS = frozenset("area base br col embed hr img input link meta param source track wbr".split())


@dataclass
class Element:
    """One parsed element: tag, attributes (entities decoded) and text content (decoded)."""

    tag: str
    attrs: dict[str, str]
    text: str = ""


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self._open: list[Element] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        el = Element(tag, {k: v or "" for k, v in attrs})
        self.elements.append(el)
        if tag not in VOID_TAGS:
            self._open.append(el)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i].tag == tag:
                del self._open[i:]
                break

    def handle_data(self, data: str) -> None:
        for el in self._open:
            el.text += data


def _parse(document: str) -> list[Element]:
    collector = _Collector()
    collector.feed(document)
    collector.close()
    return collector.elements


@pytest.fixture
def parse_html() -> Callable[[str], list[Element]]:
    """A function: HTML text -> every element in document order (text is textContent-like)."""
    return _parse
