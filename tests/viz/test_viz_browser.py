"""The written report in a real browser: images decode, anchors resolve, the console is clean."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gradsense.viz import Report, attribution_grid, bar_chart, fig_to_png, line_chart, token_heatmap

HOSTILE = "<script>alert(1)</script> \"&'"

PAGE_STATE_JS = """
return {
  ready: document.readyState,
  title: document.title,
  h1: document.querySelector('h1').textContent,
  scripts: document.scripts.length,
  images: Array.from(document.images).map(img => ({
    complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
    src: img.currentSrc.slice(0, 22)})),
  brokenAnchors: Array.from(document.querySelectorAll('nav a')).filter(
    a => !document.getElementById(decodeURIComponent(a.hash.slice(1)))).length,
  anchors: document.querySelectorAll('nav a').length,
  overflow: document.documentElement.scrollWidth > window.innerWidth,
};
"""


def _load(driver, path: Path) -> dict:
    """Open a local file and return what the page looks like once loaded."""
    driver.get(path.as_uri())
    return driver.execute_script(PAGE_STATE_JS)


def _severe(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


@pytest.mark.browser
@pytest.mark.timeout(180)
def test_report_loads_cleanly_in_headless_chromium(chromium, tmp_path):
    gen = torch.Generator().manual_seed(0)
    report = Report(f"Browser check {HOSTILE}")
    report.add_section(
        f"Attribution {HOSTILE}",
        text=f"Plain text {HOSTILE}",
        table=(["name", "value"], [[HOSTILE, 1.5]]),
        figures=[
            (
                f"grid {HOSTILE}",
                attribution_grid(
                    torch.rand(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
                ),
            ),
            ("tokens", token_heatmap(["a", "$b", "c"], [0.5, -1.0, 0.1])),
        ],
    )
    report.add_section(
        "Charts",
        figures=[bar_chart(["a", "b"], [1.0, 2.0]), line_chart(np.arange(5), {"y": np.arange(5)})],
        level=3,
    )
    report.add_section("Bytes", figures=[fig_to_png(bar_chart(["c"], [3.0]))])
    path = report.write(tmp_path / "report.html")

    state = _load(chromium, path)
    assert state["ready"] == "complete"
    assert state["title"] == f"Browser check {HOSTILE}"
    assert state["h1"] == f"Browser check {HOSTILE}"
    assert state["scripts"] == 0
    assert len(state["images"]) == 5
    for img in state["images"]:
        assert img["complete"] and img["width"] > 0 and img["height"] > 0, img
        assert img["src"] == "data:image/png;base64,"
    assert state["anchors"] == 3 and state["brokenAnchors"] == 0
    assert not state["overflow"], "the page should not scroll sideways"

    severe = _severe(chromium)
    assert severe == [], severe


@pytest.mark.browser
@pytest.mark.timeout(180)
def test_the_browser_checks_can_fail(chromium, tmp_path):
    """A broken image and a resource the page may not load are caught by the same checks."""
    path = tmp_path / "broken.html"
    path.write_text(
        "<!DOCTYPE html><html><head><title>broken</title></head><body><h1>broken</h1>"
        '<img src="data:image/png;base64,iVBORw0KGgoAAAA"><img src="missing.png"></body></html>',
        encoding="utf-8",
    )
    state = _load(chromium, path)
    assert [img["width"] for img in state["images"]] == [0, 0]
    assert _severe(chromium), "a missing file should be logged as a SEVERE console entry"
