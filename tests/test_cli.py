"""The command line end to end: runs, tables, re-evaluation, listing, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import FAST_VIT, set_args

TINY = ["--method", "erm_vit", "--dataset", "synthetic", "--preset", "tiny", "--quiet",
        *set_args(*FAST_VIT, "data.n_max=80", "data.n_test=10", "batch_size=32")]


def test_run_prints_table_and_folder_then_is_a_no_op(cli, tmp_path):
    results = str(tmp_path / "res")
    first = cli("run", *TINY, "--epochs", "2", "--results", results)
    assert "many" in first.output and "medium" in first.output and "run folder:" in first.output
    folder = first.output.split("run folder:")[1].split()[0]
    assert os.path.isfile(os.path.join(folder, "DONE"))
    second = cli("run", *TINY, "--epochs", "2", "--results", results)
    assert "Training" not in second.output and folder in second.output.replace("\n", "")
    shown = cli("eval", os.path.basename(folder), "--results", results, "--heads")
    assert "final (2)" in shown.output


def test_partial_run_can_be_evaluated_and_resumed(cli, tmp_path):
    results = str(tmp_path / "res")
    out = cli("run", *TINY, "--epochs", "3", "--results", results, "--stop-after-epochs", "1")
    assert "resume" in out.output
    run_dir = next((tmp_path / "res" / "runs").iterdir())
    assert not (run_dir / "DONE").exists()
    evaluated = cli("eval", run_dir.name, "--results", results, "--quiet")
    assert "final (1)" in evaluated.output and (run_dir / "eval.json").is_file()
    done = cli("run", *TINY, "--epochs", "3", "--results", results)
    assert "Resuming" in done.output and (run_dir / "DONE").is_file()


@pytest.mark.parametrize("args,message", [
    (["--method", "nope", "--dataset", "synthetic"], "Unknown method 'nope'"),
    (["--method", "erm_vit", "--dataset", "cifar"], "Unknown dataset 'cifar'"),
    (["--method", "erm_vit", "--dataset", "synthetic", "--preset", "giant"], "no preset 'giant'"),
    (["--method", "erm_vit", "--dataset", "synthetic", "--rho", "0.5"], "rho must be >= 1"),
    (["--method", "erm_vit", "--dataset", "synthetic", "--set", "lr"], "key=value"),
    (["--method", "erm_vit", "--dataset", "synthetic", "--set", "learning_rate=1"], "Valid keys"),
    (["--method", "erm_vit", "--dataset", "synthetic", "--set", "epochs=many"], "not a valid int"),
])
def test_bad_input_is_a_clear_error(cli, tmp_path, args, message):
    result = cli("run", *args, "--results", str(tmp_path), expect=2)
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_missing_data_is_a_clear_error(cli, tmp_path):
    # --yes: the paper recipe on a CPU is refused first otherwise (tests/test_preflight.py)
    result = cli("run", "--method", "erm_vit", "--dataset", "cifar10lt", "--data-root", str(tmp_path / "nowhere"),
                 "--results", str(tmp_path / "res"), "--yes", expect=2)
    text = " ".join(result.output.split())
    assert "cifar-10-batches-py" in text and "--data-root" in text


def test_unwritable_results_dir_is_a_clear_error(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = cli("run", *TINY, "--epochs", "1", "--results", str(blocker / "res"), expect=2)
    assert "not writable" in " ".join(result.output.split())


def test_list_and_data_info(cli):
    assert "erm_vit" in cli("list", "methods").output
    assert "synthetic" in cli("list", "datasets").output
    assert "tiny" in cli("list", "presets").output
    info = json.loads(cli("data", "info", "synthetic", "--rho", "10", "--json").output)
    assert info["class_counts"][0] == 200 and info["groups_counts_rule"]["few"] == 0


def test_data_info_on_real_cifar(cli, cifar_root):
    info = json.loads(cli("data", "info", "cifar10lt", "--rho", "100", "--data-root", str(cifar_root), "--json").output)
    assert info["train_total"] == 12406 and info["rank_fingerprint"] == "8a54f5b6fa972295"
    assert info["groups_counts_rule"] == {"many": 8, "medium": 2, "few": 0}
    assert info["groups_paper_split"] == {"many": 3, "medium": 4, "few": 3}


@pytest.mark.slow  # ~40 s; the fast tests cover real CIFAR-10-LT loading (test_data) and `run` (on synthetic)
def test_real_cifar10_lt_end_to_end(cli, cifar_root, tmp_path):
    """One short tiny-ViT epoch on real CIFAR-10-LT rho=100 (a subset of the schedule, for speed)."""
    out = cli("run", "--method", "erm_vit", "--dataset", "cifar10lt", "--rho", "100", "--preset", "tiny",
              "--epochs", "1", "--data-root", str(cifar_root), "--results", str(tmp_path), "--quiet",
              *set_args("workers=0", "batch_size=256"))
    run_dir = next((tmp_path / "runs").iterdir())
    result = json.loads((run_dir / "result.json").read_text())
    assert result["class_counts"] == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert result["final"]["heads"]["main"]["counts"]["few"] is None  # CIFAR-10-LT has no few-shot class
    assert "n/a" in out.output
    main = result["final"]["heads"]["main"]
    assert 0 <= main["top1"] <= 100 and len(main["per_class"]) == 10  # what one epoch learns differs by CPU model


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "ltbench", "list", "datasets"], capture_output=True, text=True)
    assert out.returncode == 0 and "cifar100lt" in out.stdout


def test_registry_listing_reads_the_plugins_without_importing_the_training_stack():
    """`ltbench list` shows every entry's docstring from its module's source: torch and timm stay unimported, and
    the rows equal those of the loaded classes."""
    code = ("import json, sys; from ltbench.registry import METHODS, DATASETS, EVALUATORS; "
            "rows = [r.listing() for r in (METHODS, DATASETS, EVALUATORS)]; "
            "assert not {'torch', 'timm'} & set(sys.modules), sorted({'torch', 'timm'} & set(sys.modules)); "
            "print(json.dumps(rows))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    from ltbench.registry import DATASETS, EVALUATORS, METHODS

    loaded = [[[name, r.source(name), cls.__doc__ or ""] for name, cls in r] for r in (METHODS, DATASETS, EVALUATORS)]
    assert json.loads(done.stdout) == loaded and len(loaded[0]) >= 14


def test_help_and_listing_do_not_import_the_training_stack():
    """`ltbench --help`, `list`, and `run` / `report` --help import neither torch, timm, pandas nor Ray."""
    code = ("import sys; from ltbench.cli import main\n"
            "for args in (['--help'], ['list', 'methods'], ['list', 'datasets'], ['run', '--help'], "
            "['report', '--help'], ['eval', '--help']):\n"
            "    try:\n        main(args, standalone_mode=False)\n    except SystemExit:\n        pass\n"
            "print(sorted({'torch', 'timm', 'pandas', 'ray'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "sweep" in done.stdout and "reproduce" in done.stdout and "tune" in done.stdout


def test_the_lazy_commands_help_lines_are_their_own():
    """The one-line help `ltbench --help` shows for a lazily imported command is that command's own."""
    from ltbench.cli import main

    for name, (_, line) in main.lazy.items():
        command = main.get_command(None, name)
        assert command.get_short_help_str(limit=10**6) == line, name
