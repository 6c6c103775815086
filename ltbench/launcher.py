"""Where runs execute: a sweep plan's waves as Ray Tune trials, and one run over several local processes.

A trial is the exact code path of ``ltbench run``: :func:`ltbench.stages.ensure_or_retry_eagerly` on the
deserialised config and a :class:`~ltbench.runtime.Runtime` rebuilt from its portable form. Ray's own files go to
``<results>/sweeps/<sweep_id>/`` (trial folders named by run id); ltbench's records stay in ``<results>/runs/``.
A trial that Ray placed on several GPUs trains with one process per GPU (:func:`ensure_data_parallel`), as
``torchrun --nproc_per_node`` would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ltbench import stages
from ltbench.config import RunConfig
from ltbench.errors import UserError
from ltbench.records import atomic_write_json
from ltbench.registry import DATASETS
from ltbench.runtime import Runtime
from ltbench.sweep import Job, SweepPlan, num_text


@dataclass(frozen=True)
class Resources:
    """Where trials run. ``None`` = decide from the cluster (whole GPUs when there are GPUs)."""

    gpus_per_trial: float | None = None
    cpus_per_trial: float | None = None
    address: str | None = None  # an existing Ray cluster; None = a local Ray started in-process
    max_failures: int = 1  # retries of a failed trial before it is reported as failed
    num_cpus: int | None = None  # local Ray only: CPUs to offer (default: all)
    num_gpus: int | None = None  # local Ray only: GPUs to offer (default: all visible)


# Resources a reproduction suite's runtime: block may set for its trials (besides runtime.suite_keys())
SUITE_RESOURCES = ("gpus_per_trial", "cpus_per_trial", "max_failures")


def trial_resources(resources: Resources, cluster: Mapping[str, float]) -> dict[str, float]:
    """CPU/GPU request of one trial given the cluster's totals."""
    total_gpus, total_cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 1))
    gpus = resources.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if total_gpus >= 1 else 0.0
    if gpus > total_gpus:
        raise UserError(f"Each trial asks for {num_text(gpus)} GPU(s) but the Ray cluster has {num_text(total_gpus)}. "
                        f"Lower --gpus-per-trial (0 runs on CPUs).")
    if 0 < gpus < 1 and gpus * round(1 / gpus) != 1:
        raise UserError(f"--gpus-per-trial {gpus}: a GPU share must divide one GPU evenly (0.5, 0.25, ...).")
    cpus = resources.cpus_per_trial
    if cpus is None:
        # With GPUs, split the CPUs among the GPU slots; on CPUs alone, one trial gets the whole machine.
        cpus = max(1.0, float(int(total_cpus * gpus / total_gpus))) if gpus else total_cpus
    if cpus > total_cpus:
        raise UserError(f"Each trial asks for {num_text(cpus)} CPUs but the Ray cluster has {num_text(total_cpus)}.")
    return {"cpu": cpus, "gpu": gpus}


def train_trial(params: dict[str, Any], configs: Mapping[str, dict], runtime: Mapping[str, Any]) -> None:
    """The Ray trial: exactly ``ltbench run`` on one config (reuse if done, resume if partial)."""
    # torch threads = the CPUs Ray gave this trial (unless --threads), so parallel trials do not oversubscribe
    runtime = {**runtime, "threads": runtime.get("threads") or trial_cpus()}
    config = RunConfig.from_dict(configs[params["run_id"]])
    gpus = _trial_gpus()
    if gpus > 1:  # Ray placed this trial on several GPUs: one process per GPU, as torchrun would
        ensure_data_parallel(configs[params["run_id"]], dict(runtime), gpus)
    # The Trainer seeds every RNG from config.seed inside this process, as in `ltbench run`.
    record = stages.ensure_or_retry_eagerly(config, Runtime.from_portable(runtime, echo=tagged_echo(config.run_id)))
    metrics: dict[str, Any] = {"finished": record.done}  # not "done": Ray reserves that key
    if record.done:
        metrics["top1"] = record.result()["final"]["heads"]["main"]["top1"]
    report_to_tune(metrics)


def tagged_echo(run_id: str) -> Callable[[str], None]:
    """A trial's ``echo``: each line starts with its run id, so a Ray worker reused for several runs keeps them
    apart in its log (each run's own lines are also in its folder's log.txt)."""

    def echo(line: str) -> None:
        print(f"[{run_id}] {line}", flush=True)

    return echo


def trial_cpus() -> int | None:
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


def report_to_tune(metrics: dict[str, Any]) -> None:
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


def run_sweep(plan: SweepPlan, runtime: Runtime, resources: Resources,
              observer: SweepObserver | None = None) -> SweepOutcome:
    """Train every job of the plan that is not done, wave by wave, as Ray Tune trials."""
    outcome = SweepOutcome(plan)
    if not plan.todo():
        return outcome
    observer = observer or SweepObserver()
    _write_sweep_file(plan)
    fields = runtime.portable()
    if fields["download"]:  # once, here, rather than racing in every trial
        _download_datasets(plan, fields["data_root"])
        fields["download"] = False
    started_ray = start_ray(resources)
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


def start_ray(resources: Resources) -> bool:
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
    path = plan.sweep_dir / "sweep.json"
    if not path.exists():
        grids = [{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(g).items()}
                 for g in (plan.grid if isinstance(plan.grid, tuple) else (plan.grid,))]
        atomic_write_json(path, {"grid": grids[0] if len(grids) == 1 else grids,
                                 "runs": [j.run_id for j in plan.jobs.values() if j.requested],
                                 "upstream": [j.run_id for j in plan.jobs.values() if not j.requested]})


def _write_status(plan: SweepPlan, outcome: SweepOutcome) -> None:
    atomic_write_json(plan.sweep_dir / "status.json", {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "interrupted": outcome.interrupted,
        "runs": {j.run_id: {"label": j.label, "status": j.status, "epochs": f"{j.epochs_done}/{j.epochs}",
                            "error": outcome.failed.get(j.run_id), "traceback": outcome.tracebacks.get(j.run_id),
                            "blocked": outcome.blocked.get(j.run_id), "waiting": outcome.waiting.get(j.run_id)}
                 for j in plan.jobs.values()},
    })


# ----------------------------------------------------------------------------------------------
# One run over several local processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_data_parallel(config_dict: dict[str, Any], runtime_fields: dict[str, Any], nprocs: int,
                         backend: str | None = None) -> None:
    """Train one run with ``nprocs`` local processes, as ``torchrun --nproc_per_node`` would.

    Used by sweep trials that Ray placed on several GPUs of one node (Ray sets CUDA_VISIBLE_DEVICES to
    them, so local rank i drives the i-th of the trial's GPUs). ``runtime_fields``: :meth:`Runtime.portable`.
    """
    import torch.multiprocessing as mp

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nprocs)}
    if backend:
        env["LTBENCH_DIST_BACKEND"] = backend
    mp.start_processes(_rank_main, args=(nprocs, env, config_dict, runtime_fields), nprocs=nprocs,
                       start_method="spawn", join=True)


def _rank_main(rank: int, nprocs: int, env: dict[str, str], config_dict: dict[str, Any],
               runtime_fields: dict[str, Any]) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nprocs)})
    try:
        stages.ensure(RunConfig.from_dict(config_dict), Runtime.from_portable(runtime_fields))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
