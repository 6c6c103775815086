"""`ltbench reproduce`: suite files, planning, the verdict of each expectation kind on run folders with known
numbers (PASS / FAIL / MISSING), the eager retry of a compiled run, and the smoke suite end to end under Ray."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import ltbench
from ltbench import projection, records, resolve, stages, verdict_files
from ltbench import report as rp
from ltbench import reproduce as rpd
from ltbench.errors import UserError
from ltbench.records import atomic_write_json
from ltbench.runtime import Runtime

from .conftest import FAST_VIT, set_args

GOLDEN_SUITE = """
description: Golden run folders with known numbers.
runs:
  - {methods: [erm_cnn, ldam_drw], datasets: [synthetic], preset: tiny, seeds: [0, 1]}
  - {methods: [ldam_drw], datasets: [synthetic], preset: tiny_sam}
expectations:
  - {kind: value, cell: {method: erm_cnn}, expected: 71, tolerance: 1.5, source: mean over two seeds}
  - {kind: value, cell: {method: ldam_drw, preset: tiny}, expected: 90, tolerance: 3, source: off by 10}
  - {kind: order, better: {method: ldam_drw, preset: tiny}, worse: {method: erm_cnn}, margin: 5, source: by 8}
  - {kind: order, better: {method: ldam_drw, preset: tiny}, worse: {method: erm_cnn}, margin: 10, source: not by 10}
  - {kind: value, cell: {method: ldam_drw, preset: tiny_sam}, expected: 80, tolerance: 3, source: never trained}
  - kind: order
    better: {method: erm_cnn, split: paper, metric: few}
    worse: {method: erm_cnn, split: paper, metric: many}
    source: tail above head on the index split
  - {kind: finished, cell: {method: erm_cnn}, heads: [main], source: both seeds}
  - {kind: finished, cell: {method: erm_cnn}, heads: [main, dist], source: no DIST head}
"""
# Known numbers: top-1, then (many, medium, few) on the index ("paper") split, per run.
GOLDEN = {("erm_cnn", 0): (70.0, (60.0, 70.0, 80.0)), ("erm_cnn", 1): (72.0, (62.0, 70.0, 84.0)),
          ("ldam_drw", 0): (79.0, (75.0, 80.0, 82.0))}  # ldam_drw seed 1 and the tiny_sam run: not finished


def _write_suite(folder: Path, text: str, name: str = "golden.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def _write_finished_run(results: Path, job, top1: float, paper: tuple[float, float, float]) -> None:
    """A run folder as training leaves it, holding only what the report reads."""
    folder = results / "runs" / job.run_id
    metrics = {"top1": top1, "ece": 5.0, "counts": {"many": top1, "medium": top1, "few": None},
               "paper": dict(zip(("many", "medium", "few"), paper)), "per_class": [top1] * 10}
    atomic_write_json(folder / "config.json", job.config.to_dict())
    atomic_write_json(folder / "result.json", {"final": {"epoch": 1, "heads": {"main": metrics}},
                                               "best": None, "class_counts": [200] * 10, "run_id": job.run_id})
    (folder / "DONE").write_text("")


@pytest.fixture
def golden(tmp_path):
    """A suite whose run folders hold known numbers; returns (suite file, results folder)."""
    path = _write_suite(tmp_path, GOLDEN_SUITE)
    suite = rpd.load_suite(str(path))
    plan, _ = rpd.plan_suite(suite, tmp_path / "results")
    for job in plan.jobs.values():
        known = GOLDEN.get((job.config.method, job.config.seed))
        if known and job.config.preset == "tiny":
            _write_finished_run(tmp_path / "results", job, *known)
    return path, tmp_path / "results"


# ----------------------------------------------------------------------------------------------
# Suite files


def test_shipped_suites_parse_and_every_cell_picks_one_configuration(tmp_path):
    suites = rpd.shipped_suites()
    assert {"smoke", "cifar10lt-short", "cifar10lt-cnn-paper", "deitlt-paper"} <= set(suites)
    for name in suites:
        suite = rpd.load_suite(name)
        plan, cells = rpd.plan_suite(suite, tmp_path)  # raises when a cell matches none or several configs
        assert all(e.source for e in suite.expectations) and plan.jobs
        assert all(len(runs) >= 1 for runs in cells.values())
    short = rpd.load_suite("cifar10lt-short")
    assert short.runtime["compile_mode"] == "reduce-overhead"
    kinds = {e.kind for e in short.expectations}
    assert kinds == {"value", "order"}


def test_deitlt_paper_plan_projects_gpu_hours_without_the_data(tmp_path):
    plan, _ = rpd.plan_suite(rpd.load_suite("deitlt-paper"), tmp_path)
    table = projection.throughput_table()
    hours = {j.config.method: projection.projected_hours(j, table) for j in plan.jobs.values()}
    assert set(hours) == {"deitlt", "erm_vit", "paco"}  # the PaCo+SAM teachers are planned too
    assert all(h is not None and h > 0 for h in hours.values())
    assert hours["deitlt"] > 1  # 1200 epochs of DeiT-B at 224 px: hours, not minutes


def test_projection_counts_class_balanced_epochs_and_nothing_for_tau_norm(tmp_path):
    from ltbench.registry import DATASETS

    plan, _ = rpd.plan_suite(rpd.load_suite("cifar10lt-baselines-short"), tmp_path)
    jobs = {j.config.method: j for j in plan.jobs.values()}
    hours = {method: projection.projected_hours(job, projection.throughput_table()) for method, job in jobs.items()}
    assert hours["tau_norm"] == 0.0 and hours["erm_cnn"] > 0
    dataset = DATASETS.get("cifar10lt")
    counts = dataset.train_counts(resolve.dataset_options(dataset, None, dict(jobs["crt"].config.data)))
    epochs = {m: jobs[m].config.hparams["epochs"] for m in ("crt", "erm_cnn")}
    assert jobs["crt"].config.hparams["batch_size"] == jobs["erm_cnn"].config.hparams["batch_size"]  # one rate
    balanced = max(counts) * len(counts)  # 5000 x 10, not the 12406 images of CIFAR-10-LT rho 100
    expected = epochs["crt"] * balanced / (epochs["erm_cnn"] * sum(counts))
    assert hours["crt"] / hours["erm_cnn"] == pytest.approx(expected)
    assert hours["lws"] == hours["crt"]


@pytest.mark.parametrize(("text", "key", "message"), [
    ("runs: []\nexpectations: []\n", "runs", "non-empty list"),
    ("runs:\n  - {methods: [erm_cnn], dataset: [synthetic]}\nexpectations: [{kind: finished}]\n", "runs[0]",
     "unknown key"),
    ("runs: [{methods: [erm_cnn], datasets: [synthetic]}]\nexpectations:\n  - {kind: ratio, source: x}\n",
     "expectations[0].kind", "not an expectation kind"),
    ("runs: [{methods: [erm_cnn], datasets: [synthetic]}]\nexpectations:\n"
     "  - {kind: value, cell: {method: erm_cnn}, expected: high, source: x}\n", "expectations[0].expected",
     "expected a number"),
    ("runs: [{methods: [erm_cnn], datasets: [synthetic]}]\nexpectations:\n"
     "  - {kind: value, cell: {method: erm_cnn}, expected: 70}\n", "expectations[0]", "source"),
    ("runs: [{methods: [erm_cnn], datasets: [synthetic]}]\nexpectations:\n"
     "  - {kind: value, cell: {method: erm_cnn, metric: top5}, expected: 70, source: x}\n",
     "expectations[0].cell.metric", "not one of"),
    ("runs: [{methods: [erm_cnn], datasets: [synthetic]}]\nextra: 1\nexpectations: [{kind: finished}]\n",
     "(top level)", "unknown key"),
])
def test_malformed_suite_files_name_the_file_and_the_key(tmp_path, text, key, message):
    path = _write_suite(tmp_path, text, "broken.yaml")
    with pytest.raises(UserError) as err:
        rpd.load_suite(str(path))
    assert str(path) in str(err.value) and f"key {key}" in str(err.value) and message in str(err.value)


def test_cells_must_pick_exactly_one_configuration(tmp_path):
    runs = "runs: [{methods: [erm_cnn], datasets: [synthetic], preset: tiny}, " \
           "{methods: [erm_cnn], datasets: [synthetic], preset: tiny_sam}]\n"
    none = _write_suite(tmp_path, runs + "expectations: [{kind: finished, cell: {method: paco}, heads: main, "
                                         "source: x}]\n", "none.yaml")
    with pytest.raises(UserError, match=r"expectations\[0\].*matches no run"):
        rpd.plan_suite(rpd.load_suite(str(none)), tmp_path)
    several = _write_suite(tmp_path, runs + "expectations: [{kind: finished, cell: {method: erm_cnn}, heads: main, "
                                            "source: x}]\n", "several.yaml")
    with pytest.raises(UserError, match="matches 2 configurations, which differ in preset"):
        rpd.plan_suite(rpd.load_suite(str(several)), tmp_path)


def test_unknown_and_malformed_suites_on_the_command_line(cli, tmp_path):
    out = cli("reproduce", "smok", expect=2)
    assert "no suite 'smok'" in out.output and "Did you mean 'smoke'?" in out.output
    assert "Traceback" not in out.output
    broken = _write_suite(tmp_path, "runs: {methods: erm_cnn}\nexpectations: []\n", "broken.yaml")
    out = cli("reproduce", str(broken), expect=2)
    assert "broken.yaml, key runs: expected a non-empty list" in " ".join(out.output.split())
    listing = cli("reproduce", "--list", "--results", str(tmp_path)).output
    assert all(name in listing for name in ("smoke", "cifar10lt-short", "cifar10lt-cnn-paper", "deitlt-paper"))
    rows = {line.split()[0]: line for line in listing.splitlines() if line and not line[0].isspace()}
    assert "One H100/H200" in rows["cifar10lt-short"]  # piped: one unwrapped line per suite, description included
    assert all("never run: projected only" in rows[name] for name in ("smoke", "deitlt-paper"))


def test_dry_run_shows_states_and_projected_hours(cli, tmp_path):
    out = cli("reproduce", "cifar10lt-short", "--dry-run", "--results", str(tmp_path)).output
    assert "6 run(s) (0 upstream), 7 expectation(s): 6 new" in out
    assert out.count(" new ") == 6 and "GPU h" in out and "projected:" in out and "H200" in out
    ldam = [line.split()[:3] for line in out.splitlines() if re.match(r"[0-9a-f]{12}  ldam_drw ", line)]
    assert sorted(row[2] for row in ldam) == ["short", "short_sam"]  # the preset column tells the two apart
    assert "compile reduce-overhead, GPUs per run 0.25" in out  # the suite's runtime defaults
    assert "decoupled stage 2 (crt, lws: a classifier on frozen features) is projected at the full network's " \
           "training rate, an upper bound" in " ".join(out.split())
    assert not (tmp_path / "runs").exists()
    rehearsal = cli("reproduce", "cifar10lt-short", "--dry-run", "--results", str(tmp_path), "--no-compile",
                    "--gpus-per-trial", "0", "--datasets", "synthetic", "--epochs", "1").output
    assert "compile off, GPUs per run 0" in rehearsal and "synthetic" in rehearsal and " 0/1 " in rehearsal


# ----------------------------------------------------------------------------------------------
# Verdicts on golden run folders


def test_verdict_of_each_expectation_kind_on_known_numbers(golden):
    path, results = golden
    suite = rpd.load_suite(str(path))
    plan, cells = rpd.plan_suite(suite, results)
    verdicts = rpd.judge(suite, plan, cells)
    assert [v.status for v in verdicts] == ["PASS", "FAIL", "PASS", "FAIL", "MISSING", "PASS", "PASS", "FAIL"]
    assert verdicts[0].value == pytest.approx(71.0)  # the mean of the two seeds, as `ltbench report` computes it
    assert verdicts[2].value == pytest.approx(8.0)  # 79 (seed 0 only) - 71
    assert "1/2 seed(s) finished" in " ".join(verdicts[2].notes)
    assert verdicts[5].value == pytest.approx(82.0 - 61.0)  # paper-split few minus many, seed means
    assert "dist" in " ".join(verdicts[7].notes)
    assert rpd.exit_code(verdicts) == 1
    assert rpd.exit_code([v for v in verdicts if v.status == "PASS"]) == 0


def test_command_line_verdict_table_files_and_exit_status(cli, golden):
    path, results = golden
    out = cli("reproduce", str(path), "--results", str(results), "--no-train", expect=1)
    assert "3/8 pass" not in out.output and "4/8 pass" in out.output
    assert "FAIL" in out.output and "MISSING" in out.output
    written = json.loads((results / "reproduce" / "golden" / "verdict.json").read_text())
    assert written["exit_code"] == 1 and [v["verdict"] for v in written["verdicts"]].count("PASS") == 4
    markdown = (results / "reproduce" / "golden" / "verdict.md").read_text()
    assert "| **FAIL** |" in markdown and "| **MISSING** |" in markdown and "never trained" in markdown


def test_verdict_json_holds_numbers_seeds_and_spread_and_names_the_ltbench_that_judged(cli, golden):
    path, results = golden
    cli("reproduce", str(path), "--results", str(results), "--no-train", expect=1)
    written = json.loads((results / "reproduce" / "golden" / "verdict.json").read_text())
    assert written["ltbench"] == ltbench.__version__ and written["commit"] == verdict_files.source_commit()
    assert written["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", written["commit"])
    first = written["verdicts"][0]  # erm_cnn: 70 and 72 over seeds 0 and 1
    assert first["value"] == pytest.approx(71.0) and first["expected"] == 71 and first["tolerance"] == 1.5
    reading = first["readings"][0]
    assert reading["seeds"] == [0, 1] and reading["n"] == 2 and reading["std"] == pytest.approx(2 ** 0.5)
    partial = written["verdicts"][2]["readings"]  # ldam_drw: one seed of two, so no spread
    assert partial[0]["seeds"] == [0] and partial[0]["std"] is None and partial[0]["planned_runs"] == 2
    for verdict in written["verdicts"]:
        assert all(verdict[k] is None or isinstance(verdict[k], (int, float)) for k in
                   ("value", "expected", "tolerance", "margin")), verdict
    assert all(isinstance(row["epochs"], int) and row["preset"] in ("tiny", "tiny_sam") for row in written["runs"])
    markdown = (results / "reproduce" / "golden" / "verdict.md").read_text()
    assert "| 71.00 ± 1.41 | 0,1 |" in markdown and f"ltbench: {ltbench.__version__} (commit" in markdown


def test_last_verdict_of_a_suite_for_the_listing(tmp_path):
    assert verdict_files.last_verdict(tmp_path, "smoke") == "never run: projected only"
    folder = verdict_files.verdict_folder(tmp_path, "smoke")
    folder.mkdir(parents=True)
    atomic_write_json(folder / "verdict.json", {"suite": "smoke", "date": "2026-12-07 10:00 UTC",
                                                "verdicts": [{"verdict": "PASS"}, {"verdict": "FAIL"}]})
    assert verdict_files.last_verdict(tmp_path, "smoke") == "1/2 pass, 2026-12-07 10:00 UTC"
    atomic_write_json(folder / "verdict.json", {"suite": "smoke", "verdicts": "all good"})
    assert verdict_files.last_verdict(tmp_path, "smoke").startswith("unreadable verdict.json (Run `ltbench")


def test_sources_cite_papers_and_shipped_files_and_cpu_numbers_match_the_docs():
    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    sources = [e.source for name in rpd.shipped_suites() for e in rpd.load_suite(name).expectations]
    sources += list(rp.reference_numbers()["source"])
    for source in sources:
        for cited in re.findall(r"[\w./-]+\.md\b", source):
            assert (repo / cited).is_file(), f"{source!r} cites {cited}, which is not in the repository"
        for number in re.findall(r"reached (\d+\.\d+) on CPU", source):
            assert number in readme, f"{source!r}: README.md does not give {number}"


# ----------------------------------------------------------------------------------------------
# Eager retry of a compiled run that fails in its first epoch on CUDA


def _tiny_config():
    return resolve.make_config("erm_cnn", "synthetic", preset="tiny", epochs=1,
                              sets=["workers=0", "data.n_max=16", "data.n_test=2"])


def test_compiled_first_epoch_failure_is_retried_eagerly_and_the_verdict_says_so(tmp_path, monkeypatch):
    def failing_compile(module, *args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("fake CUDA-graph capture failure")
        return fail

    monkeypatch.setattr(torch, "compile", failing_compile)
    monkeypatch.setattr(Runtime, "torch_device", lambda self: torch.device("cpu"))
    monkeypatch.setattr(stages, "_compiled_on_cuda", lambda runtime: runtime.compile)  # the CPU stands in
    config = _tiny_config()
    runtime = Runtime(results=tmp_path, data_root=tmp_path, device="cpu", compile=True, progress=False,
                      echo=lambda _: None)
    record = stages.ensure_or_retry_eagerly(config, runtime)
    assert record.done
    marker = json.loads((record.path / records.EAGER_RETRY).read_text())
    assert "fake CUDA-graph capture failure" in marker["error"]
    suite = _write_suite(tmp_path, "runs: [{methods: [erm_cnn], datasets: [synthetic], preset: tiny, epochs: 1, "
                                   "set: [workers=0, data.n_max=16, data.n_test=2]}]\nexpectations: "
                                   "[{kind: finished, cell: {method: erm_cnn}, heads: main, source: x}]\n", "r.yaml")
    loaded = rpd.load_suite(str(suite))
    plan, cells = rpd.plan_suite(loaded, tmp_path)
    (verdict,) = rpd.judge(loaded, plan, cells)
    assert verdict.status == "PASS" and "retried eagerly" in " ".join(verdict.notes)


def test_other_failures_are_not_retried(tmp_path, monkeypatch):
    calls = []

    def failing_ensure(config, runtime):
        calls.append(runtime.compile)
        raise RuntimeError("a bad recipe")

    monkeypatch.setattr(stages, "ensure", failing_ensure)
    runtime = Runtime(results=tmp_path, data_root=tmp_path, device="cpu", compile=True, echo=lambda _: None)
    with pytest.raises(RuntimeError, match="a bad recipe"):  # compiled, but not on CUDA
        stages.ensure_or_retry_eagerly(_tiny_config(), runtime)
    monkeypatch.setattr(stages, "_compiled_on_cuda", lambda runtime: runtime.compile)
    with pytest.raises(RuntimeError, match="a bad recipe"):  # on "CUDA" but eager: nothing to fall back to
        stages.ensure_or_retry_eagerly(_tiny_config(), Runtime(results=tmp_path, data_root=tmp_path,
                                                               device="cpu", echo=lambda _: None))
    assert calls == [True, False]


# ----------------------------------------------------------------------------------------------
# The smoke suite end to end: its own 2 epochs on reduced data (16-image classes, a 1-epoch deitlt teacher)


SMOKE_FAST = ["workers=0", "data.n_max=16", "data.n_test=4", "deitlt:teacher_overrides=epochs=1",
              *(f"{m}:{s}" for m in ("erm_vit", "deit", "deitlt") for s in FAST_VIT if not s.startswith("workers"))]


def test_smoke_suite_passes_and_a_second_call_trains_nothing(cli, tmp_path):
    args = ["reproduce", "smoke", "--results", str(tmp_path), *set_args(*SMOKE_FAST),
            "--cpus-per-trial", "1", "--quiet"]
    first = cli(*args)
    assert "13/13 pass" in first.output, first.output
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if (p / "DONE").is_file())
    # 13 methods, PaCo+SAM (deitlt's teacher) and livt_mgp (livt's pretraining); the erm_cnn run is deit's
    # teacher and the stage 1 of crt / tau_norm / lws
    assert len(runs) == 15
    stamps = {r.name: (r / "result.json").stat().st_mtime_ns for r in runs}
    second = cli(*args)
    assert "15 done" in second.output and "started" not in second.output and "13/13 pass" in second.output
    assert stamps == {r.name: (r / "result.json").stat().st_mtime_ns for r in runs}
    verdict = json.loads((tmp_path / "reproduce" / "smoke" / "verdict.json").read_text())
    assert verdict["exit_code"] == 0 and len(verdict["runs"]) == 15
