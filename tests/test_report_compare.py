"""`ltbench report --compare paper` compares like with like: the source's recipe, epoch selection and interval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ltbench import paper_numbers, runset
from ltbench import report as rp

GOLDEN = Path(__file__).resolve().parent / "golden"
OPTIONS = runset.ReportOptions(compare="paper")


def _cells(results: Path, options: runset.ReportOptions = OPTIONS):
    runs = runset.load_runs(results, options)
    return rp.add_reference(rp.aggregate(runs, options), runs, options), runs


def _top1(cells, row: str, dataset: str = "cifar10lt"):
    match = cells[(cells["row"] == row) & (cells["dataset"] == dataset) & (cells["metric"] == "top1")
                  & (cells["rho"] == 100)]
    return match.iloc[0]


def test_other_recipes_are_not_compared():
    cells, _ = _cells(GOLDEN)
    short = _top1(cells, "erm_vit (preset=short, epochs=100)")
    assert short["not_comparable"] == "not comparable (preset short)" and short["delta"] != short["delta"]  # NaN
    assert _top1(cells, "erm_vit (preset=paper, epochs=1200)")["not_comparable"] == ""
    flat = {"preset": "paper", "epochs": "100"}
    row = rp.reference_numbers().query("method == 'deitlt' and dataset == 'cifar10lt' and rho == 100").iloc[0]
    assert paper_numbers._recipe_mismatch(row, flat) == "not comparable (100 epochs, source 1200)"


def test_best_epoch_sources_are_compared_at_each_runs_best_epoch():
    cells, runs = _cells(GOLDEN)
    cell = _top1(cells, "deitlt")
    best = [runs.selection[i]["oracle"]["main"]["top1"] for i in cell["run_ids"].split(";")]
    assert cell["compared_at"] == "oracle" and cell["compared"] == pytest.approx(sum(best) / len(best))
    assert cell["delta"] == pytest.approx(cell["compared"] - 87.5) and cell["compared"] != cell["mean"]
    table = rp.build_table(cells, runs, OPTIONS)
    labels = [label for label, _, _ in table.rows]
    assert labels[:4] == ["deitlt", "↳ oracle (best test epoch)", "↳ paper", "↳ Δ vs paper"]
    unknown = _top1(cells, "erm_vit (preset=paper, epochs=1200)")  # selection not stated: the table's epoch
    assert unknown["compared_at"] == "final" and unknown["compared"] == unknown["mean"]


def test_coarser_evaluation_than_the_source_is_marked(tmp_path):
    shutil.copytree(GOLDEN / "runs", tmp_path / "runs")
    for folder in (tmp_path / "runs").iterdir():
        if (folder / "result.json").exists():
            result = json.loads((folder / "result.json").read_text())
            result["eval_every"] = 5 if result["method"] == "deitlt" else 1
            (folder / "result.json").write_text(json.dumps(result))
    assert _top1(_cells(tmp_path)[0], "deitlt")["coarse_eval"] == 5
    text = rp.report(tmp_path, "markdown", OPTIONS)
    assert "(coarse eval, every 5)" in text and "its best epoch may be missed" in text
    assert "coarse eval" not in rp.report(GOLDEN, "markdown", OPTIONS)  # no interval recorded: nothing to mark


def test_reference_rows_record_recipe_and_selection():
    ref = rp.reference_numbers()
    assert set(ref["selection"]) <= {"best", "final", "unknown"} and set(ref["preset"]) <= {"paper", "sam"}
    deitlt = ref[ref["method"] == "deitlt"]
    assert (deitlt["selection"] == "best").all() and (deitlt["eval_every"] == "1").all()
    assert set(deitlt["epochs"]) == {"1200", "1400", "1000"}
    assert (ref.loc[ref["match"].str.contains("sam=true") & ref["method"].isin(["ldam_drw", "paco"]), "preset"]
            == "sam").all()
