"""Tables from run folders: load -> label rows -> aggregate over seeds -> one table -> Markdown/LaTeX/HTML/CSV/JSON.

The report reads only ``<results>/runs/*/{config,result}.json`` and ``DONE`` (it imports no
training code, so run folders copied from a cluster can be reported anywhere). Rows are methods,
columns are dataset x rho with overall top-1 and many/medium/few. A cell is the mean over seeds
with the standard deviation (or standard error) and the seed count. Runs are grouped into one cell
only when their resolved configs are identical apart from the seed: when two configurations of a
method meet in one cell (other presets, epochs, versions, ...), the row label grows the keys that
differ, so different versions or settings are never averaged together. Incomplete runs (no
``DONE``) are excluded and counted in a footnote.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ltbench.config import RUNTIME_OPTIONS
from ltbench.errors import UserError
from ltbench.records import LOCK, TMP_SUFFIX, config_problem

METRICS = ("top1", "many", "medium", "few", "ece")
DEFAULT_METRICS = ("top1", "many", "medium", "few")
LOWER_IS_BETTER = frozenset({"ece"})
METRIC_LABELS = {"top1": "top-1", "many": "many", "medium": "medium", "few": "few", "ece": "ECE"}
SPLIT_TEXT = {
    "counts": "many / medium / few = classes with > 100 / 20-100 / < 20 training images",
    "paper": "many / medium / few = DeiT-LT's class-index ranges (head / mid / tail)",
}
SELECT_TEXT = {"final": "the final epoch (no selection on the test set; papers often report their best test epoch)",
               "best": "the best test epoch of each run (optimistic)"}
FORMATS = ("markdown", "latex", "csv", "json", "html")
# Config keys never used to tell experiments apart: the seed is what a cell averages over, the
# others are the cell's coordinates or do not change numbers.
_NOT_DISTINGUISHING = {"seed", "method", "dataset", "data.rho", *RUNTIME_OPTIONS}


@dataclass(frozen=True)
class ReportOptions:
    select: str = "final"  # final | best: which epoch's block of result.json
    split: str = "counts"  # counts | paper: which many/medium/few rule
    metrics: tuple[str, ...] = DEFAULT_METRICS
    heads: bool = False  # one row per head (main / cls / dist ...) instead of the main head only
    by: tuple[str, ...] = ()  # extra config keys that split rows (preset, teacher, epochs, data.KEY, ...)
    spread: str = "std"  # std | se
    digits: int = 2
    compare: str | None = None  # "paper": add the reference numbers and the difference
    methods: tuple[str, ...] = ()  # keep only these methods (empty = all)
    datasets: tuple[str, ...] = ()
    standalone: bool = False  # LaTeX: a compilable document instead of a table to paste
    adjust: float | None = None  # also rows of post-hoc logit adjustment at this tau (posthoc_la.json)

    def __post_init__(self) -> None:
        _choice("--select", self.select, ("final", "best"))
        _choice("--split", self.split, ("counts", "paper"))
        _choice("--spread", self.spread, ("std", "se"))
        for metric in self.metrics:
            _choice("--metric", metric, METRICS)
        if self.compare is not None:
            _choice("--compare", self.compare, ("paper",))
        valid_tau = self.adjust is None or (math.isfinite(self.adjust) and self.adjust >= 0)
        if self.adjust is not None and (self.select != "final" or not valid_tau):
            raise UserError("--adjust TAU needs tau >= 0 and --select final: post-hoc adjustment is computed on each "
                            "run's final-epoch logits.")


def _choice(option: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise UserError(f"{option} {value!r} is not one of {', '.join(allowed)}.")


# ----------------------------------------------------------------------------------------------
# Load


@dataclass
class RunSet:
    """Finished runs (one row per run x head) and the runs left out, with why."""

    frame: pd.DataFrame
    flat_configs: dict[str, dict[str, str]]  # run id -> flattened config (strings)
    incomplete: list[dict[str, Any]] = field(default_factory=list)
    per_class: dict[str, dict[str, Any]] = field(default_factory=dict)  # run id -> class_counts, heads -> accuracies
    # run id -> {"best": head -> metric -> value at the best test epoch, "eval_every": epochs} (--compare paper)
    selection: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_runs(results: Path, options: ReportOptions = ReportOptions()) -> RunSet:
    """Read every run folder under ``results/runs``; finished ones become rows, the others are counted."""
    base = Path(results) / "runs"
    if Path(results).is_file():
        raise UserError(f"--results {results} is a file; give the results folder that `ltbench run` wrote into.")
    if not base.is_dir():
        raise UserError(f"No run folders under {base}. Point --results at the folder given to `ltbench run`.")
    rows: list[dict[str, Any]] = []
    flat: dict[str, dict[str, str]] = {}
    incomplete: list[dict[str, Any]] = []
    per_class: dict[str, dict[str, Any]] = {}
    selection: dict[str, dict[str, Any]] = {}
    for folder in sorted(p for p in base.iterdir() if _holds_a_run(p)):
        problem = config_problem(folder)
        config = _read_json(folder / "config.json") if problem is None else _untrusted_config(folder)
        if not _wanted(config, options):
            continue
        result, why = (None, f"run {folder.name} left out: {problem}") if problem else \
            _finished_result(folder, options.select)
        if why:
            incomplete.append({"run_id": folder.name, **_coordinates(config), "reason": why})
            continue
        flat[folder.name] = flatten_config(config, result)
        rows += _head_rows(folder.name, config, result, options)
        per_class[folder.name] = {"class_counts": result.get("class_counts"), "heads": {
            head: m.get("per_class") for head, m in result[options.select]["heads"].items()}}
        selection[folder.name] = _selection_facts(result, options.split)
        if options.adjust is not None:
            rows += _posthoc_rows(folder, config, result, options, flat, incomplete)
    columns = ["run_id", "method", "dataset", "rho", "data", "seed", "head", "epoch", *METRICS]
    return RunSet(pd.DataFrame(rows, columns=columns), flat, incomplete, per_class, selection)


def _posthoc_rows(folder: Path, config: Mapping[str, Any], result: Mapping[str, Any], options: ReportOptions,
                  flat: dict[str, dict[str, str]], incomplete: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run's post-hoc logit-adjusted result at ``options.adjust`` as rows of their own, labelled
    "<method> + post-hoc LA τ=..." (never matched to the method's paper numbers); missing ones are listed."""
    from ltbench.posthoc import POSTHOC_FILE, posthoc_label, tau_key

    key, label = tau_key(options.adjust), posthoc_label(config["method"], options.adjust)
    path = folder / POSTHOC_FILE
    block = (_read_json(path).get("taus", {}).get(key)) if path.is_file() else None
    if block is None:
        incomplete.append({"run_id": folder.name, **_coordinates({**config, "method": label}),
                           "reason": f"no post-hoc result yet: ltbench eval {folder.name} --adjust {key}"})
        return []
    run_key = f"{folder.name}+la{key}"
    flat[run_key] = {**flatten_config(config, result), "posthoc_tau": key}
    return _head_rows(run_key, {**config, "method": label}, {"final": block}, options)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"Cannot read {path}: {exc}") from exc


def _holds_a_run(folder: Path) -> bool:
    """Any folder with more than a lock and temporaries (a run that is only starting has nothing else yet)."""
    return folder.is_dir() and any(p.name != LOCK and not p.name.endswith(TMP_SUFFIX) for p in folder.iterdir())


def _untrusted_config(folder: Path) -> Mapping[str, Any]:
    """Coordinates for the footnote of a folder whose config.json is missing or edited: the config as written,
    else the one result.json recorded, else unknown."""
    for path, key in ((folder / "config.json", None), (folder / "result.json", "config")):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            payload = json.loads(path.read_text())
            payload = payload[key] if key else payload
            if isinstance(payload, dict) and {"method", "dataset"} <= set(payload):
                return payload
    return {"method": "unknown method", "dataset": "unknown dataset", "seed": "?"}


def _wanted(config: Mapping[str, Any], options: ReportOptions) -> bool:
    return ((not options.methods or config["method"] in options.methods)
            and (not options.datasets or config["dataset"] in options.datasets))


def _finished_result(folder: Path, select: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the run's result, None), or (None, why the report leaves the run out)."""
    if not (folder / "DONE").is_file():
        lines = (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").exists() else []
        return None, f"unfinished ({len([x for x in lines if x.strip()])} epoch(s) logged)"
    if not (folder / "result.json").is_file():
        return None, "DONE but no result.json"
    try:
        result = json.loads((folder / "result.json").read_text())
        if select == "best" and result.get("best") is None:
            return None, "no evaluated epoch to select as best"
        heads = result[select]["heads"]
        if not heads or not all(isinstance(m["top1"], (int, float)) for m in heads.values()):
            raise ValueError("no head with a top-1")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, (f"result.json of run {folder.name} is damaged ({type(exc).__name__}: {exc}); delete it and "
                      f"DONE, then run the same `ltbench run` command, which re-evaluates the final checkpoint")
    return result, None


def _coordinates(config: Mapping[str, Any]) -> dict[str, Any]:
    return {"method": config["method"], "dataset": config["dataset"], "rho": _rho(config),
            "data": data_key(config), "seed": config.get("seed", 0)}


def data_key(config: Mapping[str, Any]) -> str:
    """The dataset's options other than rho (``n_max=100; n_test=20``): a table column is a dataset with all its
    options, so runs on different data never share a column or compete for bold."""
    options = sorted((k, _text(v)) for k, v in config.get("data", {}).items() if k != "rho")
    return "; ".join(f"{k}={v}" for k, v in options)


def data_labels(frame: pd.DataFrame) -> dict[tuple[str, str], str]:
    """``(dataset, data key) -> "n_max=100"``: the options in which a dataset's columns differ ("" if none)."""
    labels = {}
    for dataset, keys in frame.groupby("dataset")["data"]:
        keys = list(dict.fromkeys(keys))
        options = [dict(item.split("=", 1) for item in key.split("; ") if item) for key in keys]
        differing = sorted(k for k in set().union(*options) if len({o.get(k, "-") for o in options}) > 1)
        for key, values in zip(keys, options):
            labels[dataset, key] = ", ".join(f"{k}={values.get(k, '-')}" for k in differing)
    return labels


def _rho(config: Mapping[str, Any]) -> float:
    rho = config.get("data", {}).get("rho")
    return float(rho) if rho is not None else math.nan


def _head_rows(run_id: str, config: Mapping[str, Any], result: Mapping[str, Any],
               options: ReportOptions) -> list[dict[str, Any]]:
    block = result[options.select]
    rows = []
    for head, metrics in block["heads"].items():
        groups = metrics.get(options.split) or {}
        rows.append({"run_id": run_id, **_coordinates(config), "head": head, "epoch": block.get("epoch"),
                     "top1": metrics["top1"], "ece": metrics.get("ece"),
                     **{g: _float(groups.get(g)) for g in ("many", "medium", "few")}})
    return rows


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def flatten_config(config: Mapping[str, Any], result: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``{"preset": ..., "<hparam>": ..., "data.<option>": ..., "versions.<part>": ..., "sam": ...}`` as text."""
    flat = {"preset": _text(config.get("preset"))}
    flat.update({k: _text(v) for k, v in config.get("hparams", {}).items()})
    flat.update({f"data.{k}": _text(v) for k, v in config.get("data", {}).items()})
    flat.update({f"versions.{k}": _text(v) for k, v in config.get("versions", {}).items()})
    hp = config.get("hparams", {})
    if "sam_rho" in hp:  # derived: did the run use SAM (a constant radius or a schedule)?
        flat["sam"] = _text(bool(hp.get("sam_rho")) or bool(hp.get("sam_rho_steps")))
    for role, up in ((result or {}).get("upstream") or {}).items():
        flat[f"upstream.{role}.method"] = _text(up.get("method"))
    return flat


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    return "none" if value is None else str(value)


# ----------------------------------------------------------------------------------------------
# Label rows: one experiment (config without the seed) per row and cell


def experiment_key(flat: Mapping[str, str]) -> str:
    payload = json.dumps({k: v for k, v in flat.items() if k not in _NOT_DISTINGUISHING and
                          not k.startswith("upstream.")}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def label_rows(runs: RunSet, by: Sequence[str] = ()) -> pd.Series:
    """A row label per run: the method, plus ``key=value`` for ``by`` keys and for keys that differ
    between experiments that would otherwise share a cell."""
    frame = runs.frame.drop_duplicates("run_id").set_index("run_id")
    if frame.empty:
        return pd.Series(dtype=str)
    exp = pd.Series({rid: experiment_key(runs.flat_configs[rid]) for rid in frame.index})
    labels = {}
    for method, group in frame.groupby("method", sort=False):
        keys = list(by)
        for _, cell in group.groupby(["dataset", group["rho"].fillna(-1), "data"], sort=False):
            ids = list(cell.index)
            if exp[ids].nunique() > 1:
                keys += [k for k in _differing_keys([runs.flat_configs[i] for i in ids]) if k not in keys]
        for rid in group.index:
            labels[rid] = _label(method, keys, runs.flat_configs[rid])
    return pd.Series(labels)


def _differing_keys(configs: Sequence[Mapping[str, str]]) -> list[str]:
    keys = sorted(set().union(*configs) - _NOT_DISTINGUISHING)
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


def aggregate(runs: RunSet, options: ReportOptions = ReportOptions()) -> pd.DataFrame:
    """One row per (row label, head, dataset, rho, metric): mean, std, se, n and the per-seed numbers."""
    frame = runs.frame.copy()
    if frame.empty:
        return pd.DataFrame(columns=_CELL_COLUMNS)
    frame["row"] = frame["run_id"].map(label_rows(runs, options.by))
    frame["experiment"] = frame["run_id"].map(lambda rid: experiment_key(runs.flat_configs[rid]))
    if not options.heads:
        frame = frame[frame["head"] == "main"]
    long = frame.melt(id_vars=["row", "experiment", "method", "head", "dataset", "rho", "data", "seed", "run_id"],
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
                 "values", "run_ids", "experiment"]


def _cell_stats(key: dict[str, Any], group: pd.DataFrame) -> dict[str, Any]:
    values = group["value"].to_numpy(dtype=float)
    present = values[~np.isnan(values)]
    n = len(group)
    std = float(np.std(present, ddof=1)) if len(present) > 1 else math.nan
    return {**key, "method": group["method"].iloc[0], "mean": float(present.mean()) if len(present) else math.nan,
            "std": std, "se": std / math.sqrt(len(present)) if len(present) > 1 else math.nan, "n": n,
            "seeds": ";".join(str(s) for s in group["seed"]), "values": ";".join(_num_text(v) for v in values),
            "run_ids": ";".join(group["run_id"]), "experiment": group["experiment"].iloc[0]}


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
# Reference numbers


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
        if all(_condition_holds(c, flat) for c in conditions) and len(conditions) > best_specificity:
            best, best_specificity = row, len(conditions)
    return best


def _condition_holds(condition: str, flat: Mapping[str, str]) -> bool:
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
    at = "best" if row["selection"] == "best" else options.select
    compared = cell["mean"] if at == options.select else _mean_at_best(runs, ids, cell["head"], cell["metric"])
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


def _mean_at_best(runs: RunSet, run_ids: Sequence[str], head: str, metric: str) -> float:
    values = [runs.selection.get(i, {}).get("best", {}).get(head, {}).get(metric, math.nan) for i in run_ids]
    present = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(present)) if present else math.nan


def _selection_facts(result: Mapping[str, Any], split: str) -> dict[str, Any]:
    """What ``--compare paper`` needs besides the selected epoch: the best epoch's numbers and the eval interval."""
    heads = (result.get("best") or {}).get("heads", {})
    best = {head: {"top1": m["top1"], "ece": m.get("ece"),
                   **{g: _float((m.get(split) or {}).get(g)) for g in ("many", "medium", "few")}}
            for head, m in heads.items()}
    return {"best": best, "eval_every": result.get("eval_every")}


# ----------------------------------------------------------------------------------------------
# One table structure for every text format


@dataclass
class Cell:
    text: str  # the number (or "n/a") without markup
    spread: str = ""  # "0.31" or ""
    n: int | None = None  # shown when it differs from the table's usual seed count
    bold: bool = False
    missing: bool = False


@dataclass
class Table:
    caption: str
    groups: list[tuple[str, int]]  # (dataset label, number of metric columns)
    columns: list[str]  # metric label per column
    rows: list[tuple[str, list[Cell], str]]  # (label, cells, kind: run | paper | delta)
    notes: list[str]


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
    rows = []
    for row, head in row_keys:
        label = f"{row} [{head}]" if row in multi_head else row
        found = [lookup.get((row, head, ds, rk, data, m)) for ds, rk, data, m in columns]
        rows.append((label, [_cell(c, options, usual_n) for c in found], "run"))
        if options.compare and head == "main":  # published numbers are for the reported (main) head
            rows += _reference_rows(found, options)
    _bold_best(rows, [m for *_, m in columns], options.digits)
    groups = _groups(columns, data_labels(cells))
    return Table(_caption(options, usual_n, cells), groups, [METRIC_LABELS[m] for *_, m in columns], rows,
                 _notes(runs, cells, options))


def _rho_key(rho: float) -> float:
    return -1.0 if rho is None or (isinstance(rho, float) and math.isnan(rho)) else float(rho)


def _table_columns(cells: pd.DataFrame) -> list[tuple[str, float, str, str]]:
    """(dataset, rho key, data key, metric) per column: datasets in natural order, harder imbalance first."""
    combos = cells[["dataset", "rho", "data"]].drop_duplicates()
    combos = combos.assign(rk=combos["rho"].map(_rho_key)).sort_values(
        ["dataset", "rk", "data"], key=lambda col: -col if col.name == "rk" else col.map(natural_key))
    metrics = [m for m in METRICS if m in set(cells["metric"])]
    return [(ds, rk, data, m) for ds, rk, data in zip(combos["dataset"], combos["rk"], combos["data"])
            for m in metrics]


def _groups(columns: list[tuple[str, float, str, str]], labels: Mapping[tuple[str, str], str]) -> list[tuple[str, int]]:
    groups: list[tuple[str, int]] = []
    for ds, rk, data, _ in columns:
        label = " ".join(part for part in (ds, "" if rk < 0 else f"ρ={rk:g}", labels[ds, data]) if part)
        if groups and groups[-1][0] == label:
            groups[-1] = (label, groups[-1][1] + 1)
        else:
            groups.append((label, 1))
    return groups


def _cell(cell: Any, options: ReportOptions, usual_n: int) -> Cell:
    if cell is None:
        return Cell("", missing=True)
    if math.isnan(cell.mean):
        return Cell("n/a")
    spread = cell.std if options.spread == "std" else cell.se
    return Cell(f"{cell.mean:.{options.digits}f}", "" if math.isnan(spread) else f"{spread:.{options.digits}f}",
                n=cell.n if cell.n != usual_n else None)


def _reference_rows(found: list[Any], options: ReportOptions) -> list[tuple[str, list[Cell], str]]:
    """"↳ best epoch" (when a source reports its best epoch and the table shows another), "↳ paper", "↳ Δ"."""
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
    best = [] if all(c.missing for c in compared) else [("↳ best epoch", compared, "best")]
    deltas = [] if all(c.missing for c in delta) else [("↳ Δ vs paper", delta, "delta")]  # none comparable
    return [*best, ("↳ paper", paper, "paper"), *deltas]


def _num(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _bold_best(rows: list[tuple[str, list[Cell], str]], metrics: list[str], digits: int) -> None:
    run_rows = [cells for _, cells, kind in rows if kind == "run"]
    for j, metric in enumerate(metrics):
        numbers = [(float(cells[j].text), cells[j]) for cells in run_rows
                   if not cells[j].missing and cells[j].text != "n/a"]
        if len(numbers) < 2:
            continue
        best = round((min if metric in LOWER_IS_BETTER else max)(v for v, _ in numbers), digits)
        if all(round(value, digits) == best for value, _ in numbers):
            continue  # a column of ties has no best
        for value, cell in numbers:
            cell.bold = round(value, digits) == best


def _caption(options: ReportOptions, usual_n: int, cells: pd.DataFrame) -> str:
    spread = "standard deviation" if options.spread == "std" else "standard error"
    marked = " unless marked (n=k)" if (cells["n"] != usual_n).any() else ""
    metric_text = "Accuracy (%)" if set(options.metrics) - {"ece"} else "Expected calibration error (%)"
    over = f"mean ± {spread} over {usual_n} seeds{marked}" if usual_n > 1 else f"one seed{marked} (no spread)"
    text = f"{metric_text} on the balanced test set at {SELECT_TEXT[options.select]}: {over}. "
    if set(options.metrics) & {"many", "medium", "few"}:
        text += SPLIT_TEXT[options.split] + ". "
    if "ece" in options.metrics:
        text += "ECE: 15 equal-width confidence bins, lower is better. "
    text += "Bold: best per column; –: no finished run; n/a: the group has no class."
    return text


def _notes(runs: RunSet, cells: pd.DataFrame, options: ReportOptions) -> list[str]:
    notes = []
    if runs.incomplete:
        by_cell: dict[str, list[str]] = {}
        for run in runs.incomplete:
            rho = "" if math.isnan(run["rho"]) else f" ρ={run['rho']:g}"
            by_cell.setdefault(f"{run['method']} / {run['dataset']}{rho}", []).append(
                f"seed {run['seed']}: {run['reason']}")
        ordered = sorted(by_cell.items(), key=lambda kv: natural_key(kv[0]))
        detail = "; ".join(f"{k} ({', '.join(v)})" for k, v in ordered)
        notes.append(f"Excluded {len(runs.incomplete)} incomplete run(s): {detail}.")
    if options.compare:
        sources = sorted({s for s in cells.get("paper_source", pd.Series(dtype=str)) if s})
        if sources:
            notes.append("Paper numbers: " + "; ".join(sources) + ". " + _comparison_note(cells, options))
    return notes


def _comparison_note(cells: pd.DataFrame, options: ReportOptions) -> str:
    """How Δ compares like with like (paper_numbers.csv records each source's recipe and epoch selection)."""
    text = ("Δ compares runs of the source's recipe only (its ltbench preset and epochs; others are not "
            "comparable), at the source's epoch selection: ")
    text += ("each run's best test epoch where the source reports its best epoch (↳ best epoch), else the "
             "epoch this table shows." if options.select != "best" else "the best test epoch.")
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
# Renderers


def render_markdown(table: Table) -> str:
    header = ["method"] + [_md_escape(f"{g} {c}") for g, c in _column_groups(table)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * len(table.columns)]
    for label, cells, _ in table.rows:
        texts = [_md_cell(c) for c in cells]
        lines.append("| " + " | ".join([_md_escape(label), *texts]) + " |")
    out = [_md_text(table.caption), "", *lines]
    for note in table.notes:
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
    return mean + spread + n


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
                  "ρ": r"$\rho$", "Δ": r"$\Delta$", "±": r"$\pm$", "–": "--", "↳": r"$\hookrightarrow$",
                  "\n": " ", "\r": " "}  # a blank line inside a table cell ends the paragraph: an error


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


LATEX_PACKAGES = ("booktabs", "graphicx")  # \toprule etc., \resizebox


def render_latex(table: Table, standalone: bool = False) -> str:
    """A booktabs ``table`` to paste into a paper or, with ``standalone``, a document that compiles on its own."""
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
    notes = "".join(rf"\par {latex_escape(n)}" for n in table.notes)
    float_ = "\n".join([
        r"\begin{table}[ht]",
        r"\centering",
        rf"\caption{{{latex_escape(table.caption)}}}",
        r"\resizebox{\linewidth}{!}{%",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(group_row) + r" \\",
        " ".join(rules),
        " & ".join(["method", *(latex_escape(c) for c in table.columns)]) + r" \\",
        r"\midrule",
        *body,
        r"\bottomrule",
        r"\end{tabular}}",
        *([rf"{{\footnotesize{notes}\par}}"] if notes else []),
        r"\end{table}",
    ]) + "\n"
    if not standalone:
        return f"% ltbench report; needs \\usepackage{{{','.join(LATEX_PACKAGES)}}}\n" + float_
    preamble = [r"\documentclass{article}", r"\usepackage[T1]{fontenc}",
                r"\usepackage[landscape,margin=1.5cm]{geometry}",
                *(rf"\usepackage{{{package}}}" for package in LATEX_PACKAGES), r"\begin{document}"]
    return "\n".join(preamble) + "\n" + float_ + "\\end{document}\n"


def _latex_cell(cell: Cell) -> str:
    if cell.missing:
        return "--"
    mean = rf"\textbf{{{cell.text}}}" if cell.bold else latex_escape(cell.text)
    spread = rf" $\pm$ {cell.spread}" if cell.spread else ""
    n = rf" \textsuperscript{{n={cell.n}}}" if cell.n is not None else ""
    return mean + spread + n


def render_html(table: Table) -> str:
    from html import escape

    head1 = "".join(f'<th colspan="{w}">{escape(g)}</th>' for g, w in table.groups)
    head2 = "".join(f"<th>{escape(c)}</th>" for c in table.columns)
    body = []
    for label, cells, _ in table.rows:
        tds = "".join(f'<td align="right">{_html_cell(c)}</td>' for c in cells)
        body.append(f"<tr><td>{escape(label)}</td>{tds}</tr>")
    notes = "".join(f"<p>{escape(n)}</p>" for n in table.notes)
    return (f"<table>\n<caption>{escape(table.caption)}</caption>\n<thead>\n<tr><th rowspan=\"2\">method</th>{head1}"
            f"</tr>\n<tr>{head2}</tr>\n</thead>\n<tbody>\n" + "\n".join(body) + f"\n</tbody>\n</table>\n{notes}\n")


def _html_cell(cell: Cell) -> str:
    if cell.missing:
        return "–"
    mean = f"<b>{cell.text}</b>" if cell.bold else cell.text
    return mean + (f" ± {cell.spread}" if cell.spread else "") + (f" (n={cell.n})" if cell.n is not None else "")


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
               "notes": table.notes}
    return json.dumps(payload, indent=2, sort_keys=True) + "\n"


def _nan_to_none(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in item.items()} for item in items]


# ----------------------------------------------------------------------------------------------
# The whole pipeline


def report(results: Path, fmt: str = "markdown", options: ReportOptions = ReportOptions()) -> str:
    """Load the run folders under ``results`` and render the table in ``fmt``."""
    _choice("--format", fmt, FORMATS)
    runs = load_runs(results, options)
    cells = aggregate(runs, options)
    if options.compare and not cells.empty:
        cells = add_reference(cells, runs, options)
    if fmt == "csv":
        return render_csv(cells)
    table = build_table(cells, runs, options)
    if fmt == "json":
        return render_json(table, cells, runs, options)
    if fmt == "latex":
        return render_latex(table, standalone=options.standalone)
    return {"markdown": render_markdown, "html": render_html}[fmt](table)
