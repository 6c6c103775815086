"""The terminal's consoles and the light printing helpers: what every command needs, without the modules
``ltbench.console`` imports for its tables and live views (so `ltbench --help` and `ltbench list` stay fast)."""

from __future__ import annotations

import os
import re

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Piped (a log file, `| less`, CI), rich would wrap tables at 80 columns; there the width is unbounded unless
# COLUMNS says otherwise, so each row stays one line. A terminal keeps its own width.
PIPE_WIDTH = 10_000


def _console(**options) -> Console:
    made = Console(**options)
    if not made.is_terminal and "COLUMNS" not in os.environ:
        made.width = PIPE_WIDTH
    return made


console = _console()
err_console = _console(stderr=True)


def say(message: str, **style) -> None:
    """A status line on stderr, unwrapped (log files and tests see it whole)."""
    err_console.print(message, highlight=False, soft_wrap=True, **style)


def print_listing(columns: tuple[str, ...], rows: list[tuple[str, ...]], title: str | None = None,
                   right: tuple[str, ...] = ()) -> None:
    """On a terminal, a table whose last column wraps inside itself; piped, one unwrapped line per row."""
    if console.is_terminal:
        table = Table(title=title, box=None if title is None else box.SIMPLE, show_header=title is not None,
                      pad_edge=False)
        for i, column in enumerate(columns):
            table.add_column(column, no_wrap=i < len(columns) - 1, style="bold" if i == 0 else None,
                             justify="right" if column in right else "left")
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))  # docstrings and summaries are not rich markup
        console.print(table, highlight=False)
        return
    shown = [columns, *rows] if title is not None else rows
    widths = [max(len(row[i]) for row in shown) for i in range(len(columns) - 1)] if shown else []
    for row in shown:
        cells = [cell.rjust(w) if col in right else cell.ljust(w) for cell, w, col in zip(row, widths, columns)]
        click.echo("  ".join([*cells, row[-1]]))


def doc_summary(name: str, doc: str) -> str:
    """A docstring's first line as plain text: RST roles and literals unwrapped, a leading ``name:`` dropped."""
    lines = doc.strip().splitlines()
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", lines[0] if lines else "")
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return text.removeprefix(f"{name}: ")
