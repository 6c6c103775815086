"""``ltbench tune``: hyperparameter search on Ray Tune whose objective is read from the val split only.

A search samples a method's typed hyperparameters from ranges (``lr=loguniform(1e-3,1e-1)``), trains each sample as
an ordinary run on the search seed, and reports the chosen val metric after every evaluated epoch. Random search
(Ray's BasicVariantGenerator), OptunaSearch or HyperOptSearch propose the samples; ASHA stops weak trials early,
and a stopped trial stays a partial run folder that resumes like any other. The objective is a val number
(:data:`OBJECTIVES`); one naming test is refused before anything starts. The best completed trial's configuration
is then trained on k fresh seeds (never the search seed, whose run was selected on val) and reported on test;
the search's trials are listed in ``<results>/tunes/<tune_id>/tune.json`` and the report keeps them apart.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ltbench import stages
from ltbench.config import RunConfig, field_types, read_yaml_mapping
from ltbench.errors import UserError
from ltbench.launcher import Resources, report_to_tune, start_ray, tagged_echo, trial_cpus
from ltbench.records import run_record, tune_dir, write_tune_manifest
from ltbench.registry import METHODS
from ltbench.resolve import make_config
from ltbench.runtime import RUNTIME_OPTIONS, Runtime

# objective name -> path in a metrics row's "val" block (main head)
OBJECTIVES = {"val_top1": ("top1",), "val_many": ("counts", "many"), "val_medium": ("counts", "medium"),
              "val_few": ("counts", "few")}
SEARCHERS = ("random", "optuna", "hyperopt")
SCHEDULERS = ("asha", "fifo")
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
NOT_SEARCHABLE = {"epochs", "eval_every"}  # the schedule ASHA stops along, and the evaluations it stops at


@dataclass(frozen=True)
class Domain:
    """One searched hyperparameter: a distribution and its bounds (or choices)."""

    name: str
    kind: str
    args: tuple[Any, ...]

    def to_ray(self) -> Any:
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](*self.args)

    def text(self) -> str:
        return f"{self.name}={self.kind}({', '.join(map(str, self.args))})"


@dataclass(frozen=True)
class TuneSpec:
    """Everything a search needs; its hash names the tune folder, so the same command finds its trials again."""

    method: str
    dataset: str
    rho: float | None
    space: tuple[Domain, ...]
    objective: str = "val_top1"
    searcher: str = "random"
    scheduler: str = "asha"
    trials: int = 8
    final_seeds: int = 2
    search_seed: int = 0
    preset: str | None = None
    epochs: int | None = None
    sets: tuple[str, ...] = ()
    concurrent: int | None = None  # trials at once (default: what the CPUs allow)
    reduction_factor: int = 2  # ASHA keeps the best 1/reduction_factor at each rung

    @property
    def tune_id(self) -> str:
        payload = {k: v for k, v in self.__dict__.items() if k != "concurrent"}
        payload["space"] = [d.text() for d in self.space]
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]

    def final_seed_list(self) -> list[int]:
        """The first ``final_seeds`` seeds other than the search seed."""
        return [s for s in range(self.final_seeds + 1) if s != self.search_seed][:self.final_seeds]


# ----------------------------------------------------------------------------------------------
# Parsing and validation


_ITEM = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*[=:]\s*(\w+)\s*\((.*)\)\s*$")


def parse_space(items: Sequence[str], file_values: Mapping[str, Any] | None = None) -> list[Domain]:
    """``NAME=KIND(ARGS)`` items and a YAML mapping ``NAME: KIND(ARGS)`` (or ``NAME: [choices]``) as domains."""
    texts = [f"{k}=choice({','.join(map(str, v))})" if isinstance(v, list) else f"{k}={v}"
             for k, v in (file_values or {}).items()] + list(items)
    domains = {}
    for text in texts:
        match = _ITEM.match(text)
        if not match or match.group(2) not in DISTRIBUTIONS:
            raise UserError(f"Search range {text!r} is not NAME=KIND(ARGS) with KIND one of {', '.join(DISTRIBUTIONS)}"
                            f", e.g. lr=loguniform(1e-3,1e-1), tau=uniform(0.5,2), batch_size=choice(64,128).")
        name, kind, raw = match.groups()
        args = tuple(_number(a.strip()) for a in raw.split(",") if a.strip())
        domains[name] = _checked(Domain(name, kind, args), text)
    if not domains:
        raise UserError("A search needs at least one range: --space lr=loguniform(1e-3,1e-1) or --space-file.")
    return list(domains.values())


def load_space_file(path: Path) -> dict[str, Any]:
    """A YAML search space: a mapping NAME -> "KIND(ARGS)" or a list of choices."""
    return read_yaml_mapping(path, "search space", "names to ranges, e.g. lr: loguniform(1e-3, 1e-1)")


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _checked(domain: Domain, text: str) -> Domain:
    if domain.kind == "choice":
        if not domain.args:
            raise UserError(f"{text}: choice() needs at least one value.")
        return domain
    if len(domain.args) != 2 or not all(isinstance(a, (int, float)) for a in domain.args):
        raise UserError(f"{text}: {domain.kind}() takes two numbers, low and high.")
    low, high = domain.args
    if not (math.isfinite(low) and math.isfinite(high) and low < high) or (domain.kind == "loguniform" and low <= 0):
        raise UserError(f"{text}: needs finite low < high{' and low > 0' if domain.kind == 'loguniform' else ''}.")
    return Domain(domain.name, domain.kind, (float(low), float(high)) if domain.kind != "randint" else (low, high))


def check_spec(spec: TuneSpec) -> None:
    """Refuse before anything runs: a test objective, unknown searchers, names that are no typed hyperparameter."""
    if spec.objective.startswith("test") or spec.objective in {"top1", "many", "medium", "few"}:
        raise UserError(f"--objective {spec.objective} would select hyperparameters on the test split, which "
                        f"ltbench tune never reads: tune on val ({', '.join(OBJECTIVES)}) and report on test once, "
                        f"for the retrained best configuration.")
    if spec.objective not in OBJECTIVES:
        raise UserError(f"--objective {spec.objective!r} is not one of {', '.join(OBJECTIVES)}.")
    if spec.searcher not in SEARCHERS or spec.scheduler not in SCHEDULERS:
        raise UserError(f"--searcher takes {', '.join(SEARCHERS)} and --scheduler {', '.join(SCHEDULERS)}.")
    if spec.trials < 1 or spec.final_seeds < 1 or spec.reduction_factor < 2:
        raise UserError("--trials and --final-seeds must be >= 1, --reduction-factor >= 2.")
    fields = field_types(METHODS.get(spec.method).Hparams)
    for domain in spec.space:
        if domain.name in RUNTIME_OPTIONS or domain.name not in fields or domain.name in NOT_SEARCHABLE:
            raise UserError(f"{domain.name} cannot be searched: give a typed hyperparameter of {spec.method} other "
                            f"than {', '.join(sorted(NOT_SEARCHABLE))} (valid: {', '.join(sorted(fields))}).")
    if spec.searcher == "hyperopt":
        _require("hyperopt", "hyperopt")
    if spec.searcher == "optuna":
        _require("optuna", "optuna")


def _require(module: str, package: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        raise UserError(f"--searcher {module} needs the {package} package: pip install {package} "
                        f"(or pip install 'ltbench[tune]').") from exc


# ----------------------------------------------------------------------------------------------
# Trials


def trial_config(spec: TuneSpec, params: Mapping[str, Any], seed: int) -> RunConfig:
    """The run of one sample: the spec's settings, eval_every=1 unless set (ASHA stops at evaluations), the sample."""
    sets = [*spec.sets, *([] if any(s.startswith("eval_every=") for s in spec.sets) else ["eval_every=1"])]
    sets += [f"{k}={v}" for k, v in params.items()]
    return make_config(spec.method, spec.dataset, rho=spec.rho, seed=seed, preset=spec.preset, epochs=spec.epochs,
                       sets=sets)


def objective_value(row: Mapping[str, Any], objective: str) -> float:
    """The objective of one metrics row, read from its val block only (never ``eval``, the test numbers)."""
    value: Any = row["val"]["main"]
    for key in OBJECTIVES[objective]:
        value = (value or {}).get(key)
    if value is None:
        raise UserError(f"The objective {objective} is undefined on this val split (its group has no class); "
                        f"choose another --objective.")
    return float(value)


def tune_trial(params: dict[str, Any], spec: TuneSpec, runtime: Mapping[str, Any]) -> None:
    """The Ray trial: train the sample one evaluation at a time, reporting the val objective after each; ASHA may
    stop it between two, leaving a resumable run folder."""
    config = trial_config(spec, params, spec.search_seed)
    chunk = Runtime.from_portable({**runtime, "threads": runtime.get("threads") or trial_cpus(),
                                   "stop_after_epochs": int(config.hparams.get("eval_every") or 1)},
                                  echo=tagged_echo(config.run_id))
    reported = 0
    while True:
        record = stages.ensure(config, chunk)
        rows = [r for r in record.metrics() if "val" in r]
        if not rows and not record.done:
            continue  # the chunk ended before an evaluation
        if not rows:
            raise UserError(f"{spec.dataset} has no val split here ({record.result()['val_split']['source']}), so "
                            f"there is nothing to tune on.")
        for row in rows[reported:]:
            report_to_tune({"objective": objective_value(row, spec.objective), "epoch": row["epoch"],
                     "run_id": config.run_id, "finished": record.done and row is rows[-1]})
        reported = len(rows)
        if record.done:
            return


@dataclass
class TuneOutcome:
    spec: TuneSpec
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    final_runs: list[str] = field(default_factory=list)
    manifest: Path | None = None


def run_tune(spec: TuneSpec, runtime: Runtime, resources: Resources | None = None) -> TuneOutcome:
    """Search, pick the best completed trial on val, retrain it on the final seeds; write the manifest."""
    check_spec(spec)
    trial_config(spec, {d.name: _example(d) for d in spec.space}, spec.search_seed)  # a bad --set fails here
    resources = resources or Resources()
    started = start_ray(resources)
    try:
        grid = _fit(spec, runtime, resources)
    finally:
        if started:
            import ray

            ray.shutdown()
    outcome = TuneOutcome(spec, [_trial_facts(spec, r, runtime) for r in grid])
    outcome.best = _best(outcome.trials)
    if outcome.best is None:
        raise UserError(f"No trial of tune {spec.tune_id} finished ({'; '.join(t['status'] for t in outcome.trials)}"
                        f"); nothing to retrain. Run the same command again to resume them.")
    for seed in spec.final_seed_list():
        final = trial_config(spec, outcome.best["params"], seed)
        outcome.final_runs.append(stages.ensure_or_retry_eagerly(final, runtime).run_id)
    outcome.manifest = write_tune_manifest(runtime.results, spec.tune_id, _manifest(outcome))
    return outcome


def _example(domain: Domain) -> Any:
    return domain.args[0]


def _fit(spec: TuneSpec, runtime: Runtime, resources: Resources) -> Any:
    import ray
    from ray import tune

    cpus = resources.cpus_per_trial or 1
    concurrent = spec.concurrent or max(1, int(ray.cluster_resources().get("CPU", 1) // cpus))
    trainable = tune.with_resources(tune.with_parameters(tune_trial, spec=spec, runtime=runtime.portable()),
                                    {"cpu": cpus, "gpu": resources.gpus_per_trial or 0})
    tuner = tune.Tuner(trainable, param_space={d.name: d.to_ray() for d in spec.space},
                       tune_config=tune.TuneConfig(metric="objective", mode="max", num_samples=spec.trials,
                                                   search_alg=_searcher(spec), scheduler=_scheduler(spec),
                                                   max_concurrent_trials=concurrent),
                       run_config=tune.RunConfig(name="search", verbose=0, log_to_file=True,
                                                 storage_path=str(tune_dir(Path(runtime.results).resolve(),
                                                                           spec.tune_id))))
    return tuner.fit()


def _searcher(spec: TuneSpec) -> Any:
    if spec.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=spec.search_seed)
    if spec.searcher == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(random_state_seed=spec.search_seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=spec.search_seed)


def _scheduler(spec: TuneSpec) -> Any:
    if spec.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    hp = trial_config(spec, {d.name: _example(d) for d in spec.space}, 0).hparams
    evaluations = math.ceil(int(hp["epochs"]) / int(hp.get("eval_every") or 1))  # the reports a full trial makes
    return ASHAScheduler(time_attr="training_iteration", max_t=max(1, evaluations), grace_period=1,
                         reduction_factor=spec.reduction_factor)


def _trial_facts(spec: TuneSpec, result: Any, runtime: Runtime) -> dict[str, Any]:
    params = {d.name: result.config[d.name] for d in spec.space}
    record = run_record(runtime.results, trial_config(spec, params, spec.search_seed))
    history = result.metrics_dataframe
    values = [] if history is None or "objective" not in history else history["objective"].tolist()
    epochs = [] if history is None or "epoch" not in history else history["epoch"].astype(int).tolist()
    status = "completed" if record.done else f"stopped early after epoch {epochs[-1] if epochs else 0}"
    if result.error is not None:
        status = f"failed: {str(result.error).strip().splitlines()[-1][:200]}"
    return {"run_id": record.run_id, "params": params, "objective": values[-1] if values else None,
            "history": list(zip(epochs, values)), "status": status}


def _best(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the highest objective at its last evaluation (the first of ties)."""
    completed = [t for t in trials if t["status"] == "completed" and t["objective"] is not None]
    return max(completed, key=lambda t: t["objective"], default=None)


def _manifest(outcome: TuneOutcome) -> dict[str, Any]:
    spec = outcome.spec
    return {"tune_id": spec.tune_id, "method": spec.method, "dataset": spec.dataset, "rho": spec.rho,
            "objective": spec.objective, "objective_split": "val", "searcher": spec.searcher,
            "scheduler": spec.scheduler, "space": [d.text() for d in spec.space], "search_seed": spec.search_seed,
            "trials": outcome.trials, "best": outcome.best, "final_seeds": spec.final_seed_list(),
            "final_runs": outcome.final_runs}
