"""The HTML report: escaping, self-containment, valid embedded PNGs, atomic writes, results."""

from __future__ import annotations

import base64
import io
import os
import re

import matplotlib.pyplot as plt
import pytest
import torch
from PIL import Image

import gradsense.results.base as results_base
from gradsense.results import Result
from gradsense.viz import Report, attribution_grid, bar_chart, fig_to_png, slugify, token_heatmap
from gradsense.viz.figures import PNG_SIGNATURE

HOSTILE = "<script>alert(1)</script> \"&'"
BANNED = ("http://", "https://", 'src="//', "src='//", "<link", "<script", "@import", "url(")


class VizTestToyResult(Result):
    """A small result with a figure."""

    @property
    def title(self) -> str:
        return f"Toy {HOSTILE}"

    def plot(self, **kwargs):
        scores = self.tensors["scores"]
        return bar_chart([f"w{i}" for i in range(len(scores))], scores, title=kwargs.get("title", ""))


class VizTestPlainResult(Result):
    """A result without plot(): the base raises NotImplementedError."""


def _toy_result() -> VizTestToyResult:
    return VizTestToyResult.build(
        {"scores": torch.tensor([3.0, 1.0, 2.0])},
        method="toy",
        settings={"steps": 8, "note": HOSTILE},
        seed=0,
        wall_time_s=0.25,
    )


def _full_report() -> Report:
    report = Report(f"Report {HOSTILE}", dpi=60)
    report.add_section(
        f"Section {HOSTILE}",
        text=f"First paragraph {HOSTILE}\nsame paragraph.\n\n  \nSecond paragraph.",
        table=([f"col {HOSTILE}", "value"], [[HOSTILE, 1], ["pi", 3.14], ["flag", True]]),
        figures=[
            (f"caption {HOSTILE}", bar_chart(["a", "b"], [1.0, 2.0])),
            fig_to_png(token_heatmap(["a", "b"], [1.0, -1.0])),
        ],
    )
    report.add_section(
        "Attribution", figures=attribution_grid(torch.rand(2, 1, 8, 8), torch.randn(2, 1, 8, 8))
    )
    report.add_result(_toy_result(), text="A toy result.")
    report.add_result(VizTestPlainResult.build({}, method="plain"), level=3)
    return report


def _images(elements):
    return [el for el in elements if el.tag == "img"]


# --------------------------------------------------------------------------------------- escaping
def test_every_user_string_is_escaped(parse_html):
    doc = _full_report().render()
    assert "<script" not in doc.lower()
    assert HOSTILE not in doc and "\"&'" not in doc
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in doc

    elements = parse_html(doc)
    by_tag = lambda tag: [el.text for el in elements if el.tag == tag]  # noqa: E731
    assert by_tag("title") == [f"Report {HOSTILE}"]
    assert by_tag("h1") == [f"Report {HOSTILE}"]
    assert f"Section {HOSTILE}" in by_tag("h2")
    assert f"Toy {HOSTILE}" in by_tag("h2")
    assert f"First paragraph {HOSTILE}\nsame paragraph." in by_tag("p")
    assert f"col {HOSTILE}" in by_tag("th")
    assert HOSTILE in by_tag("td")  # table cell and the result's summary row
    assert by_tag("td").count(HOSTILE) == 2
    assert f"caption {HOSTILE}" in by_tag("figcaption")
    assert f"caption {HOSTILE}" in [el.attrs["alt"] for el in _images(elements)]
    toc = [el.text for el in elements if el.tag == "a"]
    assert f"Section {HOSTILE}" in toc and f"Toy {HOSTILE}" in toc


def test_text_is_plain_paragraphs(parse_html):
    report = Report("t")
    report.add_section("s", text="one\ntwo\n\n \t\nthree\r\n\r\nfour <b>bold</b>")
    paragraphs = [el.text for el in parse_html(report.render()) if el.tag == "p" and el.attrs == {}]
    assert paragraphs == ["one\ntwo", "three", "four <b>bold</b>"]


def test_anchors_are_safe_unique_and_linked(parse_html):
    report = Report("t")
    for title in ["Intro", "Intro", HOSTILE, "日本語", "Hessian spectrum (top-5)"]:
        report.add_section(title)
    elements = parse_html(report.render())
    ids = [el.attrs["id"] for el in elements if "id" in el.attrs]
    assert ids == [
        "sec-intro",
        "sec-intro-2",
        "sec-script-alert-1-script",
        "sec-section",
        "sec-hessian-spectrum-top-5",
    ]
    assert all(re.fullmatch(r"[a-z0-9-]+", i) for i in ids)
    hrefs = [el.attrs["href"] for el in elements if el.tag == "a"]
    assert hrefs == [f"#{i}" for i in ids]


def test_slugify():
    assert slugify("Hessian spectrum (top-5)") == "hessian-spectrum-top-5"
    assert slugify("Ünïcödé  title") == "unicode-title"
    assert slugify("<>&\"'") == "section"
    assert slugify("", default="x") == "x"
    assert len(slugify("a" * 500)) <= 64


# --------------------------------------------------------------------------------------- self-contained
def test_report_is_self_contained_with_valid_pngs(parse_html):
    doc = _full_report().render()
    for banned in BANNED:
        assert banned not in doc.lower(), banned
    images = _images(parse_html(doc))
    assert len(images) == 4  # two figures, the attribution grid, the toy result's plot
    prefix = "data:image/png;base64,"
    for img in images:
        src = img.attrs["src"]
        assert src.startswith(prefix)
        png = base64.b64decode(src[len(prefix) :], validate=True)
        assert png.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(png)) as im:
            im.verify()
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG"
            assert (im.width, im.height) == (int(img.attrs["width"]), int(img.attrs["height"]))


def test_header_has_generation_time_and_versions(parse_html):
    elements = parse_html(Report("t").render())
    meta = next(el for el in elements if el.tag == "p" and el.attrs.get("class") == "meta")
    assert "Generated" in meta.text
    for name, version in results_base.versions().items():
        assert f"{name} {version}" in meta.text
    assert any(el.tag == "time" and re.match(r"\d{4}-\d\d-\d\dT", el.attrs["datetime"]) for el in elements)


def test_empty_report_renders():
    doc = Report("nothing").render()
    assert "This report has no sections." in doc
    assert "<nav" not in doc


# --------------------------------------------------------------------------------------- figures
def test_figures_are_closed_after_rendering():
    fig = plt.figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    fig2 = plt.figure()
    fig2.add_subplot().plot([0, 1], [0, 1])
    report = Report("t")
    report.add_section("s", figures=[fig, ("caption", fig2)])
    assert fig.number not in plt.get_fignums()
    assert fig2.number not in plt.get_fignums()


def test_single_figure_and_single_pair_are_accepted(parse_html):
    report = Report("t")
    report.add_section("a", figures=bar_chart(["a"], [1.0]))
    report.add_section("b", figures=("cap", bar_chart(["a"], [1.0])))
    elements = parse_html(report.render())
    assert len(_images(elements)) == 2
    assert [el.text for el in elements if el.tag == "figcaption"] == ["cap"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"level": 1}, ValueError, "level"),
        ({"level": 5}, ValueError, "level"),
        ({"table": (["a", "b"], [[1]])}, ValueError, "row 0 has 1 cells"),
        ({"table": (["a"], ["abc"])}, TypeError, "row 0"),
        ({"table": "nonsense"}, TypeError, "pair"),
        ({"figures": [b"GIF89a not a png"]}, ValueError, "PNG"),
        ({"figures": ["not a figure"]}, TypeError, "figures must be"),
        ({"text": ["not", "a", "str"]}, TypeError, "text"),
    ],
    ids=[
        "level-low",
        "level-high",
        "row-length",
        "row-type",
        "table-type",
        "bytes",
        "figure-type",
        "text-type",
    ],
)
def test_add_section_rejects_bad_arguments(kwargs, error, match):
    report = Report("t")
    with pytest.raises(error, match=match):
        report.add_section("s", **kwargs)
    assert len(report) == 0


# --------------------------------------------------------------------------------------- results
def test_add_result_uses_title_summary_and_plot(parse_html):
    result = _toy_result()
    report = Report("t")
    report.add_result(result, plot_kwargs={"title": "scores"})
    report.add_result(result, title="Custom title", text="Described.")
    elements = parse_html(report.render())
    assert [el.text for el in elements if el.tag == "h2"] == ["Contents", result.title, "Custom title"]
    cells = [el.text for el in elements if el.tag == "td"]
    for key, value in result.summary():
        assert key in cells and value in cells
    assert "steps" in cells and "8" in cells and "0.250 s" in cells
    assert len(_images(elements)) == 2
    assert "Described." in [el.text for el in elements if el.tag == "p"]


def test_add_result_without_plot_has_no_figure(parse_html):
    report = Report("t")
    report.add_result(VizTestPlainResult.build({}, method="plain"))
    elements = parse_html(report.render())
    assert _images(elements) == []
    assert "plain" in [el.text for el in elements if el.tag == "td"]


def test_add_result_propagates_other_plot_errors():
    class VizTestBrokenResult(Result):
        def plot(self, **kwargs):
            raise RuntimeError("broken plot")

    with pytest.raises(RuntimeError, match="broken plot"):
        Report("t").add_result(VizTestBrokenResult.build({}, method="broken"))


# --------------------------------------------------------------------------------------- writing
def test_write_creates_parents_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "runs" / "demo" / "report.html"
    report = _full_report()
    written = report.write(path)
    assert written == path and path.is_file()
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert text.count("<section") == len(report) == 4
    assert sorted(os.listdir(path.parent)) == ["report.html", "report.json"]  # the page and its sections
    # writing again replaces the file whole
    small = Report("second")
    small.write(path)
    assert "<h1>second</h1>" in path.read_text(encoding="utf-8")
    assert sorted(os.listdir(path.parent)) == ["report.html", "report.json"]


def test_interrupted_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    Report("old").write(path)
    old = path.read_text(encoding="utf-8")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(results_base.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        Report("new").write(path)
    assert path.read_text(encoding="utf-8") == old
    assert sorted(os.listdir(tmp_path)) == ["report.html", "report.json"]


# --------------------------------------------------------------------------------------- adding to a page
def test_extend_keeps_other_sources_and_replaces_its_own(tmp_path, parse_html):
    path = tmp_path / "report.html"
    first = Report.extend(path, "first run", source="attribute")
    first.add_section(f"Saliency {HOSTILE}", text="a", figures=bar_chart(["a"], [1.0]))
    first.write(path)

    second = Report.extend(path, "ignored: the page has sections", source="hessian")
    second.add_section("Hessian", text="b")
    second.write(path)
    html = path.read_text(encoding="utf-8")
    titles = [el.text for el in parse_html(html) if el.tag == "h2"][1:]  # after "Contents"
    assert titles == [f"Saliency {HOSTILE}", "Hessian"]
    assert "<h1>first run</h1>" in html and html.count("data:image/png;base64,") == 1

    again = Report.extend(path, "x", source="attribute")  # the same command again: its section is replaced
    again.add_section("Saliency, second run")
    again.write(path)
    titles = [el.text for el in parse_html(path.read_text(encoding="utf-8")) if el.tag == "h2"][1:]
    assert titles == ["Hessian", "Saliency, second run"]
    assert "data:image/png;base64," not in path.read_text(encoding="utf-8")


def test_extend_of_a_missing_or_broken_store(tmp_path):
    path = tmp_path / "report.html"
    assert len(Report.extend(path, "new", source="x")) == 0
    path.with_suffix(".json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"report\.json"):
        Report.extend(path, "new", source="x")
