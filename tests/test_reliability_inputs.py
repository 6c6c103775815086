"""Issue 23, inputs: list files stay inside their dataset, grids, suites and dataset options are typed at the door,
tiny files cannot exhaust memory, and the minor probes (wrong kinds of paths, options out of range) are messages."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ltbench import stages
from ltbench.cli import main
from ltbench.errors import UserError
from ltbench.runtime import Runtime
from tests.conftest import FAST_VIT, set_args
from tests.test_filelist_datasets import _write_tree, places_lists

TINY = ["--method", "erm_vit", "--dataset", "synthetic", "--preset", "tiny", "--quiet", "--epochs", "1",
        *set_args(*FAST_VIT, "data.n_max=40", "data.n_test=4", "batch_size=32")]
PLACES = ["--method", "erm_vit", "--dataset", "placeslt", "--preset", "tiny", "--quiet", "--epochs", "1",
          *set_args(*FAST_VIT, "batch_size=8")]


def invoke(*args: str, expect: int | None = 0) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


def places(tmp_path: Path, edit=None) -> Path:
    """A tiny Places-LT tree under tmp_path/data; ``edit(lines)`` changes the train list's lines."""
    folder = _write_tree(tmp_path / "data" / "places_lt", places_lists())
    if edit:
        train = folder / "Places_LT_train.txt"
        train.write_text("\n".join(edit(train.read_text().splitlines())) + "\n")
    return tmp_path / "data"


def verify(root: Path, expect: int) -> str:
    return invoke("data", "verify", "placeslt", "--data-root", str(root), "--no-expect-standard", "--quiet",
                  expect=expect)


# ---------------------------------------------------------------------------------------------- silently wrong 4
@pytest.mark.parametrize("escape", ["../outside/x.jpg", "/etc/passwd"])
def test_a_list_path_outside_the_dataset_is_refused_by_verify_and_run_before_training(tmp_path, escape):
    def edit(lines):
        return [lines[0], f"{escape} 0", *lines[1:]]

    root = places(tmp_path, edit)
    train = root / "places_lt" / "Places_LT_train.txt"
    assert f"{train}:2: the path {escape!r} leaves the dataset's folder" in verify(root, expect=1)
    results = tmp_path / "results"
    out = invoke("run", *PLACES, "--set", "data.cache_resized=32", "--data-root", str(root), "--results",
                 str(results), expect=2)
    assert f"{train}:2: the path {escape!r} leaves the dataset's folder" in out
    assert not (results / "runs").exists() or not any((results / "runs").iterdir())
    assert not (tmp_path / "data" / "outside").exists() and not (root / ".ltbench-cache").exists()


def test_an_absolute_path_inside_the_dataset_is_read_as_its_relative_path(tmp_path):
    root = places(tmp_path, lambda lines: [f"{tmp_path / 'data' / 'places_lt'}/{lines[0]}", *lines[1:]])
    assert "placeslt: OK" in verify(root, expect=0)


# ---------------------------------------------------------------------------------------------- silently wrong 5
def test_an_empty_train_list_fails_verify_and_run(tmp_path):
    root = places(tmp_path, lambda lines: [])
    assert "the train list has no entries" in verify(root, expect=1)
    assert "has no entries" in invoke("run", *PLACES, "--data-root", str(root), "--results", str(tmp_path / "r"),
                                      expect=2)


def test_a_byte_order_mark_is_not_part_of_the_first_path(tmp_path):
    root = places(tmp_path)
    train = root / "places_lt" / "Places_LT_train.txt"
    train.write_bytes(b"\xef\xbb\xbf" + train.read_bytes())
    assert "placeslt: OK" in verify(root, expect=0)


def test_a_repeated_line_is_refused_by_run_and_is_a_problem_for_verify(tmp_path):
    root = places(tmp_path, lambda lines: [lines[0], lines[0], *lines[1:]])
    train = root / "places_lt" / "Places_LT_train.txt"
    assert f"{train}:2: the path" in verify(root, expect=1) and "repeats line 1" in verify(root, expect=1)
    out = invoke("run", *PLACES, "--data-root", str(root), "--results", str(tmp_path / "r"), expect=2)
    assert f"{train}:2:" in out and "repeats line 1" in out


# ---------------------------------------------------------------------------------------------- grids and suites
@pytest.mark.parametrize(("line", "key"), [("epochs: abc", "epochs"), ("epochs: [1, 2]", "epochs"),
                                           ("seeds: 1.5", "seeds"), ("set: 5", "set"), ("datasets: 7", "datasets")])
def test_a_grid_value_of_the_wrong_type_names_the_file_and_the_key(tmp_path, line, key):
    grid = tmp_path / "grid.yaml"
    values = {"methods": "methods: [erm_vit]", "datasets": "datasets: [synthetic]", key: line}
    grid.write_text("\n".join(values.values()) + "\n")
    out = invoke("sweep", str(grid), "--dry-run", "--results", str(tmp_path), expect=2)
    assert f"{grid}, key {key}:" in out


def test_a_suite_with_a_wrong_runtime_or_grid_type_names_the_file_and_the_key(tmp_path):
    suite = tmp_path / "suite.yaml"
    body = ("runs:\n  - {methods: [erm_vit], datasets: [synthetic], epochs: abc}\nexpectations:\n"
            "  - {kind: finished, cell: {method: erm_vit}, heads: [main], source: x}\n")
    suite.write_text("runtime: {gpus_per_trial: lots}\n" + body)
    out = invoke("reproduce", str(suite), "--dry-run", "--results", str(tmp_path), expect=2)
    assert f"Suite file {suite}, key runtime.gpus_per_trial: expected a number >= 0" in out
    suite.write_text(body)
    out = invoke("reproduce", str(suite), "--dry-run", "--results", str(tmp_path), expect=2)
    assert f"Suite file {suite}, key runs[0].epochs:" in out


@pytest.mark.parametrize("option", ["data.n_max=-5", "data.num_classes=0"])
def test_impossible_dataset_sizes_are_refused_naming_the_key(tmp_path, option):
    out = invoke("run", *TINY, "--set", option, "--results", str(tmp_path), expect=2)
    assert f"option {option.split('=')[0][5:]} must be >=" in out and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- memory
def test_a_yaml_alias_bomb_and_a_huge_seed_range_are_refused_at_once(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    rows = ['a: &a ["x","x","x","x","x","x","x","x","x"]'] + \
        [f'{chr(98 + i)}: &{chr(98 + i)} [{",".join(["*" + chr(97 + i)] * 9)}]' for i in range(8)]
    bomb.write_text("\n".join(rows) + "\nmethods: *i\n")
    assert bomb.stat().st_size < 1500
    start = time.perf_counter()
    out = invoke("sweep", str(bomb), "--dry-run", "--results", str(tmp_path), expect=2)
    assert "through its YAML aliases" in out and "more than 100,000 values" in out
    out = invoke("sweep", "--methods", "erm_vit", "--datasets", "synthetic", "--seeds", "0-99999999", "--dry-run",
                 "--results", str(tmp_path), expect=2)
    assert "past the 10,000 runs a sweep may have" in out
    assert time.perf_counter() - start < 20  # before: 52-177 s, then a MemoryError


# ---------------------------------------------------------------------------------------------- minor
def test_results_given_as_a_file_is_named_as_such(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert f"The results folder {blocker} is a file" in invoke("run", *TINY, "--results", str(blocker), expect=2)


def test_a_dangling_run_folder_link_is_named_as_such(tmp_path):
    out = invoke("run", *TINY, "--results", str(tmp_path), "--stop-after-epochs", "1")
    (run,) = (tmp_path / "runs").iterdir()
    shutil.rmtree(run)
    run.symlink_to(tmp_path / "gone")
    out = invoke("run", *TINY, "--results", str(tmp_path), expect=2)
    assert f"symbolic link to {tmp_path / 'gone'}, which does not exist" in out


def test_report_options_out_of_range_are_refused_before_any_output(tmp_path):
    invoke("run", *TINY, "--results", str(tmp_path))
    out = invoke("report", "--results", str(tmp_path), "--by", "nonsense_key", expect=2)
    assert "--by nonsense_key: no run in the table has that config key" in out
    assert "digits" in invoke("report", "--results", str(tmp_path), "--digits", "100000", expect=2)
    (run,) = (tmp_path / "runs").iterdir()
    out = invoke("eval", run.name, "--adjust", "nan", "--results", str(tmp_path), expect=2)
    assert "--adjust takes tau >= 0" in out and "top-1" not in out.lower().split("--adjust")[0]


def test_two_processes_checking_the_results_folder_at_once_both_find_it_writable(tmp_path):
    runtime = Runtime(results=tmp_path, data_root=tmp_path, device="cpu")
    failures: list[Exception] = []

    def check() -> None:
        for _ in range(300):
            try:
                stages._check_writable(runtime)
            except UserError as exc:
                failures.append(exc)

    threads = [threading.Thread(target=check) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and not [p for p in os.listdir(tmp_path) if p.startswith(".write-probe")]


def test_a_checkpoint_of_another_shape_names_the_tensor(tmp_path):
    invoke("run", *TINY, "--epochs", "2", "--results", str(tmp_path / "a"), "--stop-after-epochs", "1")
    wider = [*TINY, "--epochs", "2", "--set", "data.num_classes=5"]
    invoke("run", *wider, "--results", str(tmp_path / "b"), "--stop-after-epochs", "1")
    (a,), (b,) = (tmp_path / "a" / "runs").iterdir(), (tmp_path / "b" / "runs").iterdir()
    import torch

    ckpt = torch.load(b / "checkpoint.pt", weights_only=True)
    ckpt["origin"]["run_id"] = a.name  # a forged origin: the shapes must still be checked
    ckpt["origin"]["config_sha256"] = a.name + ckpt["origin"]["config_sha256"][12:]
    torch.save(ckpt, a / "checkpoint.pt")
    out = invoke("run", *TINY, "--epochs", "2", "--results", str(tmp_path / "a"), expect=2)
    assert "size mismatch for" in out and str(a / "checkpoint.pt") in out
