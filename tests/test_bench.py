"""``ltbench bench`` on CPU: the report is complete and self-consistent (no wall-clock thresholds)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ltbench import resolve
from ltbench.models import vit
from tests.conftest import set_args

SMALL_DATA = ["data.n_max=80", "data.n_test=4", "data.num_classes=4", "batch_size=32"]


def _bench(cli, tmp_path, method: str, *extra: str) -> dict:
    result = cli("bench", "--method", method, "--dataset", "synthetic", "--preset", "tiny", "--steps", "2",
                 "--warmup", "1", "--device", "cpu", "--workers", "0", "--results", str(tmp_path / "results"),
                 "--json", *set_args(*SMALL_DATA), *extra)
    return json.loads(result.stdout)


def _forward_flops_per_image(config) -> float:
    hp = resolve.hparams_of(config)
    model = vit(num_classes=4, img_size=hp.img_size, patch_size=hp.patch_size, embed_dim=hp.embed_dim,
                depth=hp.depth, num_heads=hp.num_heads)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(2, 3, hp.img_size, hp.img_size))
    return counter.get_total_flops() / 2


def test_bench_reports_every_measurement(cli, tmp_path):
    report = _bench(cli, tmp_path, "erm_vit")
    assert report["method"] == "erm_vit" and report["device"] == "cpu" and report["gpu"] is None
    assert report["input_path"] == "loader" and report["global_batch"] == 32 and report["steps"] == 2
    e2e, model = report["images_per_s_end_to_end"], report["images_per_s_model_only"]
    assert e2e > 0 and model > 0
    assert report["end_to_end_over_model_only"] == pytest.approx(e2e / model)
    assert 0 <= report["data_wait_fraction"] <= 1
    assert report["step_s_end_to_end"] == pytest.approx(32 / e2e, rel=1e-6)
    # the counted step is one forward and one backward (about twice the forward) of the student
    forward = _forward_flops_per_image(resolve.make_config("erm_vit", "synthetic", preset="tiny", sets=SMALL_DATA))
    assert 2.5 * forward < report["flops_per_image"] < 3.5 * forward
    assert report["tflops_end_to_end"] == pytest.approx(report["flops_per_image"] * e2e / 1e12)
    assert report["peak_gpu_memory_gib"] is None
    steps_per_epoch = report["steps_per_epoch"]
    assert steps_per_epoch >= 1 and report["epochs"] == 10
    hours = steps_per_epoch * report["epochs"] * report["step_s_end_to_end"] / 3600
    assert report["projected_train_hours"] == pytest.approx(hours)
    # evaluation: every eval_every epochs and at the last, at the measured evaluation rate, all 16 test images
    every = report["eval_every"]
    assert report["evaluations"] == len([e for e in range(10) if (e + 1) % every == 0 or e == 9])
    eval_hours = report["evaluations"] * 16 / report["images_per_s_eval"] / 3600
    assert report["projected_eval_hours"] == pytest.approx(eval_hours)
    assert report["projected_hours"] == pytest.approx(hours + eval_hours)
    assert not (tmp_path / "results").exists()  # the bench keeps no run


def test_bench_device_augmentation_and_teacher_stand_in(cli, tmp_path):
    student = _bench(cli, tmp_path, "deit", "--augment-on", "device")
    assert student["input_path"] == "device" and student["stand_in_upstream"] == ["teacher"]
    plain = _bench(cli, tmp_path, "erm_vit", "--augment-on", "device")
    assert plain["input_path"] == "device" and plain["stand_in_upstream"] == []
    # the distilled student's step also runs the teacher and a second head
    assert student["flops_per_image"] > plain["flops_per_image"]


def test_bench_human_output(cli, tmp_path):
    result = cli("bench", "--method", "erm_vit", "--dataset", "synthetic", "--preset", "tiny", "--steps", "1",
                 "--device", "cpu", "--workers", "0", "--results", str(tmp_path), *set_args(*SMALL_DATA))
    for label in ("img/s end to end", "img/s model only", "waiting for data", "TFLOP/s", "projected training time",
                  "projected evaluation time", "projected total"):
        assert label in result.stdout
    assert cli("bench", "--method", "erm_vit", "--dataset", "synthetic", "--steps", "0", expect=2).exit_code == 2


def test_bench_pipeline_adds_the_teacher_stage(cli, tmp_path):
    teacher_sets = "teacher_overrides=batch_size=32,workers=0"
    report = _bench(cli, tmp_path, "deitlt", "--pipeline", *set_args("teacher=ldam_drw_sam", teacher_sets))
    teacher = report["upstream_benches"]["teacher"]
    assert (teacher["method"], teacher["preset"], teacher["upstream_benches"]) == ("ldam_drw", "tiny_sam", {})
    assert teacher["flops_per_image"] > 0 and teacher["projected_hours"] > 0
    assert report["pipeline_projected_hours"] == pytest.approx(report["projected_hours"] + teacher["projected_hours"])
    human = cli("bench", "--method", "deitlt", "--dataset", "synthetic", "--preset", "tiny", "--steps", "1",
                "--device", "cpu", "--workers", "0", "--results", str(tmp_path), "--pipeline",
                *set_args(*SMALL_DATA, teacher_sets)).stdout
    assert "teacher: setup" in human and "pipeline total" in human
