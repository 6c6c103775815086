"""Grids over hyperparameters: a list value of a grid's ``set`` (or ``--set KEY=A,B``) is an axis of the sweep.

The rule (ltbench.config.SWEEP_RULE): a comma separates the values of a field that is not a tuple; a tuple field
(milestones) keeps its commas for its own items and takes ``|`` between values; in YAML a list of lists.
Planning only: nothing here trains (the end-to-end sweep under Ray is tests/test_sweep.py's).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ltbench import report as rp
from ltbench import resolve, runset
from ltbench import sweep as sw
from ltbench.errors import UserError
from ltbench.tuning import TuneSpec, parse_space, trial_config

BASE = ["workers=0"]


def _plan(tmp_path: Path, sets: list[str], methods: str = "cb_focal") -> sw.SweepPlan:
    grid = sw.build_grid(None, methods=methods, datasets="synthetic", preset="tiny", sets=[*BASE, *sets])
    return sw.plan_sweep(grid, tmp_path)


def test_each_swept_value_is_the_run_of_the_same_single_set(tmp_path):
    plan = _plan(tmp_path, ["cb_focal:focal_gamma=0.5,1,2", "milestones=1,2|1"], methods="cb_focal,erm_cnn")
    cells = {(j.config.method, j.swept) for j in plan.jobs.values()}
    assert len(plan.jobs) == 8 and plan.grid.size == 8  # 3 x 2 for cb_focal, 2 for erm_cnn
    assert ("cb_focal", ("focal_gamma=0.5", "milestones=1,2")) in cells and ("erm_cnn", ("milestones=1",)) in cells
    for job in plan.jobs.values():  # the very run `ltbench run --set KEY=VALUE` makes: one run id
        single = resolve.make_config(job.config.method, "synthetic", preset="tiny", sets=[*BASE, *job.swept])
        assert single.run_id == job.run_id
    milestones = {tuple(j.config.hparams["milestones"]) for j in plan.jobs.values()}
    assert milestones == {(1, 2), (1,)}  # "1,2" stayed one tuple
    assert {j.config.hparams.get("focal_gamma") for j in plan.jobs.values()} == {0.5, 1.0, 2.0, None}


def test_a_yaml_list_is_an_axis_and_a_list_of_lists_the_values_of_a_tuple_field(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("methods: [cb_focal]\ndatasets: [synthetic]\npreset: tiny\n"
                    "set: {workers: 0, cb_focal: {focal_gamma: [0.5, 1, 2]}, milestones: [[1, 2], [1]]}\n")
    from_file = sw.plan_sweep(sw.build_grid(sw.load_grid_file(path)), tmp_path / "a")
    from_options = _plan(tmp_path / "b", ["cb_focal:focal_gamma=0.5,1,2", "milestones=1,2|1"])
    assert set(from_file.jobs) == set(from_options.jobs) and len(from_file.jobs) == 6
    path.write_text("methods: cb_focal\ndatasets: synthetic\nset: {milestones: [1, 2]}\n")  # flat: one tuple
    assert sw.build_grid(sw.load_grid_file(path)).size == 1
    path.write_text("methods: cb_focal\ndatasets: synthetic\nset: {milestones: [[1, 2], 3]}\n")
    with pytest.raises(UserError, match="mixes lists and single values"):
        sw.build_grid(sw.load_grid_file(path))


def test_one_run_refuses_several_values_and_names_the_rule(cli, tmp_path):
    out = cli("run", "--method", "cb_focal", "--dataset", "synthetic", "--preset", "tiny", "--set", "focal_gamma=1,2",
              "--results", str(tmp_path), expect=2)
    assert "gives 2 values (1, 2)" in out.output and "ltbench sweep" in out.output and "|" in out.output
    assert not (tmp_path / "runs").exists()
    with pytest.raises(UserError, match=r"milestones holds a tuple.*\| separates the values"):
        resolve.make_config("cb_focal", "synthetic", sets=["milestones=1,2;1"])
    assert resolve.make_config("cb_focal", "synthetic", sets=["milestones=1,2"]).hparams["milestones"] == [1, 2]


def test_dry_run_shows_the_axes_their_counts_and_each_cells_values(cli, tmp_path):
    out = cli("sweep", "--methods", "cb_focal,erm_cnn", "--datasets", "synthetic", "--preset", "tiny", "--set",
              "workers=0", "--set", "cb_focal:focal_gamma=1,2", "--set", "lr=0.1|0.05", "--results", str(tmp_path),
              "--dry-run").output
    assert "x cb_focal:focal_gamma 1 | 2 (2) x lr 0.1 | 0.05 (2) = 6 cell(s) -> 6 run(s)" in out
    assert "focal_gamma=2 lr=0.05" in out and re.search(r"^run id .* seed +set +role", out, re.M)
    assert not (tmp_path / "runs").exists()


def test_tune_writes_the_values_of_a_tuple_field_as_a_sweep_does():
    [domain] = parse_space(["milestones=choice(1,2|1)"])
    assert domain.args == ("1,2", 1)
    spec = TuneSpec("cb_focal", "synthetic", None, (domain,), preset="tiny")
    assert trial_config(spec, {"milestones": "1,2"}, 0).hparams["milestones"] == [1, 2]
    [from_yaml] = parse_space([], {"milestones": [[1, 2], [1]]})
    assert from_yaml == domain


def _finish(results: Path, config, top1: float) -> None:
    """A finished run folder of a planned config (the report reads only these files)."""
    folder = results / "runs" / config.run_id
    folder.mkdir(parents=True)
    groups = {"many": None, "medium": top1, "few": top1}
    main = {"top1": top1, "per_class": [top1] * 10, "counts": groups, "paper": groups}
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    (folder / "result.json").write_text(json.dumps({
        "run_id": config.run_id, "config": config.to_dict(), "method": config.method, "dataset": config.dataset,
        "class_counts": [10] * 10, "final": {"epoch": 2, "heads": {"main": main}}}))
    (folder / "DONE").write_text("")


def test_report_labels_rows_by_the_swept_key(tmp_path):
    plan = _plan(tmp_path, ["focal_gamma=0.5,2"])
    for k, job in enumerate(plan.jobs.values()):
        _finish(tmp_path, job.config, 40.0 + k)
    runs = runset.load_runs(tmp_path)
    table = rp.build_table(rp.aggregate(runs), runs, runset.ReportOptions())
    assert sorted(label for label, _, _ in table.rows) == ["cb_focal (focal_gamma=0.5)", "cb_focal (focal_gamma=2)"]
