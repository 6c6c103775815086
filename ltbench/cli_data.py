"""``ltbench data``: inspect, export, download and verify datasets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ltbench import config as cfgmod
from ltbench import portable
from ltbench.console import console
from ltbench.data import default_data_root
from ltbench.datainfo import dataset_summary
from ltbench.errors import UserError
from ltbench.registry import DATASETS
from ltbench.resolve import dataset_options
from ltbench.verify import print_report, verify_dataset


@click.group()
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

    cls = DATASETS.get(dataset)
    options = dataset_options(cls, rho, cfgmod.parse_set_options([s.removeprefix("data.") for s in sets])[0])
    if {k for k in cfgmod.hparams_dict(options)} - {"rho", "subsample_seed"}:
        raise UserError("A portable subset is named by dataset, rho and subsample_seed only, so it holds the standard "
                        "val split: export it without other data options (val_per_class, val_fill_from_train).")
    data = cls(options, (data_root or default_data_root()).resolve()).load()
    path = portable.subset_path(out.resolve(), dataset, options.rho, getattr(options, "subsample_seed", 0))
    console.print(f"wrote {portable.export(data, path)}", highlight=False)


@data.command()
@click.argument("dataset")
@click.option("--data-root", type=click.Path(path_type=Path), default=None)
def download(dataset, data_root) -> None:
    """Download a dataset's original archive into the data root (needs internet)."""

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

    report = verify_dataset(dataset, (data_root or default_data_root()).resolve(), workers=workers,
                            expect_standard=expect_standard, progress=not quiet and not as_json)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report, console)
    if not report.ok:
        sys.exit(1)





