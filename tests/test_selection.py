"""The three selection rules (final / val / oracle), paired comparisons and the subset seed's spread, on golden run
folders with known curves (tests/golden/make_runs.py: final = epoch 4, val = epoch 3, oracle = epoch 2), and a real
run that records val and test at every evaluated epoch."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ltbench import report as rp
from ltbench import resolve, runset, stages
from ltbench.records import RunRecord
from ltbench.selection import pick_oracle, pick_val
from tests.golden.make_runs import GAIN_FINAL, GAIN_VAL, curve_offset
from tests.test_engine import SETS, _runtime

SELECTION = Path(__file__).resolve().parent / "golden" / "selection"
GOLDEN = SELECTION.parent
MEAN_OFFSET = float(np.mean([curve_offset(*pair) for pair in GAIN_FINAL]))


def _cells(**options):
    opts = runset.ReportOptions(metrics=("top1",), **options)
    runs = runset.load_runs(SELECTION, opts)
    return rp.aggregate(runs, opts).set_index("row")


@pytest.mark.parametrize(("rule", "epoch", "test_top1"), [("final", 4, 65.0), ("val", 3, 60.0), ("oracle", 2, 70.0)])
def test_each_rule_picks_its_epoch_on_the_golden_curves(rule, epoch, test_top1):
    runs = runset.load_runs(SELECTION, runset.ReportOptions(select=rule))
    erm = runs.frame[runs.frame["method"] == "erm_cnn"]
    assert set(erm["epoch"]) == {epoch}
    assert _cells(select=rule).loc["erm_cnn", "mean"] == pytest.approx(test_top1 + MEAN_OFFSET)


def test_the_engines_rules_reproduce_the_golden_blocks_from_the_curves():
    for folder in sorted((SELECTION / "runs").iterdir()):
        record = RunRecord(folder)
        oracle = val = None
        for row in record.metrics():
            test = {"heads": {"main": row["eval"]["main"]}}
            oracle = pick_oracle(oracle, row["epoch"], test)
            val = pick_val(val, row["epoch"], test, {"heads": {"main": row["val"]["main"]}})
        result = record.result()
        assert (oracle["epoch"], val["epoch"]) == (result["best"]["epoch"], result["val"]["epoch"]) == (2, 3)
        assert val["heads"]["main"]["top1"] == result["val"]["heads"]["main"]["top1"]  # test at the val epoch


def test_oracle_is_labelled_and_shown_beside_final_with_the_gap():
    text = rp.report(SELECTION, "markdown", runset.ReportOptions(select="oracle", metrics=("top1",)))
    assert "ORACLE" in text and "| erm\\_cnn (oracle) |" in text
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    erm_block = text.split("| erm\\_cnn (oracle) |")[1]
    assert f"| ↳ final | {65 + MEAN_OFFSET:.2f} |" in erm_block and "| ↳ gap oracle - final | +5.00 |" in erm_block
    assert "| ↳ final" in lines


def test_paired_difference_against_a_baseline_marks_non_significance():
    final = rp.report(SELECTION, "markdown", runset.ReportOptions(metrics=("top1",), baseline="erm_cnn"))
    mean_final = np.mean(list(GAIN_FINAL.values()))
    delta = next(line for line in final.splitlines() if line.startswith("| ↳ Δ vs erm\\_cnn"))
    assert f"+{mean_final:.2f} [+" in delta and "n.s." not in delta  # every pair gains: the interval excludes 0
    val = rp.report(SELECTION, "markdown", runset.ReportOptions(select="val", metrics=("top1",), baseline="erm_cnn"))
    delta = next(line for line in val.splitlines() if line.startswith("| ↳ Δ vs erm\\_cnn"))
    assert f"+{np.mean(list(GAIN_VAL.values())):.2f} [-" in delta and "(n.s.)" in delta and "P(better)=" in delta
    for fmt, needle in (("latex", "(n.s.)"), ("html", "(n.s.)")):
        out = rp.report(SELECTION, fmt, runset.ReportOptions(select="val", metrics=("top1",), baseline="erm_cnn"))
        assert needle in out and "P(better)" in out and "[" in out


def test_subset_seed_pools_into_one_cell_with_its_own_column():
    cell = _cells().loc["erm_cnn"]
    assert cell["n"] == 6 and cell["subsample_seeds"] == "0;1"
    per_subset = [65 + np.mean([curve_offset(s, subset) for s in (0, 1, 2)]) for subset in (0, 1)]
    assert cell["subset_std"] == pytest.approx(np.std(per_subset, ddof=1))
    text = rp.report(SELECTION, "markdown", runset.ReportOptions(metrics=("top1",)))
    assert "σ subsets" in text and "seeds × CIFAR-LT subset seeds" in text
    assert "σ subsets" not in rp.report(GOLDEN, "markdown", runset.ReportOptions(metrics=("top1",)))


def test_runs_without_val_evaluation_are_left_out_of_val_tables_with_why():
    runs = runset.load_runs(GOLDEN, runset.ReportOptions(select="val"))
    assert runs.frame.empty and runs.incomplete
    assert all("trained before val splits" in r["reason"] or "unfinished" in r["reason"] for r in runs.incomplete)


def test_a_run_records_val_and_test_at_every_evaluated_epoch_for_every_head(tmp_path):
    config = resolve.make_config("erm_vit", "synthetic", preset="tiny", epochs=3,
                                 sets=[*SETS, "data.n_val=5", "ema_decay=0.5", "eval_ema=true"])
    record = stages.ensure(config, _runtime(tmp_path))
    rows, result = record.metrics(), record.result()
    assert all(set(r["val"]) == set(r["eval"]) == {"main", "ema"} for r in rows)  # every head, both splits
    best_val = max(rows, key=lambda r: r["val"]["main"]["top1"])  # the earliest of ties, as max keeps
    assert result["val"]["epoch"] == best_val["epoch"]
    assert result["val"]["heads"]["main"]["top1"] == best_val["eval"]["main"]["top1"]
    assert result["best"]["heads"]["main"]["top1"] == max(r["eval"]["main"]["top1"] for r in rows)
    assert set(result["final"]["val_heads"]) == {"main", "ema"} and result["eval_class_counts"]["val"] == [5] * 4
    assert result["val_split"]["images"] == 20 and json.dumps(result)  # JSON-clean


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
@pytest.mark.parametrize("rule", ["val", "oracle"])
def test_latex_with_intervals_paired_rows_and_the_subset_column_compiles(tmp_path, rule):
    options = runset.ReportOptions(select=rule, baseline="erm_cnn", standalone=True)
    (tmp_path / "table.tex").write_text(rp.report(SELECTION, "latex", options))
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "table.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:]
