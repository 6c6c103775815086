"""Logs a person and a batch job can follow: epoch lines, whole-run ETA, trackers, lock and thread reporting."""

from __future__ import annotations

import io
import json
import struct
import sys
import threading
import types
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from ltbench import progress, tracking
from ltbench.records import RunRecord
from ltbench.runtime import Runtime
from tests.conftest import FAST_VIT, set_args

TINY = ["--method", "erm_vit", "--dataset", "synthetic", "--preset", "tiny", "--epochs", "2",
        *set_args(*FAST_VIT, "data.n_max=80", "data.n_test=10", "batch_size=32", "eval_every=1")]


def read_tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every event file in ``folder``: TFRecord framing (length, crc, payload, crc) around the
    Event protobuf that tensorboardX ships."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_a_piped_run_logs_every_epoch_and_writes_trackers_that_read_back(cli, tmp_path, monkeypatch):
    import torch

    thread_calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", thread_calls.append)
    results = str(tmp_path / "res")
    first = cli("run", *TINY, "--results", results, "--log", "tensorboard,csv", "--threads", "1")
    # Not a terminal: one line per epoch with the whole run's ETA, then each evaluation's results.
    for epoch in (1, 2):
        line = next(x for x in first.output.splitlines() if x.startswith(f"epoch {epoch}/2 "))
        assert all(word in line for word in ("loss", "lr", "img/s", "elapsed", "ETA")), line
        assert f"test after epoch {epoch}: top-1" in first.output
    assert thread_calls == [1]  # --threads reaches torch

    run_dir = next((tmp_path / "res" / "runs").iterdir())
    log = (run_dir / "log.txt").read_text()  # every line the run printed, in its folder
    assert "epoch 2/2" in log and "test after epoch 2: top-1" in log and f"-> {run_dir}" in log
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = read_tensorboard(run_dir / "tensorboard")
    assert [step for step, _ in events["train/loss"]] == [1, 2]
    for row in rows:
        step, expected = tracking.flatten(row)
        assert {"train/loss", "train/lr", "test/main/top1", "test/main/medium", "test/main/ece"} <= set(expected)
        for tag, value in expected.items():
            assert dict(events[tag])[step] == pytest.approx(value, rel=1e-6)  # float32 on disk
    table = pd.read_csv(run_dir / "metrics.csv")
    assert table["epoch"].tolist() == [1, 2]
    assert table["test/main/top1"].tolist() == pytest.approx([r["eval"]["main"]["top1"] for r in rows])

    # --log and --threads are runtime options: the same run, already finished, whatever they say.
    again = cli("run", *TINY, "--results", results)
    assert "already finished, nothing trained" in again.output
    assert again.output.index("already finished") < again.output.index("top-1")
    assert "epoch 1/2" not in again.output


def test_a_terminal_keeps_its_live_bar_and_leaves_a_line_per_evaluated_epoch(monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(progress, "stderr_console", Console(file=screen, force_terminal=True, width=200))
    lines: list[str] = []
    with _monitor(lines, epochs=4) as monitor:
        with monitor.epoch_bar(0) as update:
            update(0, {}, 32, 0.5)
            update(1, {}, 64, 1.0)
        monitor.epoch_done(_row(0))
        assert lines == []  # the bar was enough for an epoch without evaluation
        monitor.epoch_done(_row(1, evaluated=True))
    assert "run ETA" in screen.getvalue() and "epoch 1/4" in screen.getvalue()
    assert lines[0].startswith("epoch 2/4 ") and lines[1].startswith("  test after epoch 2: top-1 50.00")
    assert "top-1 by head: cls 40.00  dist 60.00" in lines[1]


def test_without_a_terminal_every_epoch_prints_a_line(monkeypatch):
    monkeypatch.setattr(progress, "stderr_console", Console(file=io.StringIO()))  # a pipe, a log file
    lines: list[str] = []
    with _monitor(lines, epochs=3) as monitor:
        monitor.epoch_done(_row(0))
    assert len(lines) == 1 and lines[0].startswith("epoch 1/3  loss 1.5000  lr 1.00e-02")


def test_the_run_eta_extrapolates_the_mean_epoch_over_the_epochs_left():
    assert progress.run_eta(elapsed_s=60, epochs_done=2, epochs_left=8) == 240
    assert progress.run_eta(elapsed_s=60, epochs_done=2, epochs_left=0) == 0
    assert progress.clock(3725.4) == "1:02:05"


def test_flatten_logs_every_head_and_skips_empty_groups():
    step, scalars = tracking.flatten(_row(4, evaluated=True))
    assert step == 5
    assert scalars["test/main/top1"] == 50.0 and scalars["test/cls/top1"] == 40.0 and scalars["test/dist/many"] == 70
    assert "test/main/few" not in scalars  # no class in that group
    assert "test/main/paper_many" not in scalars  # no paper split for this dataset
    assert scalars["train/loss"] == 1.5 and scalars["train/cls_loss"] == 0.7 and scalars["train/lr"] == 0.01


def test_wandb_and_mlflow_adapters_log_the_flattened_rows(monkeypatch, tmp_path):
    calls: list[tuple] = []
    run = types.SimpleNamespace(log=lambda values, step: calls.append(("log", step, values)),
                                finish=lambda exit_code: calls.append(("finish", exit_code)))
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: calls.append(("init", kwargs)) or run
    mlflow = types.ModuleType("mlflow")
    mlflow.set_experiment = lambda name: calls.append(("experiment", name))
    mlflow.start_run = lambda **kwargs: calls.append(("start", kwargs))
    mlflow.log_params = lambda params: calls.append(("params", params))
    mlflow.log_metrics = lambda values, step: calls.append(("metrics", step, values))
    mlflow.end_run = lambda status: calls.append(("end", status))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    record, config = RunRecord(tmp_path / "abc123"), _config()
    trackers = tracking.open_trackers(tracking.parse_backends(["wandb,mlflow"]), record, config, history=[])
    for tracker in trackers:
        tracker.log_epoch(_row(0, evaluated=True))
        tracker.close(failed=True)
    assert calls[0][0] == "init" and calls[0][1]["id"] == "abc123"
    assert ("log", 1, tracking.flatten(_row(0, evaluated=True))[1]) in calls
    assert ("finish", 1) in calls and ("end", "FAILED") in calls
    params = next(c[1] for c in calls if c[0] == "params")
    assert params["method"] == "erm_vit" and params["hparams.lr"] == "0.01"
    assert next(c for c in calls if c[0] == "metrics")[1] == 1


def test_a_missing_or_unknown_tracker_is_a_clear_error_before_training(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, installed or not
    missing = cli("run", *TINY, "--results", str(tmp_path), "--log", "csv", "--log", "wandb", expect=2)
    assert "--log wandb needs the wandb package" in missing.output and "pip install" in missing.output
    unknown = cli("run", *TINY, "--results", str(tmp_path), "--log", "tensorbord", expect=2)
    assert "'tensorbord' is not a tracker" in unknown.output and "tensorboard, csv, wandb, mlflow" in unknown.output
    assert not (tmp_path / "runs").exists()


def test_a_waiting_run_says_once_which_process_holds_it(tmp_path):
    import os

    record = RunRecord(tmp_path / "0123abcd")
    held, release, heard = threading.Event(), threading.Event(), []

    def holder() -> None:
        with record.lock():
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    with record.lock(on_wait=lambda message: (heard.append(message), release.set())):
        assert (record.path / ".lock").read_text().strip() == str(os.getpid())
    thread.join()
    assert heard == [f"waiting for run 0123abcd (held by pid {os.getpid()}: another process is training it)"]


def test_threads_default_to_the_cpus_this_process_may_use(monkeypatch):
    import os

    import torch

    assert Runtime(results=Path("r"), data_root=Path("d"), threads=3).cpu_threads() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert Runtime(results=Path("r"), data_root=Path("d")).cpu_threads() == 1


def test_a_sweep_trial_uses_the_cpus_ray_gave_it(monkeypatch):
    import ray

    from ltbench import launcher

    assert launcher.trial_cpus() is None  # not in a Ray worker
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    for assigned, threads in (({"CPU": 2.0}, 2), ({"CPU": 0.5}, 1)):
        context = types.SimpleNamespace(get_assigned_resources=lambda assigned=assigned: assigned)
        monkeypatch.setattr(ray, "get_runtime_context", lambda context=context: context)
        assert launcher.trial_cpus() == threads


# ----------------------------------------------------------------------------------------------


def _row(epoch: int, evaluated: bool = False) -> dict:
    """The metrics line after 0-based epoch ``epoch`` (files number epochs from 1)."""
    row = {"epoch": epoch + 1, "lr": 0.01, "train": {"loss": 1.5, "cls_loss": 0.7}, "images_per_s": 120.0,
           "epoch_time_s": 2.0}
    if evaluated:
        def head(top1: float, many: float) -> dict:
            return {"top1": top1, "ece": 3.0, "counts": {"many": many, "medium": 45.0, "few": None}, "paper": None}

        row["eval"] = {"main": head(50.0, 60.0), "cls": head(40.0, 50.0), "dist": head(60.0, 70.0)}
    return row


def _config():
    from ltbench.config import RunConfig

    return RunConfig(method="erm_vit", dataset="synthetic", data={"rho": 10.0}, hparams={"lr": 0.01, "epochs": 2})


def _monitor(lines: list[str], epochs: int) -> progress.RunMonitor:
    """A monitor as the engine makes it, with the values a Trainer would pass."""
    return progress.RunMonitor([], epochs=epochs, steps_per_epoch=2, lr=lambda: 0.01, record=None, config=None,
                               progress=True, echo=lines.append)


def test_a_run_log_keeps_the_lines_said_before_its_folder_existed_and_the_error_that_ended_it(tmp_path):
    shown: list[str] = []
    with progress.RunLog(shown.append) as log:
        log("building the model")
        log.open(tmp_path, "training session of run abc")
        log("epoch 1/2  loss 1.0")
        try:
            raise RuntimeError("out of memory")
        except RuntimeError:
            log.failed()
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert shown == ["building the model", "epoch 1/2  loss 1.0"]  # the console sees each line once, at once
    assert lines[0].startswith("--- ") and lines[0].endswith("training session of run abc")
    assert lines[1:3] == ["building the model", "epoch 1/2  loss 1.0"]
    assert lines[-1] == "RuntimeError: out of memory"


def test_a_sweep_trial_prefixes_its_lines_with_its_run_id(capsys):
    from ltbench.launcher import tagged_echo

    tagged_echo("0123abcd")("epoch 1/2  loss 1.0")
    assert capsys.readouterr().out == "[0123abcd] epoch 1/2  loss 1.0\n"


def test_piped_tables_keep_each_row_on_one_line_and_a_terminal_keeps_its_width(monkeypatch):
    from rich.table import Table

    from ltbench import terminal

    monkeypatch.delenv("COLUMNS", raising=False)
    table = Table(title="erm_cnn on cifar10lt {'rho': 100.0, 'subsample_seed': 0} seed 0 (run 0123456789ab)")
    for name in ("epoch", "head", "split", "top-1", "many", "medium", "few", "ECE", "a rather long column name"):
        table.add_column(name)
    table.add_row("final (200)", "main", "counts", "71.23", "90.10", "70.00", "55.55", "0.12", "x" * 40)
    piped = terminal._console(file=io.StringIO())
    piped.print(table)
    lines = piped.file.getvalue().splitlines()
    assert any("(run 0123456789ab)" in line for line in lines) and any("x" * 40 in line for line in lines)
    assert max(len(line) for line in lines) > 80
    assert terminal._console(file=io.StringIO(), force_terminal=True, width=100).width == 100
    monkeypatch.setenv("COLUMNS", "60")
    assert terminal._console(file=io.StringIO()).width == 60  # an explicit COLUMNS is obeyed
