"""What every CLI command shares: one option set, loading, progress, tables that fit, ``--json``, clean errors.

:func:`analysis_command` is the one decorator that gives a command the shared options

- the model: ``--model SPEC`` (``zoo:NAME``, ``file.py:factory``, ``module:factory``, ``hf:DIR``) and
  ``--weights FILE`` (``.safetensors`` or a ``.pt``/``.pth`` state dict, never unpickled);
- the data: ``--data SPEC`` (alias ``--dataset``; ``zoo:NAME``, tensors, ``.csv``, an image folder, text), ``--split``,
  ``--n``, and how to read it: ``--inputs-key``, ``--labels-key``, ``--label-column``, ``--text-key``,
  ``--input-shape C,H,W``, ``--normalize MEAN,STD``;
- the run: ``--loss``, ``--device``, ``--batch-size``, ``--max-memory``, ``--seed``, ``--out DIR``, ``--resume``
  (continue the sharded run in ``--out``), ``--json``;

collects them into a :class:`Run` handed to the command as its first argument, and turns every mistake into
one ``error: ...`` line with exit code 2 (no traceback). A command reports through the run: ``run.stage()``
(progress: a spinner with the elapsed time on a terminal, one line per stage otherwise, on stderr),
``run.table()``/``run.rows()`` (tables that stay readable at 80 columns: wrapped headers, or one block per row
when the columns cannot fit, never a cut number), and ``run.save()`` (results into ``--out`` and into the
``--json`` document, which replaces the tables on stdout).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from gradsense.viz.text import is_number_like  # numbers are recognised alike here and in the HTML report

F = TypeVar("F", bound=Callable[..., Any])

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError, OSError)


class _LazyConsole:
    """The stdout console, created on first use (rich is not imported for ``--help``/``--version``)."""

    _console: Any = None

    def __getattr__(self, name: str) -> Any:
        if _LazyConsole._console is None:
            from rich.console import Console

            _LazyConsole._console = Console(highlight=False)
        return getattr(_LazyConsole._console, name)


console: Any = _LazyConsole()


def _one_line(err: BaseException) -> str:
    text = str(err)
    if isinstance(err, OSError) and getattr(err, "filename", None) and not isinstance(err, FileNotFoundError):
        text = f"{err.strerror or type(err).__name__}: {err.filename}"
    text = " ".join(text.split()) or type(err).__name__
    return text


def _rank_tag() -> str:
    """``" (rank N)"`` on the ranks after the first under torchrun (read from its environment), else ``""``."""
    rank, size = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    return f" (rank {rank})" if size not in ("", "1") and rank not in ("", "0") else ""


def _is_main_process() -> bool:
    """Rank 0 under torch.distributed, or the only process (torch is not imported for this)."""
    if "torch" not in sys.modules:
        return True
    from gradsense.core.distributed import is_main_process

    return is_main_process()


def fail(err: BaseException) -> None:
    """Print ``error: <one line>`` to stderr and exit with code 2."""
    click.echo(f"error{_rank_tag()}: {_one_line(err)}", err=True)
    sys.exit(2)


def friendly_errors(fn: F) -> F:
    """Bad input -> one ``error:`` line and exit code 2; anything else -> one line naming the internal error and
    exit code 1 (``GRADSENSE_TRACEBACK=1`` shows the traceback instead)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if os.environ.get("GRADSENSE_TRACEBACK"):
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            fail(err)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as err:  # an internal error: still one line, and how to see more
            click.echo(f"error{_rank_tag()}: internal error {type(err).__name__}: {_one_line(err)} (set "
                       "GRADSENSE_TRACEBACK=1 for the traceback, and please report it)", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


class Command(click.Command):
    """A click command whose usage errors are one ``error:`` line (exit code 2), like every other mistake."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        return _main_one_line(super().main, *args, **kwargs)


class Group(click.Group):
    """The ``gradsense`` group, with the same one-line usage errors."""

    command_class = Command

    def main(self, *args: Any, **kwargs: Any) -> Any:
        return _main_one_line(super().main, *args, **kwargs)


def _main_one_line(main: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    standalone = kwargs.pop("standalone_mode", True)
    try:
        return main(*args, standalone_mode=False, **kwargs)
    except click.UsageError as err:
        cmd = err.ctx.command_path if err.ctx is not None else "gradsense"
        click.echo(f"error: {' '.join(err.format_message().split())} (see `{cmd} --help`)", err=True)
        code = 2
    except click.exceptions.Exit as err:
        code = err.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        code = 1
    except click.ClickException as err:
        click.echo(f"error: {' '.join(err.format_message().split())}", err=True)
        code = err.exit_code
    else:
        code = 0
    if standalone:
        sys.exit(code)
    return code


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Show Python warnings as one ``warning: ...`` line on stderr each (not file, line and source)."""
    import warnings

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if _is_main_process():  # under torchrun the other ranks would repeat rank 0's warnings
            click.echo(f"warning: {' '.join(str(message).split())}", err=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


# --------------------------------------------------------------------------------------------- tables
def _longest_word(text: str) -> int:
    return max((len(w) for w in str(text).split()), default=0)


def column_widths(header: Sequence[str], rows: Sequence[Sequence[str]], width: int) -> list[int] | None:
    """Widths of the columns of a table that fits ``width`` characters with every number and word whole.

    Each column starts at its natural width (its longest cell or header) and, while the table is too wide,
    the widest column that can still shrink loses a character; no column goes below its longest word (a
    number-like cell counts as one word: ``0.936 +- 0.0057`` is never split). ``None`` when that floor is
    already too wide.
    """
    n = max(len(header), max((len(r) for r in rows), default=0))
    cols = [[str(r[j]) if j < len(r) else "" for r in rows] for j in range(n)]
    head = [str(header[j]) if j < len(header) else "" for j in range(n)]
    avail = width - (3 * n + 1)  # a border and one space of padding on each side of every cell
    widths = [max([len(head[j]), *(len(c) for c in cols[j])], default=0) for j in range(n)]
    floor = [max([_longest_word(head[j]), *((len(c) if is_number_like(c) else _longest_word(c)) for c in cols[j])],
                 default=0) for j in range(n)]
    if sum(floor) > avail:
        return None
    while sum(widths) > avail:
        j = max((k for k in range(n) if widths[k] > floor[k]), key=lambda k: widths[k])
        widths[j] -= 1
    return widths


def layout_for(header: Sequence[str], rows: Sequence[Sequence[str]], width: int) -> str:
    """``"plain"`` (fits as it is), ``"wrap"`` (fits with wrapped words) or ``"blocks"`` (does not fit)."""
    n = max(len(header), max((len(r) for r in rows), default=0))
    if n == 0:
        return "plain"
    natural = [max([len(str(header[j])) if j < len(header) else 0, *(len(str(r[j])) for r in rows if j < len(r))])
               for j in range(n)]
    if sum(natural) + 3 * n + 1 <= width:
        return "plain"
    return "wrap" if column_widths(header, rows, width) is not None else "blocks"


def _column_groups(head: list[str], cells: list[list[str]], width: int) -> list[list[int]] | None:
    """Split the columns into tables that each fit ``width``, every one repeating the key columns (those up to
    and including the first text column, e.g. ``rank, method``); ``None`` when even one extra column does not fit."""
    n = len(head)
    key: list[int] = []
    for j in range(n):
        key.append(j)
        if not all(is_number_like(r[j]) for r in cells if j < len(r)):
            break
    rest = [j for j in range(n) if j not in key]
    if not rest:
        return None

    def fits(cols: list[int]) -> bool:
        return layout_for([head[j] for j in cols], [[r[j] for j in cols] for r in cells], width) != "blocks"

    groups: list[list[int]] = []
    current: list[int] = []
    for j in rest:
        if fits([*key, *current, j]):
            current.append(j)
        elif current and fits([*key, j]):
            groups.append(key + current)
            current = [j]
        else:
            return None
    groups.append(key + current)
    return groups


def render_table(out: Any, title: str | None, header: Sequence[str], rows: Sequence[Sequence[Any]],
                 *, show_header: bool = True) -> None:
    """Print a table on the rich console ``out`` so that no number and no word is cut.

    Wide tables wrap their text at spaces (numbers never); when even that does not fit the console width
    (80 columns when the output is piped) the columns are split over several tables that repeat the key
    columns, and failing that every row becomes a block of ``column  value`` lines.
    """
    from rich.table import Table

    cells = [[str(c) for c in r] for r in rows]
    head = [str(h) for h in header]
    n = max(len(head), max((len(r) for r in cells), default=0))
    head = head + [""] * (n - len(head))
    cells = [r + [""] * (n - len(r)) for r in cells]
    layout = layout_for(head if show_header else [""] * n, cells, out.width)
    if layout != "plain":  # text will wrap: a number inside it (0.05 ± 0.01) becomes one word, never split
        cells = [[c if is_number_like(c) else _compact_numbers(c) for c in r] for r in cells]
        layout = layout_for(head if show_header else [""] * n, cells, out.width)
    if layout == "blocks" and show_header:
        groups = _column_groups(head, cells, out.width)
        if groups is not None:
            for i, cols in enumerate(groups):
                part = f"{title} ({i + 1}/{len(groups)})" if title else None
                render_table(out, part, [head[j] for j in cols], [[r[j] for j in cols] for r in cells])
            return
    if layout != "blocks":
        widths = column_widths(head if show_header else [""] * n, cells, out.width) if layout == "wrap" else None
        if title:  # on its own line: it wraps at the console's width, not the table's
            out.print(f"[bold]{_escape(title)}[/]")
        table = Table(show_header=show_header)
        for j in range(n):
            col = [r[j] for r in cells]
            numeric = bool(cells) and all(is_number_like(c) or c in ("", "n/a", "-") for c in col)
            table.add_column(head[j], justify="right" if numeric else "left", no_wrap=layout == "plain",
                             width=None if widths is None else widths[j], overflow="fold")
        for r in cells:
            table.add_row(*r)
        out.print(table)
        return
    if title:
        out.print(f"[bold]{_escape(title)}[/]")
    key_width = min(max((len(h) for h in head), default=0), max(12, out.width // 3))
    for r in cells:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(width=key_width, overflow="fold", style="dim")
        grid.add_column(overflow="fold")
        first = f"{head[0]}: {r[0]}" if show_header and head[0] else r[0]
        out.print(f"[bold]{_escape(first)}[/]")
        for j in range(1, n):
            grid.add_row(head[j] if show_header else "", r[j])
        out.print(grid, crop=False)


def _compact_numbers(text: str) -> str:
    """``"0.05 ± 0.01 (2 probes)"`` -> ``"0.05±0.01 (2 probes)"``: each number group one word for wrapping."""
    from gradsense.viz.text import number_groups

    return "".join(re.sub(r"\s*(±|\+-|->|→)\s*", r"\1", part) if is_num else part
                   for part, is_num in number_groups(text))


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# --------------------------------------------------------------------------------------------- JSON
def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats -> None (strict JSON has no NaN/Infinity), containers recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def result_json(result: Any, *, max_values: int = 4096) -> dict[str, Any]:
    """A result as JSON: type, title, summary rows, meta, and every tensor of at most ``max_values`` values."""
    tensors: dict[str, Any] = {}
    for key, value in result.tensors.items():
        if value.numel() <= max_values:
            t = value.detach().cpu()
            tensors[key] = _finite(t.tolist() if t.dtype != _bf16() else t.float().tolist())
        else:
            tensors[key] = {"shape": list(value.shape), "dtype": str(value.dtype),
                            "omitted": f"more than {max_values} values; read it with gradsense.Result.load(--out folder)"}
    return {"type": type(result).__name__, "title": result.title, "method": result.method,
            "summary": {k: v for k, v in result.summary()}, "tensors": tensors, "meta": _finite(result.meta)}


def _bf16() -> Any:
    import torch

    return torch.bfloat16


# --------------------------------------------------------------------------------------------- progress
def _progress_enabled() -> bool:
    return os.environ.get("GRADSENSE_PROGRESS", "").lower() not in {"0", "false", "off", "no"}


class Run:
    """One invocation of a command: the shared options, loading, progress, tables, results and output.

    Attributes:
        command: The command's name (``hessian``, ...).
        options: The shared options as given (``model``, ``weights``, ``data``, ``split``, ``n``, ``loss``,
            ``device``, ``batch_size``, ``max_memory``, ``seed``, ``out``, ``json``, and the data-reading options).
        out: The run folder (``--out``) or ``None``.
        json: Whether ``--json`` was given (then stdout gets one JSON document and nothing else).
    """

    def __init__(self, command: str, options: dict[str, Any]) -> None:
        self.command = command
        self.options = options
        self.out: Path | None = Path(options["out"]) if options.get("out") else None
        self.json = bool(options.get("json"))
        # --resume: commands that write shards continue the run in --out (the shared options stay one set)
        self.resume = bool(options.get("resume", False))
        self._t0 = time.perf_counter()
        self._tty = sys.stderr.isatty()
        self._model: Any = None
        self._data: dict[Any, Any] = {}
        self._doc: dict[str, Any] = {"command": command, "options": {k: v for k, v in options.items()},
                                     "results": {}, "tables": [], "notes": [], "files": []}
        self._folder: Any = None
        from rich.console import Console

        # under torchrun only rank 0 prints (tables, progress, --json) and writes (the write functions check the rank)
        self.quiet = not _is_main_process()
        # stdout, sized when the run starts: the terminal's width, else COLUMNS, else 80 (piped output)
        self.console = Console(highlight=False, quiet=self.quiet)

    # ----------------------------------------------------------------------------- settings
    @property
    def seed(self) -> int:
        return int(self.options.get("seed") or 0)

    @property
    def batch_size(self) -> int:
        return int(self.options["batch_size"])

    @property
    def max_memory(self) -> str | None:
        return self.options.get("max_memory")

    @property
    def device(self) -> str:
        return str(self.options.get("device") or "cpu")

    @property
    def model_spec(self) -> str:
        return str(self.options.get("model") or "")

    def engine_kwargs(self, fn: Callable[..., Any], **extra: Any) -> dict[str, Any]:
        """``batch_size``/``max_memory``/``seed`` for the keywords ``fn`` accepts, and ``extra`` as given.

        The run's settings go only where ``fn`` takes them; ``extra`` (the user's own options) always goes, so
        an option ``fn`` does not know is refused by ``fn`` rather than dropped here.
        """
        import inspect

        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        # show_progress=False: the run's own stage display is the progress; a second live bar would garble it
        run = {"batch_size": self.batch_size, "max_memory": self.max_memory, "seed": self.seed,
               "show_progress": False}
        out = {k: v for k, v in run.items() if k in params and v is not None}
        out.update(extra)
        return out

    # ----------------------------------------------------------------------------- progress
    @contextlib.contextmanager
    def stage(self, text: str) -> Iterator[None]:
        """Report a stage of the run: a spinner with elapsed time on a terminal, one line on stderr otherwise."""
        if not _progress_enabled() or self.quiet:
            yield
            return
        if not self._tty:
            click.echo(f"[{time.perf_counter() - self._t0:6.1f}s] {self.command}: {text}", err=True)
            yield
            return
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        err = Console(stderr=True)
        t0 = time.perf_counter()
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                      transient=True) as bar:
            bar.add_task(f"{self.command}: {text}", total=None)
            yield
        err.print(f"[green]✓[/] {self.command}: {_escape(text)} [dim]({time.perf_counter() - t0:.1f} s)[/]")

    @contextlib.contextmanager
    def long_stage(self, text: str) -> Iterator[bool]:
        """A stage that reports its own progress: on a terminal it yields ``True`` and the caller shows its progress
        bar with an ETA (no spinner beside it); otherwise one line on stderr, and it yields ``False``."""
        if self._tty and _progress_enabled():
            t0 = time.perf_counter()
            yield True
            from rich.console import Console

            Console(stderr=True).print(f"[green]✓[/] {self.command}: {_escape(text)} "
                                       f"[dim]({time.perf_counter() - t0:.1f} s)[/]")
            return
        with self.stage(text):
            yield False

    # ----------------------------------------------------------------------------- loading
    def model(self) -> Any:
        """The model of ``--model``/``--weights`` on ``--device`` (loaded once)."""
        if self._model is None:
            from gradsense.io import load_model

            spec = self.model_spec
            if not spec:
                raise ValueError(f"`gradsense {self.command}` needs --model SPEC (zoo:NAME, file.py:factory, "
                                 "package.module:factory or hf:DIR).")
            weights = self.options.get("weights")
            with self.stage(f"loading model {spec}" + (f" with weights {weights}" if weights else "")):
                model = load_model(spec, weights=weights)
                if self.device != "cpu":
                    model = model.to(self.device)
            self._model = model
        return self._model

    def _parameter_dtype(self, model: Any) -> Any:
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
        return None

    def model_input_shape(self, model: Any) -> tuple[int, ...] | None:
        """The input shape of one example the model takes, when it can be told (zoo image models, ``input_shape``)."""
        spec = self.model_spec
        if spec.startswith("zoo:"):
            from gradsense import zoo
            from gradsense.zoo.registry import MODELS

            entry = MODELS.get(spec[4:])
            if entry is not None:
                return tuple(zoo.dataset(entry.dataset, split="test").inputs.shape[1:])
        shape = getattr(model, "input_shape", None)
        return tuple(int(s) for s in shape) if shape is not None else None

    def data_spec(self, default: str | None = None) -> str | None:
        """``--data`` or, for a zoo model without it, ``default`` / the zoo model's own dataset."""
        spec = self.options.get("data")
        if spec:
            return str(spec)
        if default is not None:
            return default
        if self.model_spec.startswith("zoo:"):
            from gradsense import zoo

            try:
                name = zoo.info(self.model_spec).get("dataset")
            except (ValueError, FileNotFoundError):
                name = None
            if name:
                return f"zoo:{name}"
        return None

    def data(self, *, spec: str | None = None, split: str | None = None, n: int | str | None = "option",
             required: bool = True, labels: bool = False, tensors: bool = True, model: Any = None) -> Any:
        """The data of ``--data`` (or ``spec``), read with the data options, on ``--device``.

        Args:
            spec: Another spec than ``--data`` (e.g. held-out data).
            split: Zoo split (default ``--split``).
            n: Examples to read (default ``--n``; ``None`` = all).
            required: Raise when no data is named (else return ``None``).
            labels: Raise when the data has no labels (loss-based analyses).
            tensors: Text is tokenized with the model's tokenizer (analyses that need tensors).
            model: The model (for image sizes, text tokenizers, dtype); default :meth:`model`.

        Returns:
            A :class:`gradsense.io.Data`, floating inputs in the model's dtype, or ``None``.
        """
        from gradsense.io import load_data

        spec = spec or self.data_spec()
        if spec is None:
            if required:
                raise ValueError(f"`gradsense {self.command}` needs --data SPEC (zoo:NAME, a tensor file, a .csv, "
                                 "an image folder or text).")
            return None
        limit = self.options.get("n") if n == "option" else n
        if limit is not None and int(limit) < 1:
            raise ValueError(f"--n must be >= 1, got {limit}.")
        split = split or self.options.get("split") or "test"
        key = (spec, split, limit, tensors)
        if key in self._data:
            return self._data[key]
        model = self.model() if model is None else model
        opts = {k: self.options.get(k) for k in ("inputs_key", "labels_key", "label_column", "text_key",
                                                  "input_shape", "normalize")}
        is_images = Path(spec).is_dir()
        if is_images and opts["input_shape"] is None:
            opts["input_shape"] = self.model_input_shape(model)
        with self.stage(f"loading data {spec}" + (f" ({split})" if spec.startswith("zoo:") else "")):
            data = load_data(spec, split=split, limit=limit, **opts)
            if data.inputs is None and tensors:
                tok = getattr(model, "tokenizer", None)
                if tok is None:
                    raise ValueError(f"{spec} is text, but {self.model_spec} has no tokenizer (text data needs a text "
                                     "model such as hf:DIR or zoo:minilm).")
                data = data.tokenize(tok)
            data = data.to(self.device if self.device != "cpu" else None, self._parameter_dtype(model))
        if labels and data.labels is None:
            raise ValueError(f"{spec} has no labels, but `gradsense {self.command}` differentiates a loss of "
                             "outputs and labels; give labelled data (--labels-key, --label-column, one subfolder "
                             "per class).")
        self._data[key] = data
        return data

    def loss(self) -> Callable[..., Any]:
        """The loss of ``--loss``."""
        from gradsense.io import load_loss

        return load_loss(self.options.get("loss") or "cross_entropy")

    @property
    def loss_name(self) -> str:
        return str(self.options.get("loss") or "cross_entropy")

    # ----------------------------------------------------------------------------- output
    def table(self, title: str | None, header: Sequence[str], rows: Sequence[Sequence[Any]], *,
              show_header: bool = True, name: str | None = None) -> None:
        """Print a table (or keep it for ``--json``)."""
        rows = [[str(c) for c in r] for r in rows]
        if self.json:
            self._doc["tables"].append({"name": name or title, "title": title,
                                        "header": [str(h) for h in header], "rows": rows})
            return
        render_table(self.console, title, header, rows, show_header=show_header)

    def rows(self, title: str | None, rows: Sequence[tuple[str, str]], *, name: str | None = None) -> None:
        """Print key/value rows as a two-column table (or keep them for ``--json``)."""
        self.table(title, ["", ""], [[k, v] for k, v in rows], show_header=False, name=name)

    def note(self, text: str) -> None:
        """A line of explanation under the tables (in ``notes`` with ``--json``)."""
        if self.json:
            self._doc["notes"].append(text)
        else:
            self.console.print(_escape(text))

    def add(self, name: str, result: Any) -> None:
        """Add a result to the ``--json`` document (without saving it)."""
        self._doc["results"][name] = result

    def folder(self) -> Any:
        """The :class:`gradsense.results.RunFolder` of ``--out`` (created on first use)."""
        if self.out is None:
            raise ValueError("no --out folder")
        if self._folder is None:
            from gradsense.results import RunFolder

            self._folder = RunFolder(self.out)
        return self._folder

    def save(self, name: str, result: Any, *, figure: Any = "plot") -> None:
        """Keep ``result`` for ``--json`` and, with ``--out``, save it (and its figure) into the run folder."""
        self.add(name, result)
        if self.out is None:
            return
        folder = self.folder()
        folder.save_result(result, name)
        self._doc["files"].append(str(self.out / name))
        if figure is not None:
            fig = result.plot() if figure == "plot" else figure
            if fig is not None:
                folder.save_figure(fig, name)

    def wrote(self, path: Any) -> None:
        """Say that a file was written."""
        self._doc["files"].append(str(path))
        if not self.json:
            self.console.print(f"wrote {_escape(str(path))}")

    def finish(self) -> None:
        """Print the ``--json`` document (stdout) and the total time (stderr); nothing on ranks after the first."""
        if self.quiet:
            return
        if _progress_enabled() and not self._tty:
            click.echo(f"[{time.perf_counter() - self._t0:6.1f}s] {self.command}: done", err=True)
        if self.json:
            doc = dict(self._doc)
            doc["results"] = {k: result_json(v) for k, v in doc["results"].items()}
            doc["wall_time_s"] = round(time.perf_counter() - self._t0, 3)
            click.echo(json.dumps(_finite(doc), indent=1, default=str))


# --------------------------------------------------------------------------------------------- the options
def _check_options(opts: dict[str, Any]) -> None:
    """Every shared option checked before any work or file."""
    from gradsense.io.data import _parse_normalize, parse_shape

    if opts.get("batch_size") is not None and opts["batch_size"] < 1:
        raise ValueError(f"--batch-size must be >= 1, got {opts['batch_size']}.")
    if opts.get("n") is not None and opts["n"] < 1:
        raise ValueError(f"--n must be >= 1, got {opts['n']}.")
    if opts.get("max_memory") is not None:
        from gradsense.core.batching import parse_memory

        try:
            parse_memory(opts["max_memory"])
        except ValueError as err:
            raise ValueError(f"--max-memory: {err}") from None
    if opts.get("input_shape") is not None:
        opts["input_shape"] = parse_shape(opts["input_shape"], "--input-shape")
    if opts.get("normalize") is not None:
        channels = (opts.get("input_shape") or (3,))[0]
        vals = opts["normalize"]
        n_given = max(len(part.split(",")) for part in str(vals).split(";"))
        _parse_normalize(vals, n_given if ";" in str(vals) else channels)
    device = opts.get("device") or "cpu"
    if device != "cpu":
        import torch

        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"--device {device!r} not understood ({err}); use cpu, cuda, cuda:1, mps.") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}); use --device cpu.")
        if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu.")
    loss = opts.get("loss")
    if loss:
        from gradsense.io import load_loss

        load_loss(loss)
    seed = opts.get("seed")
    if seed is not None and seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}.")


_SHARED = ("model", "weights", "data", "split", "n", "inputs_key", "labels_key", "label_column", "text_key",
           "input_shape", "normalize", "loss", "device", "batch_size", "max_memory", "seed", "out", "resume", "json")


def analysis_command(
    name: str,
    *,
    n: int | None = None,
    split: str = "test",
    batch_size: int = 256,
    model: bool = True,
    data_help: str = "zoo:NAME, a tensor file (.npy/.npz/.safetensors/.pt), a .csv, an image folder or text "
                     "(.txt/.jsonl); a bare zoo name works too.",
    n_help: str = "number of examples (the first N).",
    short_help: str | None = None,
    resumable: bool = False,
) -> Callable[[F], click.Command]:
    """The one decorator of every analysis command: adds the shared options, builds a :class:`Run`, and makes
    every mistake one ``error:`` line with exit code 2.

    The decorated function takes the :class:`Run` first and its own options as keywords; it reports through the
    run, which prints the ``--json`` document at the end. Only the defaults differ between commands.

    Args:
        name: The command's name.
        n: Default of ``--n`` (``None``: all examples).
        split: Default zoo split.
        batch_size: Default ``--batch-size``.
        model: Whether the command takes ``--model``/``--weights`` and the data options (``demo`` does not).
        data_help: Help of ``--data``.
        n_help: Help of ``--n``.
        short_help: The line in ``gradsense --help`` (at most ~60 characters, so it is never cut).
        resumable: Whether the command writes resumable shards (else ``--resume`` is refused, never ignored).
    """

    def decorate(fn: F) -> click.Command:
        @functools.wraps(fn)
        @friendly_errors
        def body(**kwargs: Any) -> None:
            shared = {k: kwargs.pop(k) for k in list(kwargs) if k in _SHARED}
            if shared.get("resume") and not resumable:
                raise ValueError(f"`gradsense {name}` writes no shards, so there is nothing to resume; drop --resume.")
            if shared.get("resume") and not shared.get("out"):
                raise ValueError("--resume needs --out DIR (the run folder to continue).")
            _check_options(shared)
            run = Run(name, shared)
            with one_line_warnings():
                fn(run, **kwargs)
            run.finish()

        options: list[Callable[[Any], Any]] = []
        if model:
            options += [
                click.option("--model", "model", metavar="SPEC", default=None,
                             help="zoo:NAME, path/to/file.py:factory, package.module:factory or hf:DIR."),
                click.option("--weights", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                             help=".safetensors or .pt/.pth state dict (read with weights_only=True; a checkpoint "
                                  "with a state_dict/model entry works)."),
                click.option("--data", "--dataset", "data", metavar="SPEC", default=None, help=data_help),
                click.option("--split", default=split, show_default=True, type=click.Choice(["train", "test"]),
                             help="split of zoo data."),
                click.option("--n", "n", default=n, show_default=n is not None, type=int, help=n_help),
                click.option("--inputs-key", default=None, help="name of the inputs in .npz/.safetensors/.pt data."),
                click.option("--labels-key", default=None, help="name of the labels there (or the JSONL label field)."),
                click.option("--label-column", default=None, help="label column of .csv data (name or index)."),
                click.option("--text-key", default=None, help="text field of .jsonl data (default: text)."),
                click.option("--input-shape", default=None, metavar="C,H,W",
                             help="shape of one input: images are resized to it (default: the model's, or the first "
                                  "image's)."),
                click.option("--normalize", default=None, metavar="MEAN,STD",
                             help="standardise images: MEAN,STD or 'm1,m2,m3;s1,s2,s3' per channel."),
                click.option("--loss", default="cross_entropy", show_default=True,
                             help="cross_entropy, mse, bce (on logits) or path/to/file.py:function."),
                click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, mps."),
                click.option("--batch-size", default=batch_size, show_default=True, type=int,
                             help="examples per forward/backward pass."),
                click.option("--max-memory", default=None, metavar="SIZE",
                             help="memory budget of batch-expanding methods, e.g. 2GB (default: a quarter of free "
                                  "memory)."),
                click.option("--seed", default=0, show_default=True, type=int, help="seed of every random draw."),
            ]
        # the run folder, and --resume to continue a run written there (Run.resume), the same for every command
        options += [
            click.option("--out", default=None, type=click.Path(file_okay=False), metavar="DIR",
                         help="run folder to write (results, figures, report.html)."),
            click.option("--resume", is_flag=True,
                         help="continue the run in --out after a crash or kill: finished shards are kept, the rest "
                              "computed (same settings needed; bitwise the uninterrupted result)."),
            click.option("--json", "json", is_flag=True,
                         help="print one JSON document with every number (and nothing else) on stdout."),
        ]
        own = list(getattr(body, "__click_params__", []))
        for opt in reversed(options):
            body = opt(body)
        # the command's own options first in --help, the shared set after them
        added = [p for p in getattr(body, "__click_params__", []) if all(p is not q for q in own)]
        body.__click_params__ = added + own  # type: ignore[attr-defined]
        return click.command(name, cls=Command, help=fn.__doc__, short_help=short_help)(body)

    return decorate


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    """Print key/value rows as a table that fits the terminal (for code outside :class:`Run`)."""
    render_table(console, title, ["", ""], [[k, v] for k, v in rows], show_header=False)


def model_option(fn: F) -> F:
    """``--model SPEC`` and ``--weights FILE`` alone (kept for commands written before :func:`analysis_command`;
    new commands use :func:`analysis_command`, which gives them the whole shared option set)."""
    fn = click.option("--weights", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                      help=".safetensors or .pt/.pth state dict (read with weights_only=True).")(fn)
    return click.option("--model", "model_spec", required=True, metavar="SPEC",
                        help="zoo:NAME, path/to/file.py:factory, package.module:factory or hf:DIR.")(fn)  # type: ignore[return-value]
