"""Post-hoc logit adjustment of a finished run (a ViT here): recomputed logits equal the run's own at tau = 0,
the adjustment is argmax(z - tau log prior), later taus reuse the saved logits, and `eval` / `report` label it."""

from __future__ import annotations

import numpy as np
import pytest

from ltbench import resolve, stages
from ltbench.errors import UserError
from ltbench.posthoc import posthoc_adjust
from ltbench.records import LOGITS_FILE
from ltbench.runtime import Runtime
from tests.conftest import FAST_VIT

DATA = ["data.n_max=48", "data.n_test=6", "data.num_classes=4", "data.rho=8"]


def _runtime(results) -> Runtime:
    return Runtime(results=results, data_root=results, device="cpu", progress=False, echo=lambda *_: None)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """A one-epoch tiny ERM-ViT run, logits not saved."""
    results = tmp_path_factory.mktemp("posthoc")
    config = resolve.make_config("erm_vit", "synthetic", preset="tiny", epochs=1,
                                sets=[*FAST_VIT, *DATA, "batch_size=16"])
    return stages.ensure(config, _runtime(results)), results


def test_recomputed_logits_at_tau_zero_reproduce_the_run_and_tau_one_adjusts_them(vit_run):
    record, results = vit_run
    assert not (record.path / LOGITS_FILE).exists()
    taus = posthoc_adjust(record, _runtime(results), [0.0, 1.0])["taus"]
    final = record.result()["final"]["heads"]["main"]
    assert taus["0"]["logits"] == "recomputed" and taus["0"]["heads"]["main"] == final  # same machine: exact
    saved = np.load(record.path / LOGITS_FILE)
    counts = np.asarray(record.result()["class_counts"], dtype=np.float64)
    prediction = (saved["main"] - np.log(counts / counts.sum())).argmax(1)
    top1 = 100.0 * (prediction == saved["labels"]).mean()
    assert taus["1"]["heads"]["main"]["top1"] == pytest.approx(top1, abs=1e-4)
    again = posthoc_adjust(record, _runtime(results), [1.0])["taus"]["1"]
    assert again["logits"] == "saved" and again["heads"] == taus["1"]["heads"]


def test_eval_and_report_show_the_adjusted_result_as_a_labelled_row(vit_run, cli):
    record, results = vit_run
    shown = cli("eval", record.run_id, "--results", str(results), "--data-root", str(results), "--device", "cpu",
                "--adjust", "1")
    assert "erm_vit + post-hoc LA τ=1" in shown.output
    table = cli("report", "--results", str(results), "--adjust", "1").output
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| erm")]
    assert rows == ["erm\\_vit", "erm\\_vit + post-hoc LA τ=1"]
    missing = cli("report", "--results", str(results), "--adjust", "0.5").output
    assert f"ltbench eval {record.run_id} --adjust 0.5" in missing


def test_unfinished_runs_and_best_epoch_selection_are_refused(tmp_path):
    config = resolve.make_config("erm_vit", "synthetic", preset="tiny", epochs=2, sets=[*FAST_VIT, *DATA])
    partial = stages.ensure(config, Runtime(results=tmp_path, data_root=tmp_path, device="cpu", progress=False,
                                            echo=lambda *_: None, stop_after_epochs=1))
    with pytest.raises(UserError, match="not finished"):
        posthoc_adjust(partial, _runtime(tmp_path), [1.0])
    from ltbench.runset import ReportOptions

    with pytest.raises(UserError, match="--select final"):
        ReportOptions(select="oracle", adjust=1.0)


def test_adjust_auto_chooses_tau_on_val_and_the_report_labels_it(vit_run, cli):
    record, results = vit_run
    shown = cli("eval", record.run_id, "--results", str(results), "--data-root", str(results), "--device", "cpu",
                "--adjust", "auto")
    auto = record.posthoc()["auto"]
    scores = auto["val_top1"]
    assert len(scores) == 9 and auto["tau"] == max(scores, key=scores.get) and "val" in auto["rule"]
    assert auto["tau"] in record.posthoc()["taus"] and "τ chosen on val" in shown.output
    table = cli("report", "--results", str(results), "--adjust", "auto").output
    assert "erm\\_vit + post-hoc LA τ chosen on val" in table
    with pytest.raises(UserError, match="no val split"):
        from ltbench.posthoc import auto_adjust

        config = resolve.make_config("erm_vit", "synthetic", preset="tiny", epochs=1,
                                     sets=[*FAST_VIT, *DATA, "batch_size=16", "data.n_val=0"])
        auto_adjust(stages.ensure(config, _runtime(results)), _runtime(results))
