"""Shared fixtures for the viz tests: a headless Chromium driver and a small HTML parser.

``chromium`` launches headless Chromium through selenium and chromedriver and always quits it.
It skips (with the reason) only when selenium, Chromium or chromedriver is not installed; any
other failure to start the browser is an error. Paths can be overridden with the environment
variables ``GRADSENSE_CHROMIUM`` and ``GRADSENSE_CHROMEDRIVER``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any

import matplotlib
import pytest

matplotlib.use("Agg")  # the tests import pyplot to check for leaks; never open a window

PAGE_LOAD_TIMEOUT_S = 30
SCRIPT_TIMEOUT_S = 10
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def pytest_configure(config: pytest.Config) -> None:
    # Keep --strict-markers happy even where pytest-timeout is not installed.
    config.addinivalue_line("markers", "timeout(seconds): per-test time limit (pytest-timeout)")


def find_chromium() -> tuple[str | None, str | None]:
    """Paths of the Chromium binary and of chromedriver (``None`` for whichever is missing)."""
    browser = os.environ.get("GRADSENSE_CHROMIUM") or next(
        (p for p in map(shutil.which, BROWSER_NAMES) if p), None
    )
    driver = os.environ.get("GRADSENSE_CHROMEDRIVER") or shutil.which("chromedriver")
    return browser, driver


@pytest.fixture
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A headless Chromium ``selenium.webdriver.Chrome`` that logs the browser console.

    Read the console with ``driver.get_log("browser")``. The driver quits when the test ends,
    also when it fails.
    """
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = find_chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (looked for: " + ", ".join(BROWSER_NAMES) + ")")
    if driver_path is None:
        pytest.skip("chromedriver is not installed (not found on PATH)")

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--no-first-run",
        "--no-default-browser-check",
        "--window-size=1280,1024",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})

    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
        driver.set_script_timeout(SCRIPT_TIMEOUT_S)
        yield driver
    finally:
        driver.quit()


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
