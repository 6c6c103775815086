"""The command line: a thin click layer over library functions that never see click objects.

``main`` holds the single-run commands (run, bench, eval) and the tables (report, list); ``ltbench.cli_runs`` the
many-run commands (sweep, reproduce), ``ltbench.cli_data`` the ``data`` group, ``ltbench.cli_options`` what they
share.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ltbench.cli_options import (
    COMMON_RUN_OPTIONS,
    LOG_OPTION,
    YES_OPTION,
    LTGroup,
    guard_long_run,
    make_runtime,
    runtime_options,
)
from ltbench.errors import UserError
from ltbench.registry import DATASETS, EVALUATORS, METHODS
from ltbench.terminal import console, doc_summary, err_console, print_listing, say

# The commands import what they run inside their bodies: `ltbench --help`, `ltbench list` and a command's --help
# then import neither torch nor timm nor pandas (tests/test_cli.py checks it).


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
@YES_OPTION
@runtime_options
def run(method, dataset, rho, seed, preset, epochs, sets, save_logits, stop_after_epochs, yes, **rt) -> None:
    """Train and evaluate one method on one dataset (resumes or reuses a run with the same config).

    It prints the resolved recipe and its projected wall time first; a CPU run projected past 1 h needs --yes.
    """
    from ltbench import distributed
    from ltbench.console import print_result
    from ltbench.preflight import recipe_line
    from ltbench.records import run_record
    from ltbench.resolve import make_config
    from ltbench.stages import ensure_or_retry_eagerly

    config = make_config(method, dataset, rho=rho, seed=seed, preset=preset, epochs=epochs, sets=sets)
    runtime = make_runtime(**rt, save_logits=save_logits, stop_after_epochs=stop_after_epochs)
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        say(recipe_line(config, runtime), style="dim")
    finished = run_record(runtime.results, config)
    if finished.done:
        finished.config(), finished.result()  # an edited folder is refused before it is said to be reused
        say(f"Run {config.run_id} already finished, nothing trained.")
    else:
        guard_long_run([config], runtime, yes, what=f"This run of {method}")
    record = ensure_or_retry_eagerly(config, runtime)
    if not distributed.context().is_main:
        return  # under torchrun rank 0 alone reports
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
    from ltbench.bench import bench, bench_pipeline, format_report
    from ltbench.resolve import make_config

    config = make_config(method, dataset, rho=rho, seed=seed, preset=preset, epochs=epochs, sets=sets)
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
@click.option("--adjust", "taus", multiple=True, metavar="TAU|auto",
              help="Also post-hoc logit adjustment: argmax of z - TAU*log(prior) on the final logits (saved, or "
                   "recomputed and saved); a separate result in posthoc_la.json. Repeatable. auto: TAU chosen on the "
                   "val split (0 to 2 by 0.25), test evaluated at it.")
@runtime_options
def eval_(run_ref, heads, recompute, taus, **rt) -> None:
    """Show or re-evaluate a finished or partial run (RUN is a run id, prefix or folder)."""
    from ltbench.console import print_result
    from ltbench.posthoc import auto_adjust, check_taus, posthoc_adjust
    from ltbench.records import find_run, posthoc_label, tau_key
    from ltbench.reevaluate import reevaluate

    runtime = make_runtime(**rt)
    auto = "auto" in taus
    taus = [_tau(t) for t in taus if t != "auto"]
    check_taus(taus)  # before the table, not after it
    record = find_run(runtime.results, run_ref)
    result = reevaluate(record, runtime) if recompute or not record.done else record.result()
    print_result(result, all_heads=heads)
    if auto:
        chosen = auto_adjust(record, runtime)["auto"]
        say(f"τ chosen on val: {chosen['tau']} (val top-1 by τ: "
            f"{', '.join(f'{k}: {v:.2f}' for k, v in chosen['val_top1'].items())})")
        taus.append(float(chosen["tau"]))
    if taus:
        adjusted = posthoc_adjust(record, runtime, taus)["taus"]
        for tau in taus:
            block = adjusted[tau_key(tau)]
            print_result({**result, "method": posthoc_label(result["method"], tau), "final": block, "best": None},
                         all_heads=heads)
            say(f"post-hoc logit adjustment τ={tau_key(tau)} from {block['logits']} final logits -> "
                 f"{record.path / 'posthoc_la.json'}")


def _tau(text: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise UserError(f"--adjust takes a number (tau) or auto, not {text!r}.") from exc


@main.command()
@click.option("--results", type=click.Path(path_type=Path), default=Path("results"), show_default=True,
              help="Results folder holding runs/<run_id>/.")
@click.option("--format", "fmt", type=click.Choice(["markdown", "latex", "csv", "json", "html"]),
              default="markdown", show_default=True,
              help="html: a self-contained page (a section per dataset, its figures, links to the run folders).")
@click.option("--split", type=click.Choice(["counts", "paper"]), default="counts", show_default=True,
              help="many/medium/few by training counts (>100 / 20-100 / <20) or DeiT-LT's class-index ranges.")
@click.option("--metric", "metrics", multiple=True, metavar="top1|many|medium|few|ece",
              help="Metric column(s), repeatable or comma-separated (default: top1, many, medium, few).")
@click.option("--select", default="final", show_default=True, metavar="final|val|oracle",
              help="Epoch selection rule: the final epoch; the epoch with the best val top-1 (test reported there); "
                   "or oracle, each run's best test epoch (selects on test: optimistic, labelled, shown beside final).")
@click.option("--baseline", default=None, metavar="METHOD",
              help="Add to every other row its paired difference with this row (a method or row label): mean over "
                   "common seeds, 95 % bootstrap interval, P(better); n.s. when the interval contains 0.")
@click.option("--ci/--no-ci", default=True, show_default=True,
              help="95 % bootstrap intervals in every cell (over seeds and test images, stratified by class).")
@click.option("--spread", type=click.Choice(["std", "se"]), default="std", show_default=True,
              help="Standard deviation or standard error over seeds.")
@click.option("--heads", is_flag=True, help="One row per head (main / CLS / DIST) for multi-head methods.")
@click.option("--by", multiple=True, metavar="KEY",
              help="Split rows by a config key: preset, a hyperparameter (teacher, epochs, ...) or data.KEY.")
@click.option("--method", "methods", multiple=True, help="Only these methods (repeatable).")
@click.option("--dataset", "datasets", multiple=True, help="Only these datasets (repeatable).")
@click.option("--compare", type=click.Choice(["paper"]), default=None,
              help="Add the published numbers (ltbench/reference/paper_numbers.csv) and the difference; a paper's "
                   "best-epoch number is compared with ltbench's oracle, and the table says so.")
@click.option("--adjust", default=None, metavar="TAU|auto",
              help="Also rows of post-hoc logit adjustment at TAU, or at each run's τ chosen on val (auto), from "
                   "`ltbench eval RUN --adjust TAU|auto`.")
@click.option("--digits", type=click.IntRange(min=0, max=10), default=2, show_default=True)
@click.option("--standalone", is_flag=True,
              help="LaTeX: a document that compiles on its own instead of a booktabs table to paste.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write to FILE.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write per-class and CLS-vs-DIST figures (PNG and PDF) into DIR.")
def report(results, fmt, split, metrics, select, baseline, ci, spread, heads, by, methods, datasets, compare, adjust,
           digits, out, plots_dir, standalone) -> None:
    """Tables of many/medium/few accuracy over seeds from the run folders (reads nothing else)."""
    from ltbench import report as rp
    from ltbench import runset
    from ltbench.plots import page_figures, write_plots

    metric_list = tuple(m.strip() for item in metrics for m in item.split(",") if m.strip()) or runset.DEFAULT_METRICS
    options = runset.ReportOptions(select=select, split=split, metrics=metric_list, heads=heads, by=tuple(by),
                               spread=spread, digits=digits, compare=compare, methods=tuple(methods),
                               datasets=tuple(datasets), standalone=standalone, ci=ci,
                               adjust=adjust if adjust in (None, "auto") else _tau(adjust),
                               baseline=baseline)
    page = {"figures": page_figures, "page_dir": out.parent if out else None} if fmt == "html" else {}
    text = rp.report(results.resolve(), fmt, options, **page)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        say(f"wrote {out}")
    else:
        click.echo(text, nl=False)
    if plots_dir:

        files = write_plots(runset.load_runs(results.resolve(), options), plots_dir, options)
        say(f"wrote {len(files)} figure file(s) to {plots_dir}")


@main.command(name="list")
@click.argument("what", type=click.Choice(["methods", "datasets", "evaluators", "presets"]), default="methods")
def list_(what: str) -> None:
    """List registered plugins (built-in and from installed packages) or method presets."""

    if what == "presets":
        for name, cls in METHODS:
            console.print(f"{name}: {', '.join(sorted(cls.presets))} (default {cls.default_preset})")
        return
    registry = {"methods": METHODS, "datasets": DATASETS, "evaluators": EVALUATORS}[what]
    rows = [(name, source, doc_summary(name, doc)) for name, source, doc in registry.listing()]
    print_listing(("name", "source", "description"), rows)


main.lazy = {
    "sweep": ("ltbench.cli_runs:sweep",
              "Run a grid of methods x datasets x rho x seeds on Ray Tune; only what is not done yet is trained."),
    "reproduce": ("ltbench.cli_runs:reproduce", "Train a reproduction SUITE (a shipped name or a YAML file) like a "
                  "sweep, then check its published claims."),
    "tune": ("ltbench.cli_runs:tune", "Search a method's hyperparameters on val with Ray Tune, retrain the best on "
             "fresh seeds, report on test."),
    "data": ("ltbench.cli_data:data", "Inspect, download or verify datasets."),
    "export": ("ltbench.cli_models:export", "Write a run's network alone (safetensors) beside its model card; "
               "ltbench.load_model(DIR) loads it."),
}
