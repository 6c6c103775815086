"""Figures from run folders (matplotlib, PNG and PDF), on the same rows and selection as the tables.

* ``per_class_<dataset>_rho<r>``: per-class test accuracy against the class's training images
  (log x, plain numbers), one line per table row (mean over seeds, with a band of ± one standard deviation
  where a row has several), which shows where each method gains: head or tail. Dotted lines mark the
  many / medium / few boundaries of the counts rule (> 100 / 20-100 / < 20 training images); the class names
  label the top axis where they fit.
* ``cls_dist_<row>_<dataset>_rho<r>``: for distilled runs, the CLS and DIST heads' per-class accuracy
  against training images; DeiT-LT's claim is that CLS is the head expert and DIST the tail expert.
* ``curves_<run id>``: a run's mean training loss per epoch and its test (and val) top-1 per evaluated epoch.

Titles and legends use display names (the ``display_name`` of the method and dataset classes). Every line has
its own line style and hollow marker, so identical curves stay visible. PDFs embed TrueType (Type 42) fonts, which
camera-ready checkers accept where they refuse matplotlib's default Type 3; the setting holds only while saving.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ltbench.data import FEW_BELOW, MANY_ABOVE, SHOT_GROUPS
from ltbench.html_page import PageFigure
from ltbench.records import RunRecord, runs_dir
from ltbench.registry import DATASETS, METHODS
from ltbench.report import label_rows, natural_key
from ltbench.runset import ReportOptions, RunSet, data_labels

# The counts rule's group boundaries (runset.SPLIT_TEXT["counts"]) and the regions they separate, head first.
GROUP_BOUNDARIES = (MANY_ABOVE, FEW_BELOW)
GROUP_NAMES = SHOT_GROUPS
# Dotted lines are the group boundaries, so the data lines use the other styles.
LINE_STYLES = ("-", "--", "-.", (0, (5, 1, 1, 1, 1, 1)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
HEAD_LABELS = {"main": "average (main)", "cls": "CLS head", "dist": "DIST head"}
HEAD_ORDER = ("cls", "dist", "main")
TRUETYPE = {"pdf.fonttype": 42, "ps.fonttype": 42}
MAX_NAMED_CLASSES = 20  # more class names than this do not fit along the axis


@dataclass
class Plot:
    """One figure and where it belongs: ``stem`` names its files, ``dataset`` its report section."""

    stem: str
    dataset: str
    kind: str  # per_class | cls_dist | curves
    figure: Any  # a matplotlib Figure


def write_plots(runs: RunSet, out_dir: Path, options: ReportOptions | None = None) -> list[Path]:
    """Write every figure for the finished runs in ``runs`` as PNG and PDF; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for plot in make_plots(runs, options):
        written += _save(plot.figure, out_dir / plot.stem)
    return written


def page_figures(runs: RunSet, options: ReportOptions | None = None) -> dict[str, list[PageFigure]]:
    """Every figure as PNG for the HTML page, by dataset (the page's sections)."""
    out: dict[str, list[PageFigure]] = {}
    for plot in make_plots(runs, options):
        axes = plot.figure.axes[0]
        caption = plot.figure.get_suptitle().replace("\n", " ") if plot.kind == "curves" else axes.get_title()
        out.setdefault(plot.dataset, []).append(PageFigure(plot.kind, caption, png_bytes(plot)))
    return out


def png_bytes(plot: Plot, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (for pages that embed it)."""
    buffer = io.BytesIO()
    plot.figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def make_plots(runs: RunSet, options: ReportOptions | None = None) -> list[Plot]:
    """The per-class figure of every table column, the CLS-vs-DIST figure of every distilled row and column, and
    the training curves of every run that logged them."""
    options = options or ReportOptions()
    frame = runs.frame.drop_duplicates("run_id").copy()
    if frame.empty:
        return []
    frame["row"] = frame["run_id"].map(label_rows(runs, options.by))
    plots: list[Plot] = []
    options_label = data_labels(frame)  # a dataset's options that differ between its runs, e.g. n_max=100
    for (dataset, rho, data), cell in frame.groupby(["dataset", frame["rho"].fillna(-1.0), "data"], sort=False):
        extra = options_label[dataset, data]
        suffix = f"{_slug(dataset)}" + (f"_rho{rho:g}" if rho >= 0 else "") + (f"_{_slug(extra)}" if extra else "")
        title = " ".join(part for part in (DATASETS.display_name(dataset), f"ρ={rho:g}" if rho >= 0 else "", extra)
                         if part)
        plots.append(Plot(f"per_class_{suffix}", dataset, "per_class", _per_class_figure(runs, cell, title)))
        for row, group in cell.groupby("row", sort=False):
            heads = runs.per_class[group["run_id"].iloc[0]]["heads"]
            if {"cls", "dist"} <= set(heads):
                figure = _heads_figure(runs, group, f"{_display_row(row, group['method'].iloc[0])} on {title}")
                plots.append(Plot(f"cls_dist_{_slug(row)}_{suffix}", dataset, "cls_dist", figure))
    for run in frame.itertuples():
        figure = _curves_figure(runs, run)
        if figure is not None:
            plots.append(Plot(f"curves_{_slug(run.run_id)}", run.dataset, "curves", figure))
    return plots


def _display_row(row: str, method: str) -> str:
    """A row label with the method's display name: "DeiT-LT (preset=tiny)" for "deitlt (preset=tiny)"."""
    return METHODS.display_name(method) + row[len(method):] if row.startswith(method) else row


def _mean_curve(runs: RunSet, run_ids: list[str], head: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Training counts, and the per-class accuracy's mean and standard deviation over the runs (seeds; the
    deviation is NaN for one run), sorted by count."""
    curves = [runs.per_class[r]["heads"].get(head) for r in run_ids]
    counts = runs.per_class[run_ids[0]]["class_counts"]
    if counts is None or any(c is None for c in curves):
        return None
    acc = np.array([[math.nan if v is None else v for v in c] for c in curves], dtype=float)
    mean = np.nanmean(acc, axis=0)
    std = np.nanstd(acc, axis=0, ddof=1) if len(curves) > 1 else np.full_like(mean, math.nan)
    order = np.argsort(-np.asarray(counts), kind="stable")
    return np.asarray(counts, dtype=float)[order], mean[order], std[order]


def _line_style(i: int, points: int = 0) -> dict[str, Any]:
    """The i-th curve's style; with many points (100 classes) a marker on every few of them only."""
    return {"linestyle": LINE_STYLES[i % len(LINE_STYLES)], "marker": MARKERS[i % len(MARKERS)], "markersize": 4,
            "markerfacecolor": "none", "linewidth": 1.2, "markevery": max(1, points // 12) if points > 25 else None}


def _per_class_figure(runs: RunSet, cell, title: str):
    figure, axes = _figure()
    banded = False
    for i, row in enumerate(sorted(cell["row"].unique(), key=natural_key)):
        members = cell.loc[cell["row"] == row]
        run_ids = list(members["run_id"])
        curve = _mean_curve(runs, run_ids, "main")
        if curve is not None:
            counts, mean, std = curve
            label = f"{_display_row(row, members['method'].iloc[0])} (n={len(run_ids)})"
            (line,) = axes.plot(counts, mean, label=label, **_line_style(i, len(counts)))
            if not np.isnan(std).all():
                axes.fill_between(counts, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
                banded = True
    first = runs.per_class[cell["run_id"].iloc[0]]
    _mark_groups(axes, first["class_counts"] or [])
    band = " (band: ± 1 std over seeds)" if banded else ""
    _decorate(axes, f"{title}: per-class test accuracy{band}")
    _name_classes(axes, first["class_counts"] or [], first.get("class_names"))  # after the log scale is set
    return figure


def _mark_groups(axes, counts: list[int]) -> None:
    """Dotted boundaries between many / medium / few, and each group's name at the top of its region."""
    if not counts:
        return
    low, high = min(counts), max(counts)
    for boundary in GROUP_BOUNDARIES:
        if low < boundary < high:
            axes.axvline(boundary, color="0.5", linestyle=":", linewidth=1)
    edges = (math.inf, GROUP_BOUNDARIES[0] + 0.5, GROUP_BOUNDARIES[1] - 0.5, 0)  # many > 100 >= medium >= 20 > few
    for name, upper, lower in zip(GROUP_NAMES, edges, edges[1:]):
        members = [c for c in counts if lower < c < upper]
        if members:  # the group's name centred over its classes
            axes.text(math.sqrt(min(members) * max(members)), 101, name, ha="center", va="bottom", fontsize=8,
                      color="0.4")


def _name_classes(axes, counts: list[int], names: list[str] | None) -> None:
    """The class names along the top axis, at their training counts, where they fit: few classes whose counts
    lie apart on the log axis (names are recorded in result.json since 2026-12)."""
    if not names or len(names) != len(counts) or not 1 < len(counts) <= MAX_NAMED_CLASSES:
        return
    ordered = sorted(zip(counts, names), reverse=True)
    logs = np.log10([c for c, _ in ordered])
    span = max(logs[0] - logs[-1], 1e-9)
    if np.min(-np.diff(logs)) < span / (2.5 * MAX_NAMED_CLASSES):  # equal or crowded counts: labels would overlap
        return
    top = axes.secondary_xaxis("top")
    top.set_xticks([c for c, _ in ordered], labels=[n for _, n in ordered], rotation=45, ha="left", fontsize=7)
    top.tick_params(which="minor", top=False, labeltop=False)


def _heads_figure(runs: RunSet, group, title: str):
    figure, axes = _figure()
    run_ids = list(group["run_id"])
    for i, head in enumerate(HEAD_ORDER):
        curve = _mean_curve(runs, run_ids, head)
        if curve is not None:
            axes.plot(*curve[:2], label=HEAD_LABELS[head], **_line_style(i, len(curve[0])))
    first = runs.per_class[run_ids[0]]
    _decorate(axes, f"{title}: CLS vs DIST head per class (mean over n={len(run_ids)})")
    _name_classes(axes, first["class_counts"] or [], first.get("class_names"))
    return figure


def _curves_figure(runs: RunSet, run):
    """Training loss and test / val top-1 per epoch from the run's metrics.jsonl, or None when it logged neither
    (a post-hoc row is no run folder: it has none)."""
    if runs.results is None or not (runs_dir(runs.results) / run.run_id).is_dir():
        return None
    rows = RunRecord(runs_dir(runs.results) / run.run_id).metrics()
    loss = [(r["epoch"], _number((r.get("train") or {}).get("loss"))) for r in rows if isinstance(r.get("train"), dict)]
    evaluated = [r for r in rows if isinstance(r.get("eval"), dict)]
    if not loss and not evaluated:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    figure = Figure(figsize=(7.2, 3.0), layout="constrained")
    loss_axes, acc_axes = figure.subplots(1, 2, sharex=True)
    if loss:
        loss_axes.plot(*zip(*loss), **_line_style(0, len(loss)))
    loss_axes.set(xlabel="epoch", ylabel="mean training loss")
    heads = sorted({h for r in evaluated for h in r["eval"]}, key=lambda h: (HEAD_ORDER + (h,)).index(h))
    series = [(f"test, {HEAD_LABELS.get(h, h)}", "eval", h) for h in heads] + [("val, main", "val", "main")]
    for i, (label, block, head) in enumerate(series):
        points = [(r["epoch"], _number(((r.get(block) or {}).get(head) or {}).get("top1"))) for r in rows
                  if isinstance(r.get(block), dict)]
        if points:
            acc_axes.plot(*zip(*points), label=label, **_line_style(i, len(points)))
    acc_axes.set(xlabel="epoch", ylabel="top-1 (%)")
    if acc_axes.lines:
        acc_axes.legend(fontsize=7)
    for axes in (loss_axes, acc_axes):
        axes.grid(True, alpha=0.3)
    dataset = DATASETS.display_name(run.dataset) + ("" if math.isnan(run.rho) else f" ρ={run.rho:g}")
    figure.suptitle(f"{_display_row(run.row, run.method)}\non {dataset}: run {run.run_id}, seed {run.seed}",
                    fontsize=9)
    return figure


def _number(value: Any) -> float:
    """A logged number, NaN for anything else (metrics.jsonl rows are checked for their epoch only)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _figure():
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    return figure, figure.subplots()


def _decorate(axes, title: str) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes.set_xscale("log")
    axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))  # 200, not 2×10²
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.invert_xaxis()  # head classes on the left, tail on the right, as LT papers draw it
    axes.set_xlabel("training images of the class (log scale)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_ylim(-2, 106)  # room for the group names above 100 %
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="major", alpha=0.3)
    # below the axes: inside, a legend hides curves or the group names whatever corner it takes
    axes.figure.legend(loc="outside lower center", ncols=2 if len(axes.lines) > 3 else 1, fontsize=8, frameon=False)


def _save(figure, stem: Path) -> list[Path]:
    from matplotlib import rc_context

    paths = [stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.pdf"]  # a stem may hold "." (rho0.5)
    with rc_context(TRUETYPE):  # only while saving: the caller's matplotlib settings stay as they were
        figure.savefig(paths[0], dpi=150)
        figure.savefig(paths[1])
    return paths


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")
