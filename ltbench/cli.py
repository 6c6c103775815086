"""The command line: a thin click layer over library functions that never see click objects."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ltbench.config import COMPILE_MODES
from ltbench.errors import UserError

console = Console()
err_console = Console(stderr=True)

COMMON_RUN_OPTIONS = [
    click.option("--seed", type=int, default=0, show_default=True, help="Training seed (init, order, augmentation)."),
    click.option("--preset", default=None, help="Hyperparameter preset of the method (see `ltbench list presets`)."),
    click.option("--epochs", type=int, default=None, help="Override the preset's number of epochs."),
    click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                 help="Override a hyperparameter (repeatable); data.KEY=VALUE sets a dataset option."),
]


def runtime_options(func):
    opts = [
        click.option("--data-root", type=click.Path(path_type=Path), default=None,
                     help="Folder with the datasets (default: $LTBENCH_DATA or ./data)."),
        click.option("--results", type=click.Path(path_type=Path), default=Path("results"), show_default=True,
                     help="Results folder; runs go to RESULTS/runs/<run_id>/."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--compile/--no-compile", "compile_", default=False, help="torch.compile the trained model."),
        click.option("--compile-mode", type=click.Choice(list(COMPILE_MODES)), default="default", show_default=True,
                     help="torch.compile mode (implies --compile); reduce-overhead and max-autotune replay each "
                          "training step's kernels as CUDA graphs (small models are launch-bound)."),
        click.option("--micro-batch", type=click.IntRange(min=0), default=0,
                     help="Per-device forward batch; gradients accumulate to the preset's batch."),
        click.option("--workers", type=click.IntRange(min=0), default=None, help="Data-loader worker processes."),
        click.option("--download", is_flag=True, help="Download the dataset first if it is missing (needs internet)."),
        click.option("--augment-on", type=click.Choice(["auto", "device", "cpu"]), default="auto", show_default=True,
                     help="Where per-image augmentation runs; auto = on the GPU for in-memory datasets."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Torch CPU threads (default: the CPUs this process may use; in a sweep, each run's CPUs)."),
        click.option("--quiet", is_flag=True, help="No live progress bar: one line per epoch instead, as in a log."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _log_backends(ctx, param, value) -> tuple[str, ...]:
    from ltbench.tracking import parse_backends

    try:
        return parse_backends(value)
    except UserError as exc:
        raise click.BadParameter(str(exc)) from exc


LOG_OPTION = click.option(
    "--log", "log", multiple=True, callback=_log_backends, metavar="tensorboard|csv|wandb|mlflow",
    help="Also log each epoch to experiment trackers (repeatable or comma-separated); tensorboard and csv write "
         "into the run folder. Does not change the run id.")


def make_runtime(data_root, results, device, compile_, micro_batch, workers, download, quiet, augment_on="auto",
                 compile_mode="default", **extra):
    from ltbench.data import default_data_root
    from ltbench.engine import Runtime

    check_device(device)
    if data_root is not None and Path(data_root).is_file():
        raise UserError(f"--data-root {data_root} is a file; give the folder that holds the datasets.")
    return Runtime(results=Path(results).resolve(), data_root=(data_root or default_data_root()).resolve(),
                   device=device, compile=compile_ or compile_mode != "default", compile_mode=compile_mode,
                   micro_batch=micro_batch, workers=workers, download=download, augment_on=augment_on,
                   progress=not quiet,
                   echo=_say, **extra)


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(device: str) -> None:
    """Refuse a --device torch cannot use here, before any data is loaded."""
    if not DEVICE.fullmatch(device):
        raise UserError(f"--device {device!r} is not a device name: use auto, cpu, cuda, cuda:N or mps.")
    if device.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise UserError(f"--device {device} was asked for, but PyTorch sees no CUDA GPU here. Use --device cpu.")
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise UserError(f"--device {device} was asked for, but PyTorch sees {count} CUDA GPU(s): "
                            f"cuda:0 to cuda:{count - 1}.")
    if device == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise UserError("--device mps was asked for, but PyTorch sees no Apple-silicon GPU here. Use --device cpu.")


class LTGroup(click.Group):
    """Turns UserError and OSError into a one-paragraph message and a non-zero exit, Ctrl-C into a resume hint.

    ``--debug`` (or LTBENCH_DEBUG=1) shows the traceback instead.
    """

    def invoke(self, ctx):
        debug = ctx.params.get("debug") or os.environ.get("LTBENCH_DEBUG", "") not in ("", "0")
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # the reader went away (`ltbench list | head`): nothing left to say to it
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
            sys.exit(141)
        except (UserError, OSError) as exc:
            if debug:
                raise
            text = str(exc) if isinstance(exc, UserError) else os_error_text(exc)
            err_console.print(f"[bold red]error:[/] {text}", highlight=False, soft_wrap=True)
            sys.exit(2 if isinstance(exc, UserError) else 1)
        except KeyboardInterrupt:
            if debug:
                raise
            err_console.print("Interrupted. Finished epochs are kept: run the same command again to resume from the "
                              "last checkpoint.", highlight=False, soft_wrap=True)
            sys.exit(130)


def os_error_text(exc: OSError) -> str:
    """One line: the reason and the path(s), e.g. ``Permission denied: results/runs/ab12``."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    reason = exc.strerror or type(exc).__name__
    text = f"{reason}: {paths}" if paths else f"{reason} ({exc})"
    return text + " (--debug shows the traceback)"


@click.group(cls=LTGroup)
@click.version_option(package_name="ltbench")
@click.option("--debug", is_flag=True, help="Show the traceback of an error (also LTBENCH_DEBUG=1).")
def main(debug: bool) -> None:
    """ltbench: train, reproduce and compare long-tailed recognition methods under one protocol."""


@main.command()
@click.option("--method", required=True, help="Method name (see `ltbench list methods`).")
@click.option("--dataset", required=True, help="Dataset name (see `ltbench list datasets`).")
@click.option("--rho", type=float, default=None, help="Imbalance ratio n_max/n_min (>= 1).")
@click.option("--save-logits", is_flag=True, help="Also save the final test logits (test_logits.npz).")
@click.option("--stop-after-epochs", type=click.IntRange(min=1), default=None,
              help="Stop after N epochs, resumable (time-boxed jobs).")
@LOG_OPTION
@runtime_options
def run(method, dataset, rho, seed, preset, epochs, sets, save_logits, stop_after_epochs, **rt) -> None:
    """Train and evaluate one method on one dataset (resumes or reuses a run with the same config)."""
    from ltbench import stages
    from ltbench.records import run_record

    config = stages.make_config(method, dataset, rho=rho, seed=seed, preset=preset, epochs=epochs, sets=sets)
    runtime = make_runtime(**rt, save_logits=save_logits, stop_after_epochs=stop_after_epochs)
    if run_record(runtime.results, config).done:
        _say(f"Run {config.run_id} already finished, nothing trained.")
    record = stages.ensure_or_retry_eagerly(config, runtime)
    if not record.done:
        err_console.print(f"Stopped after {stop_after_epochs} epoch(s); run the same command to resume {record.path}")
        return
    print_result(record.result())
    console.print(f"run folder: {record.path}", highlight=False, soft_wrap=True)


for _opt in reversed(COMMON_RUN_OPTIONS):
    run = _opt(run)
main.add_command(run)


@main.command(name="bench")
@click.option("--method", required=True, help="Method name (see `ltbench list methods`).")
@click.option("--dataset", required=True, help="Dataset name (see `ltbench list datasets`).")
@click.option("--rho", type=float, default=None, help="Imbalance ratio n_max/n_min (>= 1).")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Timed optimizer steps in each timed region.")
@click.option("--warmup", type=click.IntRange(min=0), default=None,
              help="Untimed steps before each timed region (default: --steps).")
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as one JSON object.")
@click.option("--pipeline", is_flag=True,
              help="Also bench every teacher stage the run needs and project the whole pipeline's wall time.")
@runtime_options
def bench_(method, dataset, rho, seed, preset, epochs, sets, steps, warmup, as_json, pipeline, **rt) -> None:
    """Time the real training step: img/s end to end and model-only, data wait, TFLOP/s, memory, projection."""
    from ltbench import stages
    from ltbench.bench import bench, bench_pipeline, format_report

    config = stages.make_config(method, dataset, rho=rho, seed=seed, preset=preset, epochs=epochs, sets=sets)
    report = (bench_pipeline if pipeline else bench)(config, make_runtime(**rt), steps=steps, warmup=warmup)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for label, value in format_report(report):
        console.print(f"[bold]{label:>26}[/]  {value}", highlight=False, soft_wrap=True)


for _opt in reversed(COMMON_RUN_OPTIONS):
    bench_ = _opt(bench_)


@main.command(name="eval")
@click.argument("run_ref")
@click.option("--heads", is_flag=True, help="Show every head (CLS / DIST / average) under both splits.")
@click.option("--recompute", is_flag=True, help="Re-evaluate the latest checkpoint instead of reading result.json.")
@click.option("--adjust", "taus", type=float, multiple=True, metavar="TAU",
              help="Also post-hoc logit adjustment: argmax of z - TAU*log(prior) on the final logits (saved, or "
                   "recomputed and saved); a separate result in posthoc_la.json. Repeatable.")
@runtime_options
def eval_(run_ref, heads, recompute, taus, **rt) -> None:
    """Show or re-evaluate a finished or partial run (RUN is a run id, prefix or folder)."""
    from ltbench.posthoc import posthoc_adjust, posthoc_label, tau_key
    from ltbench.records import find_run
    from ltbench.reevaluate import reevaluate

    runtime = make_runtime(**rt)
    record = find_run(runtime.results, run_ref)
    result = reevaluate(record, runtime) if recompute or not record.done else record.result()
    print_result(result, all_heads=heads)
    if taus:
        adjusted = posthoc_adjust(record, runtime, taus)["taus"]
        for tau in taus:
            block = adjusted[tau_key(tau)]
            print_result({**result, "method": posthoc_label(result["method"], tau), "final": block, "best": None},
                         all_heads=heads)
            _say(f"post-hoc logit adjustment τ={tau_key(tau)} from {block['logits']} final logits -> "
                 f"{record.path / 'posthoc_la.json'}")


@main.command()
@click.argument("grid_file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--methods", default=None, help="Comma-separated method names.")
@click.option("--datasets", default=None, help="Comma-separated dataset names.")
@click.option("--rho", default=None, help="Comma-separated imbalance ratios (default: each dataset's own).")
@click.option("--seeds", default=None, help="Comma-separated seeds or ranges, e.g. 0,1,2 or 0-4 (default 0).")
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
def sweep(grid_file, methods, datasets, rho, seeds, preset, epochs, sets, save_logits, stop_after_epochs,
          gpus_per_trial, cpus_per_trial, address, max_failures, dry_run, **rt) -> None:
    """Run a grid of methods x datasets x rho x seeds on Ray Tune; only what is not done yet is trained.

    The grid comes from the options or from GRID_FILE (YAML with keys methods, datasets, rho, seeds, preset,
    epochs, set); options given on the command line override the file's. Every run is an ordinary
    `ltbench run`: finished runs are skipped, interrupted ones resume, teachers train once before students.
    `--set METHOD:KEY=VALUE` applies to one method of the grid only.
    """
    from ltbench import sweep as sw

    file_values = sw.load_grid_file(grid_file) if grid_file else None
    grid = sw.build_grid(file_values, methods=methods, datasets=datasets, rho=rho, seeds=seeds, preset=preset,
                         epochs=epochs, sets=sets)
    runtime = make_runtime(**rt, save_logits=save_logits, stop_after_epochs=stop_after_epochs)
    plan = sw.plan_sweep(grid, runtime.results)
    upstream = sum(not j.requested for j in plan.jobs.values())
    _say(f"{sw.grid_summary(grid)} -> {len(plan.jobs)} run(s) ({upstream} upstream): "
                      f"{sw.summarize(plan.jobs.values())}")
    for note in plan.notes:
        _say(f"note: {note}", style="dim")
    if dry_run:
        _print_jobs(plan.jobs.values(), title=f"sweep {plan.sweep_id} (dry run) -> {plan.results}")
        return
    if not plan.todo():
        _say(f"Nothing to train: all {len(plan.jobs)} run(s) are done. Tables: ltbench report "
                          f"--results {plan.results}")
        return
    resources = sw.Resources(gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial, address=address,
                             max_failures=max_failures)
    with sw.LiveView(plan, err_console) as view:
        outcome = sw.run_sweep(plan, runtime, resources, view)
    _sweep_epilogue(outcome)


for _opt in reversed(COMMON_RUN_OPTIONS[1:]):  # --preset, --epochs, --set; sweeps take --seeds instead of --seed
    sweep = _opt(sweep)
main.add_command(sweep)


@main.command()
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
    from ltbench import reproduce as rpd
    from ltbench import sweep as sw

    if list_suites:
        _list_suites(rt["results"])
        return
    if not suite:
        raise click.UsageError("Name a suite (ltbench reproduce --list shows them) or give a suite file.")
    loaded = rpd.load_suite(suite)
    resource_values = _suite_defaults(loaded.runtime, rt, gpus_per_trial=gpus_per_trial,
                                      cpus_per_trial=cpus_per_trial, max_failures=max_failures)
    runtime = make_runtime(**rt)
    plan, cells = rpd.plan_suite(loaded, runtime.results, rpd.Overrides(datasets, epochs, tuple(sets)))
    upstream = sum(not j.requested for j in plan.jobs.values())
    _say(f"suite {loaded.name} ({loaded.path}): {len(plan.jobs)} run(s) ({upstream} upstream), "
         f"{len(loaded.expectations)} expectation(s): {sw.summarize(plan.jobs.values())}")
    gpus = resource_values["gpus_per_trial"]
    _say(f"runtime: device {runtime.device}, compile {runtime.compile_mode if runtime.compile else 'off'}, "
         f"GPUs per run {'default' if gpus is None else f'{gpus:g}'}", style="dim")
    if dry_run:
        _print_suite_plan(loaded, plan)
        return
    started, code, trained_s = time.time(), 0, None
    if plan.todo() and not no_train:
        resources = sw.Resources(address=address, **resource_values)
        with sw.LiveView(plan, err_console) as view:
            outcome = sw.run_sweep(plan, runtime, resources, view)
        code, trained_s = _sweep_problems(outcome), time.time() - started
    plan.refresh()
    verdicts = rpd.judge(loaded, plan, cells)
    header = rpd.run_header(plan, trained_s, _device_text(runtime))
    folder = rpd.write_verdicts(loaded, verdicts, plan, header)
    _print_verdicts(loaded, verdicts)
    _say(f"verdict: {folder / 'verdict.md'} and verdict.json")
    sys.exit(code if code == 130 else rpd.exit_code(verdicts))


def _suite_defaults(suite_runtime: dict[str, Any], rt: dict[str, Any], **resources: Any) -> dict[str, Any]:
    """Fill runtime options the command line left at their defaults from the suite (in ``rt``, in place);
    return the Ray resource options, likewise."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    names = {"compile": "compile_"}
    explicit_no_compile = ctx.get_parameter_source("compile_") == ParameterSource.COMMANDLINE and not rt["compile_"]
    for key, value in suite_runtime.items():
        param = names.get(key, key)
        left_default = param in rt and ctx.get_parameter_source(param) == ParameterSource.DEFAULT
        if left_default and not (explicit_no_compile and key == "compile_mode"):
            rt[param] = value
    defaults = {"gpus_per_trial": None, "cpus_per_trial": None, "max_failures": 1}
    return {key: value if value is not None else suite_runtime.get(key, defaults[key])
            for key, value in resources.items()}


def _device_text(runtime) -> str:
    device = runtime.torch_device()
    if device.type != "cuda":
        return f"{device} ({os.cpu_count()} CPU cores)"
    import torch

    return f"{device} ({torch.cuda.get_device_name(device)})"


def _print_suite_plan(suite, plan) -> None:
    from rich.markup import escape

    from ltbench import reproduce as rpd

    table = rpd.throughput_table()
    hours = {j.run_id: rpd.projected_hours(j, table) for j in plan.jobs.values()}
    extra = {rid: {"GPU h": "n/a" if h is None else f"{h:.2f}"} for rid, h in hours.items()}
    _print_jobs(plan.jobs.values(), title=f"suite {suite.name} (dry run) -> {plan.results}", extra=extra)
    known = [h for h in hours.values() if h is not None]
    unknown = len(hours) - len(known)
    _say(f"projected: {sum(known):.2f} GPU hours for what is not done" +
         (f" ({unknown} run(s) n/a)" if unknown else ""))
    _say(rpd.PROJECTION_TEXT, style="dim")
    for expectation in suite.expectations:
        _say(escape(f"expects: {expectation.name}  [{expectation.source}]"), style="dim")


def _list_suites(results: Path) -> None:
    from ltbench import reproduce as rpd

    rows = []
    throughput = rpd.throughput_table()
    for name, path in sorted(rpd.shipped_suites().items()):
        suite = rpd.load_suite(str(path))
        plan, _ = rpd.plan_suite(suite, results)
        hours = [rpd.projected_hours(j, throughput) for j in plan.jobs.values()]
        known = sum(h for h in hours if h is not None)
        cost = "n/a (CPU)" if all(h is None for h in hours) else f"{known:.2f}" + ("+" if None in hours else "")
        rows.append((name, str(len(plan.jobs)), str(len(suite.expectations)), cost, suite.summary))
    numbers = ("runs", "expectations", "projected GPU h")
    _print_listing(("suite", *numbers, "description"), rows, "reproduction suites (ltbench reproduce SUITE)", numbers)
    console.print(rpd.PROJECTION_TEXT, style="dim", highlight=False)


def _print_verdicts(suite, verdicts) -> None:
    from rich.markup import escape

    style = {"PASS": "green", "FAIL": "red", "MISSING": "yellow"}
    passed = sum(v.status == "PASS" for v in verdicts)
    table = Table(title=f"ltbench reproduce {suite.name}: {passed}/{len(verdicts)} pass")
    for col in ("expectation", "source", "measured", "expected", "tolerance", "verdict"):
        table.add_column(col)
    for v in verdicts:
        note = f"\n({'; '.join(v.notes)})" if v.notes else ""
        table.add_row(escape(v.expectation.name + note), escape(v.expectation.source), v.measured, v.expected,
                      v.tolerance,
                      f"[{style[v.status]}]{v.status}[/]")
    console.print(table)


@main.command()
@click.option("--results", type=click.Path(path_type=Path), default=Path("results"), show_default=True,
              help="Results folder holding runs/<run_id>/.")
@click.option("--format", "fmt", type=click.Choice(["markdown", "latex", "csv", "json", "html"]),
              default="markdown", show_default=True)
@click.option("--split", type=click.Choice(["counts", "paper"]), default="counts", show_default=True,
              help="many/medium/few by training counts (>100 / 20-100 / <20) or DeiT-LT's class-index ranges.")
@click.option("--metric", "metrics", multiple=True, metavar="top1|many|medium|few|ece",
              help="Metric column(s), repeatable or comma-separated (default: top1, many, medium, few).")
@click.option("--select", type=click.Choice(["final", "best"]), default="final", show_default=True,
              help="Numbers of the final epoch, or of each run's best test epoch (optimistic).")
@click.option("--spread", type=click.Choice(["std", "se"]), default="std", show_default=True,
              help="Standard deviation or standard error over seeds.")
@click.option("--heads", is_flag=True, help="One row per head (main / CLS / DIST) for multi-head methods.")
@click.option("--by", multiple=True, metavar="KEY",
              help="Split rows by a config key: preset, a hyperparameter (teacher, epochs, ...) or data.KEY.")
@click.option("--method", "methods", multiple=True, help="Only these methods (repeatable).")
@click.option("--dataset", "datasets", multiple=True, help="Only these datasets (repeatable).")
@click.option("--compare", type=click.Choice(["paper"]), default=None,
              help="Add the published numbers (ltbench/reference/paper_numbers.csv) and the difference.")
@click.option("--adjust", type=float, default=None, metavar="TAU",
              help="Also rows of post-hoc logit adjustment at TAU (from `ltbench eval RUN --adjust TAU`).")
@click.option("--digits", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--standalone", is_flag=True,
              help="LaTeX: a document that compiles on its own instead of a booktabs table to paste.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write to FILE.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write per-class and CLS-vs-DIST figures (PNG and PDF) into DIR.")
def report(results, fmt, split, metrics, select, spread, heads, by, methods, datasets, compare, adjust, digits, out,
           plots_dir, standalone) -> None:
    """Tables of many/medium/few accuracy over seeds from the run folders (reads nothing else)."""
    from ltbench import report as rp

    metric_list = tuple(m.strip() for item in metrics for m in item.split(",") if m.strip()) or rp.DEFAULT_METRICS
    options = rp.ReportOptions(select=select, split=split, metrics=metric_list, heads=heads, by=tuple(by),
                               spread=spread, digits=digits, compare=compare, methods=tuple(methods),
                               datasets=tuple(datasets), standalone=standalone, adjust=adjust)
    text = rp.report(results.resolve(), fmt, options)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        _say(f"wrote {out}")
    else:
        click.echo(text, nl=False)
    if plots_dir:
        from ltbench.plots import write_plots

        files = write_plots(rp.load_runs(results.resolve(), options), plots_dir, options)
        _say(f"wrote {len(files)} figure file(s) to {plots_dir}")


def _say(message: str, **style) -> None:
    """A status line on stderr, unwrapped (log files and tests see it whole)."""
    err_console.print(message, highlight=False, soft_wrap=True, **style)


def _print_jobs(jobs, title: str, extra: dict[str, dict[str, str]] | None = None) -> None:
    """An aligned plain-text table (it stays readable in logs and narrow terminals); ``extra`` adds columns
    per run id."""
    from ltbench.sweep import describe_job

    rows = [{**describe_job(j), **(extra or {}).get(j.run_id, {})} for j in jobs]
    if not rows:
        return
    widths = {col: max(len(col), *(len(r[col]) for r in rows)) for col in rows[0]}
    style = {"done": "green", "partial": "yellow", "failed": "red", "blocked": "red"}
    console.print(title, style="bold")
    console.print("  ".join(col.ljust(w) for col, w in widths.items()), style="dim")
    for row in rows:
        line = "  ".join(row[col].ljust(w) for col, w in widths.items())
        console.print(line, style=style.get(row["status"]))


def _sweep_epilogue(outcome) -> None:
    code = _sweep_problems(outcome)
    if code:
        sys.exit(code)


def _sweep_problems(outcome) -> int:
    """Print the runs a sweep left unfinished and why; the exit status that calls for (0: none)."""
    from rich.markup import escape

    plan = outcome.plan
    for job in plan.jobs.values():
        if job.run_id in outcome.failed:
            job.status = "failed"
        elif job.run_id in outcome.blocked:
            job.status = "blocked"
    unfinished = [j for j in plan.jobs.values() if j.status != "done"]
    if unfinished:
        _print_jobs(unfinished, title=f"sweep {plan.sweep_id}: runs not done")
    for run_id, error in outcome.failed.items():
        _say(f"[red]failed[/] {run_id} ({plan.jobs[run_id].label}): {escape(error)}")
        _say(f"  traceback: {outcome.tracebacks.get(run_id, 'see Ray logs')}", style="dim")
    for run_id, reason in outcome.blocked.items():
        _say(f"[red]not started[/] {run_id} ({plan.jobs[run_id].label}): {escape(reason)}")
    for run_id, reason in outcome.waiting.items():
        _say(f"waiting {run_id} ({plan.jobs[run_id].label}): {escape(reason)}")
    done = sum(j.status == "done" for j in plan.jobs.values())
    _say(f"{done}/{len(plan.jobs)} run(s) done; Ray's files: {plan.sweep_dir}")
    if outcome.failed or outcome.blocked:
        _say("Fix the cause and run the same command again: finished runs are kept.")
        return 1
    if outcome.interrupted:
        _say("Interrupted: run the same command again to resume the unfinished runs.")
        return 130
    if unfinished:
        _say("Stopped by --stop-after-epochs: run the same command to continue.")
    return 0


@main.command(name="list")
@click.argument("what", type=click.Choice(["methods", "datasets", "evaluators", "presets"]), default="methods")
def list_(what: str) -> None:
    """List registered plugins (built-in and from installed packages) or method presets."""
    from ltbench.registry import DATASETS, EVALUATORS, METHODS

    if what == "presets":
        for name, cls in METHODS:
            console.print(f"{name}: {', '.join(sorted(cls.presets))} (default {cls.default_preset})")
        return
    registry = {"methods": METHODS, "datasets": DATASETS, "evaluators": EVALUATORS}[what]
    rows = [(name, registry.source(name), _summary(name, cls)) for name, cls in registry]
    _print_listing(("name", "source", "description"), rows)


def _print_listing(columns: tuple[str, ...], rows: list[tuple[str, ...]], title: str | None = None,
                   right: tuple[str, ...] = ()) -> None:
    """On a terminal, a table whose last column wraps inside itself; piped, one unwrapped line per row."""
    if console.is_terminal:
        table = Table(title=title, box=None if title is None else box.SIMPLE, show_header=title is not None,
                      pad_edge=False)
        for i, column in enumerate(columns):
            table.add_column(column, no_wrap=i < len(columns) - 1, style="bold" if i == 0 else None,
                             justify="right" if column in right else "left")
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))  # docstrings and summaries are not rich markup
        console.print(table, highlight=False)
        return
    shown = [columns, *rows] if title is not None else rows
    widths = [max(len(row[i]) for row in shown) for i in range(len(columns) - 1)] if shown else []
    for row in shown:
        cells = [cell.rjust(w) if col in right else cell.ljust(w) for cell, w, col in zip(row, widths, columns)]
        click.echo("  ".join([*cells, row[-1]]))


def _summary(name: str, cls: type) -> str:
    """The docstring's first line as plain text: RST roles and literals unwrapped, a leading ``name:`` dropped."""
    import re

    lines = (cls.__doc__ or "").strip().splitlines()
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", lines[0] if lines else "")
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return text.removeprefix(f"{name}: ")


@main.group()
def data() -> None:
    """Inspect, download or verify datasets."""


@data.command()
@click.argument("dataset")
@click.option("--rho", type=float, default=None)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Dataset option (e.g. subsample_seed=1).")
@click.option("--data-root", type=click.Path(path_type=Path), default=None)
@click.option("--json", "as_json", is_flag=True)
def info(dataset, rho, sets, data_root, as_json) -> None:
    """Class counts, many/medium/few sizes and fingerprints of a (long-tailed) dataset."""
    from ltbench.datainfo import dataset_summary

    summary = dataset_summary(dataset, rho, [s.removeprefix("data.") for s in sets], data_root)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        console.print(f"[bold]{key}[/]: {value}")


@data.command()
@click.argument("dataset")
@click.option("--rho", type=float, default=None)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Dataset option (e.g. subsample_seed=1).")
@click.option("--data-root", type=click.Path(path_type=Path), default=None)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Data root to write the subset under.")
def export(dataset, rho, sets, data_root, out) -> None:
    """Freeze an in-memory LT dataset into one portable file (to ship an exact subset to another machine)."""
    from ltbench import config as cfgmod
    from ltbench import portable
    from ltbench.data import default_data_root
    from ltbench.registry import DATASETS
    from ltbench.stages import _dataset_options

    cls = DATASETS.get(dataset)
    options = _dataset_options(cls, rho, cfgmod.parse_set_options([s.removeprefix("data.") for s in sets])[0])
    data = cls(options, (data_root or default_data_root()).resolve()).load()
    path = portable.subset_path(out.resolve(), dataset, options.rho, getattr(options, "subsample_seed", 0))
    console.print(f"wrote {portable.export(data, path)}", highlight=False)


@data.command()
@click.argument("dataset")
@click.option("--data-root", type=click.Path(path_type=Path), default=None)
def download(dataset, data_root) -> None:
    """Download a dataset's original archive into the data root (needs internet)."""
    from ltbench.data import default_data_root
    from ltbench.registry import DATASETS

    cls = DATASETS.get(dataset)
    if not hasattr(cls, "download"):
        raise UserError(f"{dataset} cannot be downloaded automatically; see its documentation for the files it reads.")
    console.print(f"{dataset} is in {cls.download((data_root or default_data_root()).resolve())}")


@data.command()
@click.argument("dataset")
@click.option("--data-root", type=click.Path(path_type=Path), default=None)
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Images decoded in parallel (default: CPU count).")
@click.option("--expect-standard/--no-expect-standard", default=True, show_default=True,
              help="Compare line, class and per-class counts with the published lists (off for a subset).")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify(dataset, data_root, workers, expect_standard, as_json, quiet) -> None:
    """Check a list-file dataset: lists, counts, labels, sha256, every image present and decodable.

    Exits 1 when a problem is found; each problem names the list file and line.
    """
    from ltbench.data import default_data_root
    from ltbench.verify import print_report, verify_dataset

    report = verify_dataset(dataset, (data_root or default_data_root()).resolve(), workers=workers,
                            expect_standard=expect_standard, progress=not quiet and not as_json)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report, console)
    if not report.ok:
        sys.exit(1)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def print_result(result: dict[str, Any], all_heads: bool = False) -> None:
    """A many/medium/few table of the final and best epochs (main head, or every head)."""
    table = Table(title=f"{result['method']} on {result['dataset']} {result['config']['data']} "
                        f"seed {result['config']['seed']} (run {result['run_id']})")
    for col in ("epoch", "head", "split", "top-1", "many", "medium", "few", "ECE"):
        table.add_column(col, justify="right" if col not in ("head", "split", "epoch") else "left")
    for label in ("final", "best"):
        block = result.get(label)
        if not block:
            continue
        head_names = list(block["heads"]) if all_heads else ["main"]
        for head in head_names:
            m = block["heads"][head]
            for split in ("counts", "paper"):
                groups = m.get(split)
                if groups is None:
                    continue
                table.add_row(f"{label} ({block['epoch']})", head, split, _fmt(m["top1"]), _fmt(groups["many"]),
                              _fmt(groups["medium"]), _fmt(groups["few"]), _fmt(m["ece"]))
    console.print(table)
    console.print("counts split: many > 100, medium 20..100, few < 20 training images; paper split: DeiT-LT's "
                  "class-index ranges. n/a = no class in that group. best = best test epoch (optimistic).",
                  highlight=False, style="dim")
