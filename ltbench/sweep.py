"""Idempotent sweeps, the grid and the plan: what runs a grid asks for, in which waves, and what is done already.

Executing a plan on Ray Tune is ``ltbench.launcher``'s job; drawing it is ``ltbench.console``'s.

The driver expands the grid (methods x datasets x rho x seeds) into resolved :class:`RunConfig` s
up front, so every cell is validated before anything starts and every run id is known. Each run's
state comes only from its folder (``DONE`` = done, ``checkpoint.pt`` = partial, else new), as in
DomainBed; only runs that are not done become Ray trials. Upstream runs (teachers) form earlier
waves, so a teacher shared by several students is trained once, before them. A trial is the exact
code path of ``ltbench run``: :func:`ltbench.stages.ensure` on the deserialised config. Re-running a
sweep after a crash or Ctrl-C therefore completes only what is missing, and interrupted runs resume
from their checkpoints. Ray's own files go to ``<results>/sweeps/<sweep_id>/`` (trial folders named
by run id); ltbench's records stay in ``<results>/runs/``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ltbench.config import SWEEP_SEPARATOR, RunConfig
from ltbench.errors import UserError
from ltbench.records import UNUSABLE_RUN_FIX, config_problem, find_run, run_state, runs_dir
from ltbench.registry import DATASETS, METHODS
from ltbench.resolve import make_config, set_item_values
from ltbench.schemas import grid_values, load_yaml

GRID_KEYS = ("methods", "datasets", "rho", "seeds", "subsample_seeds", "preset", "epochs", "set")
MAX_GRID_RUNS = 10_000  # refused before expanding: more runs than any benchmark needs is a typo (0-99999999)


# ----------------------------------------------------------------------------------------------
# The grid


@dataclass(frozen=True)
class SweepGrid:
    """What to run: every combination of methods x datasets x rho x seeds, with shared settings."""

    methods: tuple[str, ...]
    datasets: tuple[str, ...]
    rhos: tuple[float | None, ...] = (None,)  # None = the dataset's default imbalance
    seeds: tuple[int, ...] = (0,)
    preset: str | None = None
    epochs: int | None = None
    sets: tuple[str, ...] = ()
    # CIFAR-LT subset seeds, a source of variance of their own (docs/protocol.md); None = the dataset's default
    subsample_seeds: tuple[int | None, ...] = (None,)

    def __post_init__(self) -> None:
        for name in ("methods", "datasets", "rhos", "seeds"):
            if not getattr(self, name):
                raise UserError(f"The sweep grid needs at least one value for {name}.")

        if self.size > MAX_GRID_RUNS:
            raise UserError(f"The sweep grid has {self.size:,} cells, past the {MAX_GRID_RUNS:,} runs a sweep may "
                            f"have (methods x datasets x rho x seeds x --set values); split it into smaller sweeps.")

    @property
    def size(self) -> int:
        per_cell = len(self.rhos) * len(self.seeds) * len(self.subsample_seeds)
        return per_cell * sum(len(set_combinations(self, m, d)) for m in self.methods for d in self.datasets)


def parse_list(text: str | Sequence[Any] | None, what: str) -> list[str]:
    """``"a,b"`` or a YAML list -> ``["a", "b"]`` (blank items dropped)."""
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else [str(v) for v in text]
    items = [item.strip() for item in items if str(item).strip()]
    if not items:
        raise UserError(f"{what} is empty.")
    return items


def parse_seeds(text: str | Sequence[Any] | int | None) -> list[int]:
    """``"0,1,2"``, ``"0-4"`` (inclusive range) or a YAML list of integers."""
    if isinstance(text, int):
        return [text]
    seeds: list[int] = []
    for item in parse_list(text, "seeds"):
        first, dash, last = item.partition("-")
        try:
            span = (int(first), int(last)) if dash and first else (int(item), int(item))
        except ValueError as exc:
            raise UserError(f"Seeds must be integers or ranges like 0-4, got {item!r}.") from exc
        if span[0] > span[1]:
            raise UserError(f"The seed range {item!r} is empty: write it low-high, e.g. {last}-{first}.")
        if span[1] - span[0] + len(seeds) >= MAX_GRID_RUNS:
            raise UserError(f"The seeds {text!r} are {span[1] - span[0] + 1 + len(seeds):,} or more, past the "
                            f"{MAX_GRID_RUNS:,} runs a sweep may have; give fewer seeds (e.g. 0-4).")
        seeds += list(range(span[0], span[1] + 1))
    return list(dict.fromkeys(seeds))


def parse_rhos(text: str | Sequence[Any] | float | None) -> list[float]:
    if isinstance(text, (int, float)):
        return [float(text)]
    try:
        return list(dict.fromkeys(float(item) for item in parse_list(text, "rho")))
    except ValueError as exc:
        raise UserError(f"rho takes numbers such as 50,100, got {text!r}.") from exc


def parse_sets(value: Any) -> list[str]:
    """``--set`` items from YAML: a list of ``"key=value"`` strings or a mapping ``{key: value}``, where a
    nested mapping under a method name holds that method's own keys (``{deitlt: {drw_epoch: 8}}``)."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if isinstance(item, Mapping):
                items += [f"{key}:{k}={yaml_set_text(v)}" for k, v in item.items()]
            else:
                items.append(f"{key}={yaml_set_text(item)}")
        return items
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def yaml_set_text(value: Any) -> str:
    """A YAML value as ``--set`` text: a list of lists is values of a tuple field, ``[[160, 180], [120]]`` ->
    ``160,180|120``; a flat list is one tuple, or the values of any other field (config.SWEEP_RULE)."""
    if isinstance(value, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in value):
        if not all(isinstance(v, (list, tuple)) for v in value):
            raise UserError(f"The YAML value {value!r:.80} mixes lists and single values: write a list of lists for "
                            f"the values of a tuple field ([[160, 180], [120, 160]]), or one flat list.")
        return SWEEP_SEPARATOR.join(yaml_set_text(v) for v in value)
    if isinstance(value, (list, tuple)):
        return ",".join(yaml_set_text(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else str(value)


def load_grid_file(path: Path) -> dict[str, Any]:
    """The grid keys of a YAML sweep file (validated; values still unparsed)."""
    payload = load_yaml(Path(path), "sweep file")
    return grid_values({} if payload is None else payload, f"The sweep file {path}")


def build_grid(file_values: Mapping[str, Any] | None = None, *, methods: str | None = None,
               datasets: str | None = None, rho: str | None = None, seeds: str | None = None,
               preset: str | None = None, epochs: int | None = None, sets: Sequence[str] = (),
               subsample_seeds: str | None = None) -> SweepGrid:
    """A grid from a YAML file's values and command-line values; the command line wins, ``--set`` appends."""
    values = dict(file_values or {})
    methods_v = methods if methods is not None else values.get("methods")
    datasets_v = datasets if datasets is not None else values.get("datasets")
    if methods_v is None or datasets_v is None:
        raise UserError("A sweep needs methods and datasets: --methods a,b --datasets x,y, or a YAML grid file.")
    rho_v = rho if rho is not None else values.get("rho")
    seeds_v = seeds if seeds is not None else values.get("seeds", 0)
    subsets_v = subsample_seeds if subsample_seeds is not None else values.get("subsample_seeds")
    epochs_v = epochs if epochs is not None else values.get("epochs")
    return SweepGrid(
        methods=tuple(dict.fromkeys(parse_list(methods_v, "methods"))),
        datasets=tuple(dict.fromkeys(parse_list(datasets_v, "datasets"))),
        rhos=tuple(parse_rhos(rho_v)) if rho_v is not None else (None,),
        seeds=tuple(parse_seeds(seeds_v)),
        preset=preset if preset is not None else values.get("preset"),
        epochs=int(epochs_v) if epochs_v is not None else None,
        sets=(*parse_sets(values.get("set")), *sets),
        subsample_seeds=tuple(parse_seeds(subsets_v)) if subsets_v is not None else (None,),
    )


# ----------------------------------------------------------------------------------------------
# The plan: resolved configs, their upstream runs, and what is already on disk


@dataclass
class Job:
    """One run of the sweep: a requested cell or an upstream run (teacher) of one."""

    config: RunConfig
    wave: int  # 0 = needs nothing; k = needs runs of earlier waves
    requested: bool  # a cell of the grid (False: only needed as an upstream run)
    needs: tuple[str, ...] = ()  # run ids of direct upstream runs
    needed_by: list[str] = field(default_factory=list)
    status: str = "new"  # done | partial | new
    epochs_done: int = 0
    swept: tuple[str, ...] = ()  # this cell's values of the grid's --set axes, e.g. ("gamma=1",)

    @property
    def run_id(self) -> str:
        return self.config.run_id

    @property
    def label(self) -> str:
        rho = self.config.data.get("rho")
        rho_text = f" rho={num_text(rho)}" if rho is not None else ""
        swept = "".join(f" / {item}" for item in self.swept)
        return f"{self.config.method} / {self.config.dataset}{rho_text} / seed {self.config.seed}{swept}"

    @property
    def epochs(self) -> int:
        return int(self.config.hparams.get("epochs", 0))


@dataclass
class SweepPlan:
    grid: SweepGrid | tuple[SweepGrid, ...]  # several grids: a reproduction suite (runs they share train once)
    results: Path
    jobs: dict[str, Job]  # run id -> job, upstream runs first
    notes: list[str] = field(default_factory=list)

    @property
    def sweep_id(self) -> str:
        """Stable for a grid: the same sweep re-run writes Ray's files to the same folder."""
        requested = sorted(j.run_id for j in self.jobs.values() if j.requested)
        return hashlib.sha256(",".join(requested).encode()).hexdigest()[:10]

    @property
    def sweep_dir(self) -> Path:
        return self.results / "sweeps" / self.sweep_id

    def waves(self) -> list[list[Job]]:
        depth = max((j.wave for j in self.jobs.values()), default=-1)
        return [[j for j in self.jobs.values() if j.wave == k] for k in range(depth + 1)]

    def todo(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.status != "done"]

    def counts(self) -> dict[str, int]:
        out = {"done": 0, "partial": 0, "new": 0}
        for job in self.jobs.values():
            out[job.status] += 1
        return out

    def refresh(self) -> None:
        for job in self.jobs.values():
            job.status, job.epochs_done = run_state(self.results, job.run_id)


def plan_sweep(grid: SweepGrid | Sequence[SweepGrid], results: Path) -> SweepPlan:
    """Resolve every cell of one grid or several (validating it) and its upstream runs; read each run's state
    from disk. Jobs are keyed by run id, so a run that several grids or students need is planned once."""
    results = Path(results).resolve()
    grids = (grid,) if isinstance(grid, SweepGrid) else tuple(grid)
    jobs: dict[str, Job] = {}
    notes: list[str] = []
    for one in grids:
        _plan_grid(one, results, jobs, notes)
    plan = SweepPlan(grids[0] if len(grids) == 1 else grids, results, _upstream_first(jobs),
                     list(dict.fromkeys(notes)))
    plan.refresh()
    _refuse_edited_runs(plan)
    return plan


def _refuse_edited_runs(plan: SweepPlan) -> None:
    """A run folder of the plan whose config.json no longer hashes to its id must not be reused or resumed.

    A partial run may lack config.json: resuming writes it from the plan's config, which its folder name is."""
    folders = {j.run_id: runs_dir(plan.results) / j.run_id for j in plan.jobs.values() if j.status != "new"}
    problems = [f"{folder}: {problem}" for run_id, folder in folders.items()
                if (plan.jobs[run_id].status == "done" or (folder / "config.json").exists())
                and (problem := config_problem(folder))]
    if problems:
        raise UserError("Run folder(s) of this sweep cannot be used: " + "; ".join(problems) + ". " + UNUSABLE_RUN_FIX)


def _plan_grid(grid: SweepGrid, results: Path, jobs: dict[str, Job], notes: list[str]) -> None:
    for method in grid.methods:
        for dataset in grid.datasets:
            rhos = grid.rhos
            if grid.rhos != (None,) and not hasattr(DATASETS.get(dataset).Options(), "rho"):
                notes.append(f"{dataset} has a fixed imbalance: the rho axis does not apply to it.")
                rhos = (None,)
            subsets = grid.subsample_seeds
            if subsets != (None,) and not hasattr(DATASETS.get(dataset).Options(), "subsample_seed"):
                notes.append(f"{dataset} has no subset seed: the subsample_seeds axis does not apply to it.")
                subsets = (None,)
            for rho, seed, subset, (sets, swept) in itertools.product(rhos, grid.seeds, subsets,
                                                                        set_combinations(grid, method, dataset)):
                config = make_config(method, dataset, rho=rho, seed=seed, preset=grid.preset, epochs=grid.epochs,
                                     sets=sets, data_options={} if subset is None else {"subsample_seed": subset})
                job = _add_job(config, jobs, requested=True, results=results)
                job.swept = job.swept or swept


def set_combinations(grid: SweepGrid, method: str, dataset: str) -> list[tuple[list[str], tuple[str, ...]]]:
    """Every combination of the values of ``method``'s ``--set`` items on ``dataset``: (the ``--set`` items of one
    run, the swept ones among them). An item with several values (``gamma=1,2``) is an axis (config.SWEEP_RULE)."""
    choices = [set_item_values(method, dataset, item) for item in sets_for(grid, method)]
    return [(list(combo), tuple(v for v, c in zip(combo, choices) if len(c) > 1))
            for combo in itertools.product(*choices)]


def set_axes(grid: SweepGrid) -> dict[str, list[str]]:
    """The swept ``--set`` items of a grid and their values, ``{"cb_focal:gamma": ["1", "2"]}``."""
    axes: dict[str, list[str]] = {}
    for item in grid.sets:
        scope, colon, rest = item.partition(":")
        scoped = colon and "=" not in scope
        for method in ([scope] if scope in grid.methods else []) if scoped else grid.methods:
            values = set_item_values(method, grid.datasets[0], rest if scoped else item)
            if len(values) > 1:
                key = values[0].partition("=")[0].strip()
                axes.setdefault(f"{scope}:{key}" if scoped else key, [v.partition("=")[2] for v in values])
    return axes


def sets_for(grid: SweepGrid, method: str) -> list[str]:
    """The ``--set`` items of one method: shared ``key=value`` ones and its own ``METHOD:key=value`` ones."""
    out = []
    for item in grid.sets:
        scope, colon, rest = item.partition(":")
        if not colon or "=" in scope:
            out.append(item)
        elif scope not in grid.methods:
            raise UserError(f"--set {item}: {scope!r} is not a method of this sweep ({', '.join(grid.methods)}).")
        elif scope == method:
            out.append(rest)
    return out


def _add_job(config: RunConfig, jobs: dict[str, Job], requested: bool, results: Path) -> Job:
    job = jobs.get(config.run_id)
    if job is None:
        upstream = []
        for role, ref in METHODS.get(config.method).requires(config).items():
            if isinstance(ref, RunConfig):
                upstream.append(_add_job(ref, jobs, requested=False, results=results))
            else:
                _check_existing_run(ref, role, results)
        job = Job(config, wave=1 + max((u.wave for u in upstream), default=-1), requested=requested,
                  needs=tuple(u.run_id for u in upstream))
        for up in upstream:
            up.needed_by.append(job.run_id)
        jobs[config.run_id] = job
    job.requested = job.requested or requested
    return job


def _check_existing_run(ref: str, role: str, results: Path) -> None:
    """An upstream run named by reference (e.g. ``teacher_run=ID``) is used as is and must be finished."""
    record = find_run(results, ref)
    if not record.done:
        raise UserError(f"The {role} run {record.path} is not finished (no DONE marker); a sweep does not train "
                        f"runs given by reference. Finish it first, or drop the reference to train one.")


def _upstream_first(jobs: dict[str, Job]) -> dict[str, Job]:
    order = sorted(jobs.values(), key=lambda j: j.wave)  # stable: grid order inside a wave
    return {j.run_id: j for j in order}


# ----------------------------------------------------------------------------------------------
# Descriptions of a plan (the CLI's tables and JSON)


def num_text(value: float | None) -> str:
    if value is None:
        return "default"
    return f"{value:g}"


def describe_job(job: Job) -> dict[str, str]:
    """One row of the dry-run / summary table."""
    rho = job.config.data.get("rho")
    role = "run" if job.requested else "upstream"
    progress = f"{job.epochs_done}/{job.epochs}" if job.status != "new" else f"0/{job.epochs}"
    swept = {"set": " ".join(job.swept)} if job.swept else {}
    return {"run id": job.run_id, "method": job.config.method, "preset": job.config.preset,
            "dataset": job.config.dataset,
            "rho": num_text(rho) if rho is not None else "-", "seed": _seed_text(job.config), **swept, "role": role,
            "wave": str(job.wave), "status": job.status, "epochs": progress}


def _seed_text(config: RunConfig) -> str:
    """The seed, and the CIFAR-LT subset seed when it is not the published subset's 0."""
    subset = config.data.get("subsample_seed", 0)
    return str(config.seed) + (f" (subset {subset})" if subset else "")


def summarize(jobs: Iterable[Job]) -> str:
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    return ", ".join(f"{counts[k]} {k}" for k in ("done", "partial", "new") if counts.get(k))


def grid_summary(grid: SweepGrid) -> str:
    rhos = ",".join(num_text(r) for r in grid.rhos)
    subsets = "" if grid.subsample_seeds == (None,) else f" x {len(grid.subsample_seeds)} subset seed(s)"
    axes = "".join(f" x {key} {' | '.join(values)} ({len(values)})" for key, values in set_axes(grid).items())
    return (f"{len(grid.methods)} method(s) x {len(grid.datasets)} dataset(s) x rho {rhos} x "
            f"{len(grid.seeds)} seed(s){subsets}{axes} = {grid.size} cell(s)")


def json_plan(plan: SweepPlan) -> str:
    return json.dumps({"sweep_id": plan.sweep_id, "jobs": [describe_job(j) for j in plan.jobs.values()]}, indent=2)

