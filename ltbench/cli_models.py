"""``ltbench export``: a run's network out of its run folder, for ``ltbench.load_model`` (the logic: ltbench.export)."""

from __future__ import annotations

from pathlib import Path

import click

from ltbench.cli_options import make_runtime
from ltbench.terminal import say


@click.command()
@click.argument("run_ref")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder to write model.safetensors and model_card.json into (created if missing).")
@click.option("--select", default="final", show_default=True, metavar="final|val|oracle",
              help="Which epoch's weights: the final one; the one with the best val top-1; or oracle, the best test "
                   "epoch (selected on test: labelled so in the card). The card holds that epoch's test numbers.")
@click.option("--adjust", default=None, metavar="TAU|auto",
              help="Bake post-hoc logit adjustment at TAU (or the tau chosen on val) into the exported logits; "
                   "`ltbench eval RUN --adjust TAU|auto` must have computed its numbers. Needs --select final.")
@click.option("--results", type=click.Path(path_type=Path), default=Path("results"), show_default=True,
              help="Results folder holding runs/<run_id>/ (and the run's upstream runs).")
@click.option("--data-root", type=click.Path(path_type=Path), default=None,
              help="Folder with the datasets (default: $LTBENCH_DATA or ./data); read only for runs trained before "
                   "result.json recorded their dataset's facts.")
def export(run_ref, out, select, adjust, results, data_root) -> None:
    """Write a run's network alone (safetensors) beside its model card; ltbench.load_model(DIR) loads it."""
    from ltbench.export import export_run
    from ltbench.records import find_run

    runtime = make_runtime(results=results, data_root=data_root, device="cpu", progress=False)
    card = export_run(find_run(runtime.results, run_ref), runtime, out, select, adjust)
    top1 = card["test"]["heads"][card["default_head"]]["top1"]
    say(f"exported run {card['run_id']} ({card['method']}, --select {card['select']}: epoch {card['epoch']}, test "
        f"top-1 {top1:.2f}) to {out}; in Python: ltbench.load_model({str(out)!r})")
