"""The single-file HTML report: sections of text, tables and figures in one self-contained page.

The page needs nothing but itself: CSS is inline, figures are embedded as
``data:image/png;base64`` URIs, there is no script and no external URL, and a Content Security
Policy forbids loading anything else. Every user-supplied string is HTML-escaped (Jinja2
autoescaping); text is plain text, never raw HTML.

Example:
    >>> from gradsense.viz import Report, bar_chart
    >>> report = Report("Digits CNN")
    >>> report.add_section("Importance", text="Top layers.", figures=[bar_chart(["a", "b"], [2.0, 1.0])])
    >>> html = report.render()
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import functools
import os
import re
import struct
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import markupsafe
from matplotlib.figure import Figure

from gradsense.results.base import atomic_write_text, versions
from gradsense.viz.figures import PNG_SIGNATURE, fig_to_png
from gradsense.viz.text import is_number_like, number_groups

__all__ = ["Report", "slugify"]

_MIN_LEVEL, _MAX_LEVEL = 2, 4
_PARAGRAPH_SPLIT = re.compile(r"\n[ \t\r\f\v]*\n")


def slugify(text: str, *, default: str = "section") -> str:
    """Turn text into a safe HTML id fragment: lowercase ASCII letters, digits and single hyphens.

    Args:
        text: Any string (e.g. a section title).
        default: Returned when nothing usable is left.

    Returns:
        The slug, e.g. ``"Hessian spectrum (top-5)" -> "hessian-spectrum-top-5"``.
    """
    ascii_text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:64].rstrip("-") or default


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)


@dataclasses.dataclass(frozen=True)
class _Image:
    data_uri: str
    width: int
    height: int
    caption: str | None
    alt: str


@dataclasses.dataclass(frozen=True)
class _Table:
    header: list[str]
    rows: list[list[tuple[str, bool]]]  # (text, is_numeric)

    @property
    def numeric_columns(self) -> list[bool]:
        """Columns whose every non-empty cell is a number: right-aligned."""
        n = max([len(self.header), *(len(r) for r in self.rows)], default=0)
        return [bool(self.rows) and all(r[j][1] or r[j][0] in ("", "n/a", "-") for r in self.rows if j < len(r))
                and any(j < len(r) and r[j][1] for r in self.rows) for j in range(n)]


@dataclasses.dataclass(frozen=True)
class _Section:
    title: str
    anchor: str
    level: int
    paragraphs: list[str]
    table: _Table | None
    images: list[_Image]
    source: str | None = None  # the command that added it (sections of one source are replaced together)


_PNG_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/]+={0,2}")
_ANCHOR = re.compile(r"sec-[a-z0-9-]{1,80}")


def _stored_image(i: Mapping[str, Any]) -> _Image:
    """An image of ``report.json``, refused unless its source is an embedded PNG (a ``data:`` URI, nothing else)."""
    uri = i["data_uri"]
    if not isinstance(uri, str) or not _PNG_URI.fullmatch(uri):
        raise ValueError(f"an image source is not an embedded PNG (data:image/png;base64,...): {str(uri)[:60]!r}")
    head = uri.split(",", 1)[1][:16]
    if len(head) < 16 or not base64.b64decode(head).startswith(PNG_SIGNATURE):
        raise ValueError("an image source is not a PNG (missing PNG signature)")
    width, height = i["width"], i["height"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 100_000 for v in (width, height)):
        raise ValueError(f"an image has an invalid size {width!r} x {height!r}")
    caption = i["caption"]
    if caption is not None and not isinstance(caption, str):
        raise ValueError("an image caption is not text")
    return _Image(uri, width, height, caption, str(i["alt"]))


def _section_from_json(d: Mapping[str, Any]) -> _Section:
    """A section of ``report.json``; anything that would not have come from :meth:`Report.write` is refused."""
    table = d.get("table")
    anchor, level = d["anchor"], d["level"]
    if not isinstance(anchor, str) or not _ANCHOR.fullmatch(anchor):
        raise ValueError(f"a section anchor is not a slug: {str(anchor)[:60]!r}")
    if isinstance(level, bool) or not isinstance(level, int) or not _MIN_LEVEL <= level <= _MAX_LEVEL:
        raise ValueError(f"a section level must be {_MIN_LEVEL}..{_MAX_LEVEL}, got {level!r}")
    source = d.get("source")
    return _Section(
        title=str(d["title"]),
        anchor=anchor,
        level=level,
        paragraphs=[str(p) for p in d["paragraphs"]],
        table=None if table is None else _Table(
            [str(h) for h in table["header"]], [[(str(t), bool(num)) for t, num in row] for row in table["rows"]]
        ),
        images=[_stored_image(i) for i in d["images"]],
        source=None if source is None else str(source),
    )


def _keep_numbers(text: str) -> markupsafe.Markup:
    """Escaped ``text`` with every number group (``0.725 ± 0.01``) in a ``nowrap`` span, so a cell mixing words
    and numbers wraps between words but never inside or between the parts of a number."""
    return markupsafe.Markup("").join(
        markupsafe.Markup('<span class="n">{}</span>').format(part) if is_number else markupsafe.escape(part)
        for part, is_number in number_groups(str(text)))


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gradsense.viz", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["keep_numbers"] = _keep_numbers
    return env


def _store_path(path: str | os.PathLike[str]) -> Path:
    return Path(path).with_suffix(".json")


def _paragraphs(text: str | None) -> list[str]:
    if text is None:
        return []
    if not isinstance(text, str):
        raise TypeError(f"text must be a str (plain text); got {type(text).__name__}.")
    return [p.strip() for p in _PARAGRAPH_SPLIT.split(text.replace("\r\n", "\n")) if p.strip()]


def _table(table: tuple[Sequence[Any], Sequence[Sequence[Any]]] | None) -> _Table | None:
    if table is None:
        return None
    try:
        header, rows = table
    except (TypeError, ValueError) as exc:
        raise TypeError("table must be a pair (header: list[str], rows: list[list[Any]]).") from exc
    head = [str(h) for h in header]
    out: list[list[tuple[str, bool]]] = []
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, Iterable):
            raise TypeError(f"table row {i} must be a list of cells; got {type(row).__name__}.")
        cells = list(row)
        if head and len(cells) != len(head):
            raise ValueError(f"table row {i} has {len(cells)} cells but the header has {len(head)} columns.")
        out.append([(str(c), (isinstance(c, (int, float)) and not isinstance(c, bool)) or is_number_like(c))
                    for c in cells])
    return _Table(head, out)


def _is_figure_like(obj: Any) -> bool:
    return isinstance(obj, (Figure, bytes, bytearray, memoryview))


class Report:
    """A self-contained HTML report built section by section.

    Figures are rendered to PNG when they are added (so later changes to a figure do not show)
    and then closed, so adding many figures does not leak memory.

    Args:
        title: The report's title (plain text).
        dpi: Resolution at which figures are rendered.

    Example:
        >>> report = Report("Run 42")
        >>> report.add_section("Notes", text="First paragraph.\\n\\nSecond paragraph.")
        >>> "Second paragraph." in report.render()
        True
    """

    def __init__(self, title: str, *, dpi: float = 100, source: str | None = None) -> None:
        if not dpi > 0:
            raise ValueError(f"dpi must be positive; got {dpi!r}.")
        self.title = str(title)
        self.dpi = dpi
        self.source = source
        self._sections: list[_Section] = []
        self._anchors: set[str] = set()
        self._n_images = 0

    @classmethod
    def extend(cls, path: str | os.PathLike[str], title: str, *, source: str, dpi: float = 100) -> Report:
        """A report that adds to the one already written at ``path`` (by :meth:`write`), if any.

        The sections written earlier by other sources are kept, in their order, and those of ``source``
        are dropped (running the same command again replaces its sections rather than repeating them).
        Sections added to the new report come after the kept ones. The stored sections live next to the
        page, in ``report.json`` for ``report.html``.

        Args:
            path: The report's HTML file, e.g. ``runs/x/report.html``.
            title: Title when nothing is kept; otherwise the earlier report's title stays.
            source: Name of what adds the new sections (e.g. the CLI command).
            dpi: Resolution of new figures.

        Returns:
            The report, ready for :meth:`add_section` and :meth:`write`.

        Raises:
            ValueError: If the stored sections cannot be read, or hold anything :meth:`write` would not have
                written there - an image source other than an embedded PNG (``javascript:``, ``http:`` URLs), an
                anchor that is not a slug, a level outside 2..4 - (the message names the file). Text is escaped
                when the page is rendered, so titles, captions and cells cannot inject markup either.
        """
        report = cls(title, dpi=dpi, source=source)
        store = _store_path(path)
        if not store.is_file():
            return report
        try:
            import json

            data = json.loads(store.read_text(encoding="utf-8"))
            kept = [_section_from_json(d) for d in data["sections"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"cannot read the report's stored sections in {store}: {err}; delete it to start anew.") from err
        kept = [sec for sec in kept if sec.source != source]
        if kept:
            report.title = str(data.get("title", title))
            report._sections = kept
            report._anchors = {sec.anchor for sec in kept}
            report._n_images = sum(len(sec.images) for sec in kept)
        return report

    # ----------------------------------------------------------------------------- building
    def _anchor(self, title: str) -> str:
        base = "sec-" + slugify(title)
        anchor, k = base, 2
        while anchor in self._anchors:
            anchor, k = f"{base}-{k}", k + 1
        self._anchors.add(anchor)
        return anchor

    def _image(self, fig: Any, caption: str | None) -> _Image:
        if isinstance(fig, Figure):
            png = fig_to_png(fig, dpi=self.dpi, close=True)
        elif isinstance(fig, (bytes, bytearray, memoryview)):
            png = bytes(fig)
            if not png.startswith(PNG_SIGNATURE) or len(png) < 24:
                raise ValueError("figure bytes are not a PNG image (missing PNG signature).")
        else:
            raise TypeError(
                "figures must be matplotlib Figures, PNG bytes or (caption, figure) pairs; "
                f"got {type(fig).__name__}."
            )
        self._n_images += 1
        width, height = _png_size(png)
        return _Image(
            data_uri="data:image/png;base64," + base64.b64encode(png).decode("ascii"),
            width=width,
            height=height,
            caption=caption,
            alt=caption or f"Figure {self._n_images}",
        )

    def add_section(
        self,
        title: str,
        *,
        text: str | None = None,
        table: tuple[Sequence[Any], Sequence[Sequence[Any]]] | None = None,
        figures: Any = (),
        level: int = 2,
    ) -> None:
        """Append a section.

        Args:
            title: Section heading (plain text); also listed in the table of contents.
            text: Plain text; blank lines separate paragraphs, single newlines are kept. It is
                escaped, never interpreted as HTML.
            table: ``(header, rows)``: column names and rows of cells; every cell is shown as
                ``str(cell)``. Rows must have as many cells as the header (if it is non-empty). Numbers
                (ints, floats and number-like strings such as ``"0.936 +- 0.0057"``) are right-aligned and
                never wrap; other cells wrap only between words, and a table wider than the page scrolls
                sideways inside its own box.
            figures: A sequence of matplotlib Figures, PNG bytes, or ``(caption, figure)`` pairs
                (a single figure or pair is accepted too). Figures are rendered and closed now.
            level: Heading level, 2 (top) to 4 (nested).

        Raises:
            ValueError: If ``level`` is out of range, a table row has the wrong length, or bytes
                are not a PNG.
            TypeError: If ``text``, ``table`` or a figure has the wrong type.
        """
        if not isinstance(level, int) or not _MIN_LEVEL <= level <= _MAX_LEVEL:
            raise ValueError(f"level must be an int from {_MIN_LEVEL} to {_MAX_LEVEL}; got {level!r}.")
        paragraphs = _paragraphs(text)
        tab = _table(table)
        if _is_figure_like(figures) or (
            isinstance(figures, tuple)
            and len(figures) == 2
            and isinstance(figures[0], str)
            and _is_figure_like(figures[1])
        ):
            figures = [figures]
        images: list[_Image] = []
        for item in figures:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                images.append(self._image(item[1], item[0]))
            else:
                images.append(self._image(item, None))
        title = str(title)
        self._sections.append(_Section(title, self._anchor(title), level, paragraphs, tab, images, self.source))

    def add_result(
        self,
        result: Any,
        title: str | None = None,
        text: str | None = None,
        *,
        level: int = 2,
        plot_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """Append a section for a :class:`gradsense.results.Result`.

        The section shows ``result.summary()`` as a key/value table and ``result.plot()`` as its
        figure (no figure when ``plot`` raises ``NotImplementedError`` or returns ``None``).

        Args:
            result: A gradsense Result (anything with ``title``, ``summary()`` and ``plot()``).
            title: Section heading; defaults to ``result.title``.
            text: Optional plain-text description shown above the table.
            level: Heading level, 2 to 4.
            plot_kwargs: Keyword arguments passed to ``result.plot()``.

        Raises:
            ValueError, TypeError: As :meth:`add_section`. Errors raised by ``result.plot()``
                other than ``NotImplementedError`` propagate.
        """
        rows = [[str(k), str(v)] for k, v in result.summary()]
        try:
            fig = result.plot(**dict(plot_kwargs or {}))
        except NotImplementedError:
            fig = None
        self.add_section(
            result.title if title is None else title,
            text=text,
            table=(["key", "value"], rows) if rows else None,
            figures=() if fig is None else [fig],
            level=level,
        )

    # ----------------------------------------------------------------------------- output
    def render(self) -> str:
        """Render the report as one self-contained HTML document.

        Returns:
            The HTML text (UTF-8, no external resources).
        """
        now = _dt.datetime.now(_dt.timezone.utc).astimezone()
        return (
            _environment()
            .get_template("report.html.j2")
            .render(
                title=self.title,
                sections=self._sections,
                generated=now.strftime("%Y-%m-%d %H:%M:%S %Z").strip(),
                generated_iso=now.isoformat(timespec="seconds"),
                versions=versions(),
            )
        )

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Render and write the report atomically (temp file + rename); parent folders are created.

        The sections are also stored next to it (``report.json`` for ``report.html``), so that
        :meth:`extend` can add to the page later.

        Args:
            path: Destination file, e.g. ``runs/ig/report.html``.

        Returns:
            The path written, as a ``Path``.
        """
        import json

        store = {"title": self.title, "sections": [dataclasses.asdict(sec) for sec in self._sections]}
        atomic_write_text(_store_path(path), json.dumps(store))
        return atomic_write_text(path, self.render())

    def __len__(self) -> int:
        return len(self._sections)

    def __repr__(self) -> str:
        return f"Report(title={self.title!r}, sections={len(self._sections)})"
