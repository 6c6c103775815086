"""The shared engine: run folders, resume after interruption, idempotence, checkpoints."""

from __future__ import annotations

import json

import torch

from ltbench import stages
from ltbench.engine import Runtime
from ltbench.records import run_record
from tests.conftest import FAST_VIT

SETS = [*FAST_VIT, "data.n_max=60", "data.n_test=6", "data.num_classes=4", "batch_size=32", "eval_every=1"]


def _runtime(tmp_path, **kw) -> Runtime:
    return Runtime(results=tmp_path / "results", data_root=tmp_path, device="cpu", progress=False,
                   echo=lambda *_: None, **kw)


def _config(epochs=3):
    return stages.make_config("erm_vit", "synthetic", preset="tiny", epochs=epochs, sets=SETS + ["mixup=0.8"])


def test_run_folder_contents(tmp_path):
    record = stages.ensure(_config(epochs=2), _runtime(tmp_path))
    names = {p.name for p in record.path.iterdir() if not p.name.startswith(".")}
    assert {"config.json", "env.json", "metrics.jsonl", "checkpoint.pt", "result.json", "DONE"} <= names
    result = record.result()
    assert result["final"]["epoch"] == 1 and result["best"]["epoch"] in (0, 1)
    assert set(result["final"]["heads"]["main"]) >= {"top1", "per_class", "ece", "counts", "paper"}
    assert result["images_per_s"] > 0 and result["parameters"] > 0 and result["class_counts"][0] == 60
    assert len(record.metrics()) == 2
    ckpt = torch.load(record.checkpoint_path, weights_only=True)  # loads without unpickling code
    assert ckpt["epoch"] == 2 and "model" in ckpt["modules"]
    env = json.loads((record.path / "env.json").read_text())
    assert env["torch"] == torch.__version__


def test_resume_equals_uninterrupted(tmp_path):
    config = _config(epochs=3)
    full = stages.ensure(config, _runtime(tmp_path / "a"))
    partial_rt = _runtime(tmp_path / "b", stop_after_epochs=1)
    partial = stages.ensure(config, partial_rt)
    assert not partial.done and partial.load_checkpoint()["epoch"] == 1
    resumed = stages.ensure(config, _runtime(tmp_path / "b"))
    assert resumed.done
    a, b = full.result(), resumed.result()
    assert a["final"]["heads"] == b["final"]["heads"] and a["best"] == b["best"]
    sa, sb = full.load_checkpoint()["modules"]["model"], resumed.load_checkpoint()["modules"]["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["epoch"] for r in resumed.metrics()] == [0, 1, 2]


def test_same_config_is_a_no_op(tmp_path):
    config = _config(epochs=1)
    rt = _runtime(tmp_path)
    first = stages.ensure(config, rt)
    stamp = (first.path / "result.json").stat().st_mtime_ns
    second = stages.ensure(config, rt)
    assert second.path == first.path == run_record(rt.results, config).path
    assert (second.path / "result.json").stat().st_mtime_ns == stamp


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Micro-batches x accumulation = the same update as the whole batch (a ViT has no BatchNorm)."""
    config = stages.make_config("erm_vit", "synthetic", preset="tiny", epochs=1,
                                sets=SETS + ["drop_last=false", "sched=multistep", "warmup_epochs=0", "optimizer=sgd"])
    one = stages.ensure(config, _runtime(tmp_path / "one"))
    accum = stages.ensure(config, _runtime(tmp_path / "accum", micro_batch=8))
    sa, sb = one.load_checkpoint()["modules"]["model"], accum.load_checkpoint()["modules"]["model"]
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-5


def test_device_input_pipeline_runs_and_resumes_identically(tmp_path):
    """In-memory data augmented as batched tensor ops (the GPU path), exercised on the CPU."""
    config = stages.make_config("erm_vit", "synthetic", preset="tiny", epochs=2,
                                sets=["workers=0", "data.n_max=40", "data.n_test=4", "data.num_classes=4",
                                      "batch_size=16"])
    full = stages.ensure(config, _runtime(tmp_path / "a", augment_on="device"))
    assert full.result()["input_pipeline"] == "device"
    stages.ensure(config, _runtime(tmp_path / "b", augment_on="device", stop_after_epochs=1))
    resumed = stages.ensure(config, _runtime(tmp_path / "b", augment_on="device"))
    assert full.result()["final"]["heads"] == resumed.result()["final"]["heads"]
