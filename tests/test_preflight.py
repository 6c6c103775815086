"""Before training: the resolved recipe in one line, the projected wall time, and the --yes guard on a CPU.

The long runs here are never trained: a CNN recipe with tens of thousands of epochs on synthetic is projected (its
ResNet-32 timed in well under a second) and refused. Tiny runs are not timed at all.
"""

from __future__ import annotations

import pytest

from ltbench import preflight
from ltbench.errors import UserError
from ltbench.resolve import make_config
from ltbench.runtime import Runtime

LONG = ["--method", "erm_cnn", "--dataset", "synthetic", "--preset", "tiny", "--epochs", "100000", "--device", "cpu"]


def _runtime(tmp_path, **kw) -> Runtime:
    return Runtime(results=tmp_path, device="cpu", **kw)


def test_the_paper_recipe_is_one_line_with_what_makes_it_long(tmp_path):
    line = preflight.recipe_line(make_config("erm_vit", "synthetic"), _runtime(tmp_path, threads=2))
    for part in ("erm_vit on synthetic rho=10", "preset paper", "1200 epochs of 812 images", "vit-768x12@224/16",
                 "batch 1024", "8 loader workers", "cpu, 2 thread(s)"):
        assert part in line
    assert "\n" not in line


def test_a_long_cpu_run_is_refused_without_yes_and_nothing_is_written(cli, tmp_path):
    out = cli("run", *LONG, "--results", str(tmp_path), expect=2).output
    text = " ".join(out.split())
    assert "recipe: erm_cnn on synthetic" in text and "100000 epochs" in text
    assert "projected: at least" in text and "resnet32@32 timed on" in text
    assert "Pass --yes" in text and "fewer --epochs" in text and "Nothing was written" in text
    assert "--preset tiny" not in text  # it is tiny already
    assert not (tmp_path / "runs").exists()


def test_a_long_sweep_is_refused_before_ray_starts(cli, tmp_path):
    out = cli("sweep", "--methods", "erm_cnn", "--datasets", "synthetic", "--seeds", "0,1", "--preset", "tiny",
              "--epochs", "100000", "--device", "cpu", "--results", str(tmp_path), expect=2).output
    assert "This sweep (2 runs to train)" in " ".join(out.split()) and "Pass --yes" in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sweeps").exists()


def test_yes_or_an_answer_lets_it_start(tmp_path):
    config = make_config("erm_cnn", "synthetic", preset="tiny", epochs=100000)
    stages = preflight.stages_to_train([config], tmp_path)
    projection = preflight.project(stages, _runtime(tmp_path, threads=1))
    assert projection.hours > preflight.CPU_LIMIT_HOURS and projection.probed == {"resnet32@32": 16}
    preflight.check_length(projection, yes=True, ask=None, what="it")
    preflight.check_length(projection, yes=False, ask=lambda question: "Train anyway?" in question, what="it")
    with pytest.raises(UserError, match="--yes"):
        preflight.check_length(projection, yes=False, ask=lambda question: False, what="it")
    two_hours = preflight.Stage(make_config("erm_cnn", "synthetic"), epochs=200, images=1, flops_per_image=1.0,
                                seconds_per_image=7200.0)
    paper = preflight.Projection([two_hours], "cpu", threads=1)
    with pytest.raises(UserError, match=r"--preset tiny \(the CPU-sized recipe\)"):  # the paper recipe: tiny is named
        preflight.check_length(paper, yes=False, ask=None, what="it")
    unmeasured = preflight.project(stages, _runtime(tmp_path), timed=False)  # --yes: not timed
    assert unmeasured.hours is None and "not timed: --yes" in unmeasured.text()


def test_tiny_runs_are_not_timed_and_pass(tmp_path):
    projection = preflight.project(preflight.stages_to_train(
        [make_config("erm_vit", "synthetic", preset="tiny", sets=["workers=0"])], tmp_path), _runtime(tmp_path))
    assert projection.clearly_small and projection.hours is None and not projection.probed
    assert "so not timed" in projection.text()
    preflight.check_length(projection, yes=False, ask=None, what="it")


def test_the_stages_are_the_pipeline_and_their_compute_follows_the_recipe(tmp_path):
    student = make_config("deitlt", "synthetic", preset="tiny", epochs=4)
    stages = preflight.stages_to_train([student], tmp_path, stop_after=3)
    assert [s.config.method for s in stages] == ["paco", "deitlt"]  # its teacher (paco_sam) first
    assert [s.epochs for s in stages] == [2, 3]  # the teacher's 2; a time-boxed call trains at most its 3
    plain = preflight.stages_to_train([make_config("ldam_drw", "synthetic", preset="tiny")], tmp_path)[0]
    sam = preflight.stages_to_train([make_config("ldam_drw", "synthetic", preset="tiny_sam")], tmp_path)[0]
    assert sam.flops_per_image == 2 * plain.flops_per_image  # SAM's second pass
    longer = preflight.stages_to_train([make_config("ldam_drw", "synthetic", preset="tiny", epochs=4)], tmp_path)[0]
    assert longer.flops == 2 * plain.flops and plain.epochs == 2


def test_the_option_help_states_the_limit():
    from ltbench.cli import run

    [yes] = [p for p in run.params if p.name == "yes"]
    assert f"past {preflight.CPU_LIMIT_HOURS:g} h" in yes.help
