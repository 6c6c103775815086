"""``ltbench sweep``, ``ltbench reproduce`` and ``ltbench tune``: grids of runs on Ray Tune, reproduction suites with
verdicts, and hyperparameter searches on val."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from ltbench import console, runset, verdict_files
from ltbench import report as rp
from ltbench import reproduce as rpd
from ltbench import sweep as sw
from ltbench import tuning as tn
from ltbench.cli_options import COMMON_RUN_OPTIONS, LOG_OPTION, make_runtime, runtime_options
from ltbench.console import (
    LiveView,
    device_text,
    err_console,
    print_jobs,
    print_suite_plan,
    print_verdicts,
    say,
    sweep_problems,
)
from ltbench.launcher import Resources, run_sweep


@click.command()
@click.argument("grid_file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--methods", default=None, help="Comma-separated method names.")
@click.option("--datasets", default=None, help="Comma-separated dataset names.")
@click.option("--rho", default=None, help="Comma-separated imbalance ratios (default: each dataset's own).")
@click.option("--seeds", default=None, help="Comma-separated seeds or ranges, e.g. 0,1,2 or 0-4 (default 0).")
@click.option("--subsample-seeds", default=None,
              help="CIFAR-LT subset seeds (data.subsample_seed) as an axis of their own, e.g. 0,1 (default: 0 only).")
@click.option("--save-logits", is_flag=True, help="Also save each run's final test logits.")
@click.option("--stop-after-epochs", type=click.IntRange(min=1), default=None,
              help="Stop every run after N epochs, resumable.")
@click.option("--gpus-per-trial", type=click.FloatRange(min=0), default=None,
              help="GPUs per run (default: 1 when there are GPUs, else 0); a fraction shares a GPU with no memory "
                   "isolation.")
@click.option("--cpus-per-trial", type=click.FloatRange(min=0, min_open=True), default=None,
              help="CPUs per run (default: CPUs / GPUs with GPUs, the whole machine without).")
@click.option("--address", default=None, help="Join this Ray cluster (e.g. auto or ray://host:10001) instead of "
                                              "starting a local Ray.")
@click.option("--max-failures", type=click.IntRange(min=-1), default=1, show_default=True,
              help="Retries of a failed run before it is reported as failed (-1: retry forever, as in Ray).")
@click.option("--dry-run", is_flag=True, help="Print the grid and what is already done; train nothing.")
@LOG_OPTION
@runtime_options
def sweep(grid_file, methods, datasets, rho, seeds, subsample_seeds, preset, epochs, sets, save_logits,
          stop_after_epochs, gpus_per_trial, cpus_per_trial, address, max_failures, dry_run, **rt) -> None:
    """Run a grid of methods x datasets x rho x seeds on Ray Tune; only what is not done yet is trained.

    The grid comes from the options or from GRID_FILE (YAML with keys methods, datasets, rho, seeds,
    subsample_seeds, preset, epochs, set); options given on the command line override the file's. Every run is an
    ordinary `ltbench run`: finished runs are skipped, interrupted ones resume, teachers train once before students.
    `--set METHOD:KEY=VALUE` applies to one method of the grid only.
    """

    file_values = sw.load_grid_file(grid_file) if grid_file else None
    grid = sw.build_grid(file_values, methods=methods, datasets=datasets, rho=rho, seeds=seeds, preset=preset,
                         epochs=epochs, sets=sets, subsample_seeds=subsample_seeds)
    runtime = make_runtime(**rt, save_logits=save_logits, stop_after_epochs=stop_after_epochs)
    plan = sw.plan_sweep(grid, runtime.results)
    upstream = sum(not j.requested for j in plan.jobs.values())
    say(f"{sw.grid_summary(grid)} -> {len(plan.jobs)} run(s) ({upstream} upstream): "
                      f"{sw.summarize(plan.jobs.values())}")
    for note in plan.notes:
        say(f"note: {note}", style="dim")
    if dry_run:
        print_jobs(plan.jobs.values(), title=f"sweep {plan.sweep_id} (dry run) -> {plan.results}")
        return
    if not plan.todo():
        say(f"Nothing to train: all {len(plan.jobs)} run(s) are done. Tables: ltbench report "
                          f"--results {plan.results}")
        return
    resources = Resources(gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial, address=address,
                             max_failures=max_failures)
    say(f"Each run logs to {plan.results}/runs/<run id>/log.txt (and, prefixed with its run id, to Ray's own "
        f"logs).", style="dim")
    with LiveView(plan, err_console) as view:
        outcome = run_sweep(plan, runtime, resources, view)
    _sweep_epilogue(outcome)


for _opt in reversed(COMMON_RUN_OPTIONS[1:]):  # --preset, --epochs, --set; sweeps take --seeds instead of --seed
    sweep = _opt(sweep)


@click.command()
@click.argument("suite", required=False)
@click.option("--list", "list_suites", is_flag=True,
              help="List the shipped suites: runs, expectations, projected GPU hours.")
@click.option("--dry-run", is_flag=True, help="Print the runs, their state and projected GPU hours; train nothing.")
@click.option("--no-train", is_flag=True, help="Judge the runs already in --results; train nothing (absent = MISSING).")
@click.option("--datasets", default=None,
              help="Train every grid on these datasets instead (e.g. synthetic for a CPU rehearsal of a GPU suite).")
@click.option("--epochs", type=int, default=None, help="Override every grid's epochs (a rehearsal, not the claim).")
@click.option("--set", "sets", multiple=True, metavar="[METHOD:]KEY=VALUE",
              help="Add a --set to every grid (METHOD:KEY=VALUE: to that method's runs only).")
@click.option("--gpus-per-trial", type=click.FloatRange(min=0), default=None,
              help="GPUs per run (default: the suite's, else 1 with GPUs); a fraction shares a GPU.")
@click.option("--cpus-per-trial", type=click.FloatRange(min=0, min_open=True), default=None,
              help="CPUs per run (default: as in `ltbench sweep`).")
@click.option("--address", default=None, help="Join this Ray cluster instead of starting a local Ray.")
@click.option("--max-failures", type=click.IntRange(min=-1), default=None,
              help="Retries of a failed run (default: the suite's, else 1).")
@runtime_options
def reproduce(suite, list_suites, dry_run, no_train, datasets, epochs, sets, gpus_per_trial, cpus_per_trial, address,
              max_failures, **rt) -> None:
    """Train a reproduction SUITE (a shipped name or a YAML file) like a sweep, then check its published claims.

    Prints a verdict table (expectation, source, measured, expected, tolerance, PASS / FAIL / MISSING) and
    writes it as Markdown and JSON to RESULTS/reproduce/SUITE/. Finished runs are reused and interrupted ones
    resume, so running it again trains only what is missing. Exit status 0 when every expectation passes,
    1 otherwise. Runtime options left at their defaults take the suite's `runtime` values.
    """

    if list_suites:
        console.list_suites(rt["results"])
        return
    if not suite:
        raise click.UsageError("Name a suite (ltbench reproduce --list shows them) or give a suite file.")
    loaded = rpd.load_suite(suite)
    resource_values = _suite_defaults(loaded.runtime, rt, gpus_per_trial=gpus_per_trial,
                                      cpus_per_trial=cpus_per_trial, max_failures=max_failures)
    runtime = make_runtime(**rt)
    plan, cells = rpd.plan_suite(loaded, runtime.results, rpd.Overrides(datasets, epochs, tuple(sets)))
    upstream = sum(not j.requested for j in plan.jobs.values())
    say(f"suite {loaded.name} ({loaded.path}): {len(plan.jobs)} run(s) ({upstream} upstream), "
         f"{len(loaded.expectations)} expectation(s): {sw.summarize(plan.jobs.values())}")
    gpus = resource_values["gpus_per_trial"]
    say(f"runtime: device {runtime.device}, compile {runtime.compile_mode if runtime.compile else 'off'}, "
         f"GPUs per run {'default' if gpus is None else f'{gpus:g}'}", style="dim")
    if dry_run:
        print_suite_plan(loaded, plan)
        return
    started, code, trained_s = time.time(), 0, None
    if plan.todo() and not no_train:
        resources = Resources(address=address, **resource_values)
        with LiveView(plan, err_console) as view:
            outcome = run_sweep(plan, runtime, resources, view)
        code, trained_s = sweep_problems(outcome), time.time() - started
    plan.refresh()
    verdicts = rpd.judge(loaded, plan, cells)
    header = verdict_files.run_header(plan, trained_s, device_text(runtime))
    folder = verdict_files.write_verdicts(loaded, verdicts, plan, header)
    print_verdicts(loaded, verdicts)
    say(f"verdict: {folder / 'verdict.md'} and verdict.json")
    sys.exit(code if code == 130 else rpd.exit_code(verdicts))


def _suite_defaults(suite_runtime: dict[str, Any], rt: dict[str, Any], **resources: Any) -> dict[str, Any]:
    """Fill runtime options the command line left at their defaults from the suite (in ``rt``, in place);
    return the Ray resource options, likewise."""
    ctx = click.get_current_context()
    explicit_no_compile = ctx.get_parameter_source("compile") == ParameterSource.COMMANDLINE and not rt["compile"]
    for key, value in suite_runtime.items():
        left_default = key in rt and ctx.get_parameter_source(key) == ParameterSource.DEFAULT
        if left_default and not (explicit_no_compile and key == "compile_mode"):
            rt[key] = value
    defaults = {"gpus_per_trial": None, "cpus_per_trial": None, "max_failures": 1}
    return {key: value if value is not None else suite_runtime.get(key, defaults[key])
            for key, value in resources.items()}











def _sweep_epilogue(outcome) -> None:
    code = sweep_problems(outcome)
    if code:
        sys.exit(code)






@click.command()
@click.option("--method", required=True, help="Method name (see `ltbench list methods`).")
@click.option("--dataset", required=True, help="Dataset name (its val split is the objective's).")
@click.option("--rho", type=float, default=None, help="Imbalance ratio n_max/n_min (>= 1).")
@click.option("--space", "space", multiple=True, metavar="NAME=KIND(ARGS)",
              help="A searched hyperparameter, repeatable: lr=loguniform(1e-3,1e-1), tau=uniform(0.5,2), "
                   "batch_size=choice(64,128), warmup_epochs=randint(0,5).")
@click.option("--space-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="YAML mapping NAME: KIND(ARGS) (or NAME: [choices]); --space items are added to it.")
@click.option("--objective", default="val_top1", show_default=True, metavar="val_top1|val_many|val_medium|val_few",
              help="The val metric maximised (main head, counts groups); a test objective is refused.")
@click.option("--searcher", type=click.Choice(["random", "optuna", "hyperopt"]), default="random", show_default=True,
              help="Random search, or a model-based searcher through Ray Tune's integration.")
@click.option("--scheduler", type=click.Choice(["asha", "fifo"]), default="asha", show_default=True,
              help="ASHA stops weak trials early (they stay resumable partial runs); fifo runs every trial out.")
@click.option("--trials", type=click.IntRange(min=1), default=8, show_default=True, help="Samples to try.")
@click.option("--final-seeds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Seeds the best configuration is retrained on and reported with (never the search seed).")
@click.option("--search-seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Training seed of every search trial, also the searcher's seed.")
@click.option("--concurrent", type=click.IntRange(min=1), default=None, help="Trials at once (default: CPUs).")
@click.option("--reduction-factor", type=click.IntRange(min=2), default=2, show_default=True,
              help="ASHA keeps the best 1/N of the trials at each evaluation rung.")
@click.option("--cpus-per-trial", type=click.FloatRange(min=0, min_open=True), default=1, show_default=True)
@click.option("--gpus-per-trial", type=click.FloatRange(min=0), default=0, show_default=True)
@runtime_options
def tune(method, dataset, rho, space, space_file, objective, searcher, scheduler, trials, final_seeds, search_seed,
         concurrent, reduction_factor, cpus_per_trial, gpus_per_trial, preset, epochs, sets, **rt) -> None:
    """Search a method's hyperparameters on val with Ray Tune, retrain the best on fresh seeds, report on test.

    The objective never reads the test split. The search's trials are listed apart by `ltbench report`.
    """

    file_values = tn.load_space_file(space_file) if space_file else None
    spec = tn.TuneSpec(method=method, dataset=dataset, rho=rho, space=tuple(tn.parse_space(space, file_values)),
                       objective=objective, searcher=searcher, scheduler=scheduler, trials=trials,
                       final_seeds=final_seeds, search_seed=search_seed, preset=preset, epochs=epochs,
                       sets=tuple(sets), concurrent=concurrent, reduction_factor=reduction_factor)
    tn.check_spec(spec)
    runtime = make_runtime(**rt)
    say(f"tune {spec.tune_id}: {trials} trial(s) of {method} on {dataset} ({searcher}, {scheduler}), objective "
        f"{objective} on val; then {final_seeds} fresh seed(s) on test")
    outcome = tn.run_tune(spec, runtime, Resources(cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial))
    console.print_tune(outcome.trials, outcome.best, spec.objective)
    say(f"best on val retrained on seeds {spec.final_seed_list()}: runs {', '.join(outcome.final_runs)}; "
        f"manifest {outcome.manifest}")
    click.echo(rp.report(runtime.results, "markdown", runset.ReportOptions(methods=(method,), datasets=(dataset,))),
               nl=False)


for _opt in reversed(COMMON_RUN_OPTIONS[1:]):  # --preset, --epochs, --set; the seeds are --search-seed/--final-seeds
    tune = _opt(tune)
