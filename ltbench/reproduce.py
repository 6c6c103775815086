"""``ltbench reproduce SUITE``: shipped reproduction suites, each a sweep plus the published claims it checks.

A suite is a YAML file (``ltbench/suites/<name>.yaml``, or any path): ``runs`` is a list of sweep grids
(the keys of ``ltbench sweep`` grid files), ``expectations`` the claims checked on the finished runs, and an
optional ``runtime`` gives defaults for the command's runtime options. The runs are planned and trained by
:mod:`ltbench.sweep` (idempotent: finished runs are reused, interrupted ones resume); metrics are read
and averaged over the seeds present by :mod:`ltbench.report`, the same code as ``ltbench report``.

Expectation kinds, each with a ``source`` (paper, table, or the section claiming an ordering):

* ``value``: the metric of one cell is ``expected`` within ``tolerance`` points;
* ``order``: the metric of cell ``better`` exceeds that of cell ``worse`` by at least ``margin`` points;
* ``finished``: every run of the cell finished and reports every head in ``heads`` (smoke checks).

A cell names ``method`` and as much of ``dataset``, ``rho``, ``preset`` and ``set`` (hyperparameter
conditions) as it takes to pick one configuration of the suite, then what to read: ``head`` (main), ``split``
(counts or paper) and ``metric`` (top1, many, medium, few or ece).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import pandas as pd

from ltbench import report as rp
from ltbench import runset
from ltbench import sweep as sw
from ltbench.config import coerce, field_types
from ltbench.errors import UserError
from ltbench.launcher import SUITE_RESOURCES
from ltbench.records import RunRecord, runs_dir
from ltbench.runtime import Runtime, suite_keys
from ltbench.schemas import grid_values, load_yaml

SUITE_KEYS = ("description", "runtime", "runs", "expectations")
# a suite's runtime: block: the Runtime options marked for suites, and the Ray resources of its trials
RUNTIME_KEYS = (*suite_keys(), *SUITE_RESOURCES)
CELL_KEYS = ("method", "dataset", "rho", "preset", "set", "head", "split", "metric")
KIND_KEYS = {"value": ("cell", "expected", "tolerance"), "order": ("better", "worse", "margin"),
             "finished": ("cell", "heads")}
COMMON_KEYS = ("kind", "name", "source")
PASS, FAIL, MISSING = "PASS", "FAIL", "MISSING"


# ----------------------------------------------------------------------------------------------
# The suite file


@dataclass(frozen=True)
class Cell:
    """Which runs (configuration, over its seeds) and which number of them an expectation reads."""

    method: str
    dataset: str | None = None
    rho: float | None = None
    preset: str | None = None
    conditions: tuple[str, ...] = ()  # KEY=VALUE on the flattened config, as in paper_numbers.csv's match column
    head: str = "main"
    split: str = "counts"
    metric: str = "top1"

    def label(self) -> str:
        where = [self.preset or "", *self.conditions, self.dataset or "", "" if self.rho is None else f"ρ={self.rho:g}"]
        where_text = ", ".join(w for w in where if w)
        head = "" if self.head == "main" else f" {self.head.upper()} head"
        group = "" if self.metric in ("top1", "ece") else f" ({self.split} split)"
        where = f" ({where_text})" if where_text else ""
        return f"{self.method}{where}{head} {runset.METRIC_LABELS[self.metric]}{group}"


@dataclass(frozen=True)
class Expectation:
    kind: str
    name: str
    source: str
    cells: tuple[Cell, ...]  # value / finished: (cell,); order: (better, worse)
    expected: float | None = None
    tolerance: float = 0.0
    margin: float = 0.0
    heads: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    description: str
    grids: tuple[dict[str, Any], ...]  # raw grid values, built into SweepGrids with the command's overrides
    expectations: tuple[Expectation, ...]
    runtime: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """The description's first sentence."""
        return self.description.split(". ")[0].rstrip(".") + "."


def shipped_suites() -> dict[str, Path]:
    """Suite name -> file of the suites shipped in ``ltbench/suites/``."""
    folder = files("ltbench").joinpath("suites")
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def find_suite(ref: str) -> Path:
    """A shipped suite by name, or a suite file by path."""
    path = Path(ref).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise UserError(f"The suite file {path} does not exist.")
        return path
    suites = shipped_suites()
    if ref in suites:
        return suites[ref]
    close = difflib.get_close_matches(ref, list(suites), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UserError(f"There is no suite {ref!r}.{hint} Shipped suites: {', '.join(sorted(suites))} "
                    f"(`ltbench reproduce --list`); a path to your own suite file (.yaml) works too.")


def load_suite(ref: str) -> Suite:
    """Read and validate a suite file; errors name the file and the key."""
    path = find_suite(ref)
    payload = load_yaml(path, "suite file")
    where = _Where(path)
    payload = where.mapping(payload, "", SUITE_KEYS, required=("runs", "expectations"))
    runtime = _runtime_block(where, where.mapping(payload.get("runtime") or {}, "runtime", RUNTIME_KEYS))
    runs = where.sequence(payload["runs"], "runs")
    grids = tuple(grid_values(where.mapping(grid, f"runs[{i}]", sw.GRID_KEYS, required=("methods", "datasets")),
                              f"Suite file {path}", f"runs[{i}]") for i, grid in enumerate(runs))
    items = where.sequence(payload["expectations"], "expectations")
    expectations = tuple(_expectation(where, item, f"expectations[{i}]") for i, item in enumerate(items))
    return Suite(path.stem, path, str(payload.get("description") or "").strip(), grids, expectations, runtime)


@dataclass(frozen=True)
class _Where:
    """Validation helpers that name the suite file and the key path in every message."""

    path: Path

    def error(self, key: str, message: str) -> UserError:
        return UserError(f"Suite file {self.path}, key {key or '(top level)'}: {message}")

    def mapping(self, value: Any, key: str, allowed: Sequence[str], required: Sequence[str] = ()) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise self.error(key, f"expected a mapping with keys {', '.join(allowed)}, got {_kind(value)}.")
        unknown = sorted(set(map(str, value)) - set(allowed))
        if unknown:
            raise self.error(key, f"unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(allowed)}.")
        missing = [k for k in required if value.get(k) is None]
        if missing:
            raise self.error(key, f"missing required key(s) {', '.join(missing)}.")
        return dict(value)

    def sequence(self, value: Any, key: str) -> list[Any]:
        if not isinstance(value, list) or not value:
            raise self.error(key, f"expected a non-empty list, got {_kind(value)}.")
        return value

    def number(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"expected a number, got {_kind(value)}.")
        return float(value)

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"expected a non-empty text, got {_kind(value)}.")
        return value.strip()


def _runtime_block(where: _Where, block: dict[str, Any]) -> dict[str, Any]:
    """The suite's runtime options, typed as the command-line options are (Runtime's fields), and its Ray
    resources, in the ranges of the options of the same names."""
    types = field_types(Runtime)
    typed = {}
    for key, value in block.items():
        if key in SUITE_RESOURCES:
            rule, ok = RESOURCE_RULES[key]
            if value is not None and (isinstance(value, bool) or not ok(value)):
                raise where.error(f"runtime.{key}", f"expected {rule}, got {_kind(value)}.")
            typed[key] = value
            continue
        try:
            typed[key] = coerce(value, types[key], key)
        except UserError as exc:
            raise where.error(f"runtime.{key}", str(exc)) from exc
    return typed


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


RESOURCE_RULES = {
    "gpus_per_trial": ("a number >= 0", lambda v: _number(v) and v >= 0),
    "cpus_per_trial": ("a number > 0", lambda v: _number(v) and v > 0),
    "max_failures": ("an integer >= -1", lambda v: isinstance(v, int) and v >= -1),
}


def _kind(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"[:80]


def _expectation(where: _Where, item: Any, key: str) -> Expectation:
    kind = where.mapping(item, key, (*COMMON_KEYS, *sorted({k for ks in KIND_KEYS.values() for k in ks})),
                         required=("kind",))["kind"]
    if kind not in KIND_KEYS:
        raise where.error(f"{key}.kind", f"{kind!r} is not an expectation kind; kinds: {', '.join(KIND_KEYS)}.")
    required = ("source", *(k for k in KIND_KEYS[kind] if k not in ("margin", "tolerance")))
    item = where.mapping(item, key, (*COMMON_KEYS, *KIND_KEYS[kind]), required=required)
    source = where.text(item["source"], f"{key}.source")
    if kind == "value":
        cell = _cell(where, item["cell"], f"{key}.cell")
        expected = where.number(item["expected"], f"{key}.expected")
        tolerance = where.number(item.get("tolerance", 0), f"{key}.tolerance")
        name = item.get("name") or f"{cell.label()} = {expected:g} ± {tolerance:g}"
        return Expectation(kind, str(name), source, (cell,), expected=expected, tolerance=tolerance)
    if kind == "order":
        better, worse = _cell(where, item["better"], f"{key}.better"), _cell(where, item["worse"], f"{key}.worse")
        margin = where.number(item.get("margin", 0), f"{key}.margin")
        name = item.get("name") or f"{better.label()} ≥ {worse.label()} + {margin:g}"
        return Expectation(kind, str(name), source, (better, worse), margin=margin)
    cell = _cell(where, item["cell"], f"{key}.cell")
    heads = item["heads"] if isinstance(item["heads"], list) else [item["heads"]]
    name = item.get("name") or f"{cell.method} runs finish with head(s) {', '.join(map(str, heads))}"
    return Expectation(kind, str(name), source, (cell,), heads=tuple(str(h) for h in heads))


def _cell(where: _Where, value: Any, key: str) -> Cell:
    cell = where.mapping(value, key, CELL_KEYS, required=("method",))
    conditions = sw.parse_sets(cell.get("set"))
    for condition in conditions:
        if "=" not in condition:
            raise where.error(f"{key}.set", f"{condition!r} is not KEY=VALUE.")
    for option, allowed in (("split", ("counts", "paper")), ("metric", runset.METRICS)):
        if option in cell and cell[option] not in allowed:
            raise where.error(f"{key}.{option}", f"{cell[option]!r} is not one of {', '.join(allowed)}.")
    rho = cell.get("rho")
    return Cell(method=str(cell["method"]), dataset=cell.get("dataset"),
                rho=None if rho is None else where.number(rho, f"{key}.rho"), preset=cell.get("preset"),
                conditions=tuple(conditions), head=str(cell.get("head", "main")),
                split=cell.get("split", "counts"), metric=cell.get("metric", "top1"))


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Overrides:
    """What the command line changes in every grid of a suite (a CPU stand-in of a GPU suite, a faster test)."""

    datasets: str | None = None
    epochs: int | None = None
    sets: tuple[str, ...] = ()


def suite_grids(suite: Suite, overrides: Overrides = Overrides()) -> list[sw.SweepGrid]:
    """The suite's grids with the command line's overrides (a METHOD: scoped --set goes to the grids of METHOD)."""
    methods = {m for values in suite.grids for m in sw.parse_list(values["methods"], "methods")}
    for item in overrides.sets:
        scope, colon, _ = item.partition(":")
        if colon and "=" not in scope and scope not in methods:
            raise UserError(f"--set {item}: {scope!r} is not a method of suite {suite.name} "
                            f"({', '.join(sorted(methods))}).")
    grids = []
    for i, values in enumerate(suite.grids):
        grid_methods = sw.parse_list(values["methods"], "methods")
        sets = [s for s in overrides.sets if _applies(s, grid_methods)]
        try:
            grids.append(sw.build_grid(values, datasets=overrides.datasets, epochs=overrides.epochs, sets=sets))
        except UserError as exc:
            raise UserError(f"Suite file {suite.path}, key runs[{i}]: {exc}") from exc
    return grids


def _applies(item: str, methods: Sequence[str]) -> bool:
    scope, colon, _ = item.partition(":")
    return not colon or "=" in scope or scope in methods


def plan_suite(suite: Suite, results: Path, overrides: Overrides = Overrides()
               ) -> tuple[sw.SweepPlan, dict[Cell, list[str]]]:
    """The sweep plan of every grid of the suite, and each expectation cell's run ids (validated: a cell must
    pick exactly one configuration of the suite, over its seeds)."""
    grids = suite_grids(suite, overrides)
    try:
        plan = sw.plan_sweep(grids, results)
    except UserError as exc:
        raise UserError(f"Suite {suite.name} ({suite.path}): {exc}") from exc
    cells = {}
    for i, expectation in enumerate(suite.expectations):
        for cell in expectation.cells:
            cells[cell] = _cell_runs(cell, plan, f"Suite file {suite.path}, expectations[{i}] ({expectation.name})")
    return plan, cells


def _cell_runs(cell: Cell, plan: sw.SweepPlan, where: str) -> list[str]:
    experiments: dict[str, list[str]] = {}
    flats: dict[str, dict[str, str]] = {}
    for job in plan.jobs.values():
        flat = runset.flatten_config(job.config.to_dict())
        if job.requested and _matches(cell, job, flat):
            experiments.setdefault(rp.experiment_key(flat), []).append(job.run_id)
            flats[job.run_id] = flat
    if not experiments:
        raise UserError(f"{where}: the cell {cell.label()} matches no run of the suite. Name a method, preset, "
                        f"dataset and rho the suite's runs have.")
    if len(experiments) > 1:
        firsts = [flats[ids[0]] for ids in experiments.values()]
        keys = [k for k in rp.differing_keys(firsts) if not k.startswith("versions.")]
        raise UserError(f"{where}: the cell {cell.label()} matches {len(experiments)} configurations, which differ "
                        f"in {', '.join(keys[:6])}. Add preset, dataset, rho or set: {{KEY: VALUE}} to the cell.")
    return next(iter(experiments.values()))


def _matches(cell: Cell, job: sw.Job, flat: Mapping[str, str]) -> bool:
    config = job.config
    rho = config.data.get("rho")
    return (config.method == cell.method and cell.dataset in (None, config.dataset)
            and (cell.rho is None or (rho is not None and math.isclose(float(rho), cell.rho)))
            and cell.preset in (None, config.preset)
            and all(rp.condition_holds(c, flat) for c in cell.conditions))


# ----------------------------------------------------------------------------------------------
# Verdicts


@dataclass(frozen=True)
class Reading:
    """One cell as a verdict read it: the mean over its finished runs, their standard deviation (None for one run)
    and which seeds and runs those were, out of ``planned`` runs."""

    cell: Cell
    mean: float | None
    std: float | None
    seeds: tuple[int, ...]
    run_ids: tuple[str, ...]
    planned: int

    def text(self) -> str:
        if self.mean is None:
            return "–"
        return f"{self.mean:.2f}" + (f" ± {self.std:.2f}" if self.std is not None else "")


@dataclass
class Verdict:
    expectation: Expectation
    status: str  # PASS | FAIL | MISSING
    measured: str  # the number(s) read, as text (the JSON file keeps the numbers: ``value`` and ``readings``)
    expected: str
    tolerance: str
    value: float | None = None  # the measured number (order: the difference)
    notes: list[str] = field(default_factory=list)
    readings: tuple[Reading, ...] = ()  # per cell: mean, std, seeds


class Metrics:
    """Cell means over the seeds present, read by ``ltbench report``'s own loading and aggregation."""

    def __init__(self, results: Path) -> None:
        self.results = results
        self._runs: dict[str, runset.RunSet] = {}

    def runs(self, split: str) -> runset.RunSet:
        if split not in self._runs:
            if (self.results / "runs").is_dir():
                self._runs[split] = runset.load_runs(self.results, runset.ReportOptions(split=split, heads=True))
            else:  # nothing trained yet: every cell is missing
                self._runs[split] = runset.RunSet(pd.DataFrame(columns=["run_id", "head"]), {})
        return self._runs[split]

    def read(self, cell: Cell, run_ids: Sequence[str]) -> Reading:
        """The cell's mean and std over its finished seeds (mean None when none finished or it has no value)."""
        runs = self.runs(cell.split)
        frame = runs.frame[runs.frame["run_id"].isin(run_ids) & (runs.frame["head"] == cell.head)]
        if frame.empty:
            return Reading(cell, None, None, (), (), len(run_ids))
        subset = runset.RunSet(frame, {rid: runs.flat_configs[rid] for rid in frame["run_id"]})
        options = runset.ReportOptions(split=cell.split, metrics=(cell.metric,), heads=True)
        found = rp.aggregate(subset, options).iloc[0]
        mean, std = (None if math.isnan(found[k]) else float(found[k]) for k in ("mean", "std"))
        return Reading(cell, mean, std, tuple(int(s) for s in found["seeds"].split(";")),
                       tuple(found["run_ids"].split(";")), len(run_ids))

    def heads(self, run_id: str) -> set[str]:
        frame = self.runs("counts").frame
        return set(frame.loc[frame["run_id"] == run_id, "head"])


def judge(suite: Suite, plan: sw.SweepPlan, cells: Mapping[Cell, list[str]]) -> list[Verdict]:
    metrics = Metrics(plan.results)
    return [_judge_one(e, cells, metrics, plan.results) for e in suite.expectations]


def _judge_one(expectation: Expectation, cells: Mapping[Cell, list[str]], metrics: Metrics,
               results: Path) -> Verdict:
    notes = _retry_notes(results, [rid for cell in expectation.cells for rid in cells[cell]])
    if expectation.kind == "finished":
        return _judge_finished(expectation, cells[expectation.cells[0]], metrics, notes)
    read = tuple(metrics.read(cell, cells[cell]) for cell in expectation.cells)
    for reading in read:
        if len(reading.run_ids) < reading.planned:
            notes.append(f"{reading.cell.method}: {len(reading.run_ids)}/{reading.planned} seed(s) finished")
    measured = " vs ".join(r.text() for r in read)
    if any(r.mean is None for r in read):
        return _verdict(expectation, MISSING, measured, None, notes, read)
    if expectation.kind == "value":
        value = read[0].mean
        ok = abs(value - expectation.expected) <= expectation.tolerance
        return _verdict(expectation, PASS if ok else FAIL, measured, value, notes, read)
    difference = read[0].mean - read[1].mean
    status = PASS if difference >= expectation.margin else FAIL
    return _verdict(expectation, status, f"{measured} (Δ {difference:+.2f})", difference, notes, read)


def _judge_finished(expectation: Expectation, run_ids: Sequence[str], metrics: Metrics, notes: list[str]) -> Verdict:
    runs = metrics.runs("counts")
    finished = [rid for rid in run_ids if rid in runs.flat_configs]
    seeds = runs.frame.drop_duplicates("run_id").set_index("run_id")["seed"]
    read = (Reading(expectation.cells[0], None, None, tuple(int(seeds[r]) for r in finished), tuple(finished),
                    len(run_ids)),)
    absent = sorted({h for rid in finished for h in expectation.heads if h not in metrics.heads(rid)})
    measured = f"{len(finished)}/{len(run_ids)} run(s) finished"
    if absent:
        notes.append(f"head(s) {', '.join(absent)} absent")
        return _verdict(expectation, FAIL, measured, None, notes, read)
    status = PASS if len(finished) == len(run_ids) else MISSING
    return _verdict(expectation, status, measured, None, notes, read)


def _verdict(expectation: Expectation, status: str, measured: str, value: float | None, notes: list[str],
             readings: tuple[Reading, ...]) -> Verdict:
    if expectation.kind == "value":
        expected, tolerance = f"{expectation.expected:.2f}", f"± {expectation.tolerance:g}"
    elif expectation.kind == "order":
        expected, tolerance = f"Δ ≥ {expectation.margin:+g}", "–"
    else:
        expected, tolerance = f"head(s) {', '.join(expectation.heads)}", "–"
    return Verdict(expectation, status, measured, expected, tolerance, value, notes, readings)


def _retry_notes(results: Path, run_ids: Sequence[str]) -> list[str]:
    notes = []
    for run_id in dict.fromkeys(run_ids):
        marker = RunRecord(runs_dir(results) / run_id).eager_retry()
        if marker is not None:
            error = marker.get("error", "") if isinstance(marker, dict) else ""
            notes.append(f"run {run_id} retried eagerly after its compiled first epoch failed ({error})")
    return notes


def exit_code(verdicts: Sequence[Verdict]) -> int:
    """0 when every expectation passes, 1 otherwise (a failed or a missing measurement)."""
    return 0 if verdicts and all(v.status == PASS for v in verdicts) else 1
