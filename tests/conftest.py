"""Seeded, tiny float64 model factories shared by the engine tests.

Each factory builds a fresh model from a fixed seed, so tests may change what they get. Fixtures:

- ``mlp``: tanh/softplus MLP 4 -> 5 -> 4 -> 3 (64 parameters), float64, eval mode.
- ``bn_cnn``: conv -> BatchNorm2d -> softplus -> linear on 1x5x5 inputs (81 parameters), float64,
  eval mode with non-trivial running statistics (a few train-mode forwards under ``no_grad`` first).
- ``dropout_mlp``: MLP with ``Dropout(0.5)``, float64, eval mode.
- ``case``: parametrised over the MLP and the BN CNN with their data (ids ``mlp-f64``,
  ``bn-cnn-eval-f64``).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

# The oracles and helpers live next to this file; make them importable from every test folder.
sys.path.insert(0, str(Path(__file__).parent))

# Tiny models run fastest on one thread, and a 2-core runner shared with other jobs makes
# multi-threaded kernels for 10-example batches slower by an order of magnitude.
torch.set_num_threads(int(os.environ.get("GRADSENSE_TEST_THREADS", "1")))

from cases import (  # noqa: E402  (after the sys.path insert)
    CASES,
    Case,
    make_bn_cnn,
    make_cnn_case,
    make_dropout_mlp,
    make_mlp,
    make_mlp_case,
)


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    torch.manual_seed(0)
    yield


@pytest.fixture
def mlp() -> nn.Module:
    return make_mlp()


@pytest.fixture
def bn_cnn() -> nn.Module:
    return make_bn_cnn()


@pytest.fixture
def dropout_mlp() -> nn.Module:
    return make_dropout_mlp()


@pytest.fixture
def mlp_case() -> Case:
    return make_mlp_case()


@pytest.fixture
def cnn_case() -> Case:
    return make_cnn_case()


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]()


# --------------------------------------------------------------------------------------- headless Chromium
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
