"""Uncertainty and comparisons in the report's cells: 95 % intervals, paired differences against a baseline row,
the CIFAR-LT subset seed's own spread, and the oracle-versus-final gap. The statistics are :mod:`ltbench.stats`';
this module finds, per aggregated cell, the runs and numbers they need, and turns the answers into table rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ltbench.data import shot_groups
from ltbench.errors import UserError
from ltbench.render import Cell
from ltbench.runset import LOWER_IS_BETTER, ReportOptions, RunSet
from ltbench.stats import RunClasses, cell_interval, paired_difference, seed_interval

Row = tuple[str, list[Cell], str]


# ----------------------------------------------------------------------------------------------
# Intervals


def add_intervals(cells: pd.DataFrame, runs: RunSet, options: ReportOptions) -> pd.DataFrame:
    """``ci_low`` / ``ci_high`` per cell and ``ci_over`` (what was resampled): seeds and test images by class where
    every run recorded its per-class accuracies and test counts (and the metric is an accuracy under the counts
    split), else seeds only."""
    out = cells.copy()
    found = [_interval(cell, runs, options) for cell in cells.itertuples()]
    out["ci_low"], out["ci_high"], out["ci_over"] = ([f[k] for f in found] for k in range(3))
    return out


def _interval(cell: Any, runs: RunSet, options: ReportOptions) -> tuple[float, float, str]:
    ids = cell.run_ids.split(";")
    classes = _class_runs(ids, cell.head, runs)
    if classes is not None and cell.metric != "ece" and (cell.metric == "top1" or options.split == "counts"):
        members = None if cell.metric == "top1" else shot_groups(classes[1])[cell.metric]
        low, high = cell_interval(classes[0], members)
        return low, high, "seeds and test images (by class)"
    low, high = seed_interval([float(v) for v in cell.values.split(";")])
    return low, high, "seeds"


def _class_runs(ids: Sequence[str], head: str, runs: RunSet) -> tuple[list[RunClasses], list[int]] | None:
    """Each run's per-class accuracy and test counts, and the training counts, when every run of the cell has them."""
    found, train = [], None
    for rid in ids:
        facts = runs.per_class.get(rid) or {}
        accuracy, counts = (facts.get("heads") or {}).get(head), facts.get("test_counts")
        if accuracy is None or counts is None or len(accuracy) != len(counts):
            return None
        found.append(RunClasses(np.array([math.nan if a is None else a for a in accuracy], dtype=float),
                                np.asarray(counts, dtype=np.int64)))
        train = facts.get("class_counts")
    return (found, list(train)) if train else None


def interval_text(cell: Any, digits: int) -> str:
    if not hasattr(cell, "ci_low") or math.isnan(cell.ci_low):
        return ""
    return f"[{cell.ci_low:.{digits}f}, {cell.ci_high:.{digits}f}]"


# ----------------------------------------------------------------------------------------------
# Paired comparisons against a baseline row


def baseline_row(cells: pd.DataFrame, baseline: str) -> str:
    """The row label ``--baseline`` names: a label, or a method with exactly one row."""
    labels = list(dict.fromkeys(cells["row"]))
    if baseline in labels:
        return baseline
    of_method = list(dict.fromkeys(cells.loc[cells["method"] == baseline, "row"]))
    if len(of_method) == 1:
        return of_method[0]
    if of_method:
        raise UserError(f"--baseline {baseline} matches {len(of_method)} rows ({'; '.join(of_method)}); give one of "
                        f"these labels exactly.")
    raise UserError(f"--baseline {baseline!r} is no row of this table; rows: {'; '.join(labels)}.")


def paired_cell(cell: Any, base: Any, runs: RunSet) -> tuple[Cell, str]:
    """The Δ cell of ``cell`` against the baseline's cell of the same column, paired by (seed, subset seed)."""
    if base is None or math.isnan(cell.mean):
        return Cell("", missing=True), ""
    mine, theirs = _by_pair(cell, runs), _by_pair(base, runs)
    pairs = sorted(set(mine) & set(theirs))
    if not pairs:
        return Cell("no common seed"), ""
    paired = paired_difference([mine[p] for p in pairs], [theirs[p] for p in pairs],
                               lower_is_better=cell.metric in LOWER_IS_BETTER)
    interval = "" if math.isnan(paired.low) else f"[{paired.low:+.2f}, {paired.high:+.2f}]"
    mark = "" if paired.significant else "n.s."
    return Cell(f"{paired.mean:+.2f}", interval=interval, mark=mark, extra=f"P(better)={paired.p_improve:.2f}",
                n=paired.n), mark


def _by_pair(cell: Any, runs: RunSet) -> dict[tuple[int, int], float]:
    """(seed, subset seed) -> the cell's value in that run."""
    frame = runs.frame.set_index("run_id")
    out = {}
    for rid, value in zip(cell.run_ids.split(";"), cell.values.split(";")):
        row = frame.loc[rid]
        row = row.iloc[0] if isinstance(row, pd.DataFrame) else row
        if not math.isnan(float(value)):
            out[int(row["seed"]), int(row["subsample_seed"])] = float(value)
    return out


def baseline_rows(found: list[Any], base_found: list[Any], runs: RunSet, baseline: str) -> list[Row]:
    cells = [paired_cell(c, b, runs)[0] if c is not None else Cell("", missing=True)
             for c, b in zip(found, base_found)]
    return [] if all(c.missing for c in cells) else [(f"↳ Δ vs {baseline} (paired)", cells, "paired")]


# ----------------------------------------------------------------------------------------------
# The oracle beside final


def oracle_rows(found: list[Any], runs: RunSet, digits: int) -> list[Row]:
    """Under ``--select oracle``: each cell's mean at the final epoch, and the gap oracle - final."""
    final, gap = [], []
    for c in found:
        value = math.nan if c is None else mean_at(runs, c.run_ids.split(";"), "final", c.head, c.metric)
        if c is None or math.isnan(value):
            final.append(Cell("", missing=True))
            gap.append(Cell("", missing=True))
            continue
        final.append(Cell(f"{value:.{digits}f}"))
        gap.append(Cell(f"{c.mean - value:+.{digits}f}"))
    return [("↳ final", final, "final"), ("↳ gap oracle - final", gap, "gap")]


def mean_at(runs: RunSet, run_ids: Sequence[str], rule: str, head: str, metric: str) -> float:
    values = [runs.selection.get(i, {}).get(rule, {}).get(head, {}).get(metric, math.nan) for i in run_ids]
    present = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(present)) if present else math.nan


# ----------------------------------------------------------------------------------------------
# The subset seed's own spread


def subset_facts(group: pd.DataFrame) -> dict[str, Any]:
    """The subset seeds of a cell and the std of its per-subset means (NaN with one subset)."""
    subsets = sorted(set(group["subsample_seed"].astype(int)))
    means = group.groupby("subsample_seed")["value"].mean().to_numpy(dtype=float)
    spread = float(np.std(means, ddof=1)) if len(means) > 1 else math.nan
    return {"subsample_seeds": ";".join(map(str, subsets)), "subset_std": spread}


def subset_cell(cell: Any, digits: int) -> Cell:
    if cell is None or math.isnan(cell.subset_std):
        return Cell("", missing=True)
    return Cell(f"{cell.subset_std:.{digits}f}", n=len(cell.subsample_seeds.split(";")))


def varies_subsets(cells: pd.DataFrame, keys: Mapping[str, Any]) -> bool:
    """Whether the cells of one dataset column group pool more than one subset seed."""
    mask = np.ones(len(cells), dtype=bool)
    for key, value in keys.items():
        nan = isinstance(value, float) and math.isnan(value)
        mask &= (cells[key].isna() if nan else cells[key] == value).to_numpy()
    return bool(cells.loc[mask, "subsample_seeds"].str.contains(";").any())


# ----------------------------------------------------------------------------------------------
# Search trials, listed apart


def search_note(trials: Sequence[Mapping[str, Any]]) -> str:
    """The trials of `ltbench tune` searches: what they scored on val, kept out of the cells."""
    ordered = sorted(trials, key=lambda t: (t["tune_id"], -(t["objective"] if t["objective"] is not None
                                                             else -math.inf)))
    listed = "; ".join(f"{t['run_id']} {params_text(t['params'])}: {t['objective_name']} "
                       f"{'n/a' if t['objective'] is None else format(t['objective'], '.2f')} ({t['status']})"
                       for t in ordered)
    tunes = ", ".join(sorted({t["tune_id"] for t in trials}))
    return (f"Search trials of tune {tunes}, listed apart (not in the cells; scored on val, their test numbers "
            f"unused): {listed}.")


def params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
