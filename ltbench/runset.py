"""The report's input: every run folder under a results folder as one row per run and head, with its flattened
config and the runs left out (with why). Reading the folders is :mod:`ltbench.records`' job; this module turns
what it returns into a :class:`RunSet` for :mod:`ltbench.report`, the plots and the reproduction verdicts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ltbench.config import uses_sam
from ltbench.errors import UserError
from ltbench.records import RunRecord, config_problem, posthoc_label, runs_dir, tau_key, tune_manifests
from ltbench.runtime import RUNTIME_OPTIONS
from ltbench.selection import BLOCK, RULES, rule_named

METRICS = ("top1", "many", "medium", "few", "ece")
DEFAULT_METRICS = ("top1", "many", "medium", "few")
LOWER_IS_BETTER = frozenset({"ece"})
METRIC_LABELS = {"top1": "top-1", "many": "many", "medium": "medium", "few": "few", "ece": "ECE",
                 "subsets": "σ subsets"}  # the std of top-1 over CIFAR-LT subset seeds (report columns only)
SPLIT_TEXT = {
    "counts": "many / medium / few = classes with > 100 / 20-100 / < 20 training images",
    "paper": "many / medium / few = DeiT-LT's class-index ranges (head / mid / tail)",
}
SELECT_TEXT = {"final": "the final epoch (no selection on the test set; papers often report their best test epoch)",
               "val": "the epoch of each run with the best val top-1 (selected on the val split, never on test)",
               "oracle": "ORACLE: the best test epoch of each run (selected on the test set itself: optimistic)"}
FORMATS = ("markdown", "latex", "csv", "json", "html")
# Config keys never used to tell experiments apart: the seed is what a cell averages over, the
# others are the cell's coordinates or do not change numbers.
# The CIFAR-LT subset seed is a source of variance like the seed (docs/protocol.md): a cell pools its subsets.
NOT_DISTINGUISHING = {"seed", "method", "dataset", "data.rho", "data.subsample_seed", *RUNTIME_OPTIONS}


@dataclass(frozen=True)
class ReportOptions:
    select: str = "final"  # final | val | oracle: the selection rule (ltbench.selection)
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
    # also rows of post-hoc logit adjustment at this tau (posthoc_la.json), or "auto": each run's tau chosen on val
    adjust: float | str | None = None
    ci: bool = True  # 95 % bootstrap intervals in every cell (ltbench.stats)
    baseline: str | None = None  # a row label (or method) every other row is compared with, paired by seed

    def __post_init__(self) -> None:
        rule_named(self.select)
        choice("--split", self.split, ("counts", "paper"))
        choice("--spread", self.spread, ("std", "se"))
        for metric in self.metrics:
            choice("--metric", metric, METRICS)
        if self.compare is not None:
            choice("--compare", self.compare, ("paper",))
        valid_tau = self.adjust in (None, "auto") or (isinstance(self.adjust, (int, float)) and
                                                      math.isfinite(self.adjust) and self.adjust >= 0)
        if self.adjust is not None and (self.select != "final" or not valid_tau):
            raise UserError("--adjust TAU needs tau >= 0 and --select final: post-hoc adjustment is computed on each "
                            "run's final-epoch logits.")


def choice(option: str, value: str, allowed: Sequence[str]) -> None:
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
    # run id -> {rule: head -> metric -> value at the epoch the rule picks, "eval_every": epochs}
    selection: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the trials of `ltbench tune` searches, listed apart: their selection used val, the cells hold only real runs
    search: list[dict[str, Any]] = field(default_factory=list)
    results: Path | None = None  # the folder read (figures read the runs' per-epoch metrics through it)


def load_runs(results: Path, options: ReportOptions | None = None) -> RunSet:
    """Read every run folder under ``results/runs``; finished ones become rows, the others are counted."""
    options = options or ReportOptions()
    base = runs_dir(Path(results))
    if Path(results).is_file():
        raise UserError(f"--results {results} is a file; give the results folder that `ltbench run` wrote into.")
    if not base.is_dir():
        raise UserError(f"No run folders under {base}. Point --results at the folder given to `ltbench run`.")
    rows: list[dict[str, Any]] = []
    flat: dict[str, dict[str, str]] = {}
    incomplete: list[dict[str, Any]] = []
    per_class: dict[str, dict[str, Any]] = {}
    selection: dict[str, dict[str, Any]] = {}
    trials = {t["run_id"]: {**t, "tune_id": m["tune_id"], "objective_name": m["objective"]}
              for m in tune_manifests(Path(results)) for t in m["trials"]}
    search = []
    for record in (RunRecord(p) for p in sorted(base.iterdir())):
        if not record.holds_a_run():
            continue
        if record.run_id in trials:
            search.append(trials[record.run_id])
            continue
        folder, problem = record.path, config_problem(record.path)
        config = record.read_json("config.json") if problem is None else record.untrusted_config()
        if not _wanted(config, options):
            continue
        result, why = (None, f"run {folder.name} left out: {problem}") if problem else \
            record.finished_result(options.select)
        if why:
            incomplete.append({"run_id": folder.name, **_coordinates(config), "reason": why})
            continue
        flat[folder.name] = flatten_config(config, result)
        rows += _head_rows(folder.name, config, result, options)
        per_class[folder.name] = {"class_counts": result.get("class_counts"), "class_names": result.get("class_names"),
                                  "test_counts": (result.get("eval_class_counts") or {}).get("test"), "heads": {
            head: m.get("per_class") for head, m in result[BLOCK[options.select]]["heads"].items()}}
        selection[folder.name] = _selection_facts(result, options.split)
        if options.adjust is not None:
            rows += _posthoc_rows(record, config, result, options, flat, incomplete)
    columns = ["run_id", "method", "dataset", "rho", "data", "seed", "subsample_seed", "head", "epoch", *METRICS]
    return RunSet(pd.DataFrame(rows, columns=columns), flat, incomplete, per_class, selection, search, Path(results))


def _posthoc_rows(record: RunRecord, config: Mapping[str, Any], result: Mapping[str, Any], options: ReportOptions,
                  flat: dict[str, dict[str, str]], incomplete: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run's post-hoc logit-adjusted result at ``options.adjust`` as rows of their own, labelled
    "<method> + post-hoc LA τ=..." (never matched to the method's paper numbers); missing ones are listed."""
    folder, payload = record.path, record.posthoc() or {}
    if options.adjust == "auto":  # each run's own tau, chosen on val; one label, so the seeds share a row
        key = (payload.get("auto") or {}).get("tau", "auto")
        label = f"{config['method']} + post-hoc LA τ chosen on val"
    else:
        key, label = tau_key(options.adjust), posthoc_label(config["method"], options.adjust)
    block = (payload.get("taus") or {}).get(key)
    if block is None:
        incomplete.append({"run_id": folder.name, **_coordinates({**config, "method": label}),
                           "reason": f"no post-hoc result yet: ltbench eval {folder.name} --adjust "
                                     f"{'auto' if options.adjust == 'auto' else key}"})
        return []
    run_key = f"{folder.name}+la{key}"
    flat[run_key] = {**flatten_config(config, result), "posthoc_tau": "auto" if options.adjust == "auto" else key}
    return _head_rows(run_key, {**config, "method": label}, {"final": block}, options)


def _wanted(config: Mapping[str, Any], options: ReportOptions) -> bool:
    return ((not options.methods or config["method"] in options.methods)
            and (not options.datasets or config["dataset"] in options.datasets))


def _coordinates(config: Mapping[str, Any]) -> dict[str, Any]:
    return {"method": config["method"], "dataset": config["dataset"], "rho": _rho(config),
            "data": data_key(config), "seed": config.get("seed", 0),
            "subsample_seed": config.get("data", {}).get("subsample_seed", 0)}


def data_key(config: Mapping[str, Any]) -> str:
    """The dataset's options other than rho (``n_max=100; n_test=20``): a table column is a dataset with all its
    options, so runs on different data never share a column or compete for bold."""
    options = sorted((k, _text(v)) for k, v in config.get("data", {}).items() if k not in ("rho", "subsample_seed"))
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
    block = result[BLOCK[options.select]]
    rows = []
    for head, metrics in block["heads"].items():
        groups = metrics.get(options.split) or {}
        rows.append({"run_id": run_id, **_coordinates(config), "head": head, "epoch": block.get("epoch"),
                     "top1": metrics["top1"], "ece": metrics.get("ece"),
                     **{g: as_float(groups.get(g)) for g in ("many", "medium", "few")}})
    return rows


def as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


def flatten_config(config: Mapping[str, Any], result: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``{"preset": ..., "<hparam>": ..., "data.<option>": ..., "versions.<part>": ..., "sam": ...}`` as text."""
    flat = {"preset": _text(config.get("preset"))}
    flat.update({k: _text(v) for k, v in config.get("hparams", {}).items()})
    flat.update({f"data.{k}": _text(v) for k, v in config.get("data", {}).items()})
    flat.update({f"versions.{k}": _text(v) for k, v in config.get("versions", {}).items()})
    hp = config.get("hparams", {})
    if "sam_rho" in hp:  # derived: did the run use SAM (a constant radius or a schedule)?
        flat["sam"] = _text(uses_sam(hp.get("sam_rho") or 0.0, hp.get("sam_rho_steps") or ()))
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


def _selection_facts(result: Mapping[str, Any], split: str) -> dict[str, Any]:
    """Every rule's numbers (head -> metric -> value; ``--select oracle`` shows final beside them, ``--compare paper``
    the oracle ones) and the evaluation interval."""
    facts: dict[str, Any] = {"eval_every": result.get("eval_every")}
    for rule in RULES:
        heads = (result.get(BLOCK[rule]) or {}).get("heads", {})
        facts[rule] = {head: {"top1": m["top1"], "ece": m.get("ece"),
                              **{g: as_float((m.get(split) or {}).get(g)) for g in ("many", "medium", "few")}}
                       for head, m in heads.items()}
    return facts
