"""Issue 23: property-based tests of every reader. Random truncation, byte flips, wrong types and huge values of
each run file, grid, suite and list file give a one-line error (a UserError) or the correct result: never another
exception, never a silently different number.

One tiny finished run (with its test logits) is trained per module; each example works on a fresh copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from ltbench.datasets.filelist_lt import read_list

from ltbench import report as rp
from ltbench import reproduce, runset
from ltbench import sweep as sw
from ltbench.cli import main
from ltbench.errors import UserError
from ltbench.records import RunRecord, config_problem, epochs_logged
from tests.conftest import FAST_VIT, set_args

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TINY = ["--method", "erm_vit", "--dataset", "synthetic", "--preset", "tiny", "--quiet", "--epochs", "2",
        *set_args(*FAST_VIT, "data.n_max=40", "data.n_test=4", "batch_size=32")]

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                               max_size=4), max_leaves=12)
HUGE = st.sampled_from([10**30, -10**30, 1e308, -1e308, 2**63, "9" * 40, float("nan"), float("inf")])


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """``data`` cut short, with bytes flipped, or both (always different from ``data``)."""
    out = bytearray(data[:draw(st.integers(0, len(data)))] if draw(st.booleans()) else data)
    for _ in range(draw(st.integers(0 if len(out) < len(data) else 1, 4))):
        if out:
            at = draw(st.integers(0, len(out) - 1))
            out[at] ^= draw(st.integers(1, 255))
    assume(bytes(out) != data)  # two flips of one byte can restore it
    return bytes(out)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    result = CliRunner().invoke(main, ["run", *TINY, "--save-logits", "--results", str(root)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run,) = (root / "runs").iterdir()
    return run


def damage(path: Path, data: st.DataObject) -> None:
    path.write_bytes(data.draw(damaged(path.read_bytes())))


def fresh(finished: Path, tmp_path: Path) -> Path:
    target = tmp_path / "results" / "runs" / finished.name
    shutil.rmtree(tmp_path / "results", ignore_errors=True)
    shutil.copytree(finished, target)
    return target


def report_or_error(results: Path, **options: Any) -> str | None:
    """The Markdown report, or None after a UserError; any other exception fails the test."""
    try:
        return rp.report(results, "markdown", runset.ReportOptions(**options))
    except UserError as exc:
        assert "\n" not in str(exc).strip()
        return None


def mutate_key(payload: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        payload = payload[key]
    payload[path[-1]] = value


RESULT_KEYS = [["final"], ["final", "epoch"], ["final", "heads"], ["final", "heads", "main"],
               ["final", "heads", "main", "top1"], ["final", "heads", "main", "counts"],
               ["final", "heads", "main", "counts", "many"], ["final", "heads", "main", "ece"], ["best"],
               ["class_counts"], ["eval_every"], ["run_id"], ["wall_time_s"]]


# ---------------------------------------------------------------------------------------------- result.json, DONE
@SETTINGS
@given(data=st.data())
def test_a_damaged_result_json_is_an_error_never_a_different_number(finished, tmp_path, data):
    run = fresh(finished, tmp_path)
    original = RunRecord(run).result()
    damage(run / "result.json", data)
    record = RunRecord(run)
    found, why = record.finished_result()
    assert found is None and "changed after the run finished" in why  # DONE's digest catches every change
    with pytest.raises(UserError):
        record.result()
    assert original["final"]["heads"]["main"]["top1"] not in (None, 99.9)
    report_or_error(run.parent.parent)


@SETTINGS
@given(key=st.sampled_from(RESULT_KEYS), value=JSON | HUGE)
def test_wrong_types_and_huge_values_in_result_json_never_crash_a_reader(finished, tmp_path, key, value):
    """The digest in DONE is rewritten too (a careful editor): the schema alone must stop the bad value."""
    run = fresh(finished, tmp_path)
    payload = json.loads((run / "result.json").read_text())
    mutate_key(payload, key, value)
    (run / "result.json").write_text(json.dumps(payload))
    RunRecord(run).mark_done()
    found, why = RunRecord(run).finished_result()
    assert (found is None) == (why is not None)
    if found is not None:  # accepted: then the reported number is the one in the file
        assert found["final"]["heads"]["main"]["top1"] == payload["final"]["heads"]["main"]["top1"]
    report_or_error(run.parent.parent)
    report_or_error(run.parent.parent, select="best", split="paper", metrics=("top1", "many", "ece"))


@SETTINGS
@given(data=st.data())
def test_a_damaged_done_marker_is_a_reason_never_a_crash(finished, tmp_path, data):
    run = fresh(finished, tmp_path)
    (run / "DONE").write_bytes(data.draw(damaged((run / "DONE").read_bytes()) | st.binary(max_size=80)))
    found, why = RunRecord(run).finished_result()
    if found is not None:  # an empty DONE (before digests) or one whose damage kept the digests
        assert found == json.loads((run / "result.json").read_text())
    report_or_error(run.parent.parent)


# ---------------------------------------------------------------------------------------------- metrics, config
@SETTINGS
@given(data=st.data())
def test_a_damaged_metrics_file_is_an_error_or_its_rows(finished, tmp_path, data):
    run = fresh(finished, tmp_path)
    intact = RunRecord(run).metrics()
    damage(run / "metrics.jsonl", data)
    try:
        rows = RunRecord(run).metrics()
    except UserError:
        rows = None
    if rows is not None:  # a torn last line is dropped; what remains must be well-formed rows
        assert all(isinstance(r["epoch"], int) and r["epoch"] >= 0 for r in rows)
    assert epochs_logged(run) >= 0 and RunRecord(run).finished_result()[0] is None  # DONE's digest
    assert len(intact) == 2


@SETTINGS
@given(data=st.data(), value=JSON | HUGE, key=st.sampled_from(["method", "dataset", "data", "hparams", "seed",
                                                                "versions", "preset"]))
def test_a_damaged_or_retyped_config_json_is_a_reason_never_a_crash(finished, tmp_path, data, value, key):
    run = fresh(finished, tmp_path)
    if data.draw(st.booleans()):
        damage(run / "config.json", data)
    else:
        payload = json.loads((run / "config.json").read_text())
        payload[key] = value
        (run / "config.json").write_text(json.dumps(payload))
    problem = config_problem(run)
    assert problem is None or isinstance(problem, str)
    if problem is None:
        assert RunRecord(run).config().run_id == run.name
    report_or_error(run.parent.parent)


# ---------------------------------------------------------------------------------------------- logits, post-hoc
@SETTINGS
@given(data=st.data())
def test_damaged_saved_logits_are_an_error_or_the_same_arrays(finished, tmp_path, data):
    run = fresh(finished, tmp_path)
    intact = RunRecord(run).saved_logits()
    damage(run / "test_logits.npz", data)
    if data.draw(st.booleans()):
        (run / "DONE").write_bytes(b"")  # no digest: the file's own checks must hold
    try:
        arrays = RunRecord(run).saved_logits()
    except UserError:
        return
    assert set(arrays) == set(intact) and all(np.array_equal(arrays[k], intact[k]) for k in intact)


@SETTINGS
@given(value=JSON | HUGE, key=st.sampled_from([["taus"], ["taus", "1"], ["taus", "1", "heads"], ["run_id"],
                                               ["taus", "1", "heads", "main", "top1"], ["taus", "1", "epoch"]]))
def test_a_retyped_posthoc_file_is_an_error_or_its_numbers(finished, tmp_path, key, value):
    run = fresh(finished, tmp_path)
    block = json.loads((run / "result.json").read_text())["final"]
    payload = {"run_id": run.name, "rule": "r", "taus": {"1": {**block, "logits": "saved"}}}
    mutate_key(payload, key, value)
    (run / "posthoc_la.json").write_text(json.dumps(payload, allow_nan=True))
    try:
        found = RunRecord(run).posthoc()
    except UserError:
        found = None
    if found is not None:
        assert found["taus"] == json.loads(json.dumps(payload["taus"]))
    report_or_error(run.parent.parent, adjust=1.0)


def test_a_truncated_checkpoint_is_an_error(finished, tmp_path):
    """Truncation is what a copy cut short leaves (a flipped byte inside tensor data is not detected: no digest
    of the checkpoint is kept, which would cost a second read of every checkpoint on resume)."""
    run = fresh(finished, tmp_path)
    data = (run / "checkpoint.pt").read_bytes()
    for cut in (0, 10, len(data) // 3, len(data) - 30):
        (run / "checkpoint.pt").write_bytes(data[:cut])
        with pytest.raises(UserError, match="cannot be used"):
            RunRecord(run).load_checkpoint()


# ---------------------------------------------------------------------------------------------- grids, suites, lists
GRID = {"methods": ["erm_vit"], "datasets": ["synthetic"], "rho": [10], "seeds": "0-1", "preset": "tiny",
        "epochs": 2, "set": {"data.n_max": 40}}


@SETTINGS
@given(data=st.data(), key=st.sampled_from(sorted(GRID)), value=JSON | HUGE)
def test_a_damaged_or_retyped_grid_file_is_an_error_or_a_grid(tmp_path, data, key, value):
    path = tmp_path / "grid.yaml"
    text = yaml.safe_dump({**GRID, key: value}) if data.draw(st.booleans()) else yaml.safe_dump(GRID)
    if data.draw(st.booleans()):
        text = data.draw(damaged(text.encode())).decode("utf-8", "replace")
    path.write_text(text, encoding="utf-8")
    try:
        grid = sw.build_grid(sw.load_grid_file(path))
    except UserError as exc:
        assert "\n" not in str(exc).strip()
        return
    assert 1 <= grid.size <= sw.MAX_GRID_RUNS


@SETTINGS
@given(data=st.data())
def test_a_damaged_suite_file_is_an_error_or_a_suite(tmp_path, data):
    shipped = reproduce.shipped_suites()["smoke"]
    path = tmp_path / "suite.yaml"
    path.write_bytes(data.draw(damaged(shipped.read_bytes())))
    try:
        suite = reproduce.load_suite(str(path))
    except UserError as exc:
        assert "\n" not in str(exc).strip()
        return
    assert suite.grids and suite.expectations


LINE = st.tuples(st.sampled_from(["a/x.jpg", "b/y.jpg", "../z.jpg", "/etc/passwd", "a/../a/x.jpg", "./c.jpg",
                                  "a b.jpg", ""]), st.sampled_from(["0", "1", "-1", "x", "", "99999999999999999999"]))


@SETTINGS
@given(lines=st.lists(LINE, max_size=6), bom=st.booleans())
def test_a_list_file_is_an_error_or_unique_paths_inside_its_folder(tmp_path, lines, bom):
    path = tmp_path / "lists" / "train.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "".join(f"{p} {label}\n" for p, label in lines).encode())
    try:
        listing = read_list(path)
    except UserError as exc:
        assert str(path) in str(exc)
        return
    assert len(set(listing.paths)) == len(listing.paths) == len(lines) > 0
    assert all(not p.startswith(("..", "/")) and (path.parent / p).resolve().is_relative_to(path.parent.resolve())
               for p in listing.paths)
