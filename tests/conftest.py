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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

# The oracles and helpers live next to this file; make them importable from every test folder.
sys.path.insert(0, str(Path(__file__).parent))

# Tiny models run fastest on one thread, and a 2-core runner shared with other jobs makes
# multi-threaded kernels for 10-example batches slower by an order of magnitude.
torch.set_num_threads(int(os.environ.get("GRADSENSE_TEST_THREADS", "1")))

N_CLASSES = 3
N_EXAMPLES = 10


@dataclass
class Case:
    """A model with data: ``x`` (N, ...) float64 inputs and ``y`` (N,) class labels."""

    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    n_classes: int = N_CLASSES


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Softplus(), nn.Linear(4, N_CLASSES)
    ).double()
    return model.eval()


def make_bn_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 2, kernel_size=3),
        nn.BatchNorm2d(2),
        nn.Softplus(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, N_CLASSES),
    ).double()
    with torch.no_grad():
        bn = model[1]
        bn.weight.copy_(1.0 + 0.3 * torch.randn(2, dtype=torch.float64))
        bn.bias.copy_(0.2 * torch.randn(2, dtype=torch.float64))
        model.train()
        for _ in range(3):  # non-trivial running statistics
            model(2.0 * torch.randn(6, 1, 5, 5, dtype=torch.float64) + 0.5)
    model.eval()
    assert not torch.allclose(bn.running_mean, torch.zeros(2, dtype=torch.float64))
    assert not torch.allclose(bn.running_var, torch.ones(2, dtype=torch.float64))
    return model


def make_dropout_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, N_CLASSES)).double()
    return model.eval()


def make_mlp_case(seed: int = 0, n: int = N_EXAMPLES) -> Case:
    model = make_mlp(seed)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    return Case("mlp-f64", model, x, y)


def make_cnn_case(seed: int = 0, n: int = N_EXAMPLES) -> Case:
    model = make_bn_cnn(seed)
    g = torch.Generator().manual_seed(seed + 200)
    x = torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    return Case("bn-cnn-eval-f64", model, x, y)


CASES: dict[str, Callable[[], Case]] = {"mlp-f64": make_mlp_case, "bn-cnn-eval-f64": make_cnn_case}


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
