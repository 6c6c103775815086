"""Figures from run folders (matplotlib, PNG and PDF), on the same rows and selection as the tables.

* ``per_class_<dataset>_rho<r>``: per-class test accuracy against the class's training images
  (log x, plain numbers), one line per table row (mean over seeds, with a band of ± one standard deviation
  when there are several), which shows where each method gains: head or tail. Dotted lines mark the
  many / medium / few boundaries of the counts rule (> 100 / 20-100 / < 20 training images).
* ``cls_dist_<row>_<dataset>_rho<r>``: for distilled runs, the CLS and DIST heads' per-class accuracy
  against training images; DeiT-LT's claim is that CLS is the head expert and DIST the tail expert.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ltbench.data import FEW_BELOW, MANY_ABOVE, SHOT_GROUPS
from ltbench.report import label_rows, natural_key
from ltbench.runset import ReportOptions, RunSet, data_labels

# The counts rule's group boundaries (runset.SPLIT_TEXT["counts"]) and the regions they separate, head first.
GROUP_BOUNDARIES = (MANY_ABOVE, FEW_BELOW)
GROUP_NAMES = SHOT_GROUPS
HEAD_STYLE = {"main": ("average (main)", "--", "0.4"), "cls": ("CLS head", "-", "tab:blue"),
              "dist": ("DIST head", "-", "tab:orange")}


def write_plots(runs: RunSet, out_dir: Path, options: ReportOptions | None = None) -> list[Path]:
    """Write every figure for the finished runs in ``runs``; returns the files written."""
    options = options or ReportOptions()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = runs.frame.drop_duplicates("run_id").copy()
    if frame.empty:
        return []
    frame["row"] = frame["run_id"].map(label_rows(runs, options.by))
    written: list[Path] = []
    options_label = data_labels(frame)  # a dataset's options that differ between its runs, e.g. n_max=100
    for (dataset, rho, data), cell in frame.groupby(["dataset", frame["rho"].fillna(-1.0), "data"], sort=False):
        extra = options_label[dataset, data]
        suffix = f"{_slug(dataset)}" + (f"_rho{rho:g}" if rho >= 0 else "") + (f"_{_slug(extra)}" if extra else "")
        title = " ".join(part for part in (dataset, f"ρ={rho:g}" if rho >= 0 else "", extra) if part)
        written += _save(_per_class_figure(runs, cell, title), out_dir / f"per_class_{suffix}")
        for row, group in cell.groupby("row", sort=False):
            heads = runs.per_class[group["run_id"].iloc[0]]["heads"]
            if {"cls", "dist"} <= set(heads):
                figure = _heads_figure(runs, group, f"{row}: {title}")
                written += _save(figure, out_dir / f"cls_dist_{_slug(row)}_{suffix}")
    return written


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


def _per_class_figure(runs: RunSet, cell, title: str):
    figure, axes = _figure()
    for row in sorted(cell["row"].unique(), key=natural_key):
        run_ids = list(cell.loc[cell["row"] == row, "run_id"])
        curve = _mean_curve(runs, run_ids, "main")
        if curve is not None:
            counts, mean, std = curve
            (line,) = axes.plot(counts, mean, marker="o", markersize=3, linewidth=1.2,
                                label=f"{row} (n={len(run_ids)})")
            if not np.isnan(std).all():
                axes.fill_between(counts, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    _mark_groups(axes, runs.per_class[cell["run_id"].iloc[0]]["class_counts"] or [])
    _decorate(axes, f"{title}: per-class accuracy (band: ± 1 std over seeds)")
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


def _heads_figure(runs: RunSet, group, title: str):
    figure, axes = _figure()
    run_ids = list(group["run_id"])
    for head in ("cls", "dist", "main"):
        curve = _mean_curve(runs, run_ids, head)
        if curve is not None:
            label, style, color = HEAD_STYLE[head]
            axes.plot(*curve[:2], linestyle=style, color=color, marker="o", markersize=3, linewidth=1.2, label=label)
    _decorate(axes, f"{title} (n={len(run_ids)})")
    return figure


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
    axes.legend(fontsize=8)


def _save(figure, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    figure.savefig(paths[0], dpi=150)
    figure.savefig(paths[1])
    return paths


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")
