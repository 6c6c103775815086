"""The published numbers shipped with ltbench (``ltbench/reference/paper_numbers.csv``) and how a report cell is
matched with one: the method, the cell, the metric and split, and the conditions a source's recipe puts on the run's
config (``report --compare paper``; reproduction suites use the same conditions to pick their cells)."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ltbench.compare import mean_at
from ltbench.runset import ReportOptions, RunSet


def reference_numbers() -> pd.DataFrame:
    """The published numbers shipped with ltbench (``ltbench/reference/paper_numbers.csv``)."""
    from importlib.resources import files

    text = files("ltbench").joinpath("reference/paper_numbers.csv").read_text()
    data = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    text_columns = ("match", "split", "preset", "epochs", "selection", "eval_every")
    return pd.read_csv(io.StringIO(data), dtype=dict.fromkeys(text_columns, str), keep_default_na=False,
                       na_values={"rho": [""], "value": [""]})


def match_reference(ref: pd.DataFrame, method: str, dataset: str, rho: float, metric: str, split: str,
                    flat: Mapping[str, str]) -> pd.Series | None:
    """The most specific reference row whose method, cell, metric, split and conditions fit the run."""
    same_rho = ref["rho"].isna() if math.isnan(rho) else np.isclose(ref["rho"].fillna(-1), rho)
    rows = ref[(ref["method"] == method) & (ref["dataset"] == dataset) & same_rho & (ref["metric"] == metric)]
    if metric in ("many", "medium", "few"):
        rows = rows[rows["split"] == split]
    best, best_specificity = None, -1
    for _, row in rows.iterrows():
        conditions = [c for c in row["match"].split(";") if c.strip()]
        if all(condition_holds(c, flat) for c in conditions) and len(conditions) > best_specificity:
            best, best_specificity = row, len(conditions)
    return best


def condition_holds(condition: str, flat: Mapping[str, str]) -> bool:
    negate = "!=" in condition
    key, _, expected = condition.partition("!=" if negate else "=")
    actual = flat.get(key.strip())
    if actual is None:
        return False
    equal = _same(actual, expected.strip())
    return not equal if negate else equal


def _same(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b))
    except ValueError:
        return a.lower() == b.lower()


def add_reference(cells: pd.DataFrame, runs: RunSet, options: ReportOptions) -> pd.DataFrame:
    """Per cell: ``paper``, ``paper_source``, ``paper_label``; ``not_comparable`` (why, when the runs' recipe is not
    the source's); ``compared`` (the runs' mean at the source's epoch selection) and ``compared_at``; ``coarse_eval``
    (the runs' evaluation interval when coarser than the source's, else 0); ``delta`` = compared - paper."""
    ref = reference_numbers()
    out = cells.copy()
    facts = [_reference_facts(ref, cell, runs, options) for _, cell in cells.iterrows()]
    for key in ("paper", "paper_source", "paper_label", "not_comparable", "compared", "compared_at", "coarse_eval"):
        out[key] = [f[key] for f in facts]
    out["delta"] = [math.nan if f["not_comparable"] else f["compared"] - f["paper"] for f in facts]
    return out


def _reference_facts(ref: pd.DataFrame, cell: pd.Series, runs: RunSet, options: ReportOptions) -> dict[str, Any]:
    ids = cell["run_ids"].split(";")
    flat = runs.flat_configs[ids[0]]
    row = match_reference(ref, cell["method"], cell["dataset"], cell["rho"], cell["metric"], options.split, flat)
    if row is None:
        return {"paper": math.nan, "paper_source": "", "paper_label": "", "not_comparable": "",
                "compared": math.nan, "compared_at": options.select, "coarse_eval": 0}
    # a source that reports its best test epoch is compared with the runs' oracle, and says so
    at = "oracle" if row["selection"] == "best" else options.select
    compared = cell["mean"] if at == options.select else mean_at(runs, ids, "oracle", cell["head"], cell["metric"])
    intervals = [runs.selection.get(i, {}).get("eval_every") or 0 for i in ids]
    coarse = max(intervals) if row["eval_every"] and max(intervals) > int(row["eval_every"]) else 0
    return {"paper": float(row["value"]), "paper_source": f"{row['source']} [{row['tag']}]",
            "paper_label": row["label"], "not_comparable": _recipe_mismatch(row, flat), "compared": compared,
            "compared_at": at, "coarse_eval": coarse}


def _recipe_mismatch(row: pd.Series, flat: Mapping[str, str]) -> str:
    """"not comparable (preset tiny)" when the run's preset or epochs differ from the source's recipe, else ""."""
    reasons = []
    if row["preset"] and flat.get("preset") != row["preset"]:
        reasons.append(f"preset {flat.get('preset', '-')}")
    if row["epochs"] and not _same(flat.get("epochs", "-"), row["epochs"]):
        reasons.append(f"{flat.get('epochs', '-')} epochs, source {row['epochs']}")
    return f"not comparable ({', '.join(reasons)})" if reasons else ""


