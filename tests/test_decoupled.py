"""Decoupled classifiers (crt, tau_norm, lws): one stage-1 run serves all three through the upstream mechanism,
the backbone stays frozen, each head is what Kang et al. define; and the engine's class-balanced sampler."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from ltbench import augment, resolve, stages
from ltbench.engine import Trainer
from ltbench.errors import UserError
from ltbench.records import run_record
from ltbench.registry import METHODS
from ltbench.runtime import Runtime
from ltbench.stages import build_trainer

from .conftest import set_args

DATA = ["data.num_classes=4", "data.n_max=40", "data.rho=8", "data.n_test=4", "data.image_size=16"]
STAGE1 = "stage1_overrides=epochs=1,batch_size=32"
DECOUPLED = ("crt", "tau_norm", "lws")


def _runtime(results, **options) -> Runtime:
    return Runtime(results=results, data_root=results, device="cpu", progress=False, echo=lambda *_: None, **options)


def _config(method: str, *extra: str):
    return resolve.make_config(method, "synthetic", preset="tiny", sets=[*DATA, STAGE1, "batch_size=16", *extra])


def _trainer(method: str, results, *extra: str, **runtime_options) -> Trainer:
    config = _config(method, *extra)
    runtime = _runtime(results, **runtime_options)
    upstream = stages.resolve_upstream(config, runtime, train=True)
    return build_trainer(config, runtime, upstream, record=run_record(results, config))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tmp_path_factory.mktemp("decoupled")


def _train_steps(trainer: Trainer, steps: int = 4) -> None:
    trainer.method.trainable().train()
    for _, (x, y) in zip(range(steps), trainer._train_batches(0)):
        trainer.step([(x, y)], epoch=0)


def _stage1_modules(method) -> dict[str, torch.Tensor]:
    return method.upstream["stage1"].record.load_checkpoint()["modules"]["model"]


def test_one_stage1_run_serves_crt_tau_norm_and_lws(results):
    stage1 = {METHODS.get(m).requires(_config(m))["stage1"].run_id for m in DECOUPLED}
    assert len(stage1) == 1
    records = [stages.ensure(_config(m), _runtime(results)) for m in DECOUPLED]
    runs = sorted(p.name for p in (results / "runs").iterdir())
    assert len(runs) == 4 and stage1 <= set(runs)  # three stage-2 runs and a single stage-1 run
    for record in records:
        assert record.done and record.result()["upstream"]["stage1"]["run_id"] == next(iter(stage1))
    assert records[1].result()["final"]["epoch"] == 0 and records[1].load_checkpoint() is not None  # tau_norm


def test_crt_trains_a_fresh_linear_head_on_the_frozen_backbone(results):
    trainer = _trainer("crt", results)
    stage1 = _stage1_modules(trainer.method)
    assert not torch.equal(trainer.method.model.weight, stage1["fc.weight"])  # re-initialised
    _train_steps(trainer)
    backbone = trainer.method.backbone.state_dict()
    assert all(torch.equal(value, stage1[f"backbone.{key}"]) for key, value in backbone.items())  # BN stats too
    assert sorted(trainer.method.state_modules()) == ["model"] and list(trainer.method.model.state_dict()) == \
        ["weight", "bias"]


def test_tau_norm_divides_class_vectors_by_norm_to_the_tau_and_drops_the_bias(results):
    method = _trainer("tau_norm", results, "tau=0.5").method
    weight = _stage1_modules(method)["fc.weight"]
    expected = weight / weight.norm(dim=1, keepdim=True).sqrt()
    torch.testing.assert_close(method.model.weight.detach(), expected)
    x = torch.randn(5, 3, 16, 16)
    method.backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(method.predict(x)["main"], method.backbone(x) @ expected.t())


def test_lws_learns_only_per_class_scales_of_the_frozen_classifier(results):
    trainer = _trainer("lws", results)
    _train_steps(trainer)
    head, stage1 = trainer.method.model, _stage1_modules(trainer.method)
    assert torch.equal(head.classifier.weight, stage1["fc.weight"]) and torch.equal(head.classifier.bias,
                                                                                  stage1["fc.bias"])
    assert not torch.equal(head.scales, torch.ones_like(head.scales))  # the scales moved
    assert [n for n, p in head.named_parameters() if p.requires_grad] == ["scales"]


def test_stage1_options_and_mismatched_inputs(results):
    assert METHODS.get("crt").requires(_config("crt", "stage1=ldam_drw"))["stage1"].method == "ldam_drw"
    assert METHODS.get("lws").requires(_config("lws", "stage1_run=abc123"))["stage1"] == "abc123"
    with pytest.raises(UserError, match="stage1 must be one of"):
        _config("crt", "stage1=resnet")
    with pytest.raises(UserError, match="stage-1 run was trained on 32 px"):
        _trainer("crt", results, "img_size=48")


@pytest.mark.parametrize(("method", "option"), [("lws", "stage1_run"), ("deit", "teacher_run")])
def test_a_stage2_run_is_refused_as_an_upstream_run(cli, results, method, option):
    crt = stages.ensure(_config("crt"), _runtime(results))
    stage1 = crt.result()["upstream"]["stage1"]["run_id"]
    before = sorted((results / "runs").iterdir())
    extra = [*DATA, "batch_size=16", f"{option}={crt.run_id}", *(["workers=0"] if method == "deit" else [])]
    out = cli("run", "--method", method, "--dataset", "synthetic", "--preset", "tiny", "--results", str(results),
              *set_args(*extra), expect=2)
    text = " ".join(out.output.split())
    assert f"run {crt.run_id} (method crt) is itself built on an upstream run (its stage1 run {stage1})" in text
    assert f"--set {option}={stage1}" in text and "Traceback" not in out.output
    assert sorted((results / "runs").iterdir()) == before  # refused before any run folder is made


# ----------------------------------------------------------------------------------------------
# Class-balanced sampling (the engine's sampler hook)


def test_class_balanced_sampler_draws_every_class_as_often_as_the_largest():
    labels = [0] * 8 + [1] * 4 + [2]
    sampler = augment.ClassBalancedSampler(labels, torch.Generator().manual_seed(0))
    order = list(sampler)
    assert len(sampler) == len(order) == 24  # max count 8 x 3 classes
    per_class = Counter(labels[i] for i in order)
    assert per_class == {0: 8, 1: 8, 2: 8}
    assert Counter(i for i in order if labels[i] == 1) == {8: 2, 9: 2, 10: 2, 11: 2}  # cycles through its members
    runs = [labels[i] for i in order]
    assert all(len(set(runs[k:k + 4])) == 1 for k in range(0, 24, 4))  # 4 consecutive samples per class visit
    assert order == list(augment.ClassBalancedSampler(labels, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_engine_epochs_are_class_balanced_on_both_input_pipelines(results, augment_on):
    trainer = _trainer("crt", results, augment_on=augment_on)
    counts = trainer.data.info.train_counts
    assert trainer.steps_per_epoch == -(-max(counts) * len(counts) // 16)
    labels = Counter()
    for _, y in trainer._train_batches(0):
        labels.update(y.tolist())
    assert labels == {c: max(counts) for c in range(len(counts))}


def test_class_balanced_sampling_refuses_repeated_augmentation():
    with pytest.raises(UserError, match="repeated_aug"):
        augment.epoch_order(10, [0] * 9 + [1], torch.Generator(), "class_balanced", repeated_aug=3)
    with pytest.raises(UserError, match="sampler must be one of"):
        augment.epoch_order(10, [0] * 10, torch.Generator(), "balanced")


@pytest.mark.parametrize(("extra", "message"), [
    (["sampler=balanced"], "sampler must be one of instance, class_balanced, not 'balanced'"),
    (["repeated_aug=3"], "sampler=class_balanced cannot be combined with repeated_aug > 1"),
])
def test_stage2_sampler_settings_are_refused_before_stage_1_trains(cli, tmp_path, extra, message):
    out = cli("run", "--method", "crt", "--dataset", "synthetic", "--preset", "tiny", "--results", str(tmp_path),
              *set_args(*DATA, *extra), expect=2)
    assert message in " ".join(out.output.split()) and "Traceback" not in out.output
    assert not (tmp_path / "runs").exists()  # refused when the config is resolved, nothing trained


def test_tau_norm_says_epochs_do_not_apply(cli, tmp_path):
    out = cli("run", "--method", "tau_norm", "--dataset", "synthetic", "--preset", "tiny", "--epochs", "2",
              "--results", str(tmp_path), expect=2)
    text = " ".join(out.output.split())
    assert "tau_norm trains nothing" in text and "--epochs does not apply" in text and "warmup" not in text
    assert "Traceback" not in out.output and not (tmp_path / "runs").exists()
    assert _config("tau_norm").hparams["warmup_epochs"] == 0


def test_bench_says_tau_norm_has_no_training_step(tmp_path):
    from ltbench.bench import bench

    with pytest.raises(UserError, match="trains nothing"):
        bench(_config("tau_norm"), _runtime(tmp_path), steps=1)
