"""Tables from run folders: load -> label rows -> aggregate over seeds -> one table -> Markdown/LaTeX/HTML/CSV/JSON.

The report reads only ``<results>/runs/*/{config,result}.json`` and ``DONE`` through :mod:`ltbench.records` (it
imports no training code, so run folders copied from a cluster can be reported anywhere). Rows are methods,
columns are dataset x rho with overall top-1 and many/medium/few. A cell is the mean over seeds
with the standard deviation (or standard error) and the seed count. Runs are grouped into one cell
only when their resolved configs are identical apart from the seed: when two configurations of a
method meet in one cell (other presets, epochs, versions, ...), the row label grows the keys that
differ, so different versions or settings are never averaged together. Incomplete runs (no
``DONE``) are excluded and counted in a footnote. Loading is :mod:`ltbench.runset`, rendering
:mod:`ltbench.render`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ltbench.compare import (
    add_intervals,
    baseline_row,
    baseline_rows,
    interval_text,
    oracle_rows,
    search_note,
    subset_cell,
    subset_facts,
    varies_subsets,
)
from ltbench.errors import UserError
from ltbench.html_page import FigureSource, render_page
from ltbench.paper_numbers import (  # noqa: F401 (condition_holds, match_reference: re-exported)
    add_reference,
    condition_holds,
    match_reference,
    reference_numbers,
)
from ltbench.render import Cell, Table, render_csv, render_json, render_latex, render_markdown
from ltbench.runset import (
    FORMATS,
    LOWER_IS_BETTER,
    METRIC_LABELS,
    METRICS,
    NOT_DISTINGUISHING,
    SELECT_TEXT,
    SPLIT_TEXT,
    ReportOptions,
    RunSet,
    choice,
    data_labels,
    load_runs,
)

# ----------------------------------------------------------------------------------------------
# Label rows: one experiment (config without the seed) per row and cell


def experiment_key(flat: Mapping[str, str]) -> str:
    payload = json.dumps({k: v for k, v in flat.items() if k not in NOT_DISTINGUISHING and
                          not k.startswith("upstream.")}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def label_rows(runs: RunSet, by: Sequence[str] = ()) -> pd.Series:
    """A row label per run: the method, plus ``key=value`` for ``by`` keys and for keys that differ
    between experiments that would otherwise share a cell."""
    frame = runs.frame.drop_duplicates("run_id").set_index("run_id")
    if frame.empty:
        return pd.Series(dtype=str)
    known = set().union(*(runs.flat_configs[rid] for rid in frame.index))
    unknown = [k for k in by if k not in known]
    if unknown:
        raise UserError(f"--by {unknown[0]}: no run in the table has that config key. Keys the runs have: "
                        f"{', '.join(sorted(known - NOT_DISTINGUISHING)[:30])}.")
    exp = pd.Series({rid: experiment_key(runs.flat_configs[rid]) for rid in frame.index})
    labels = {}
    for method, group in frame.groupby("method", sort=False):
        keys = list(by)
        for _, cell in group.groupby(["dataset", group["rho"].fillna(-1), "data"], sort=False):
            ids = list(cell.index)
            if exp[ids].nunique() > 1:
                keys += [k for k in differing_keys([runs.flat_configs[i] for i in ids]) if k not in keys]
        for rid in group.index:
            labels[rid] = _label(method, keys, runs.flat_configs[rid])
    return pd.Series(labels)


def differing_keys(configs: Sequence[Mapping[str, str]]) -> list[str]:
    keys = sorted(set().union(*configs) - NOT_DISTINGUISHING)
    keys = [k for k in keys if not k.startswith("upstream.")]
    differing = [k for k in keys if len({c.get(k, "-") for c in configs}) > 1]
    # Show what a reader recognises first: the preset, then versions, then the rest alphabetically.
    rank = {"preset": 0}
    return sorted(differing, key=lambda k: (rank.get(k, 2 if not k.startswith("versions.") else 1), k))


def _label(method: str, keys: Sequence[str], flat: Mapping[str, str]) -> str:
    if not keys:
        return method
    settings = ", ".join(f"{k}={flat.get(k, '-')}" for k in keys)
    return f"{method} ({settings})"


# ----------------------------------------------------------------------------------------------
# Aggregate


def aggregate(runs: RunSet, options: ReportOptions | None = None) -> pd.DataFrame:
    """One row per (row label, head, dataset, rho, metric): mean, std, se, n and the per-seed numbers."""
    options = options or ReportOptions()
    frame = runs.frame.copy()
    if frame.empty:
        return pd.DataFrame(columns=_CELL_COLUMNS)
    frame["row"] = frame["run_id"].map(label_rows(runs, options.by))
    frame["experiment"] = frame["run_id"].map(lambda rid: experiment_key(runs.flat_configs[rid]))
    if not options.heads:
        frame = frame[frame["head"] == "main"]
    ids = ["row", "experiment", "method", "head", "dataset", "rho", "data", "seed", "subsample_seed", "run_id"]
    long = frame.melt(id_vars=ids,
                      value_vars=list(options.metrics), var_name="metric")
    cells = []
    keys = ["row", "head", "dataset", "rho", "data", "metric"]
    for key, group in long.sort_values(["seed", "run_id"]).groupby(keys, sort=False, dropna=False):
        if group["experiment"].nunique() != 1:  # label_rows makes this impossible; never average across configs
            raise AssertionError(f"cell {key} mixes configurations")
        cells.append(_cell_stats(dict(zip(keys, key)), group))
    out = pd.DataFrame(cells, columns=_CELL_COLUMNS)
    return out.sort_values(["dataset", "rho", "data", "row", "head", "metric"], key=_sort_key,
                           ignore_index=True)


_CELL_COLUMNS = ["row", "method", "head", "dataset", "rho", "data", "metric", "mean", "std", "se", "n", "seeds",
                 "values", "run_ids", "experiment", "subsample_seeds", "subset_std"]


def _cell_stats(key: dict[str, Any], group: pd.DataFrame) -> dict[str, Any]:
    values = group["value"].to_numpy(dtype=float)
    present = values[~np.isnan(values)]
    n = len(group)
    std = float(np.std(present, ddof=1)) if len(present) > 1 else math.nan
    return {**key, "method": group["method"].iloc[0], "mean": float(present.mean()) if len(present) else math.nan,
            "std": std, "se": std / math.sqrt(len(present)) if len(present) > 1 else math.nan, "n": n,
            "seeds": ";".join(str(s) for s in group["seed"]), "values": ";".join(_num_text(v) for v in values),
            "run_ids": ";".join(group["run_id"]), "experiment": group["experiment"].iloc[0], **subset_facts(group)}


def _num_text(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.10g}"


def _sort_key(column: pd.Series) -> pd.Series:
    if column.name == "metric":
        return column.map({m: i for i, m in enumerate(METRICS)})
    if column.name == "rho":
        return -column.fillna(-1.0)  # harder imbalance first, as in LT papers
    if column.name == "head":
        return column.map(lambda h: (h != "main", h))
    return column.map(natural_key)


def natural_key(text: Any) -> tuple:
    """``cifar10lt`` before ``cifar100lt``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(text)))


# ----------------------------------------------------------------------------------------------
# One table


def build_table(cells: pd.DataFrame, runs: RunSet, options: ReportOptions) -> Table:
    """Rows = methods (x heads), columns = dataset x rho x metric; bold = best per column."""
    if cells.empty:
        raise UserError("No finished runs match: nothing to tabulate" + _incomplete_hint(runs) + ".")
    columns = _table_columns(cells)
    row_keys = sorted({(r, h) for r, h in zip(cells["row"], cells["head"])},
                      key=lambda k: (natural_key(k[0]), k[1] != "main", k[1]))
    lookup = {(c.row, c.head, c.dataset, _rho_key(c.rho), c.data, c.metric): c for c in cells.itertuples()}
    usual_n = int(cells["n"].mode().max())
    multi_head = {r for r, h in row_keys if h != "main"}
    base = baseline_row(cells, options.baseline) if options.baseline else None
    rows = []
    for row, head in row_keys:
        label = (f"{row} [{head}]" if row in multi_head else row) + (" (oracle)" if options.select == "oracle" else "")
        subsets = [lookup.get((row, head, ds, rk, data, "top1")) for ds, rk, data, _ in columns]
        found = [lookup.get((row, head, *column)) for column in columns]  # None in the subset-spread columns
        rows.append((label, [subset_cell(t, options.digits) if m == "subsets" else _cell(c, options, usual_n)
                             for c, t, (*_, m) in zip(found, subsets, columns)], "run"))
        if options.select == "oracle":
            rows += oracle_rows(found, runs, options.digits)
        if base is not None and row != base:
            rows += baseline_rows(found, [lookup.get((base, head, *column)) for column in columns], runs, base)
        if options.compare and head == "main":  # published numbers are for the reported (main) head
            rows += _reference_rows(found, options)
    _bold_best(rows, [m for *_, m in columns], options.digits)
    groups = _groups(columns, data_labels(cells))
    caption = _caption(options, usual_n, cells, _settings_text(cells, runs, data_labels(cells)))
    return Table(caption, groups, [METRIC_LABELS[m] for *_, m in columns], rows,
                 _notes(runs, cells, options), _excluded_note(runs), [ds for ds, *_ in columns])


def _rho_key(rho: float) -> float:
    return -1.0 if rho is None or (isinstance(rho, float) and math.isnan(rho)) else float(rho)


def _table_columns(cells: pd.DataFrame) -> list[tuple[str, float, str, str]]:
    """(dataset, rho key, data key, metric) per column: datasets in natural order, harder imbalance first."""
    combos = cells[["dataset", "rho", "data"]].drop_duplicates()
    combos = combos.assign(rk=combos["rho"].map(_rho_key)).sort_values(
        ["dataset", "rk", "data"], key=lambda col: -col if col.name == "rk" else col.map(natural_key))
    metrics = [m for m in METRICS if m in set(cells["metric"])]
    columns = []
    for ds, rho, rk, data in zip(combos["dataset"], combos["rho"], combos["rk"], combos["data"]):
        columns += [(ds, rk, data, m) for m in metrics]
        if "top1" in metrics and varies_subsets(cells, {"dataset": ds, "rho": rho, "data": data}):
            columns.append((ds, rk, data, "subsets"))  # the CIFAR-LT subset seed's own spread
    return columns


def _groups(columns: list[tuple[str, float, str, str]], labels: Mapping[tuple[str, str], str]) -> list[tuple[str, int]]:
    groups: list[tuple[str, int]] = []
    for ds, rk, data, _ in columns:
        label = _column_label(ds, rk, labels[ds, data])
        if groups and groups[-1][0] == label:
            groups[-1] = (label, groups[-1][1] + 1)
        else:
            groups.append((label, 1))
    return groups


def _column_label(dataset: str, rho_key: float, data_label: str) -> str:
    return " ".join(part for part in (dataset, "" if rho_key < 0 else f"ρ={rho_key:g}", data_label) if part)


def _settings_text(cells: pd.DataFrame, runs: RunSet, labels: Mapping[tuple[str, str], str]) -> str:
    """For each row whose columns ran another preset or number of epochs: which column ran what. (A row label names
    only the keys that differ inside one cell, so a row can hide that its columns ran different recipes.)"""
    parts = []
    for row, group in cells.groupby("row", sort=False):
        settings: dict[str, list[str]] = {}
        for cell in group.drop_duplicates(["dataset", "rho", "data"]).itertuples():
            flat = runs.flat_configs[cell.run_ids.split(";")[0]]
            setting = f"preset {flat.get('preset', '-')}, {flat.get('epochs', '-')} epochs"
            column = _column_label(cell.dataset, _rho_key(cell.rho), labels[cell.dataset, cell.data])
            settings.setdefault(setting, []).append(column)
        if len(settings) > 1:
            parts.append(f"{row}: " + "; ".join(f"{s} in {', '.join(c)}" for s, c in settings.items()))
    return f"Columns ran different settings: {' | '.join(parts)}. " if parts else ""


def _cell(cell: Any, options: ReportOptions, usual_n: int) -> Cell:
    if cell is None:
        return Cell("", missing=True)
    if math.isnan(cell.mean):
        return Cell("n/a")
    spread = cell.std if options.spread == "std" else cell.se
    return Cell(f"{cell.mean:.{options.digits}f}", "" if math.isnan(spread) else f"{spread:.{options.digits}f}",
                n=cell.n if cell.n != usual_n else None, interval=interval_text(cell, options.digits))


def _reference_rows(found: list[Any], options: ReportOptions) -> list[tuple[str, list[Cell], str]]:
    """"↳ oracle" (when a source reports its best test epoch and the table shows another rule), "↳ paper", "↳ Δ"."""
    compared, paper, delta = [], [], []
    for c in found:
        if c is None or math.isnan(c.paper):
            compared.append(Cell("", missing=True))
            paper.append(Cell("", missing=True))
            delta.append(Cell("", missing=True))
            continue
        at_best = c.compared_at != options.select and not c.not_comparable
        compared.append(Cell(_num(c.compared, options.digits)) if at_best else Cell("", missing=True))
        paper.append(Cell(c.not_comparable) if c.not_comparable else Cell(f"{c.paper:.{options.digits}f}"))
        coarse = f" (coarse eval, every {c.coarse_eval})" if c.coarse_eval else ""
        delta.append(Cell("", missing=True) if c.not_comparable else
                     Cell("n/a") if math.isnan(c.delta) else Cell(f"{c.delta:+.{options.digits}f}{coarse}"))
    if all(c.missing for c in paper):
        return []
    best = [] if all(c.missing for c in compared) else [("↳ oracle (best test epoch)", compared, "oracle")]
    deltas = [] if all(c.missing for c in delta) else [("↳ Δ vs paper", delta, "delta")]  # none comparable
    return [*best, ("↳ paper", paper, "paper"), *deltas]


def _num(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _bold_best(rows: list[tuple[str, list[Cell], str]], metrics: list[str], digits: int) -> None:
    run_rows = [cells for _, cells, kind in rows if kind == "run"]
    for j, metric in enumerate(metrics):
        if metric == "subsets":
            continue
        numbers = [(float(cells[j].text), cells[j]) for cells in run_rows
                   if not cells[j].missing and cells[j].text != "n/a"]
        if len(numbers) < 2:
            continue
        best = round((min if metric in LOWER_IS_BETTER else max)(v for v, _ in numbers), digits)
        if all(round(value, digits) == best for value, _ in numbers):
            continue  # a column of ties has no best
        for value, cell in numbers:
            cell.bold = round(value, digits) == best


def _caption(options: ReportOptions, usual_n: int, cells: pd.DataFrame, settings: str = "") -> str:
    spread = "standard deviation" if options.spread == "std" else "standard error"
    marked = " unless marked (n=k)" if (cells["n"] != usual_n).any() else ""
    metric_text = "Accuracy (%)" if set(options.metrics) - {"ece"} else "Expected calibration error (%)"
    units = "runs (seeds × CIFAR-LT subset seeds; σ subsets: the std over subset seeds of their means)" if \
        cells["subsample_seeds"].str.contains(";").any() else "seeds"
    over = f"mean ± {spread} over {usual_n} {units}{marked}" if usual_n > 1 else f"one seed{marked} (no spread)"
    text = f"{metric_text} on the balanced test set at {SELECT_TEXT[options.select]}: {over}. "
    if set(options.metrics) & {"many", "medium", "few"}:
        text += SPLIT_TEXT[options.split] + ". "
    if "ece" in options.metrics:
        text += "ECE: 15 equal-width confidence bins, lower is better. "
    if options.ci and "ci_over" in cells:
        over_images = (cells["ci_over"] != "seeds").all()
        text += ("[a, b]: 95 % bootstrap interval of the mean over seeds and test images (stratified by class; "
                 "docs/protocol.md). " if over_images else "[a, b]: 95 % bootstrap interval of the mean over seeds; "
                 "over test images too (stratified by class) only for runs that recorded per-class test counts "
                 "(docs/protocol.md). ")
    if options.baseline:
        text += (f"↳ Δ vs {options.baseline}: mean paired difference over the seeds both rows ran, its 95 % "
                 f"bootstrap interval, and P(better) = the probability that a run beats a baseline run; n.s.: the "
                 f"interval contains 0 (not significant). ")
    if options.select == "oracle":
        text += "Oracle rows select on the test set; ↳ final and the gap show what that selection adds. "
    text += settings + "Bold: best per column; –: no finished run; n/a: the group has no class."
    return text


def _excluded_note(runs: RunSet) -> list[str]:
    if not runs.incomplete:
        return []
    by_cell: dict[str, list[str]] = {}
    for run in runs.incomplete:
        rho = "" if math.isnan(run["rho"]) else f" ρ={run['rho']:g}"
        by_cell.setdefault(f"{run['method']} / {run['dataset']}{rho}", []).append(
            f"seed {run['seed']}: {run['reason']}")
    ordered = sorted(by_cell.items(), key=lambda kv: natural_key(kv[0]))
    detail = "; ".join(f"{k} ({', '.join(v)})" for k, v in ordered)
    return [f"Excluded {len(runs.incomplete)} incomplete run(s): {detail}."]


def _notes(runs: RunSet, cells: pd.DataFrame, options: ReportOptions) -> list[str]:
    notes = []
    if runs.search:
        notes.append(search_note(runs.search))
    if any(flat.get("data.eval_split") == "val" for flat in runs.flat_configs.values()):
        listed = sorted({rid.split("+")[0] for rid, flat in runs.flat_configs.items()
                         if flat.get("data.eval_split") == "val"})
        notes.append(f"'Test' is the official val list for {len(listed)} run(s) (data.eval_split=val; iNaturalist-2018 "
                     f"has no labelled test set, so its papers report on val).")
    if options.compare:
        sources = sorted({s for s in cells.get("paper_source", pd.Series(dtype=str)) if s})
        if sources:
            notes.append("Paper numbers: " + "; ".join(sources) + ". " + _comparison_note(cells, options))
    return notes


def _comparison_note(cells: pd.DataFrame, options: ReportOptions) -> str:
    """How Δ compares like with like (paper_numbers.csv records each source's recipe and epoch selection)."""
    text = ("Δ compares runs of the source's recipe only (its ltbench preset and epochs; others are not "
            "comparable), at the source's epoch selection: ")
    text += ("a paper's best-epoch number is compared with ltbench's oracle (each run's best test epoch, ↳ oracle), "
             "other numbers with the epoch this table shows." if options.select != "oracle" else
             "ltbench's oracle (each run's best test epoch), as the papers select.")
    coarse = cells.loc[cells["coarse_eval"] > 0] if "coarse_eval" in cells else cells.iloc[0:0]
    if not coarse.empty:
        text += (" Coarse eval: the run evaluated only every N epochs, the source every epoch, so its best epoch "
                 "may be missed and Δ errs low.")
    return text


def _incomplete_hint(runs: RunSet) -> str:
    if not runs.incomplete:
        return ""
    return f" ({len(runs.incomplete)} run(s) left out: " + "; ".join(r["reason"] for r in runs.incomplete) + ")"


# ----------------------------------------------------------------------------------------------
# The whole pipeline


def report(results: Path, fmt: str = "markdown", options: ReportOptions | None = None, *,
           figures: FigureSource | None = None, page_dir: Path | None = None) -> str:
    """Load the run folders under ``results`` and render the table in ``fmt``. HTML only: ``figures`` draws the
    figures the page embeds (``ltbench.plots.page_figures``; none without it), and links to the run folders are
    relative to ``page_dir``, the folder the page is written to (absolute file URIs without it)."""
    options = options or ReportOptions()
    choice("--format", fmt, FORMATS)
    runs = load_runs(results, options)
    cells = aggregate(runs, options)
    if options.ci and not cells.empty:
        cells = add_intervals(cells, runs, options)
    if options.compare and not cells.empty:
        cells = add_reference(cells, runs, options)
    if fmt == "csv":
        return render_csv(cells)
    table = build_table(cells, runs, options)
    if fmt == "json":
        return render_json(table, cells, runs, options)
    if fmt == "latex":
        return render_latex(table, standalone=options.standalone)
    if fmt == "html":
        return render_page(table, runs, label_rows(runs, options.by), figures(runs, options) if figures else {},
                           page_dir)
    return render_markdown(table)

