"""`ltbench sweep`: grid parsing, planning from disk, resources, and one end-to-end run under local Ray.

The end-to-end test is the issue's acceptance check, on `synthetic` with the `tiny` presets: a sweep of
2 methods x 2 rho x 2 seeds first stops every run after one epoch (as a crash midway would leave them),
the same command then resumes all 8 from their checkpoints, and a third call trains nothing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ltbench.methods.erm_vit import ERMViT

from ltbench import launcher, resolve
from ltbench import sweep as sw
from ltbench.errors import UserError
from ltbench.registry import METHODS

# Shared settings keep each trial to a couple of seconds on 2 cores; ViT-only keys are scoped to erm_vit.
FAST = ["workers=0", "batch_size=32", "data.n_max=40", "data.n_test=8", "erm_vit:auto_augment=",
        "erm_vit:re_prob=0", "erm_vit:mixup=0", "erm_vit:cutmix=0"]
GRID = ["--methods", "erm_vit,erm_cnn", "--datasets", "synthetic", "--rho", "10", "--seeds", "0,1",
        "--preset", "tiny", "--epochs", "2", *[a for s in FAST for a in ("--set", s)]]


def _grid(**kw) -> sw.SweepGrid:
    defaults = {"methods": "erm_vit,erm_cnn", "datasets": "synthetic", "rho": "5,10", "seeds": "0,1",
                "preset": "tiny", "epochs": 2, "sets": FAST}
    return sw.build_grid(None, **{**defaults, **kw})


# ----------------------------------------------------------------------------------------------
# Grid


def test_grid_values_parse():
    assert sw.parse_seeds("0-2,5,1") == [0, 1, 2, 5]
    assert sw.parse_rhos("100, 50") == [100.0, 50.0]
    with pytest.raises(UserError, match="Seeds must be integers"):
        sw.parse_seeds("a")
    with pytest.raises(UserError, match="needs methods and datasets"):
        sw.build_grid(None, methods="erm_vit")
    assert _grid().size == 8


def test_subsample_seed_is_an_axis_of_its_own(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("methods: erm_cnn\ndatasets: [cifar10lt, synthetic]\nrho: 100\nseeds: 0-2\n"
                    "subsample_seeds: [0, 1]\n")
    grid = sw.build_grid(sw.load_grid_file(path))
    assert grid.subsample_seeds == (0, 1) and grid.size == 12 and "x 2 subset seed(s)" in sw.grid_summary(grid)
    plan = sw.plan_sweep(grid, tmp_path)
    cifar = [j.config for j in plan.jobs.values() if j.config.dataset == "cifar10lt"]
    assert sorted((c.seed, c.data["subsample_seed"]) for c in cifar) == [(s, k) for s in range(3) for k in (0, 1)]
    default = resolve.make_config("erm_cnn", "cifar10lt", rho=100, seed=0)
    assert default.run_id in plan.jobs  # subset seed 0 is the published subset: the same run as without the axis
    assert len([j for j in plan.jobs.values() if j.config.dataset == "synthetic"]) == 3  # no such option there
    assert any("subsample_seeds axis does not apply" in note for note in plan.notes)
    assert sorted(sw.describe_job(j)["seed"] for j in plan.jobs.values() if j.config.dataset == "cifar10lt")[:2] == \
        ["0", "0 (subset 1)"]


def test_yaml_grid_with_method_scoped_sets_and_command_line_override(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("methods: [erm_vit, deitlt]\ndatasets: cifar10lt,cifar100lt\nrho: [50, 100]\nseeds: 0-2\n"
                    "preset: short\nset:\n  workers: 0\n  milestones: [1, 2]\n  deitlt:\n    drw_epoch: 8\n")
    grid = sw.build_grid(sw.load_grid_file(path), seeds="3", sets=["eval_every=5"])
    assert grid.methods == ("erm_vit", "deitlt") and grid.datasets == ("cifar10lt", "cifar100lt")
    assert grid.rhos == (50.0, 100.0) and grid.seeds == (3,) and grid.preset == "short"
    assert grid.sets == ("workers=0", "milestones=1,2", "deitlt:drw_epoch=8", "eval_every=5")
    assert sw.sets_for(grid, "erm_vit") == ["workers=0", "milestones=1,2", "eval_every=5"]
    assert sw.sets_for(grid, "deitlt") == ["workers=0", "milestones=1,2", "drw_epoch=8", "eval_every=5"]
    path.write_text("methods: [erm_vit]\nmethod: x\n")
    with pytest.raises(UserError, match="Unknown key"):
        sw.load_grid_file(path)
    with pytest.raises(UserError, match="not a method of this sweep"):
        sw.sets_for(sw.build_grid(None, methods="erm_vit", datasets="synthetic", sets=["paco:alpha=1"]), "erm_vit")


# ----------------------------------------------------------------------------------------------
# Plan


def test_plan_uses_the_run_command_configs_and_reads_state_from_disk(tmp_path):
    plan = sw.plan_sweep(_grid(), tmp_path)
    expected = {resolve.make_config(m, "synthetic", rho=r, seed=s, preset="tiny", epochs=2,
                                   sets=sw.sets_for(plan.grid, m)).run_id
                for m in ("erm_vit", "erm_cnn") for r in (5, 10) for s in (0, 1)}
    assert set(plan.jobs) == expected and len(expected) == 8
    assert plan.counts() == {"done": 0, "partial": 0, "new": 8}
    done_id, partial_id = list(plan.jobs)[:2]
    (tmp_path / "runs" / done_id).mkdir(parents=True)
    (tmp_path / "runs" / done_id / "DONE").write_text("")
    (tmp_path / "runs" / done_id / "config.json").write_text(json.dumps(plan.jobs[done_id].config.to_dict()))
    (tmp_path / "runs" / partial_id).mkdir(parents=True)
    (tmp_path / "runs" / partial_id / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "runs" / partial_id / "metrics.jsonl").write_text('{"epoch": 0}\n')
    again = sw.plan_sweep(_grid(), tmp_path)
    assert again.sweep_id == plan.sweep_id and again.counts() == {"done": 1, "partial": 1, "new": 6}
    assert sw.describe_job(again.jobs[partial_id])["epochs"] == "1/2"
    assert [j.run_id for j in again.todo()] == [j for j in plan.jobs if j != done_id]


def test_invalid_cells_fail_before_anything_runs(tmp_path):
    with pytest.raises(UserError, match="Unknown erm_cnn hyperparameter"):
        sw.plan_sweep(_grid(sets=["auto_augment="]), tmp_path)  # a ViT key given to every method
    with pytest.raises(UserError, match="Unknown method"):
        sw.plan_sweep(_grid(methods="erm_vit,nope"), tmp_path)
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def students(monkeypatch):
    """Two student methods that need the same CNN teacher (what deit and deitlt do with one teacher)."""

    def make(name):
        class Student(ERMViT):
            @classmethod
            def requires(cls, config):
                teacher = resolve.make_config("erm_cnn", config.dataset, rho=config.data["rho"], seed=config.seed,
                                             preset="tiny", sets=["workers=0"])
                return {"teacher": teacher}

        return Student

    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))
    METHODS.names()
    for name in ("student_a", "student_b"):
        METHODS.add(name, make(name))


def test_a_shared_teacher_is_one_job_in_an_earlier_wave(students, tmp_path):
    grid = sw.build_grid(None, methods="student_a,student_b", datasets="synthetic", rho="5", seeds="0,1",
                         preset="tiny", sets=["workers=0"])
    plan = sw.plan_sweep(grid, tmp_path)
    waves = plan.waves()
    assert [len(w) for w in waves] == [2, 4]  # one teacher per seed, then the 4 students
    teachers = [j for j in waves[0] if j.needed_by]
    assert len(teachers) == 2 and all(len(t.needed_by) == 2 and not t.requested for t in teachers)
    assert all(j.config.method.startswith("student") and len(j.needs) == 1 for j in waves[1])
    # A requested cell that is also a teacher is one job, marked requested.
    grid = sw.build_grid(None, methods="student_a,erm_cnn", datasets="synthetic", rho="5", seeds="0",
                         preset="tiny", sets=["workers=0"], epochs=None)
    plan = sw.plan_sweep(grid, tmp_path)
    erm = [j for j in plan.jobs.values() if j.config.method == "erm_cnn"]
    assert len(plan.jobs) == 2 and (len(erm) == 1 and erm[0].requested and erm[0].needed_by)


def test_students_of_a_failed_teacher_are_reported_not_started(students, tmp_path):
    grid = sw.build_grid(None, methods="student_a,student_b", datasets="synthetic", rho="5", seeds="0",
                         preset="tiny", sets=["workers=0"])
    plan = sw.plan_sweep(grid, tmp_path)
    teacher, *kids = plan.jobs.values()
    outcome = launcher.SweepOutcome(plan, failed={teacher.run_id: "RuntimeError: boom"})
    assert all(launcher._block(kid, plan, outcome) for kid in kids)
    assert set(outcome.blocked) == {k.run_id for k in kids} and teacher.run_id in next(iter(outcome.blocked.values()))
    time_boxed = launcher.SweepOutcome(plan)  # the teacher only stopped early (--stop-after-epochs): not an error
    assert all(launcher._block(kid, plan, time_boxed) for kid in kids)
    assert not time_boxed.blocked and len(time_boxed.waiting) == 2


# ----------------------------------------------------------------------------------------------
# Resources and errors


def test_trial_resources():
    gpus = {"CPU": 16, "GPU": 4}
    assert launcher.trial_resources(launcher.Resources(), gpus) == {"cpu": 4.0, "gpu": 1.0}
    assert launcher.trial_resources(launcher.Resources(gpus_per_trial=0.5), gpus) == {"cpu": 2.0, "gpu": 0.5}
    assert launcher.trial_resources(launcher.Resources(), {"CPU": 2}) == {"cpu": 2.0, "gpu": 0.0}
    assert launcher.trial_resources(launcher.Resources(cpus_per_trial=1), {"CPU": 2}) == {"cpu": 1.0, "gpu": 0.0}
    with pytest.raises(UserError, match="divide one GPU"):
        launcher.trial_resources(launcher.Resources(gpus_per_trial=0.3), gpus)
    with pytest.raises(UserError, match="has 0"):
        launcher.trial_resources(launcher.Resources(gpus_per_trial=1), {"CPU": 2})
    with pytest.raises(UserError, match="CPUs"):
        launcher.trial_resources(launcher.Resources(cpus_per_trial=8), {"CPU": 2})


def test_error_summary_reports_the_root_cause():
    class Wrapped(Exception):
        def __init__(self, cause):
            super().__init__("wrapper")
            self.cause = cause

    assert launcher.error_summary(Wrapped(UserError("dataset missing"))) == "UserError: dataset missing"
    assert launcher.error_summary("Traceback ...\n  File x\nValueError: bad\n") == "ValueError: bad"


def test_dry_run_prints_the_grid_and_trains_nothing(cli, tmp_path):
    out = cli("sweep", *GRID, "--results", str(tmp_path), "--dry-run")
    assert "4 cell(s) -> 4 run(s) (0 upstream): 4 new" in out.output
    assert out.output.count(" new ") == 4 and "erm_cnn" in out.output
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------
# End to end under local Ray


def _run_dirs(results: Path) -> list[Path]:
    return sorted(p for p in (results / "runs").iterdir() if p.is_dir())


@pytest.fixture
def ray_token_notices():
    """Records of Ray's "Token authentication is enabled for this Ray cluster" warning (its own logger)."""
    import logging

    notices: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = notices.append
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    logger.addHandler(handler)
    yield notices
    logger.removeHandler(handler)


def test_sweep_completes_resumes_and_is_idempotent(cli, tmp_path, ray_token_notices):
    args = ["sweep", *GRID, "--results", str(tmp_path), "--cpus-per-trial", "1"]
    # 1) Every run stops after its first epoch: the state a crash midway leaves behind.
    first = cli(*args, "--stop-after-epochs", "1")
    assert ray_token_notices == []  # the local Ray keeps token authentication without announcing it
    runs = _run_dirs(tmp_path)
    assert len(runs) == 4, first.output
    assert all((r / "checkpoint.pt").is_file() and not (r / "DONE").exists() for r in runs)
    first_epoch = {r.name: (r / "metrics.jsonl").read_text() for r in runs}
    assert all(len(text.splitlines()) == 1 for text in first_epoch.values())
    assert "Stopped by --stop-after-epochs" in first.output
    # 2) The same command completes what is missing, resuming each run from its checkpoint.
    second = cli(*args)
    assert "4 partial" in second.output and "4/4 run(s) done" in second.output
    for run in _run_dirs(tmp_path):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert (run / "DONE").is_file() and len(lines) == 2
        assert lines[0] + "\n" == first_epoch[run.name]  # epoch 0 was kept, not retrained
        result = json.loads((run / "result.json").read_text())
        assert result["final"]["epoch"] == 2 and Path(result["run_id"]).name == run.name
        log = (run / "log.txt").read_text()  # the trial's own lines, beside its results, across both sessions
        assert log.count(f"training session of run {run.name}") == 2 and "Resuming" in log and "epoch 2/2" in log
    assert "/runs/<run id>/log.txt" in second.output
    status = json.loads(next((tmp_path / "sweeps").glob("*/status.json")).read_text())
    assert {r["status"] for r in status["runs"].values()} == {"done"}
    # 3) A third call trains nothing and starts no Ray.
    stamps = {r.name: (r / "result.json").stat().st_mtime_ns for r in _run_dirs(tmp_path)}
    third = cli(*args)
    assert "Nothing to train: all 4 run(s) are done" in third.output
    assert stamps == {r.name: (r / "result.json").stat().st_mtime_ns for r in _run_dirs(tmp_path)}
    table = cli("report", "--results", str(tmp_path), "--metric", "top1").output
    assert "over 2 seeds" in table and "| erm\\_cnn |" in table and "synthetic ρ=10 top-1" in table


@pytest.mark.slow
def test_ctrl_c_midway_then_rerun_completes(tmp_path):
    """A real SIGINT (Ctrl-C) while trials train; the re-run resumes the interrupted runs and finishes all."""
    command = [sys.executable, "-m", "ltbench", "sweep", *GRID, "--epochs", "12", "--results", str(tmp_path),
               "--cpus-per-trial", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(tmp_path.glob("runs/*/checkpoint.pt")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Interrupted" in output, output
    assert not all((r / "DONE").exists() for r in _run_dirs(tmp_path))
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert " partial" in rerun.stderr.splitlines()[0]  # runs resumed from checkpoints, not restarted
    runs = _run_dirs(tmp_path)
    assert len(runs) == 8 and all((r / "DONE").exists() for r in runs)


@pytest.mark.slow  # ~20 s: a Ray start for one failing run; the fast suite keeps one Ray test
def test_failed_runs_are_retried_then_reported_with_their_error(cli, tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    out = cli("sweep", "--methods", "erm_cnn", "--datasets", "cifar10lt", "--rho", "100", "--preset", "tiny",
              "--results", str(tmp_path), "--data-root", str(empty), "--cpus-per-trial", "1", "--max-failures", "1",
              expect=1)
    assert "retry 1" in out.output and "failed" in out.output
    failures = [line for line in out.output.splitlines() if line.startswith("failed ")]
    assert len(failures) == 1 and "CIFAR python-pickle batches were not found" in failures[0]
    assert "Trial task failed" not in out.output  # Ray's own traceback log is replaced by the line above
    status = json.loads(next((tmp_path / "sweeps").glob("*/status.json")).read_text())
    (run,) = status["runs"].values()
    assert run["status"] == "new" and "CIFAR" in run["error"] and Path(run["traceback"]).is_file()
