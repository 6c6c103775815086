"""Idempotent sweeps: a grid of ``ltbench run`` calls placed on the available resources by Ray Tune.

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

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ltbench.config import RunConfig
from ltbench.errors import UserError
from ltbench.records import CHECKPOINT, DONE, UNUSABLE_RUN_FIX, config_problem, runs_dir

GRID_KEYS = ("methods", "datasets", "rho", "seeds", "preset", "epochs", "set")


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

    def __post_init__(self) -> None:
        for name in ("methods", "datasets", "rhos", "seeds"):
            if not getattr(self, name):
                raise UserError(f"The sweep grid needs at least one value for {name}.")

    @property
    def size(self) -> int:
        return len(self.methods) * len(self.datasets) * len(self.rhos) * len(self.seeds)


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
                items += [f"{key}:{k}={_yaml_scalar(v)}" for k, v in item.items()]
            else:
                items.append(f"{key}={_yaml_scalar(item)}")
        return items
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else str(value)


def load_grid_file(path: Path) -> dict[str, Any]:
    """The grid keys of a YAML sweep file (validated; values still unparsed)."""
    import yaml

    try:
        payload = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"Cannot read the sweep file {path}: {exc}") from exc
    if not isinstance(payload, Mapping):
        raise UserError(f"The sweep file {path} must be a mapping with keys {', '.join(GRID_KEYS)}.")
    unknown = sorted(set(payload) - set(GRID_KEYS))
    if unknown:
        raise UserError(f"Unknown key(s) {', '.join(unknown)} in {path}. Valid keys: {', '.join(GRID_KEYS)}.")
    return dict(payload)


def build_grid(file_values: Mapping[str, Any] | None = None, *, methods: str | None = None,
               datasets: str | None = None, rho: str | None = None, seeds: str | None = None,
               preset: str | None = None, epochs: int | None = None, sets: Sequence[str] = ()) -> SweepGrid:
    """A grid from a YAML file's values and command-line values; the command line wins, ``--set`` appends."""
    values = dict(file_values or {})
    methods_v = methods if methods is not None else values.get("methods")
    datasets_v = datasets if datasets is not None else values.get("datasets")
    if methods_v is None or datasets_v is None:
        raise UserError("A sweep needs methods and datasets: --methods a,b --datasets x,y, or a YAML grid file.")
    rho_v = rho if rho is not None else values.get("rho")
    seeds_v = seeds if seeds is not None else values.get("seeds", 0)
    epochs_v = epochs if epochs is not None else values.get("epochs")
    return SweepGrid(
        methods=tuple(dict.fromkeys(parse_list(methods_v, "methods"))),
        datasets=tuple(dict.fromkeys(parse_list(datasets_v, "datasets"))),
        rhos=tuple(parse_rhos(rho_v)) if rho_v is not None else (None,),
        seeds=tuple(parse_seeds(seeds_v)),
        preset=preset if preset is not None else values.get("preset"),
        epochs=int(epochs_v) if epochs_v is not None else None,
        sets=(*parse_sets(values.get("set")), *sets),
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

    @property
    def run_id(self) -> str:
        return self.config.run_id

    @property
    def label(self) -> str:
        rho = self.config.data.get("rho")
        rho_text = f" rho={_num(rho)}" if rho is not None else ""
        return f"{self.config.method} / {self.config.dataset}{rho_text} / seed {self.config.seed}"

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


def run_state(results: Path, run_id: str) -> tuple[str, int]:
    """``(done | partial | new, epochs finished)`` read from the run folder alone."""
    folder = runs_dir(results) / run_id
    if (folder / DONE).is_file():
        return "done", _epochs_logged(folder)
    if (folder / CHECKPOINT).is_file():
        return "partial", _epochs_logged(folder)
    return "new", 0


def _epochs_logged(folder: Path) -> int:
    try:
        with open(folder / "metrics.jsonl") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return 0


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
    from ltbench import stages
    from ltbench.registry import DATASETS

    for method in grid.methods:
        for dataset in grid.datasets:
            rhos = grid.rhos
            if grid.rhos != (None,) and not hasattr(DATASETS.get(dataset).Options(), "rho"):
                notes.append(f"{dataset} has a fixed imbalance: the rho axis does not apply to it.")
                rhos = (None,)
            for rho in rhos:
                for seed in grid.seeds:
                    config = stages.make_config(method, dataset, rho=rho, seed=seed, preset=grid.preset,
                                                epochs=grid.epochs, sets=sets_for(grid, method))
                    _add_job(config, jobs, requested=True, results=results)


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
    from ltbench.registry import METHODS

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
    from ltbench.records import find_run

    record = find_run(results, ref)
    if not record.done:
        raise UserError(f"The {role} run {record.path} is not finished (no DONE marker); a sweep does not train "
                        f"runs given by reference. Finish it first, or drop the reference to train one.")


def _upstream_first(jobs: dict[str, Job]) -> dict[str, Job]:
    order = sorted(jobs.values(), key=lambda j: j.wave)  # stable: grid order inside a wave
    return {j.run_id: j for j in order}


# ----------------------------------------------------------------------------------------------
# Resources and the trial


@dataclass(frozen=True)
class Resources:
    """Where trials run. ``None`` = decide from the cluster (whole GPUs when there are GPUs)."""

    gpus_per_trial: float | None = None
    cpus_per_trial: float | None = None
    address: str | None = None  # an existing Ray cluster; None = a local Ray started in-process
    max_failures: int = 1  # retries of a failed trial before it is reported as failed
    num_cpus: int | None = None  # local Ray only: CPUs to offer (default: all)
    num_gpus: int | None = None  # local Ray only: GPUs to offer (default: all visible)


def trial_resources(resources: Resources, cluster: Mapping[str, float]) -> dict[str, float]:
    """CPU/GPU request of one trial given the cluster's totals."""
    total_gpus, total_cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 1))
    gpus = resources.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if total_gpus >= 1 else 0.0
    if gpus > total_gpus:
        raise UserError(f"Each trial asks for {_num(gpus)} GPU(s) but the Ray cluster has {_num(total_gpus)}. "
                        f"Lower --gpus-per-trial (0 runs on CPUs).")
    if 0 < gpus < 1 and gpus * round(1 / gpus) != 1:
        raise UserError(f"--gpus-per-trial {gpus}: a GPU share must divide one GPU evenly (0.5, 0.25, ...).")
    cpus = resources.cpus_per_trial
    if cpus is None:
        # With GPUs, split the CPUs among the GPU slots; on CPUs alone, one trial gets the whole machine.
        cpus = max(1.0, float(int(total_cpus * gpus / total_gpus))) if gpus else total_cpus
    if cpus > total_cpus:
        raise UserError(f"Each trial asks for {_num(cpus)} CPUs but the Ray cluster has {_num(total_cpus)}.")
    return {"cpu": cpus, "gpu": gpus}


def runtime_fields(runtime: Any) -> dict[str, Any]:
    """A picklable copy of a :class:`~ltbench.engine.Runtime` (absolute paths, no callables)."""
    fields = {f.name: getattr(runtime, f.name) for f in dataclasses.fields(runtime) if f.name != "echo"}
    fields["results"] = Path(fields["results"]).resolve()
    fields["data_root"] = Path(fields["data_root"]).resolve()
    fields["progress"] = False
    return fields


def train_trial(params: dict[str, Any], configs: Mapping[str, dict], runtime: Mapping[str, Any]) -> None:
    """The Ray trial: exactly ``ltbench run`` on one config (reuse if done, resume if partial)."""
    from ltbench import stages
    from ltbench.engine import Runtime

    # torch threads = the CPUs Ray gave this trial (unless --threads), so parallel trials do not oversubscribe
    runtime = {**runtime, "threads": runtime.get("threads") or _trial_cpus()}
    config = RunConfig.from_dict(configs[params["run_id"]])
    gpus = _trial_gpus()
    if gpus > 1:  # Ray placed this trial on several GPUs: one process per GPU, as torchrun would
        from ltbench.distributed import ensure_data_parallel

        ensure_data_parallel(configs[params["run_id"]], dict(runtime), gpus)
    # The Trainer seeds every RNG from config.seed inside this process, as in `ltbench run`.
    record = stages.ensure_or_retry_eagerly(config, Runtime(**runtime, echo=print))
    metrics: dict[str, Any] = {"finished": record.done}  # not "done": Ray reserves that key
    if record.done:
        metrics["top1"] = record.result()["final"]["heads"]["main"]["top1"]
    _report(metrics)


def _trial_cpus() -> int | None:
    """The CPUs Ray gave this trial, in whole threads (at least 1); None outside a Ray worker."""
    import ray

    if not ray.is_initialized():  # get_runtime_context would start a Ray here
        return None
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # the driver, not a worker
        return None
    return None if cpus is None else max(1, int(cpus))


def _trial_gpus() -> int:
    """How many whole GPUs Ray gave this trial (0 outside Ray)."""
    try:
        import ray

        return len(ray.get_gpu_ids())
    except Exception:  # not inside a Ray worker
        return 0


def _report(metrics: dict[str, Any]) -> None:
    """The one place that calls Ray's reporting API (it moved between Ray versions)."""
    from ray import tune

    tune.report(metrics)


# ----------------------------------------------------------------------------------------------
# Running


@dataclass
class SweepOutcome:
    plan: SweepPlan
    failed: dict[str, str] = field(default_factory=dict)  # run id -> error message
    tracebacks: dict[str, str] = field(default_factory=dict)  # run id -> Ray's error.txt of the last attempt
    blocked: dict[str, str] = field(default_factory=dict)  # run id -> the failed upstream run it needs
    waiting: dict[str, str] = field(default_factory=dict)  # run id -> the time-boxed upstream run it needs
    interrupted: bool = False


class SweepObserver:
    """Receives trial events (from a Ray callback); the CLI draws a live view from it."""

    def wave_started(self, wave: int, jobs: list[Job], resources: Mapping[str, float]) -> None: ...

    def trial_started(self, run_id: str) -> None: ...

    def trial_finished(self, run_id: str, error: str | None) -> None: ...

    def trial_retried(self, run_id: str) -> None: ...

    def tick(self) -> None: ...


def run_sweep(plan: SweepPlan, runtime: Any, resources: Resources,
              observer: SweepObserver | None = None) -> SweepOutcome:
    """Train every job of the plan that is not done, wave by wave, as Ray Tune trials."""
    outcome = SweepOutcome(plan)
    if not plan.todo():
        return outcome
    observer = observer or SweepObserver()
    _write_sweep_file(plan)
    fields = runtime_fields(runtime)
    if fields["download"]:  # once, here, rather than racing in every trial
        _download_datasets(plan, fields["data_root"])
        fields["download"] = False
    started_ray = _start_ray(resources)
    try:
        import ray

        request = trial_resources(resources, ray.cluster_resources())
        for wave, jobs in enumerate(plan.waves()):
            runnable = [j for j in jobs if j.status != "done" and not _block(j, plan, outcome)]
            if not runnable:
                continue
            observer.wave_started(wave, runnable, request)
            _run_wave(plan, wave, runnable, fields, request, resources, observer, outcome)
            plan.refresh()
            stopped = [j for j in runnable if j.status != "done" and j.run_id not in outcome.failed]
            if stopped and fields.get("stop_after_epochs") is None:
                outcome.interrupted = True
                break
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    plan.refresh()
    _write_status(plan, outcome)
    return outcome


def _download_datasets(plan: SweepPlan, data_root: Path) -> None:
    from ltbench.registry import DATASETS

    for name in dict.fromkeys(j.config.dataset for j in plan.todo()):
        dataset_cls = DATASETS.get(name)
        if hasattr(dataset_cls, "download"):
            dataset_cls.download(data_root)


def _block(job: Job, plan: SweepPlan, outcome: SweepOutcome) -> bool:
    """True when an upstream run is not done: failed (an error) or time-boxed (``--stop-after-epochs``)."""
    missing = [u for u in job.needs if plan.jobs[u].status != "done"]
    failed = [u for u in missing if u in outcome.failed or u in outcome.blocked]
    if failed:
        outcome.blocked[job.run_id] = f"upstream run {', '.join(failed)} failed"
    elif missing:
        outcome.waiting[job.run_id] = f"upstream run {', '.join(missing)} not finished yet"
    return bool(missing)


def _start_ray(resources: Resources) -> bool:
    """Connect to ``--address`` or start a private local Ray; True when we started it."""
    import logging

    import ray

    # Trials use absolute paths; keeping the driver's working directory also keeps relative user paths valid.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own console output; ltbench draws its own view
    if ray.is_initialized():
        return False
    env = {"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}}
    if resources.address:
        try:
            ray.init(address=resources.address, runtime_env=env, logging_level=logging.WARNING,
                     log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"Cannot connect to the Ray cluster at {resources.address}: {exc}") from exc
        return True
    # Ray enables token authentication for a new local cluster by default and announces it with a warning on
    # every start unless RAY_AUTH_MODE is set; keep that secure default for this private cluster, without the notice.
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        ray.init(address="local", num_cpus=resources.num_cpus or os.cpu_count(), num_gpus=resources.num_gpus
                 if resources.num_gpus is not None else _visible_gpus(), include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False, runtime_env=env)
    finally:
        notice.setLevel(level)
    return True


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _run_wave(plan: SweepPlan, wave: int, jobs: list[Job], fields: dict[str, Any], request: dict[str, float],
              resources: Resources, observer: SweepObserver, outcome: SweepOutcome) -> None:
    from ray import tune

    configs = {j.run_id: j.config.to_dict() for j in jobs}
    trainable = tune.with_resources(tune.with_parameters(train_trial, configs=configs, runtime=fields), request)
    tuner = tune.Tuner(
        trainable,
        param_space={"run_id": tune.grid_search([j.run_id for j in jobs])},
        tune_config=tune.TuneConfig(trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
                                     reuse_actors=True),  # torch and the data load once per worker
        run_config=tune.RunConfig(
            name=f"{time.strftime('%Y%m%d-%H%M%S')}-wave{wave}", storage_path=str(plan.sweep_dir),
            failure_config=tune.FailureConfig(max_failures=resources.max_failures), verbose=0,
            log_to_file=True, callbacks=[_ray_callback(observer)],
        ),
    )
    with _quiet_tune_errors():  # failures are reported once, by run, at the end
        grid = tuner.fit()
    for result in grid:
        if result.error is not None:
            run_id = result.config["run_id"]
            outcome.failed[run_id] = error_summary(result.error)
            outcome.tracebacks[run_id] = str(Path(result.path) / "error.txt")


@contextlib.contextmanager
def _quiet_tune_errors() -> Iterator[None]:
    import logging

    names = ("ray.tune.execution.tune_controller", "ray.tune.tune", "ray.tune.analysis.experiment_analysis")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _trial_name(trial: Any) -> str:
    return str(trial.config["run_id"])


# Tune pickles its callbacks with the experiment state; the observer (a live console) stays out of it.
_OBSERVERS: dict[int, SweepObserver] = {}


def _observer(key: int) -> SweepObserver:
    return _OBSERVERS.get(key) or SweepObserver()


def _ray_callback(observer: SweepObserver) -> Any:
    from ray.tune import Callback

    key = id(observer)
    _OBSERVERS[key] = observer

    class _Forward(Callback):
        @property
        def to(self) -> SweepObserver:
            return _observer(key)

        def on_trial_start(self, iteration, trials, trial, **info):
            self.to.trial_started(_trial_name(trial))

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.to.trial_retried(_trial_name(trial))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.to.trial_finished(_trial_name(trial), None)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.to.trial_finished(_trial_name(trial), error_summary(_trial_error(trial)))

        def on_step_end(self, iteration, trials, **info):
            self.to.tick()

    return _Forward()


def _trial_error(trial: Any) -> Any:
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        return Path(path).read_text()
    return "unknown error (see Ray's logs)"


def error_summary(error: Any) -> str:
    """The last line of the root cause, e.g. ``UserError: The results folder ... is not writable``."""
    cause = error
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    if isinstance(cause, BaseException) and not hasattr(cause, "traceback_str"):
        return f"{type(cause).__name__}: {cause}".strip()
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return lines[-1] if lines else type(cause).__name__


def _write_sweep_file(plan: SweepPlan) -> None:
    from ltbench.records import atomic_write_json

    path = plan.sweep_dir / "sweep.json"
    if not path.exists():
        grids = [{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(g).items()}
                 for g in (plan.grid if isinstance(plan.grid, tuple) else (plan.grid,))]
        atomic_write_json(path, {"grid": grids[0] if len(grids) == 1 else grids,
                                 "runs": [j.run_id for j in plan.jobs.values() if j.requested],
                                 "upstream": [j.run_id for j in plan.jobs.values() if not j.requested]})


def _write_status(plan: SweepPlan, outcome: SweepOutcome) -> None:
    from ltbench.records import atomic_write_json

    atomic_write_json(plan.sweep_dir / "status.json", {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "interrupted": outcome.interrupted,
        "runs": {j.run_id: {"label": j.label, "status": j.status, "epochs": f"{j.epochs_done}/{j.epochs}",
                            "error": outcome.failed.get(j.run_id), "traceback": outcome.tracebacks.get(j.run_id),
                            "blocked": outcome.blocked.get(j.run_id), "waiting": outcome.waiting.get(j.run_id)}
                 for j in plan.jobs.values()},
    })


# ----------------------------------------------------------------------------------------------
# The live view


class LiveView(SweepObserver):
    """A rich live panel: runs done / running / failed / pending, per-trial epochs, and an ETA.

    The ETA divides the epochs still to train by the epochs trained per second so far in this
    call, so it is meaningful before the first trial finishes and with runs of unequal length.
    """

    def __init__(self, plan: SweepPlan, console: Any, refresh_s: float = 1.0) -> None:
        from rich.live import Live

        self.plan, self.refresh_s, self.console = plan, refresh_s, console
        self.running: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        self.retries: dict[str, int] = {}
        self.start_epochs = {j.run_id: j.epochs_done for j in plan.jobs.values()}
        self.started_at: float | None = None
        self.last_draw = 0.0
        self.wave_text = ""
        # In a log file (no terminal) a redrawn panel is noise: print one line per event instead.
        self.live = Live(self.render(), console=console, refresh_per_second=4) if console.is_terminal else None

    def __enter__(self) -> LiveView:
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.tick(force=True)
        if self.live:
            self.live.__exit__(*exc)

    # --- events ------------------------------------------------------------------------------
    def trial_started(self, run_id: str) -> None:
        self.started_at = self.started_at or time.time()
        self.running[run_id] = time.time()
        self._event("started", run_id)

    def trial_retried(self, run_id: str) -> None:
        self.retries[run_id] = self.retries.get(run_id, 0) + 1
        self.running.pop(run_id, None)
        self._event(f"retry {self.retries[run_id]}", run_id)

    def trial_finished(self, run_id: str, error: str | None) -> None:
        self.running.pop(run_id, None)
        self.plan.jobs[run_id].status, self.plan.jobs[run_id].epochs_done = run_state(self.plan.results, run_id)
        if error is not None:
            self.failed[run_id] = error
        self._event("failed: " + error if error else self.plan.jobs[run_id].status, run_id)

    def wave_started(self, wave: int, jobs: list[Job], resources: Mapping[str, float]) -> None:
        upstream = sum(not j.requested for j in jobs)
        what = f" ({upstream} upstream)" if upstream else ""
        self.wave_text = (f"wave {wave}: {len(jobs)} run(s){what}, each on {_num(resources['cpu'])} CPU(s) and "
                          f"{_num(resources['gpu'])} GPU(s)")
        if self.live:
            self.tick(force=True)
        else:
            self.console.print(self.wave_text, highlight=False, soft_wrap=True, markup=False)

    def _event(self, what: str, run_id: str) -> None:
        if self.live:
            self.tick(force=True)
            return
        done = sum(j.status == "done" for j in self.plan.jobs.values())
        self.console.print(f"[{done}/{len(self.plan.jobs)} done, ETA {self.eta()}] {run_id} "
                           f"({self.plan.jobs[run_id].label}): {what}", highlight=False, soft_wrap=True, markup=False)

    def tick(self, force: bool = False) -> None:
        if self.live and (force or time.time() - self.last_draw >= self.refresh_s):
            self.last_draw = time.time()
            for run_id in self.running:
                job = self.plan.jobs[run_id]
                job.status, job.epochs_done = run_state(self.plan.results, run_id)
            self.live.update(self.render())

    # --- drawing -----------------------------------------------------------------------------
    def eta(self) -> str:
        jobs = self.plan.jobs.values()
        trained = sum(max(0, j.epochs_done - self.start_epochs[j.run_id]) for j in jobs)
        left = sum(j.epochs - j.epochs_done for j in jobs if j.status != "done" and j.run_id not in self.failed)
        if not self.started_at or trained == 0 or left == 0:
            return "-"
        return _duration(left * (time.time() - self.started_at) / trained)

    def render(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        jobs = list(self.plan.jobs.values())
        done = sum(j.status == "done" for j in jobs)
        pending = len(jobs) - done - len(self.running) - len(self.failed)
        elapsed = _duration(time.time() - self.started_at) if self.started_at else "0:00:00"
        head = Text.assemble(("sweep ", "bold"), (self.plan.sweep_id, "cyan"), f"  {done}/{len(jobs)} done  ",
                             (f"{len(self.running)} running", "yellow"), "  ",
                             (f"{len(self.failed)} failed", "red" if self.failed else ""),
                             f"  {max(0, pending)} pending  elapsed {elapsed}  ETA {self.eta()}")
        table = Table(box=None, pad_edge=False, header_style="dim")
        for col in ("run id", "run", "epochs", "time", "retries"):
            table.add_column(col)
        for run_id, since in sorted(self.running.items()):
            job = self.plan.jobs[run_id]
            table.add_row(run_id, job.label, f"{job.epochs_done}/{job.epochs}", _duration(time.time() - since),
                          str(self.retries.get(run_id, "")))
        parts: list[Any] = [head, Text(self.wave_text, style="dim")] + ([table] if self.running else [])
        parts += [Text(f"failed {run_id} ({self.plan.jobs[run_id].label}): {error}", style="red")
                  for run_id, error in sorted(self.failed.items())[-5:]]
        return Group(*parts)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------------------------
# Small helpers shared with the CLI


def _num(value: float | None) -> str:
    if value is None:
        return "default"
    return f"{value:g}"


def describe_job(job: Job) -> dict[str, str]:
    """One row of the dry-run / summary table."""
    rho = job.config.data.get("rho")
    role = "run" if job.requested else "upstream"
    progress = f"{job.epochs_done}/{job.epochs}" if job.status != "new" else f"0/{job.epochs}"
    return {"run id": job.run_id, "method": job.config.method, "dataset": job.config.dataset,
            "rho": _num(rho) if rho is not None else "-", "seed": str(job.config.seed), "role": role,
            "wave": str(job.wave), "status": job.status, "epochs": progress}


def summarize(jobs: Iterable[Job]) -> str:
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    return ", ".join(f"{counts[k]} {k}" for k in ("done", "partial", "new") if counts.get(k))


def grid_summary(grid: SweepGrid) -> str:
    rhos = ",".join(_num(r) for r in grid.rhos)
    return (f"{len(grid.methods)} method(s) x {len(grid.datasets)} dataset(s) x rho {rhos} x "
            f"{len(grid.seeds)} seed(s) = {grid.size} cell(s)")


def json_plan(plan: SweepPlan) -> str:
    return json.dumps({"sweep_id": plan.sweep_id, "jobs": [describe_job(j) for j in plan.jobs.values()]}, indent=2)

