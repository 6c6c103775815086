"""``ltbench report --format html``: one self-contained page (inline CSS, a 30-line sort script, figures as base64
PNG; nothing fetched from a network) with the caption, a section per dataset holding its columns of the table, its
figures and links to its run folders, and the notes and left-out runs of the whole table.

Clicking a column header sorts the rows by it; a row's ↳ rows (paired differences, paper numbers, the oracle's final
epoch) move with it, as each row and its ↳ rows are one ``<tbody>``.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import NamedTuple

import pandas as pd

import ltbench
from ltbench.records import runs_dir
from ltbench.registry import DATASETS
from ltbench.render import Cell, Table
from ltbench.runset import ReportOptions, RunSet


class PageFigure(NamedTuple):
    kind: str  # per_class | cls_dist | curves (ltbench.plots)
    caption: str
    png: bytes


# Draws the figures of a page, dataset -> figures (ltbench.plots.page_figures: plots sit above this layer).
FigureSource = Callable[[RunSet, ReportOptions], Mapping[str, Sequence[PageFigure]]]

CSS = """
:root { color-scheme: light; --line: #d8dce3; --muted: #5f6b7a; --band: #f5f7fa; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1d2430; margin: 2rem auto; max-width: 1600px; padding: 0 1.5rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.25rem; margin-top: 2.5rem; }
h2 small, .meta { color: var(--muted); font-weight: normal; font-size: .9rem; }
.caption { max-width: 110ch; color: #2c3644; background: var(--band); border-left: 3px solid #8aa4c8;
           padding: .6rem .9rem; }
.notes li, .warnings li { max-width: 110ch; margin: .25rem 0; }
.warnings { border-left: 3px solid #d9a441; background: #fdf8ee; padding: .4rem .9rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .8rem 0; font-variant-numeric: tabular-nums; font-size: .9rem; }
th, td { padding: .3rem .6rem; border-bottom: 1px solid var(--line); white-space: nowrap; }
thead th { background: #eef1f6; border-bottom: 2px solid #b9c2cf; text-align: center; position: sticky; top: 0; }
th[data-col] { cursor: pointer; user-select: none; } th[data-col]:hover { background: #e0e6ef; }
th[aria-sort=ascending]::after { content: " ▲"; } th[aria-sort=descending]::after { content: " ▼"; }
td { text-align: right; } td.label { text-align: left; font-weight: 600; }
tbody:nth-of-type(even) tr { background: var(--band); }
tr.sub td { font-size: .85rem; color: var(--muted); border-bottom: none; } tr.sub td.label { font-weight: normal;
          font-style: italic; padding-left: 1.6rem; }
.sd, .n { color: var(--muted); } .ci, .note { color: var(--muted); font-size: .78rem; }
.ci { display: block; } .missing { color: #a3acb9; }  /* the interval under its mean keeps columns narrow */
figure { margin: 0; } .figures { display: flex; flex-wrap: wrap; gap: 1rem; }
.figures img { max-width: 640px; width: 100%; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: .85rem; max-width: 640px; }
details { margin: .6rem 0; } summary { cursor: pointer; color: #2b5797; }
a { color: #2b5797; }
"""

# Sorts the <tbody> groups of a table by the data-v of the clicked column in their first row (missing last).
SORT_SCRIPT = """
(function () {
  "use strict";
  function key(group, col) {
    var cell = group.rows[0].cells[col], v = cell ? cell.getAttribute("data-v") : null;
    if (v === null || v === "") return null;
    return isNaN(Number(v)) ? v.toLowerCase() : Number(v);
  }
  function sortBy(table, th) {
    var col = Number(th.getAttribute("data-col")), up = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("th[aria-sort]").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", up ? "ascending" : "descending");
    var groups = Array.prototype.slice.call(table.tBodies);
    groups.sort(function (a, b) {
      var x = key(a, col), y = key(b, col);
      if (x === null || y === null) return (x === null) - (y === null);
      return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
    });
    groups.forEach(function (g) { table.appendChild(g); });
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    table.querySelectorAll("th[data-col]").forEach(function (th) {
      th.tabIndex = 0;
      th.addEventListener("click", function () { sortBy(table, th); });
      th.addEventListener("keydown", function (e) { if (e.key === "Enter") sortBy(table, th); });
    });
    table.setAttribute("data-ready", "sortable");
  });
})();
"""


def render_page(table: Table, runs: RunSet, labels: pd.Series, figures: Mapping[str, Sequence[PageFigure]],
                page_dir: Path | None = None) -> str:
    """The page: caption, then per dataset its table, figures and run folders, then the notes and left-out runs."""
    datasets = list(dict.fromkeys(table.column_datasets))
    links = _Links(runs, page_dir)
    contents = " · ".join(f'<a href="#{escape(d)}">{escape(DATASETS.display_name(d))}</a>' for d in datasets)
    body = [f"<h1>ltbench report</h1>\n<p class=\"meta\">{escape(str(runs.results or ''))} · ltbench "
            f"{escape(ltbench.__version__)} · {contents}</p>", f'<p class="caption">{escape(table.caption)}</p>']
    for dataset in datasets:
        body.append(_section(table, dataset, runs, labels, figures.get(dataset, ()), links))
    if table.notes:
        body.append("<h2>Notes</h2>\n<ul class=\"notes\">" + "".join(f"<li>{escape(n)}</li>" for n in table.notes)
                    + "</ul>")
    if table.warnings or runs.incomplete:
        body.append(_left_out(table.warnings, runs, links))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>ltbench report: {escape(', '.join(datasets))}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + f"\n<script>{SORT_SCRIPT}</script>\n</body>\n</html>\n")


def _section(table: Table, dataset: str, runs: RunSet, labels: pd.Series, figures: Sequence[PageFigure],
             links: _Links) -> str:
    parts = [f'<section id="{escape(dataset)}">',
             f"<h2>{escape(DATASETS.display_name(dataset))} <small>{escape(dataset)}</small></h2>",
             f'<div class="scroll">{table_html(table, dataset)}</div>']
    shown = [f for f in figures if f.kind != "curves"]
    curves = [f for f in figures if f.kind == "curves"]
    if shown:
        parts.append('<div class="figures">' + "".join(_figure(f) for f in shown) + "</div>")
    if curves:
        parts.append(f"<details><summary>Training curves ({len(curves)} run(s))</summary><div class=\"figures\">"
                     + "".join(_figure(f) for f in curves) + "</div></details>")
    parts.append(_runs_table(runs, labels, dataset, links))
    return "\n".join(parts) + "\n</section>"


def table_html(table: Table, dataset: str | None = None) -> str:
    """The table's columns of ``dataset`` (all columns without it) as a sortable HTML table; rows with no number
    in those columns are left out."""
    keep = [i for i, d in enumerate(table.column_datasets or [""] * len(table.columns)) if dataset in (None, d)]
    head1, start = [], 0
    for label, width in table.groups:
        inside = [i for i in range(start, start + width) if i in keep]
        if inside:
            head1.append(f'<th colspan="{len(inside)}">{escape(label)}</th>')
        start += width
    head2 = "".join(f'<th data-col="{k + 1}">{escape(table.columns[i])}</th>' for k, i in enumerate(keep))
    bodies = []
    for group in _row_groups(table.rows):
        rows = [(label, [cells[i] for i in keep], kind) for label, cells, kind in group]
        rows = [r for r in rows if not all(c.missing for c in r[1])]
        if rows and rows[0][2] == group[0][2]:  # the run row itself has a number here
            bodies.append("<tbody>" + "".join(_row_html(*r) for r in rows) + "</tbody>")
    return (f'<table class="report sortable">\n<thead>\n<tr><th rowspan="2" data-col="0">method</th>{"".join(head1)}'
            f"</tr>\n<tr>{head2}</tr>\n</thead>\n" + "\n".join(bodies) + "\n</table>")


def _row_groups(rows: Sequence[tuple[str, list[Cell], str]]) -> list[list[tuple[str, list[Cell], str]]]:
    """Each run row with the ↳ rows that follow it."""
    groups: list[list[tuple[str, list[Cell], str]]] = []
    for row in rows:
        if row[2] == "run" or not groups:
            groups.append([row])
        else:
            groups[-1].append(row)
    return groups


def _row_html(label: str, cells: list[Cell], kind: str) -> str:
    css = "" if kind == "run" else ' class="sub"'
    tds = "".join(f'<td data-v="{escape(_sort_value(c))}">{_cell_html(c)}</td>' for c in cells)
    return f'<tr{css}><td class="label" data-v="{escape(label)}">{escape(label)}</td>{tds}</tr>'


def _sort_value(cell: Cell) -> str:
    try:
        return "" if cell.missing else str(float(cell.text))
    except ValueError:
        return ""


def _cell_html(cell: Cell) -> str:
    if cell.missing:
        return '<span class="missing">–</span>'
    text = escape(cell.text)
    parts = [f"<b>{text}</b>" if cell.bold else text]
    if cell.spread:
        parts.append(f'<span class="sd">± {escape(cell.spread)}</span>')
    if cell.interval:
        parts.append(f'<span class="ci">{escape(cell.interval)}</span>')
    for note in (cell.extra, f"({cell.mark})" if cell.mark else ""):
        if note:
            parts.append(f'<span class="note">{escape(note)}</span>')
    if cell.n is not None:
        parts.append(f'<span class="n">(n={cell.n})</span>')
    return " ".join(parts)


def _figure(figure: PageFigure) -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(figure.caption)}">'
            f"<figcaption>{escape(figure.caption)}</figcaption></figure>")


class _Links:
    """Where a run folder is, seen from the page: relative to the page's folder, else an absolute file URI."""

    def __init__(self, runs: RunSet, page_dir: Path | None) -> None:
        self.base = runs_dir(runs.results) if runs.results is not None else None
        self.page_dir = page_dir

    def anchor(self, run_id: str) -> str:
        folder_id = run_id.split("+")[0]  # a post-hoc row's run key: "<run id>+la<tau>"
        if self.base is None:
            return escape(run_id)
        folder = (self.base / folder_id).resolve()
        href = Path(os.path.relpath(folder, self.page_dir.resolve())).as_posix() if self.page_dir else folder.as_uri()
        return f'<a href="{escape(href)}/">{escape(run_id)}</a>'


def _runs_table(runs: RunSet, labels: pd.Series, dataset: str, links: _Links) -> str:
    frame = runs.frame[(runs.frame["dataset"] == dataset) & (runs.frame["head"] == "main")]
    frame = frame.drop_duplicates("run_id").sort_values(["run_id"])
    rows = []
    for run in frame.itertuples():
        flat = runs.flat_configs.get(run.run_id, {})
        rho = "" if pd.isna(run.rho) else f"{run.rho:g}"
        values = (labels.get(run.run_id, run.method), flat.get("preset", ""), flat.get("epochs", ""), rho, run.seed,
                  f"{run.top1:.2f}", run.epoch)
        tds = "".join(f'<td data-v="{escape(str(v))}">{escape(str(v))}</td>' for v in values)
        rows.append(f'<tbody><tr><td class="label" data-v="{escape(run.run_id)}">{links.anchor(run.run_id)}</td>{tds}'
                    f"</tr></tbody>")
    header = "".join(f'<th data-col="{i}">{name}</th>' for i, name in enumerate(
        ("run folder", "row", "preset", "epochs", "ρ", "seed", "top-1 (main)", "epoch")))
    return (f"<details><summary>Run folders ({len(rows)})</summary><table class=\"runs sortable\"><thead><tr>{header}"
            f"</tr></thead>" + "".join(rows) + "</table></details>")


def _left_out(warnings: Sequence[str], runs: RunSet, links: _Links) -> str:
    """The table's warnings, then each left-out run with a link to its folder."""
    items = [f"<p>{escape(w)}</p>" for w in warnings]
    items += [f"<li>{links.anchor(r['run_id'])}: {escape(str(r['method']))} on {escape(str(r['dataset']))}, seed "
              f"{escape(str(r['seed']))}: {escape(str(r['reason']))}</li>" for r in runs.incomplete]
    return "<h2>Left out</h2>\n<div class=\"warnings\">" + "".join(items[:len(warnings)]) + "<ul>" + \
        "".join(items[len(warnings):]) + "</ul></div>"
