"""Issue 23, run folders: a file is tied to its run, a finished result to its digest, a full disk is a message,
and every damaged run file is a one-line error (never a traceback, never a silently different number).

Two tiny finished runs of different lr (with their test logits) and a partial run of each are trained once per
module; each test works on its own copies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ltbench.cli import main
from ltbench.records import RunRecord
from tests.conftest import FAST_VIT, set_args

BASE = ["--method", "erm_vit", "--dataset", "synthetic", "--preset", "tiny", "--quiet", "--epochs", "2",
        *set_args(*FAST_VIT, "data.n_max=40", "data.n_test=4", "batch_size=32")]
LR = {"a": ["--set", "lr=0.02"], "b": ["--set", "lr=0.05"]}


def invoke(*args: str, expect: int | None = 0):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """finished / partial runs "a" (lr 0.02) and "b" (lr 0.05), each in its own results folder."""
    root, runs = tmp_path_factory.mktemp("runs"), {}
    for name, lr in LR.items():
        invoke("run", *BASE, *lr, "--save-logits", "--results", str(root / f"{name}-finished"))
        invoke("run", *BASE, *lr, "--results", str(root / f"{name}-partial"), "--stop-after-epochs", "1")
        for kind in ("finished", "partial"):
            (runs[f"{name}-{kind}"],) = (root / f"{name}-{kind}" / "runs").iterdir()
    return runs


@pytest.fixture
def copy_run(trained, tmp_path):
    def copy(kind: str) -> Path:
        target = tmp_path / kind / "runs" / trained[kind].name
        shutil.copytree(trained[kind], target)
        return target
    return copy


def results_of(run: Path) -> str:
    return str(run.parent.parent)


def args_of(run: Path) -> list[str]:
    return [*BASE, *LR[run.parent.parent.name[0]], "--results", results_of(run)]


# ---------------------------------------------------------------------------------------------- silently wrong 1
def test_a_checkpoint_or_logits_file_of_another_run_is_refused_naming_both_ids(copy_run, trained):
    target, source = copy_run("b-partial"), trained["a-partial"]
    shutil.copy(source / "checkpoint.pt", target / "checkpoint.pt")
    out = invoke("run", *args_of(target), expect=2)
    assert f"written by run {source.name}" in out and f"not by run {target.name}" in out
    assert "Nothing was discarded" in out and not (target / "DONE").exists()

    target, source = copy_run("b-finished"), trained["a-finished"]
    shutil.copy(source / "test_logits.npz", target / "test_logits.npz")
    (target / "DONE").write_bytes(b"")  # a DONE without digests: the logits' own record still names their run
    out = invoke("eval", target.name, "--adjust", "1", "--results", results_of(target), "--quiet", expect=2)
    assert f"written by run {source.name}" in out and f"not by run {target.name}" in out
    assert not (target / "posthoc_la.json").exists()


# ---------------------------------------------------------------------------------------------- silently wrong 2
@pytest.mark.parametrize("edited", ["result.json", "metrics.jsonl"])
def test_a_file_edited_after_the_run_finished_is_refused_by_run_eval_and_report(copy_run, edited):
    run = copy_run("a-finished")
    text = (run / edited).read_text()
    if edited == "result.json":
        result = json.loads(text)
        result["final"]["heads"]["main"]["top1"] = 99.9
        (run / edited).write_text(json.dumps(result))
    else:
        (run / edited).write_text(text.replace('"epoch": 1', '"epoch": 1, "note": "edited"', 1))
    for args in (["run", *args_of(run)], ["eval", run.name, "--results", results_of(run)]):
        out = invoke(*args, expect=2)
        assert f"its {edited} was changed after the run finished" in out and "99.9" not in out
        assert "already finished" not in out
    report = invoke("report", "--results", results_of(run), expect=2)
    assert f"its {edited} was changed after the run finished" in report and "99.9" not in report


def test_done_records_the_digests_and_an_intact_run_is_reused(copy_run):
    run = copy_run("a-finished")
    digests = json.loads((run / "DONE").read_text())["sha256"]
    assert set(digests) == {"result.json", "metrics.jsonl", "test_logits.npz"}
    assert "already finished" in invoke("run", *args_of(run))
    (run / "DONE").write_text('{"sha256": {"result.json": 5}}')
    out = invoke("eval", run.name, "--results", results_of(run), expect=2)
    assert "DONE is damaged: key sha256.'result.json'" in out


# ---------------------------------------------------------------------------------------------- silently wrong 3
def test_micro_batches_are_refused_for_a_batchnorm_model_before_any_folder_exists(tmp_path):
    cnn = ["--method", "erm_cnn", "--dataset", "synthetic", "--preset", "tiny", "--quiet", "--epochs", "1",
           *set_args("data.n_max=40", "data.n_test=3"), "--results", str(tmp_path)]
    out = invoke("run", *cnn, "--micro-batch", "4", expect=2)
    assert "BatchNorm" in out and "--micro-batch" in out and "same run id" in out
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    invoke("run", *cnn, "--micro-batch", "0")  # 0 = the whole batch at once: allowed


def test_env_json_keeps_one_entry_per_training_session(copy_run):
    run = copy_run("a-partial")
    invoke("run", *args_of(run), "--workers", "1")
    sessions = json.loads((run / "env.json").read_text())["sessions"]
    assert len(sessions) == 2 and [s["epochs_logged_at_start"] for s in sessions] == [0, 1]
    assert sessions[1]["runtime"]["workers"] == "1" != sessions[0]["runtime"]["workers"]


# ---------------------------------------------------------------------------------------------- the full disk
def _mount_tmpfs(folder: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_a_real_full_disk_during_the_checkpoint_write_is_a_message_then_the_run_resumes(copy_run, trained, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "8m"):
        pytest.skip("needs root and a mountable tmpfs to fill a real file system (CI may not be root)")
    try:
        run = disk / "runs" / trained["a-partial"].name
        shutil.copytree(trained["a-partial"], run)
        before = (run / "checkpoint.pt").read_bytes()
        filler = disk / "filler"
        free = shutil.disk_usage(disk).free
        filler.write_bytes(b"\0" * (free - 200_000))  # room for the metrics line, not for a checkpoint
        out = invoke("run", *BASE, *LR["a"], "--results", str(disk), expect=2)
        assert f"Could not write {run / 'checkpoint.pt'}: No space left on device" in out
        assert f"{run} has 0." in out and "the file needs about" in out and "Traceback" not in out
        assert (run / "checkpoint.pt").read_bytes() == before and not list(run.glob(".*.tmp"))
        filler.unlink()
        invoke("run", *BASE, *LR["a"], "--results", str(disk))
        same = RunRecord(trained["a-finished"]).result()["final"]["heads"]
        assert RunRecord(run).result()["final"]["heads"] == same  # as if never interrupted
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ---------------------------------------------------------------------------------------------- damaged run files
def test_invalid_utf8_in_metrics_is_a_one_line_error_for_run_report_and_sweep(copy_run):
    run = copy_run("a-partial")
    (run / "metrics.jsonl").write_bytes(b'{"epoch": 1, "lr": "\xff\xfe"}\n{"epoch": 2}\n')
    out = invoke("run", *args_of(run), expect=2)
    assert "metrics.jsonl line 1 is damaged: it is not UTF-8 text" in out
    (run / "metrics.jsonl").write_bytes(b'{"epoch": 1}\n{"epoch": 2, "lr": \xff')  # a torn last line
    report = invoke("report", "--results", results_of(run), expect=2)
    assert "unfinished" in report
    sweep = invoke("sweep", "--methods", "erm_vit", "--datasets", "synthetic", "--preset", "tiny", "--epochs", "2",
                   *set_args(*FAST_VIT, "data.n_max=40", "data.n_test=4", "batch_size=32", "lr=0.02"),
                   "--results", results_of(run), "--dry-run")
    assert "partial" in sweep


def test_a_partial_run_whose_config_json_is_not_json_is_refused_with_the_way_out(copy_run):
    run = copy_run("a-partial")
    (run / "config.json").write_bytes(b"\x00\x01 not json")
    out = invoke("run", *args_of(run), expect=2)
    assert "config.json is unreadable" in out and "move the folder away" in out


@pytest.mark.parametrize("damage", ["random", "object", "shape"])
def test_a_damaged_logits_file_is_refused_with_the_way_out(copy_run, damage):
    run = copy_run("a-finished")
    path = run / "test_logits.npz"
    saved = dict(np.load(path))
    if damage == "random":
        path.write_bytes(np.random.default_rng(0).bytes(300))
    elif damage == "object":
        np.savez(path, labels=saved["labels"], main=np.array([{"x": 1}] * len(saved["labels"]), dtype=object))
    else:
        np.savez(path, **{**saved, "main": saved["main"][:, :1][:-1]})
    (run / "DONE").write_bytes(b"")  # a DONE without digests: the file's own checks must catch it
    out = invoke("eval", run.name, "--adjust", "1", "--results", results_of(run), "--quiet", expect=2)
    assert f"The saved logits {path} cannot be used" in out and f"rm {path}" in out


def test_a_posthoc_file_of_the_wrong_structure_is_refused_by_eval_and_report(copy_run):
    run = copy_run("a-finished")
    invoke("eval", run.name, "--adjust", "1", "--results", results_of(run), "--quiet")
    (run / "posthoc_la.json").write_text(json.dumps({"run_id": run.name, "rule": "x", "taus": {"1": [1, 2]}}))
    for args in (["eval", run.name, "--adjust", "0.5", "--quiet"], ["report", "--adjust", "1"]):
        out = invoke(*args, "--results", results_of(run), expect=2)
        assert "posthoc_la.json is damaged: key taus.1" in out and "rm " in out


def test_an_empty_result_json_under_a_done_without_digests_is_a_one_line_error(copy_run):
    """The probe's `{}`, in a folder finished before DONE held digests: the schema alone must refuse it."""
    run = copy_run("a-finished")
    (run / "result.json").write_text("{}")
    (run / "DONE").write_bytes(b"")
    for args in (["run", *args_of(run)], ["eval", run.name, "--results", results_of(run)]):
        out = invoke(*args, expect=2)
        assert f"result.json of run {run.name} is damaged: key" in out and "delete result.json and DONE" in out
    assert f"result.json of run {run.name} is damaged" in invoke("report", "--results", results_of(run), expect=2)
