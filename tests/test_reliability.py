"""Fault and bad-input probes (issue 13): no silently wrong result, no traceback, no code run from a data file.

Two tiny runs are trained once per module (a finished one and a partial one of the same config); each
test works on its own copy of their folders.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from ltbench.datasets.cifar_lt import CIFAR10LT, CIFARLTOptions

from ltbench import atomic, records, resolve, runset, stages
from ltbench.cli import main
from ltbench.config import RunConfig
from ltbench.data import exp_profile_counts
from ltbench.errors import UserError
from ltbench.records import RunRecord
from tests.conftest import FAST_VIT, set_args

GOLDEN = Path(__file__).resolve().parent / "golden"  # a results folder of invented finished runs

TINY = ["--method", "erm_vit", "--dataset", "synthetic", "--preset", "tiny", "--quiet", "--epochs", "2",
        *set_args(*FAST_VIT, "data.n_max=40", "data.n_test=4", "batch_size=32")]


def invoke(*args: str, expect: int | None = 0, env: dict[str, str] | None = None):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False, env=env)
    if expect is not None:
        assert result.exit_code == expect, result.output
    return result


def text_of(result) -> str:
    """The output as one line (rich wraps long messages on narrow terminals)."""
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A finished 2-epoch run and a partial run of the same config stopped after epoch 1."""
    root = tmp_path_factory.mktemp("trained")
    invoke("run", *TINY, "--results", str(root / "finished"))
    invoke("run", *TINY, "--results", str(root / "partial"), "--stop-after-epochs", "1")
    (finished,) = (root / "finished" / "runs").iterdir()
    (partial,) = (root / "partial" / "runs").iterdir()
    assert finished.name == partial.name and not (partial / "DONE").exists()
    return {"finished": finished, "partial": partial}


@pytest.fixture
def copy_run(trained, tmp_path):
    """copy_run("finished" | "partial") -> a private copy of that run folder under tmp_path/res/runs/."""
    def copy(kind: str) -> Path:
        target = tmp_path / "res" / "runs" / trained[kind].name
        shutil.copytree(trained[kind], target)
        return target
    return copy


def results_of(run: Path) -> str:
    return str(run.parent.parent)


# ---------------------------------------------------------------------------------------------- 1, 2
def test_edited_config_of_a_finished_run_is_refused_by_every_reader(copy_run):
    run = copy_run("finished")
    config = json.loads((run / "config.json").read_text())
    config["hparams"]["lr"] = 0.5
    (run / "config.json").write_text(json.dumps(config))
    for args in (["run", *TINY], ["eval", run.name], ["eval", run.name, "--recompute", "--quiet"]):
        out = text_of(invoke(*args, "--results", results_of(run), expect=2))
        assert "config.json hashes to run id" in out and "edited" in out
    report = text_of(invoke("report", "--results", results_of(run), expect=2))
    assert f"run {run.name} left out" in report and "edited" in report
    from ltbench import sweep

    grid = sweep.build_grid(methods="erm_vit", datasets="synthetic", seeds="0", preset="tiny", epochs=2,
                            sets=[*FAST_VIT, "data.n_max=40", "data.n_test=4", "batch_size=32"])
    with pytest.raises(UserError, match="config.json hashes to run id"):
        sweep.plan_sweep(grid, Path(results_of(run)))


def test_a_run_folder_of_an_older_ltbench_is_named_as_such(copy_run):
    """Before runtime options left the run id, folders were named by the hash of the whole config.json."""
    from ltbench.config import RunConfig

    run = copy_run("finished")
    legacy = RunConfig.from_dict(json.loads((run / "config.json").read_text())).legacy_run_id
    assert legacy != run.name
    run = run.rename(run.parent / legacy)
    out = text_of(invoke("eval", run.name, "--results", results_of(run), expect=2))
    assert "older ltbench" in out and "edited" not in out
    assert "older ltbench" in runset.load_runs(Path(results_of(run))).incomplete[0]["reason"]


def test_a_finished_run_without_config_json_is_named_and_counted_in_the_report(copy_run):

    run = copy_run("finished")
    (run / "config.json").unlink()
    out = text_of(invoke("eval", run.name, "--results", results_of(run), expect=2))
    assert str(run) in out and "no config.json" in out
    left_out = runset.load_runs(Path(results_of(run))).incomplete
    assert [(r["method"], r["seed"]) for r in left_out] == [("erm_vit", 0)]  # coordinates from result.json
    assert "no config.json" in left_out[0]["reason"]


# ---------------------------------------------------------------------------------------------- 3
@pytest.mark.parametrize("dataset,rho,message", [
    ("synthetic", "1e9", "largest valid rho for synthetic here is 200"),
    ("cifar10lt", "1e9", "largest valid rho for cifar10lt here is 5000"),
    ("cifar10lt", "5001", "largest valid rho for cifar10lt here is 5000"),
    ("cifar100lt", "501", "largest valid rho for cifar100lt here is 500"),
    ("synthetic", "50", "here is just below 49 (49 itself rounds"),  # --set data.n_max=49: 49 * (1/49) < 1
    ("cifar10lt", "inf", "must be >= 1 and finite"),
    ("synthetic", "nan", "must be >= 1 and finite"),
])
def test_impossible_rho_is_refused_before_any_data_is_loaded(tmp_path, dataset, rho, message):
    # the data root does not exist: a data error would name it, the rho error comes first
    n_max = ["--set", "data.n_max=49"] if "49" in message else []
    out = text_of(invoke("run", "--method", "erm_vit", "--dataset", dataset, "--rho", rho, *n_max, "--data-root",
                         str(tmp_path / "nowhere"), "--results", str(tmp_path / "res"), expect=2))
    assert message in out
    assert not (tmp_path / "res" / "runs").exists()


def test_the_largest_valid_rho_keeps_one_image_in_the_rarest_class():
    assert resolve.make_config("erm_vit", "synthetic", rho=200).data["rho"] == 200
    assert CIFAR10LT.profile_size(CIFARLTOptions()) == (5000, 10)
    assert exp_profile_counts(5000, 10, 5000)[-1] == 1 and exp_profile_counts(200, 10, 200)[-1] == 1


# ---------------------------------------------------------------------------------------------- 4, 10
@pytest.mark.parametrize("damage", ["truncated", "garbage", "other_model"])
def test_a_damaged_checkpoint_is_a_one_line_error_with_a_way_out(copy_run, damage):
    run = copy_run("partial")
    ckpt = run / "checkpoint.pt"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "garbage":
        ckpt.write_bytes(b"\x00garbage" * 100)
    else:  # a checkpoint of another model: head.weight has the wrong shape
        state = torch.load(ckpt, weights_only=True)
        state["modules"]["model"]["head.weight"] = torch.zeros(3, 3)
        torch.save(state, ckpt)
    expected = "does not match this run's configuration" if damage == "other_model" else "cannot be used"
    for args in (["run", *TINY], ["eval", run.name, "--quiet"], ["eval", run.name, "--recompute", "--quiet"]):
        out = text_of(invoke(*args, "--results", results_of(run), expect=2))
        assert str(ckpt) in out and expected in out and f"rm {ckpt}" in out and "Nothing was discarded" in out
    assert ckpt.exists()  # never discarded silently


# ---------------------------------------------------------------------------------------------- 5, 6, 12
def test_resume_survives_a_torn_metrics_line_a_full_disk_and_stale_temporaries(copy_run, trained, monkeypatch):
    run = copy_run("partial")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 2, "tra')  # what a crash in the middle of a write leaves
    stale = run / ".checkpoint.pt.k1ll3d.tmp"
    stale.write_bytes(b"\x00" * 1000)

    def full_disk(state, fh):  # torch.save on a full disk: a partial write, then ENOSPC
        fh.write(b"PK\x03\x04")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", full_disk)
        out = text_of(invoke("run", *TINY, "--results", results_of(run), expect=2))
    assert "torn last line 2" in out
    assert f"Could not write {run / 'checkpoint.pt'}: No space left on device" in out
    assert "previous version of the file, if any, is intact" in out
    assert not stale.exists() and not list(run.glob(".*.tmp"))
    assert RunRecord(run).load_checkpoint()["epoch"] == 1  # the last good checkpoint is intact

    resumed = text_of(invoke("run", *TINY, "--results", results_of(run)))
    assert "Resuming" in resumed and (run / "DONE").is_file()
    same = RunRecord(trained["finished"]).result()  # nothing was lost: as if never interrupted
    assert RunRecord(run).result()["final"]["heads"] == same["final"]["heads"]


def test_corruption_before_the_last_metrics_line_is_an_error(tmp_path):
    record = RunRecord(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(UserError, match="line 2 is damaged: it is not valid JSON"):
        record.metrics()
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2, "x"')
    notes: list[str] = []
    assert record.metrics(note=notes.append) == [{"epoch": 1}] and "torn last line 2" in notes[0]


def test_atomic_writes_fsync_the_file_and_its_folder(tmp_path, monkeypatch):
    synced: list[bool] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real_fsync(fd)))
    records.atomic_torch_save(tmp_path / "checkpoint.pt", {"epoch": 1})
    assert synced == [False, True]  # the data before the rename, the folder after it
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True) == {"epoch": 1}


# ---------------------------------------------------------------------------------------------- 7, 8
def _denied(path: str) -> PermissionError:
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)


def test_read_only_run_folder_and_runs_folder_are_clear_errors(copy_run, monkeypatch):
    # simulated: the tests may run as root, which ignores file modes
    run = copy_run("partial")
    with monkeypatch.context() as patch:
        patch.setattr(atomic.tempfile, "mkstemp", lambda dir, **_: (_ for _ in ()).throw(_denied(dir)))
        out = text_of(invoke("run", *TINY, "--results", results_of(run), expect=2))
    assert f"Could not write {run}" in out and "Permission denied" in out
    shutil.rmtree(run)
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.parent.name == "runs":
            raise _denied(str(self))
        return real_mkdir(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "mkdir", mkdir)
        out = text_of(invoke("run", *TINY, "--results", results_of(run), expect=2))
    assert f"Could not write {run / '.lock'}: Permission denied" in out


def test_an_unwritable_report_destination_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = text_of(invoke("report", "--results", str(GOLDEN), "--out", str(blocker / "table.md"), expect=1))
    assert out.startswith("error: File exists") and str(blocker) in out and "--debug" in out
    with pytest.raises(FileExistsError):  # --debug and LTBENCH_DEBUG show the traceback instead
        invoke("--debug", "report", "--results", str(GOLDEN), "--out", str(blocker / "table.md"))
    with pytest.raises(FileExistsError):
        invoke("report", "--results", str(GOLDEN), "--out", str(blocker / "t.md"), env={"LTBENCH_DEBUG": "1"})


def test_runs_being_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "runs").write_text("")
    out = text_of(invoke("run", *TINY, "--results", str(tmp_path), expect=2))
    assert f"{tmp_path / 'runs'} exists but is not a folder" in out


# ---------------------------------------------------------------------------------------------- 9
@pytest.mark.parametrize("device,message", [
    ("gpu", "not a device name: use auto, cpu, cuda, cuda:N or mps"),
    ("cuda:x", "not a device name"),
    ("cuda:99", "CUDA GPU"),
])
def test_device_is_validated(tmp_path, device, message):
    out = text_of(invoke("run", *TINY, "--device", device, "--results", str(tmp_path), expect=2))
    assert message in out and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- 11
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("file", ["data_batch_1", "batches.meta"])
def test_a_crafted_cifar_pickle_is_refused_and_runs_nothing(tmp_path, file, monkeypatch):
    monkeypatch.setattr(CIFAR10LT, "train_images", 100)  # the fake's size is the standard here
    monkeypatch.setattr(CIFAR10LT, "test_images", 20)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = np.tile(np.arange(10), 2).tolist()
        batch = {"batch_label": name, "labels": labels, "data": rng.randint(0, 255, (20, 3072)).astype(np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    assert CIFAR10LT(CIFARLTOptions(rho=2), tmp_path).load().info.class_names[3] == "c3"  # the honest files load
    marker = tmp_path / "pwned"
    (folder / file).write_bytes(pickle.dumps({"data": _Payload(marker), "labels": [], "label_names": []}))
    with pytest.raises(UserError, match=re.escape(str(folder / file)) + ".*posix.system"):
        CIFAR10LT(CIFARLTOptions(rho=2), tmp_path).load()
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- 13
def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "ensure", interrupted)
    result = invoke("run", *TINY, "--results", str(tmp_path), expect=130)
    assert "run the same command again to resume" in text_of(result) and "Aborted" not in result.output


# ---------------------------------------------------------------------------------------------- 14
def test_run_references_are_ids_prefixes_or_paths(copy_run, tmp_path, monkeypatch):
    run = copy_run("finished")
    results = results_of(run)
    for ref in ("*", "", "../../other/runs/d868", run.name[:3], "ZZZZ"):
        out = text_of(invoke("eval", ref, "--results", results, expect=2))
        assert "is not a run reference" in out or "No run" in out
    (run.parent / f"{run.name[:4]}0000").mkdir()
    out = text_of(invoke("eval", run.name[:4], "--results", results, expect=2))
    assert "ambiguous" in out and run.name in out and f"{run.name[:4]}0000" in out
    assert run.name in invoke("eval", run.name[:5], "--results", results).output
    monkeypatch.chdir(run.parent)
    assert run.name in invoke("eval", f"./{run.name}", "--results", str(tmp_path / "elsewhere")).output


# ---------------------------------------------------------------------------------------------- 15
def test_run_files_follow_the_process_umask(trained):
    mask = os.umask(0o022)
    os.umask(mask)
    assert 0o666 & ~mask == records.FILE_MODE
    for name in ("config.json", "env.json", "metrics.jsonl", "checkpoint.pt", "result.json", "DONE"):
        assert stat.S_IMODE((trained["finished"] / name).stat().st_mode) == records.FILE_MODE, name


# ---------------------------------------------------------------------------------------------- 16
def test_inert_hyperparameters_do_not_change_the_run_id():
    def run_id(*sets: str) -> str:
        return resolve.make_config("erm_vit", "synthetic", preset="tiny", sets=sets).run_id

    assert run_id("augment=none") == run_id("augment=none", "auto_augment=rand-m5", "re_prob=0.5")
    assert run_id("mixup=0", "cutmix=0") == run_id("mixup=0", "cutmix=0", "mixup_switch_prob=0.9")
    assert run_id("auto_augment=rand-m5") != run_id()  # effective under augment=deit
    assert run_id("mixup_switch_prob=0.9") != run_id()


# ---------------------------------------------------------------------------------------------- 18
def test_a_run_whose_data_fails_to_load_leaves_no_folder(tmp_path):
    # --yes: the paper recipe on a CPU is refused before its data is read otherwise (tests/test_preflight.py)
    out = text_of(invoke("run", "--method", "erm_vit", "--dataset", "cifar10lt", "--data-root",
                         str(tmp_path / "nowhere"), "--results", str(tmp_path / "res"), "--yes", expect=2))
    assert "cifar-10-batches-py" in out
    assert list((tmp_path / "res" / "runs").iterdir()) == []


def test_the_lock_excludes_a_second_holder_and_survives_the_first_removing_its_folder(tmp_path):
    record = RunRecord(tmp_path / "runs" / "abcd12345678")
    second_has_it = threading.Event()

    def second() -> None:
        with record.lock():
            second_has_it.set()
            (record.path / "config.json").write_text("{}")

    with pytest.raises(RuntimeError), record.lock():
        waiter = threading.Thread(target=second)
        waiter.start()
        assert not second_has_it.wait(0.3)  # blocked while the first holds the lock
        raise RuntimeError("data failed to load")  # the first removes its still-empty folder
    waiter.join(10)
    assert second_has_it.is_set() and (record.path / "config.json").is_file()


# ---------------------------------------------------------------------------------------------- 19
def test_markdown_and_latex_escape_config_values(tmp_path):
    runs = tmp_path / "runs"
    nasty = "<script>alert(1)</script> *x* `c` [l](u) $x_1$ & 50% #1 {a} ~^\\"
    for folder in sorted((GOLDEN / "runs").iterdir()):
        config = json.loads((folder / "config.json").read_text())
        if config["method"] == "deitlt" and config["dataset"] == "cifar100lt":
            config["hparams"]["auto_augment"] = nasty if config["seed"] == 0 else "rand"
            target = runs / RunConfig.from_dict(config).run_id
            shutil.copytree(folder, target)
            (target / "config.json").write_text(json.dumps(config))
    markdown = invoke("report", "--results", str(tmp_path), "--format", "markdown").output
    assert "<script>" not in markdown and "&lt;script>" in markdown and r"\*x\*" in markdown
    assert r"\`c\`" in markdown and r"[l]\(u)" in markdown
    latex = invoke("report", "--results", str(tmp_path), "--format", "latex").output
    assert (r"\$x\_1\$ \& 50\% \#1 \{a\} \textasciitilde{}\textasciicircum{}\textbackslash{}" in latex)


# ---------------------------------------------------------------------------------------------- 20
@pytest.mark.parametrize("setting,message", [
    ("lr=inf", "lr must be a finite number, not inf"),
    ("warmup_lr=nan", "warmup_lr must be a finite number, not nan"),
    ("weight_decay=-5", "weight_decay must be >= 0"),
    ("momentum=7", "momentum must be in [0, 1)"),
    ("ema_decay=1", "ema_decay must be in [0, 1)"),
    ("decay_rate=0", "decay_rate (the lr factor at each milestone) must be in (0, 1]"),
    ("milestones=-3", "milestones and sam_rho_epochs must be >= 0"),
    ("data.data_seed=-1", "data_seed must be in [0, 2**32)"),
])
def test_impossible_hyperparameters_are_refused_before_a_run_folder_exists(tmp_path, setting, message):
    out = text_of(invoke("run", *TINY, "--set", setting, "--results", str(tmp_path), expect=2))
    assert message in out and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("option", [["--micro-batch", "-1"], ["--workers", "-1"], ["--stop-after-epochs", "0"]])
def test_impossible_runtime_options_are_refused_before_a_run_folder_exists(tmp_path, option):
    out = text_of(invoke("run", *TINY, *option, "--results", str(tmp_path), expect=2))
    assert option[0] in out and not (tmp_path / "runs").exists()


def test_runtime_values_from_a_grid_are_checked_like_the_options(tmp_path):
    from ltbench.runtime import Runtime

    with pytest.raises(UserError, match="micro_batch must be >= 0, got -1"):
        Runtime(results=tmp_path, data_root=tmp_path, micro_batch=-1)


def test_rho_given_twice_must_agree():
    with pytest.raises(UserError, match="--rho 50 and data.rho=20 disagree"):
        resolve.make_config("erm_cnn", "synthetic", rho=50, sets=["data.rho=20"])
    assert resolve.make_config("erm_cnn", "synthetic", rho=50, sets=["data.rho=5e1"]).data["rho"] == 50


def test_a_diverged_run_stops_unfinished_and_says_why(tmp_path, monkeypatch):
    from ltbench import engine

    def nan_loss(method, batch):
        loss, parts = compute_loss(method, batch)
        return loss * float("nan"), parts

    compute_loss = engine.compute_loss
    monkeypatch.setattr(engine, "compute_loss", nan_loss)
    out = text_of(invoke("run", *TINY, "--results", str(tmp_path), expect=2))
    assert "Training diverged: the mean training loss of epoch 1 is nan" in out
    (run,) = (tmp_path / "runs").iterdir()
    assert not (run / "DONE").exists() and not (run / "result.json").exists()
    assert not (run / records.CHECKPOINT).exists()  # no checkpoint of the diverged epoch
    assert "unfinished" in text_of(invoke("report", "--results", str(tmp_path), expect=2))


@pytest.mark.parametrize("damage", ["{}", '{"final": {"heads": {"main": {"top1": null}}}}', '{"final": {"he'])
def test_a_damaged_result_json_is_left_out_of_the_report_with_its_reason(tmp_path, damage):
    shutil.copytree(GOLDEN / "runs", tmp_path / "runs")
    damaged = sorted((tmp_path / "runs").iterdir())[0]
    (damaged / "result.json").write_text(damage)
    out = text_of(invoke("report", "--results", str(tmp_path), "--format", "markdown"))
    assert f"result.json of run {damaged.name} is damaged" in out


def test_a_damaged_cifar_meta_file_costs_only_the_class_names(tmp_path, monkeypatch):
    monkeypatch.setattr(CIFAR10LT, "train_images", 100)
    monkeypatch.setattr(CIFAR10LT, "test_images", 20)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"labels": np.tile(np.arange(10), 2).tolist(), "data": np.zeros((20, 3072), np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(b"Iabc\n.")  # a pickle of int("abc"): ValueError when read
    assert CIFAR10LT(CIFARLTOptions(rho=2), tmp_path).load().info.class_names == tuple(map(str, range(10)))


def test_paths_of_the_wrong_kind_and_empty_seed_ranges_are_named(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert "--results" in text_of(invoke("report", "--results", str(a_file), expect=2))
    assert "--data-root" in text_of(invoke("run", *TINY, "--data-root", str(a_file), "--results", str(tmp_path),
                                           expect=2))
    from ltbench.sweep import parse_seeds

    with pytest.raises(UserError, match="The seed range '3-1' is empty: write it low-high, e.g. 1-3"):
        parse_seeds("3-1")
    assert parse_seeds("0-2,5") == [0, 1, 2, 5]
