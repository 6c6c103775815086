"""The report's renderers: one :class:`Table` structure as Markdown, LaTeX (booktabs), CSV and JSON (the HTML page is
:mod:`ltbench.html_page`)."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ltbench.runset import ReportOptions, RunSet

# ----------------------------------------------------------------------------------------------
# One table structure for every text format


@dataclass
class Cell:
    text: str  # the number (or "n/a") without markup
    spread: str = ""  # "0.31" or ""
    n: int | None = None  # shown when it differs from the table's usual seed count
    bold: bool = False
    missing: bool = False
    interval: str = ""  # "[69.10, 70.88]": a 95 % bootstrap interval, or ""
    extra: str = ""  # "P(better)=0.89" on a paired row
    mark: str = ""  # "n.s." when a paired difference's interval contains 0


@dataclass
class Table:
    caption: str
    groups: list[tuple[str, int]]  # (dataset label, number of metric columns)
    columns: list[str]  # metric label per column
    rows: list[tuple[str, list[Cell], str]]  # (label, cells, kind: run | paper | delta)
    notes: list[str]  # about the numbers: printed with the table in every format
    # about the runs behind the table (incomplete ones left out): for the author, so LaTeX keeps them out of the float
    warnings: list[str] = field(default_factory=list)
    column_datasets: list[str] = field(default_factory=list)  # the dataset of each column (HTML's sections)


# ----------------------------------------------------------------------------------------------
# Renderers


def render_markdown(table: Table) -> str:
    header = ["method"] + [_md_escape(f"{g} {c}") for g, c in _column_groups(table)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * len(table.columns)]
    for label, cells, _ in table.rows:
        texts = [_md_cell(c) for c in cells]
        lines.append("| " + " | ".join([_md_escape(label), *texts]) + " |")
    out = [_md_text(table.caption), "", *lines]
    for note in [*table.warnings, *table.notes]:
        out += ["", _md_text(note)]
    return "\n".join(out) + "\n"


def _column_groups(table: Table) -> list[tuple[str, str]]:
    out = []
    for (label, width), start in zip(table.groups, np.cumsum([0] + [w for _, w in table.groups])):
        out += [(label, table.columns[start + k]) for k in range(width)]
    return out


def _md_cell(cell: Cell) -> str:
    if cell.missing:
        return "–"
    mean = f"**{cell.text}**" if cell.bold else cell.text
    spread = f" ± {cell.spread}" if cell.spread else ""
    n = f" (n={cell.n})" if cell.n is not None else ""
    return mean + spread + _suffix(cell) + n


def _suffix(cell: Cell) -> str:
    """The interval, the paired row's P(better) and "n.s.", as plain text after the number."""
    return "".join(f" {part}" for part in (cell.interval, cell.extra, f"({cell.mark})" if cell.mark else "") if part)


# Config values reach labels and notes verbatim: escape what Markdown would interpret. A "<" opens raw HTML only
# before a letter, "/", "!" or "?" and "&" starts an entity only before "name;", so "> 100 / < 20" stays readable.
_MD_HTML = re.compile(r"<(?=[A-Za-z/!?])|&(?=#?\w+;)")
_MD_INLINE = re.compile(r"([\\`*]|(?<=\])\()")  # and "](" would make a link


def _md_text(text: str) -> str:
    """Running text (caption, notes): no raw HTML, no emphasis, code or links from the values it quotes."""
    text = _MD_HTML.sub(lambda m: "&lt;" if m.group() == "<" else "&amp;", " ".join(text.splitlines()))
    return _MD_INLINE.sub(r"\\\1", text)


def _md_escape(text: str) -> str:
    """A table cell: running text that also cannot end the cell (|) or start emphasis (_)."""
    return _md_text(text).replace("|", "\\|").replace("_", "\\_")


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "ρ": r"$\rho$", "σ": r"$\sigma$",
                  "×": r"$\times$", "Δ": r"$\Delta$", "±": r"$\pm$", "–": "--", "↳": r"$\hookrightarrow$",
                  "τ": r"$\tau$", "≥": r"$\geq$", "≤": r"$\leq$", "≈": r"$\approx$", "→": r"$\rightarrow$",
                  "—": "---", "−": r"$-$", "·": r"$\cdot$", "’": "'",
                  # the default article's OT1 text font prints <, > and | as ¡, ¿ and an em dash
                  "<": r"$<$", ">": r"$>$", "|": r"$|$",
                  "\n": " ", "\r": " "}  # a blank line inside a table cell ends the paragraph: an error


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


LATEX_PACKAGES = ("booktabs", "graphicx")  # \toprule etc., \resizebox


def render_latex(table: Table, standalone: bool = False) -> str:
    """A booktabs ``table`` to paste into a paper or, with ``standalone``, a document that compiles on its own.

    The tabular is scaled down to the text width only when it is wider (a narrow table keeps the body's size).
    The warnings about left-out runs follow the float as comments: they are for the author, not the reader."""
    notes = "".join(rf"\par {latex_escape(n)}" for n in table.notes)
    float_ = "\n".join([
        r"\begin{table}[ht]",
        r"\centering",
        rf"\caption{{{latex_escape(table.caption)}}}",
        r"\setbox0=\hbox{%",
        *_latex_tabular(table),
        r"}% shrunk to the text width only when wider than the text",
        r"\ifdim\wd0>\linewidth\resizebox{\linewidth}{!}{\box0}\else\leavevmode\box0\fi",
        *([rf"{{\footnotesize{notes}\par}}"] if notes else []),
        r"\end{table}",
        *(f"% {' '.join(w.splitlines())}" for w in table.warnings),
    ]) + "\n"
    if not standalone:
        return f"% ltbench report; needs \\usepackage{{{','.join(LATEX_PACKAGES)}}}\n" + float_
    preamble = [r"\documentclass{article}", r"\usepackage[T1]{fontenc}",
                r"\usepackage[landscape,margin=1.5cm]{geometry}",
                *(rf"\usepackage{{{package}}}" for package in LATEX_PACKAGES), r"\begin{document}"]
    shown = "".join(rf"\par\noindent{{\footnotesize {latex_escape(w)}}}" + "\n" for w in table.warnings)
    return "\n".join(preamble) + "\n" + float_ + shown + "\\end{document}\n"


def _latex_tabular(table: Table) -> list[str]:
    spec = "l" + "".join("r" * width for _, width in table.groups)
    group_row = [""] + [rf"\multicolumn{{{w}}}{{c}}{{{latex_escape(g)}}}" for g, w in table.groups]
    rules, start = [], 2
    for _, width in table.groups:
        rules.append(rf"\cmidrule(lr){{{start}-{start + width - 1}}}")
        start += width
    body = []
    for label, cells, kind in table.rows:
        name = latex_escape(label) if kind == "run" else rf"\quad\textit{{{latex_escape(label.lstrip('↳ '))}}}"
        body.append(" & ".join([name, *(_latex_cell(c) for c in cells)]) + r" \\")
    return [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(group_row) + r" \\", " ".join(rules),
            " & ".join(["method", *(latex_escape(c) for c in table.columns)]) + r" \\", r"\midrule", *body,
            r"\bottomrule", r"\end{tabular}"]


def _latex_cell(cell: Cell) -> str:
    if cell.missing:
        return "--"
    mean = rf"\textbf{{{cell.text}}}" if cell.bold else latex_escape(cell.text)
    spread = rf" $\pm$ {cell.spread}" if cell.spread else ""
    n = rf" \textsuperscript{{n={cell.n}}}" if cell.n is not None else ""
    suffix = rf" {{\scriptsize {latex_escape(_suffix(cell).strip())}}}" if _suffix(cell) else ""
    return mean + spread + suffix + n


def render_csv(cells: pd.DataFrame) -> str:
    """Every aggregated number, one line per (row, head, dataset, rho, metric), with the per-seed values."""
    out = io.StringIO()
    cells.to_csv(out, index=False, float_format="%.10g", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    return out.getvalue()


def render_json(table: Table, cells: pd.DataFrame, runs: RunSet, options: ReportOptions) -> str:
    records = json.loads(cells.to_json(orient="records", double_precision=10))
    run_rows = json.loads(runs.frame.to_json(orient="records", double_precision=10))
    payload = {"caption": table.caption, "options": {k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in options.__dict__.items()},
               "cells": records, "runs": run_rows, "incomplete": _nan_to_none(runs.incomplete),
               "notes": [*table.warnings, *table.notes]}
    return json.dumps(payload, indent=2, sort_keys=True) + "\n"


def _nan_to_none(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in item.items()} for item in items]


