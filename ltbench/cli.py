"""The command line: a thin click layer over library functions that never see click objects."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

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
        click.option("--micro-batch", type=int, default=0,
                     help="Per-device forward batch; gradients accumulate to the preset's batch."),
        click.option("--workers", type=int, default=None, help="Data-loader worker processes."),
        click.option("--download", is_flag=True, help="Download the dataset first if it is missing (needs internet)."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def make_runtime(data_root, results, device, compile_, micro_batch, workers, download, quiet, **extra):
    from ltbench.data import default_data_root
    from ltbench.engine import Runtime

    if device != "auto" and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {device} was asked for, but PyTorch sees no CUDA GPU here. Use --device cpu.")
    return Runtime(results=Path(results).resolve(), data_root=(data_root or default_data_root()).resolve(),
                   device=device, compile=compile_, micro_batch=micro_batch, workers=workers, download=download,
                   progress=not quiet, echo=lambda msg: err_console.print(msg, highlight=False), **extra)


class LTGroup(click.Group):
    """Turns UserError into a one-paragraph message and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(2)


@click.group(cls=LTGroup)
@click.version_option(package_name="ltbench")
def main() -> None:
    """ltbench: train, reproduce and compare long-tailed recognition methods under one protocol."""


@main.command()
@click.option("--method", required=True, help="Method name (see `ltbench list methods`).")
@click.option("--dataset", required=True, help="Dataset name (see `ltbench list datasets`).")
@click.option("--rho", type=float, default=None, help="Imbalance ratio n_max/n_min (>= 1).")
@click.option("--save-logits", is_flag=True, help="Also save the final test logits (test_logits.npz).")
@click.option("--stop-after-epochs", type=int, default=None, help="Stop after N epochs, resumable (time-boxed jobs).")
@runtime_options
def run(method, dataset, rho, seed, preset, epochs, sets, save_logits, stop_after_epochs, **rt) -> None:
    """Train and evaluate one method on one dataset (resumes or reuses a run with the same config)."""
    from ltbench import stages

    config = stages.make_config(method, dataset, rho=rho, seed=seed, preset=preset, epochs=epochs, sets=sets)
    runtime = make_runtime(**rt, save_logits=save_logits, stop_after_epochs=stop_after_epochs)
    record = stages.ensure(config, runtime)
    if not record.done:
        err_console.print(f"Stopped after {stop_after_epochs} epoch(s); run the same command to resume {record.path}")
        return
    print_result(record.result())
    console.print(f"run folder: {record.path}", highlight=False, soft_wrap=True)


for _opt in reversed(COMMON_RUN_OPTIONS):
    run = _opt(run)
main.add_command(run)


@main.command(name="eval")
@click.argument("run_ref")
@click.option("--heads", is_flag=True, help="Show every head (CLS / DIST / average) under both splits.")
@click.option("--recompute", is_flag=True, help="Re-evaluate the latest checkpoint instead of reading result.json.")
@runtime_options
def eval_(run_ref, heads, recompute, **rt) -> None:
    """Show or re-evaluate a finished or partial run (RUN is a run id, prefix or folder)."""
    from ltbench.records import find_run
    from ltbench.reevaluate import reevaluate

    runtime = make_runtime(**rt)
    record = find_run(runtime.results, run_ref)
    result = reevaluate(record, runtime) if recompute or not record.done else record.result()
    print_result(result, all_heads=heads)


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
    for name, cls in registry:
        doc = (cls.__doc__ or "").strip().splitlines()
        console.print(f"{name:<14} {doc[0] if doc else ''}", highlight=False)


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
        console.print(f"[bold]{key}[/]: {value}", highlight=False, soft_wrap=True)


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
@click.option("--workers", type=int, default=None, help="Images decoded in parallel (default: CPU count).")
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
                table.add_row(f"{label} ({block['epoch'] + 1})", head, split, _fmt(m["top1"]), _fmt(groups["many"]),
                              _fmt(groups["medium"]), _fmt(groups["few"]), _fmt(m["ece"]))
    console.print(table)
    console.print("counts split: many > 100, medium 20..100, few < 20 training images; paper split: DeiT-LT's "
                  "class-index ranges. n/a = no class in that group. best = best test epoch (optimistic).",
                  highlight=False, style="dim")
