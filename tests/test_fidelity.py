"""Defaults that match the released DeiT-LT / LDAM-DRW / PaCo code (issue #12, docs/fidelity.md)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ltbench import engine, resolve, stages
from ltbench.augment import MicroBatchSampler
from ltbench.data import IMAGENET_MEAN, frequency_order
from ltbench.errors import UserError
from ltbench.method import BatchPosition
from ltbench.registry import METHODS
from ltbench.runtime import Runtime
from ltbench.stages import build_trainer
from ltbench.teacher import teacher_input
from tests.conftest import FAST_VIT

SMALL_DATA = ["data.n_max=40", "data.n_test=4", "data.num_classes=10", "data.rho=4"]


def _method(name: str, sets=(), preset: str = "tiny"):
    config = resolve.make_config(name, "synthetic", preset=preset, sets=[*SMALL_DATA, *sets])
    data = stages.load_data(config, Runtime(results=None, data_root=None, device="cpu"))
    return METHODS.get(name)(resolve.hparams_of(config), data.info, torch.device("cpu"), {}), data


def test_teacher_resize_defaults_to_no_antialiasing():
    """DeiT-LT: transforms.Resize(32, bicubic) on a tensor batch under torchvision 0.15 does not antialias."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    want = F.interpolate(x, size=(32, 32), mode="bicubic", antialias=False, align_corners=False)
    assert METHODS.get("deitlt").Hparams().teacher_antialias is False
    assert torch.equal(teacher_input(x, 32), want)
    assert not torch.allclose(teacher_input(x, 32, antialias=True), want, atol=1e-3)
    assert teacher_input(x, 64) is x


@pytest.mark.parametrize("method", ["erm_vit", "deit", "deitlt"])
def test_vit_inputs_use_imagenet_statistics_unless_asked(method):
    assert METHODS.get(method).Hparams().normalize == "imagenet"
    vit, data = _method("erm_vit")  # deit/deitlt build their input pipelines through ERMViT's
    assert tuple(vit.train_transform().transforms[-2].mean.tolist()) == pytest.approx(IMAGENET_MEAN)
    assert tuple(vit.eval_transform().transforms[-1].mean) == pytest.approx(IMAGENET_MEAN)
    own, _ = _method("erm_vit", sets=["normalize=dataset"])
    assert tuple(own.eval_transform().transforms[-1].mean) == pytest.approx(data.info.mean)


def test_mixup_stays_on_through_drw_on_the_large_datasets_only():
    for preset in ("paper", "short", "tiny"):
        for dataset, rho, keeps in (("cifar10lt", 100, False), ("imagenetlt", None, True), ("inat2018", None, True)):
            hp = resolve.make_config("deitlt", dataset, rho=rho, preset=preset).hparams
            assert hp["mixup_after_drw"] is keeps, (preset, dataset)


def test_vit_trains_the_last_partial_batch():
    """CIFAR-100-LT: 10,752 images per repeated-augmentation epoch; the released loader trains all of them."""
    hp = resolve.make_config("erm_vit", "cifar100lt", rho=100, preset="paper").hparams
    sampler = MicroBatchSampler(range(10752), hp["batch_size"], 128, drop_last=hp["drop_last"])
    assert hp["drop_last"] is False and [size for _, size in sampler.steps][-1] == 512 and len(sampler.steps) == 11


class _Labelled:
    """A training split of ``n`` images, as far as the engine's step count looks at it."""

    def __init__(self, n: int) -> None:
        self.labels = np.zeros(n, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)


@pytest.mark.parametrize(("n", "batch", "world", "drop_last"),
                         [(10752, 1024, 1, False), (1025, 1024, 4, False), (1027, 1024, 4, False),
                          (1030, 256, 8, False), (1030, 256, 8, True), (100, 256, 1, True)])
def test_scheduled_steps_equal_the_steps_the_sampler_draws(n, batch, world, drop_last):
    """The per-step lr schedule is built for exactly the updates an epoch makes, on any number of processes."""
    fake = SimpleNamespace(data=SimpleNamespace(train=_Labelled(n)), hp=SimpleNamespace(
        batch_size=batch, drop_last=drop_last, repeated_aug=1), dist=SimpleNamespace(world=world),
        _sampler=lambda: "instance")
    drawn = len(MicroBatchSampler(range(n), batch, batch // world, drop_last, world=world).steps)
    assert engine.Trainer._steps_per_epoch(fake) == max(1, drawn)


def test_without_mixing_the_cls_loss_is_plain_cross_entropy():
    """Released main.py: SoftTargetCrossEntropy with Mixup (smoothing folded in), else nn.CrossEntropyLoss()."""
    model, _ = _method("erm_vit", FAST_VIT)  # FAST_VIT turns Mixup and CutMix off
    y = torch.tensor([0, 3, 9])
    _, soft, hard = model.prepare(torch.randn(3, 3, 32, 32), y)  # the prepare of every ViT student
    assert torch.equal(soft, F.one_hot(y, 10).float()) and torch.equal(hard, y)
    for method in ("erm_vit", "deit", "deitlt"):  # smoothing is inert without mixing: one experiment, one run id
        assert len({resolve.make_config(method, "synthetic", preset="tiny", sets=[*FAST_VIT, f"smoothing={s}"]).run_id
                    for s in (0.0, 0.1, 0.3)}) == 1
    assert len({resolve.make_config("erm_vit", "synthetic", preset="tiny", sets=[f"smoothing={s}"]).run_id
                for s in (0.0, 0.1)}) == 2  # with Mixup it matters


MIX_IN_CHUNKS_OF_4 = [*FAST_VIT, "mixup=0.8", "cutmix=1.0", "mixup_batch=4", "smoothing=0"]


def test_mixup_draws_per_chunk_of_the_released_per_gpu_batch():
    vit, _ = _method("erm_vit", sets=MIX_IN_CHUNKS_OF_4)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    vit.batch_position = BatchPosition(7, 0, 0, 0)
    whole = vit.prepare(x.clone(), y)
    assert whole[1][0, 3] > 0 and whole[1][0, 7] == 0  # image 0 is mixed with 3 (its chunk), not 7 (the batch end)
    halves = []
    for offset, part, label in zip((0, 4), x.split(4), y.split(4)):  # two micro-batches, or two devices
        vit.batch_position = BatchPosition(7, 0, 0, offset)
        halves.append(vit.prepare(part.clone(), label))
    assert torch.equal(whole[0], torch.cat([h[0] for h in halves]))
    assert torch.equal(whole[1], torch.cat([h[1] for h in halves]))
    vit.batch_position = BatchPosition(7, 0, 1, 0)  # another step: other draws
    assert not torch.equal(vit.prepare(x.clone(), y)[1], whole[1])


def test_a_chunk_split_across_micro_batches_keeps_its_lambda_and_box():
    """Chunks of 4 in a global batch of 12 cut into micro-batches of 6: chunk 1 (images 4-7) is split 2 + 2."""
    vit, _ = _method("erm_vit", sets=MIX_IN_CHUNKS_OF_4)
    x, y = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(12) % 10
    out, soft = {}, {}
    for micro in (12, 6):
        parts = []
        for offset in range(0, 12, micro):
            vit.batch_position = BatchPosition(3, 2, 5, offset)
            parts.append(vit.prepare(x[offset:offset + micro].clone(), y[offset:offset + micro]))
        out[micro], soft[micro] = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    # with smoothing 0 an image's own label weighs its lambda (labels are distinct within a chunk)
    lam = {micro: soft[micro][torch.arange(12), y] for micro in out}
    per_chunk = lam[12].view(3, 4)
    assert torch.equal(per_chunk, per_chunk[:, :1].expand(3, 4)) and (per_chunk < 1).all()  # one lambda per chunk
    assert len(set(per_chunk[:, 0].tolist())) == 3  # three draws
    assert torch.equal(lam[6], lam[12])  # every image keeps its global chunk's lambda, split or not
    assert torch.equal(out[6] != x, out[12] != x)  # and its chunk's box (under Mixup every pixel changes)
    for whole in (slice(0, 4), slice(8, 12)):  # chunks 0 and 2 are whole in either split: identical mixes
        assert torch.equal(out[6][whole], out[12][whole]) and torch.equal(soft[6][whole], soft[12][whole])
    # partners stay within a piece: image 4 pairs with 7 in the whole chunk, with 5 in the piece 4-5
    assert soft[12][4, y[7]] == 1 - lam[12][4] and soft[6][4, y[5]] == 1 - lam[6][4]


def test_engine_positions_micro_batches_in_the_global_batch(tmp_path):
    """One step of 8 images as one micro-batch or two of 4: the same Mixup draws, hence the same loss."""
    config = resolve.make_config("erm_vit", "synthetic", preset="tiny", sets=[*SMALL_DATA, *MIX_IN_CHUNKS_OF_4])
    x, y = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 10
    losses = []
    for micro in (8, 4):
        runtime = Runtime(results=tmp_path, data_root=tmp_path, device="cpu", micro_batch=micro)
        trainer = build_trainer(config, runtime, {})
        parts = [(x[i:i + micro].clone(), y[i:i + micro]) for i in range(0, 8, micro)]
        losses.append(float(trainer.step(parts, 0, global_size=8, index=3)["loss"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_frequency_order_is_numpy_124s_unstable_argsort_with_ties():
    counts = [7, 3, 7, 7, 1, 3, 9, 7, 3, 3, 1, 7, 9, 3, 7, 1, 3, 7, 9, 1, 3, 7, 3, 1]
    # np.argsort(-np.array(counts)) under numpy 1.24.3 (DeiT-LT's environment.yml); a stable sort gives 6, 12, 18
    assert frequency_order(counts).tolist() == [18, 12, 6, 0, 21, 17, 14, 11, 3, 2, 7, 8, 9, 22, 5, 13, 16, 20,
                                                1, 10, 4, 15, 19, 23]
    assert frequency_order([5, 9, 5, 1, 9]).tolist() == [1, 4, 0, 2, 3]  # up to 16 classes: insertion sort


def test_precision_defaults_follow_the_released_code():
    for method in ("erm_cnn", "ldam_drw", "paco"):
        for preset in ("paper", "sam"):
            assert resolve.make_config(method, "cifar10lt", rho=100, preset=preset).hparams["precision"] == "fp32"
    for method in ("erm_vit", "deit", "deitlt"):
        assert resolve.make_config(method, "cifar10lt", rho=100, preset="paper").hparams["precision"] == "fp16"
    cuda = torch.device("cuda")
    assert [engine.autocast_dtype(cuda, p) for p in ("bf16", "fp16", "fp32")] == [torch.bfloat16, torch.float16, None]
    assert engine.autocast_dtype(torch.device("cpu"), "fp16") is None
    with pytest.raises(UserError, match="fp16 cannot be combined with SAM"):
        resolve.make_config("ldam_drw", "cifar10lt", rho=100, preset="sam", sets=["precision=fp16"])


def test_fp16_trains_with_a_grad_scaler(tmp_path, monkeypatch):
    """The GPU's fp16 path (autocast + GradScaler), run on the CPU, where torch supports both."""
    monkeypatch.setattr(engine, "autocast_dtype", lambda device, precision: torch.float16)
    config = resolve.make_config("erm_vit", "synthetic", preset="tiny", epochs=1,
                                sets=[*FAST_VIT, *SMALL_DATA, "batch_size=16"])
    runtime = Runtime(results=tmp_path, data_root=tmp_path, device="cpu", progress=False, echo=lambda *_: None)
    trainer = build_trainer(config, runtime, {})
    before = [p.detach().clone() for p in trainer.method.trainable().parameters()]
    x, y = next(iter(trainer._train_batches(0)))
    losses = [float(trainer.step([(x, y)], 0)["loss"]) for _ in range(3)]
    assert trainer.scaler is not None and np.isfinite(losses).all()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.method.trainable().parameters()))
    assert trainer.state(1)["scaler"]["scale"] > 0
