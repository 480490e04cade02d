"""Report tables never break a number or a word, and scroll when wide; line charts keep coinciding series visible.

Oracles: the CSS rules themselves (no ``overflow-wrap: anywhere`` on cells, ``nowrap`` on numbers, a scrolling
box around every table), every number-like cell carrying the class that gets ``nowrap``, and in headless
Chromium the rendered heights and widths (a number cell is one line high, the page does not scroll sideways
while the wide table's own box does).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from gradsense.viz import Report, line_chart
from gradsense.viz.text import is_number_like

WIDE_HEADER = ["rank", "method", "mass in mask", "pointing game", "deletion AUC (lower better)", "insertion AUC",
               "seconds", "a_very_long_column_name_without_any_space_in_it", "notes"]
WIDE_ROWS = [[str(i), name, "0.936 +- 0.0057", "1 +- 0", "0.0875 +- 0.029", 0.8392, 0.00487,
              "integrated_gradients_with_a_long_suffix", "a sentence of ordinary words that may wrap between them"]
             for i, name in enumerate(["integrated_gradients", "smoothgrad_sq", "gradcam_plus_plus"], 1)]


def _report() -> str:
    report = Report("tables")
    report.add_section("Wide", table=(WIDE_HEADER, WIDE_ROWS))
    report.add_section("Key/value", table=(["key", "value"], [["trace", "914.605 ± 17"], ["layer types", "Conv2d x3"],
                                                              ["model", "zoo:digits-cnn"], ["accuracy", "98.9%"]]))
    return report.render()


def _css_rule(html: str, selector: str) -> str:
    m = re.search(re.escape(selector) + r"\s*\{([^}]*)\}", html)
    assert m, selector
    return m.group(1)


def test_css_keeps_numbers_and_words_whole_and_tables_scroll():
    html = _report()
    assert "anywhere" not in html.split("<footer>")[0]  # no rule may break inside a word or number
    cells = _css_rule(html, "th, td")
    assert "overflow-wrap: normal" in cells and "word-break: normal" in cells
    assert "white-space: nowrap" in _css_rule(html, "td.num")
    assert "white-space: nowrap" in _css_rule(html, "td.tok, td .n")
    wrap = _css_rule(html, ".table-wrap")
    assert "overflow-x: auto" in wrap and "max-width: 100%" in wrap


def test_every_number_cell_is_marked_nowrap_and_every_table_is_in_a_scroll_box(parse_html):
    html = _report()
    elements = parse_html(html)
    tables = [e for e in elements if e.tag == "table"]
    boxes = [e for e in elements if e.tag == "div" and e.attrs.get("class") == "table-wrap"]
    assert len(tables) == len(boxes) == 2
    assert html.count('<div class="table-wrap">\n<table>') == 2  # each table directly inside its box
    tds = [e for e in elements if e.tag == "td"]
    numbers = [e for e in tds if is_number_like(e.text)]
    assert len(numbers) == 3 * 6 + 2  # six per wide row; the trace and the accuracy
    for td in tds:
        classes = td.attrs.get("class", "").split()
        assert ("num" in classes) == is_number_like(td.text), (td.text, classes)
        # one token (a name such as zoo:digits-cnn): kept whole even at its hyphens
        assert ("tok" in classes) == (not is_number_like(td.text) and " " not in td.text and td.text != ""), td.text
    # whole columns of numbers are right-aligned, a key/value column mixing text and numbers is not
    first_row = [e for e in tds][: len(WIDE_HEADER)]
    assert ["r" in e.attrs.get("class", "").split() for e in first_row] == [True, False, True, True, True, True, True,
                                                                          False, False]
    kv = tds[len(WIDE_HEADER) * len(WIDE_ROWS):]
    assert all("r" not in e.attrs.get("class", "").split() for e in kv)


def test_numbers_inside_text_cells_are_kept_whole_and_still_escaped():
    report = Report("t")
    report.add_section("kv", table=(["key", "value"], [["mean", "0.05039 ± 0.0077 (Hutchinson estimate from 2 probes)"],
                                                      ["hostile", "<b>1</b> & Conv2d x3"]]))
    html = report.render()
    assert '<span class="n">0.05039 ± 0.0077</span> (Hutchinson estimate from <span class="n">2</span> probes)' in html
    assert '&lt;b&gt;<span class="n">1</span>&lt;/b&gt; &amp; Conv2d x3' in html  # digits inside words stay words
    assert "<b>" not in html


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.725", True), ("-1.2e-05", True), ("98.9%", True), ("24,170", True), ("0.936 +- 0.0057", True),
     ("914.605 ± 17", True), ("0.0332 -> 0.4457", True), ("integrated_gradients", False), ("taylor2", False),
     ("Conv2d x3", False), ("", False), ("n/a", False), ("1 2 3 4 5 6", False)],
)
def test_is_number_like(text, expected):
    assert is_number_like(text) is expected


def test_coinciding_series_stay_visible_and_are_named():
    x = np.arange(1, 8)
    y = 1.0 / x
    fig = line_chart(x, {"1st order (gradient)": y, "2nd order (+ curvature)": y.copy(), "other": 2 * y})
    (ax,) = fig.axes
    first, second, _ = ax.lines
    np.testing.assert_array_equal(first.get_ydata(), second.get_ydata())
    assert first.get_linestyle() != second.get_linestyle()
    assert second.get_linewidth() < first.get_linewidth() and second.get_zorder() > first.get_zorder()
    assert first.get_marker() != second.get_marker()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["1st order (gradient)", "2nd order (+ curvature) (= 1st order (gradient))", "other"]


PAGE_JS = """
// lines of text a cell's content takes: distinct tops of its text's client rects (the row may be taller)
const lines = td => { const r = document.createRange(); r.selectNodeContents(td);
  return new Set(Array.from(r.getClientRects()).map(b => Math.round(b.top))).size; };
const num = Array.from(document.querySelectorAll('td.num'));
const wraps = Array.from(document.querySelectorAll('.table-wrap'));
const words = Array.from(document.querySelectorAll('td.tok'));
const prose = Array.from(document.querySelectorAll('td.txt'));
return {
  numTooTall: num.filter(td => lines(td) > 1).map(td => td.textContent),
  wordSplit: words.filter(td => lines(td) > 1).map(td => td.textContent),
  proseTooNarrow: prose.filter(td => lines(td) > 4).map(td => td.textContent),
  pageOverflow: document.documentElement.scrollWidth > window.innerWidth,
  wideScrolls: wraps[0].scrollWidth > wraps[0].clientWidth,
  styles: num.concat(words).map(td => getComputedStyle(td).whiteSpace),
};
"""


@pytest.mark.browser
@pytest.mark.timeout(180)
def test_in_a_browser_numbers_are_one_line_and_wide_tables_scroll(chromium, tmp_path):
    report = Report("tables")
    report.add_section("Wide", table=(WIDE_HEADER, WIDE_ROWS))
    path = report.write(tmp_path / "report.html")
    chromium.set_window_size(700, 900)
    chromium.get(path.as_uri())
    state = chromium.execute_script(PAGE_JS)
    assert state["numTooTall"] == [] and state["wordSplit"] == [] and state["proseTooNarrow"] == []
    assert set(state["styles"]) == {"nowrap"}
    assert not state["pageOverflow"] and state["wideScrolls"]
