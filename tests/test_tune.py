"""`ltbench tune`: a search on Ray Tune whose objective is the val split's, with ASHA and a model-based searcher
(Optuna), the best configuration retrained on fresh seeds, the search listed apart by the report."""

from __future__ import annotations

import json

import pytest

from ltbench import report as rp
from ltbench import runset
from ltbench.errors import UserError
from ltbench.records import RunRecord, run_state, runs_dir, tune_manifests
from ltbench.tuning import TuneSpec, check_spec, objective_value, parse_space
from tests.conftest import FAST_VIT

# A tiny ViT on an easy synthetic set: from lr 1e-5 (learns nothing in 3 epochs) to 1e-2 (learns it in two), so the
# trials differ clearly on val and ASHA has something to stop.
FAST = [*FAST_VIT, "batch_size=16", "warmup_epochs=0", "data.num_classes=4", "data.n_max=60", "data.n_test=10",
        "data.n_val=10", "data.noise=0.3"]


def test_search_ranges_parse_and_bad_ones_are_refused():
    space = parse_space(["lr=loguniform(1e-3, 1e-1)", "batch_size=choice(16,32)"], {"weight_decay": "uniform(0,1e-3)"})
    assert [d.text() for d in space] == ["weight_decay=uniform(0.0, 0.001)", "lr=loguniform(0.001, 0.1)",
                                         "batch_size=choice(16, 32)"]
    for bad in ("lr=loguniform(0, 1)", "lr=normal(0,1)", "lr=uniform(2,1)", "lr"):
        with pytest.raises(UserError):
            parse_space([bad])
    with pytest.raises(UserError, match="cannot be searched"):
        check_spec(TuneSpec("erm_cnn", "synthetic", None, tuple(parse_space(["epochs=randint(1,5)"]))))


@pytest.mark.parametrize("objective", ["test_top1", "top1", "few"])
def test_a_search_on_the_test_split_is_refused(cli, tmp_path, objective):
    out = cli("tune", "--method", "erm_cnn", "--dataset", "synthetic", "--space", "lr=uniform(0.01,0.1)",
              "--objective", objective, "--results", str(tmp_path), expect=2)
    assert "never reads" in out.output or "not one of" in out.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "tunes").exists()  # refused before anything ran


def test_the_objective_reads_the_val_block_only():
    row = {"epoch": 3, "eval": {"main": {"top1": 90.0, "counts": {"few": 80.0}}},
           "val": {"main": {"top1": 40.0, "counts": {"few": 20.0}}}}
    assert objective_value(row, "val_top1") == 40.0 and objective_value(row, "val_few") == 20.0
    with pytest.raises(KeyError):
        objective_value({"epoch": 1, "eval": row["eval"]}, "val_top1")  # test numbers alone give no objective


def test_tune_with_asha_and_optuna_stops_trials_retrains_the_best_and_is_listed_apart(cli, tmp_path):
    results = tmp_path / "results"
    out = cli("tune", "--method", "erm_vit", "--dataset", "synthetic", "--rho", "2", "--preset", "tiny", "--epochs",
              "3", "--space", "lr=loguniform(1e-5,1e-2)", "--searcher", "optuna", "--scheduler", "asha",
              "--trials", "6",
              "--concurrent", "2", "--final-seeds", "2", "--results", str(results), "--data-root", str(tmp_path),
              "--device", "cpu", "--quiet", *[a for s in FAST for a in ("--set", s)])
    [manifest] = tune_manifests(results)
    trials = manifest["trials"]
    assert len(trials) == 6 and manifest["objective_split"] == "val" and manifest["searcher"] == "optuna"
    stopped = [t for t in trials if t["status"].startswith("stopped early")]
    assert stopped, [t["status"] for t in trials]  # ASHA stopped some trials early ...
    for trial in stopped:  # ... and each stays a resumable partial run
        assert run_state(results, trial["run_id"])[0] == "partial"
    for trial in trials:  # every reported objective is the run's own val top-1, epoch by epoch
        rows = {r["epoch"]: r for r in RunRecord(runs_dir(results) / trial["run_id"]).metrics()}
        assert trial["history"] and all(value == rows[epoch]["val"]["main"]["top1"]
                                        for epoch, value in trial["history"])
    best = manifest["best"]
    assert best["status"] == "completed" and best["objective"] == max(
        t["objective"] for t in trials if t["status"] == "completed")
    finals = [RunRecord(runs_dir(results) / rid) for rid in manifest["final_runs"]]
    assert [r.config().seed for r in finals] == [1, 2] and all(r.done for r in finals)
    assert all(r.config().hparams["lr"] == best["params"]["lr"] for r in finals)
    runs = runset.load_runs(results)
    assert set(runs.frame["run_id"]) == set(manifest["final_runs"])  # the cells hold the retrained runs only
    assert {t["run_id"] for t in runs.search} == {t["run_id"] for t in trials}
    text = rp.report(results, "markdown")
    assert "Search trials of tune" in text and "(n=" not in text.split("\n\n")[1]
    assert "search trials" in out.output and json.dumps(manifest)
