"""``erm_vit``: a Vision Transformer trained from scratch with cross-entropy and DeiT's augmentation.

The ViT baseline of the DeiT-LT paper (its "ViT" rows): timm's VisionTransformer, RandAugment
``rand-m9-mstd0.5-inc1``, Mixup 0.8 / CutMix 1.0 with label smoothing 0.1, random erasing 0.25,
AdamW (wd 0.05, no decay on 1-D parameters, position embedding and tokens), lr 5e-4 per 512 images,
5 warm-up epochs and a cosine schedule stepped at fractional epochs, fp16 autocast with a GradScaler on a GPU.
As the released code (timm's ``create_transform``), inputs are normalised with ImageNet's mean/std on every
dataset, CIFAR included (``normalize=dataset`` for the dataset's own); a distilled student's CNN teacher
receives this same tensor. ``deit`` and ``deitlt``
extend this class with the distillation token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from ltbench import augment
from ltbench.config import TrainHparams, check
from ltbench.data import IMAGENET_MEAN, IMAGENET_STD, DatasetInfo
from ltbench.exported import NetworkExport
from ltbench.method import Method
from ltbench.models import vit, vit_architecture
from ltbench.seeding import seed_hash


@dataclass
class ViTHparams(TrainHparams):
    # model
    img_size: int = 224  # CIFAR images are upsampled to this size (DeiT-LT's protocol)
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    drop_path: float = 0.1
    # augmentation
    augment: str = "deit"  # deit | none (no per-image augmentation: an ablation, and deterministic tests)
    # Input normalisation: "imagenet" mean/std on every dataset, as the released code (timm's create_transform,
    # also what its CIFAR teacher is fed) | "dataset": the dataset's own statistics
    normalize: str = "imagenet"
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    crop_scale_min: float = 0.08
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    # images per Mixup lambda / CutMix box: the released per-GPU batch of 128, whatever the devices or
    # micro-batches here (0 = one per micro-batch)
    mixup_batch: int = 128
    drop_last: bool = False  # the released loader trains the last partial batch
    # optimisation (DeiT defaults)
    epochs: int = 1200
    batch_size: int = 1024
    optimizer: str = "adamw"
    lr: float = 5e-4
    lr_base_batch: int = 512
    weight_decay: float = 0.05
    sched: str = "cosine"
    sched_per_step: bool = True
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    precision: str = "fp16"  # the released DeiT / DeiT-LT code: fp16 autocast with a GradScaler

    def validate(self) -> None:
        super().validate()
        check(self.img_size % self.patch_size == 0, "img_size must be a multiple of patch_size")
        check(self.embed_dim % self.num_heads == 0, "embed_dim must be a multiple of num_heads")
        check(0 <= self.smoothing < 1, "smoothing must be in [0, 1)")
        check(self.mixup_batch >= 0, "mixup_batch must be >= 0 (0 = one lambda per micro-batch)")
        check(self.augment in {"deit", "none"}, f"augment must be deit or none, not {self.augment!r}")
        check(self.normalize in {"imagenet", "dataset"}, f"normalize must be imagenet or dataset, not "
                                                          f"{self.normalize!r}")

    def inert_fields(self) -> tuple[str, ...]:
        unused_augment = ("auto_augment", "re_prob", "crop_scale_min") if self.augment == "none" else ()
        # label smoothing comes only with Mixup/CutMix: without them the released code trains plain cross-entropy
        unused_mixing = ("mixup_prob", "mixup_switch_prob", "mixup_batch", "smoothing") \
            if self.mixup <= 0 and self.cutmix <= 0 else ()
        return (*super().inert_fields(), *unused_augment, *unused_mixing)


DEIT_B = {"img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12}
# Presets shared by the ViT family (erm_vit, deit, deitlt); methods add their own fields.
VIT_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # deitlt.md §4: DeiT-B/16 at 224 from scratch, effective batch 1024 (CIFAR) / 2048 (large datasets) through
    # accumulation; the released code scales lr by the per-step batch without accumulation (256 -> 2.5e-4 on CIFAR).
    "paper": {
        "*": {**DEIT_B, "epochs": 1200, "warmup_epochs": 5, "batch_size": 1024, "lr_scale_batch": 256,
              "repeated_aug": 3, "ema_decay": 0.99996, "workers": 8},
        "imagenetlt": {"epochs": 1400, "batch_size": 2048, "lr_scale_batch": 512},
        "inat2018": {"epochs": 1000, "batch_size": 2048, "lr_scale_batch": 512},
    },
    # GPU validation: the native 32 px input with patch 4 (64 tokens), a DeiT-S-width encoder of 6 blocks,
    # 60 epochs; a short schedule wants a higher lr than the 1200-epoch recipe (1e-3 per 512 images). Not the
    # paper recipe at fewer epochs (model, batch and lr differ), so its warm-up stays 5 epochs.
    "short": {"*": {"img_size": 32, "patch_size": 4, "embed_dim": 384, "depth": 6, "num_heads": 6, "epochs": 60,
                    "warmup_epochs": 5, "batch_size": 256, "lr": 1e-3, "drop_path": 0.1, "workers": 8,
                    "eval_every": 5}},
    # CPU-sized: about 0.2M parameters at 32 px; an epoch of CIFAR-10-LT in about a minute on 2 cores.
    "tiny": {"*": {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2, "epochs": 10,
                   "batch_size": 128, "lr": 2e-3, "drop_path": 0.0, "warmup_epochs": 1, "crop_scale_min": 0.35,
                   "workers": 2}},
}


class ERMViT(Method):
    """ViT from scratch, cross-entropy on Mixup/CutMix-ed, RandAugment-ed images."""

    display_name = "ERM-ViT"  # how papers write it (figure titles, legends)

    name = "erm_vit"
    Hparams = ViTHparams
    batch_structure = "(x, soft_targets, y)"  # Mixup/CutMix (or smoothed one-hot) targets, hard labels
    presets = VIT_PRESETS
    default_preset = "paper"
    distilled = False

    def __init__(self, hp: ViTHparams, info, device, upstream) -> None:
        super().__init__(hp, info, device, upstream)
        self.model = vit(num_classes=info.num_classes, img_size=hp.img_size, patch_size=hp.patch_size,
                         embed_dim=hp.embed_dim, depth=hp.depth, num_heads=hp.num_heads, drop_path=hp.drop_path,
                         distilled=self.distilled)
        self.mixup = self._make_mixup()
        self.soft_ce = SoftTargetCrossEntropy()

    def _make_mixup(self) -> Mixup | None:
        hp = self.hp
        if hp.mixup <= 0 and hp.cutmix <= 0:
            return None
        return Mixup(mixup_alpha=hp.mixup, cutmix_alpha=hp.cutmix, prob=hp.mixup_prob, switch_prob=hp.mixup_switch_prob,
                     mode="batch", label_smoothing=hp.smoothing, num_classes=self.info.num_classes)

    def input_info(self) -> DatasetInfo:
        """The dataset facts the input pipelines use: with ``normalize=imagenet`` ImageNet's mean/std."""
        if self.hp.normalize == "dataset":
            return self.info
        return dataclasses.replace(self.info, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def train_transform(self) -> Callable:
        if self.hp.augment == "none":
            return augment.resize_eval(self.input_info(), self.hp.img_size)
        return augment.deit_train(self.input_info(), self.hp.img_size, self.hp.auto_augment, self.hp.re_prob,
                                  scale=(self.hp.crop_scale_min, 1.0))

    def eval_transform(self) -> Callable:
        return augment.resize_eval(self.input_info(), self.hp.img_size)

    def mixing_active(self) -> bool:
        return self.mixup is not None

    def prepare(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mix once per step, one lambda and CutMix box per ``mixup_batch`` images of the global batch; returns
        (images, soft targets, hard labels).

        Chunk j holds images [j·mixup_batch, (j+1)·mixup_batch) of the global batch, wherever its micro-batches
        and processes cut it (``batch_position``). The micro-batch is cut at the chunk boundaries and each piece
        is mixed with the draws seeded by (step, j): the pieces of a chunk split across micro-batches or devices
        get the same lambda, the same CutMix-or-Mixup choice and the same box coordinates. Partners stay within
        a piece: timm pairs image i of a piece of P images with image P − 1 − i (a whole chunk pairs exactly as a
        released per-GPU batch); a piece of an odd number of images stays unmixed, as timm needs pairs.
        ``mixup_batch=0`` draws once per micro-batch.
        """
        if not self.mixing_active():  # released: plain CrossEntropyLoss when Mixup and CutMix are off
            return x, F.one_hot(y, self.info.num_classes).float(), y
        position = self.batch_position
        key = position.key()  # hashed only while mixing: the engine's hot path does not pay for it
        mixed = [self._mix(x[start:end], y[start:end], seed_hash(key, chunk_index))
                 for chunk_index, start, end in self._pieces(position.offset, len(y))]
        return torch.cat([m[0] for m in mixed]), torch.cat([m[1] for m in mixed]), y

    def _pieces(self, offset: int, size: int) -> list[tuple[int, int, int]]:
        """(global chunk index, start, end) of the pieces of the micro-batch at ``offset`` of the global batch."""
        chunk = self.hp.mixup_batch
        if not chunk:  # one draw per micro-batch
            return [(offset // size, 0, size)]
        pieces, start = [], 0
        while start < size:
            end = min(size, start + chunk - (offset + start) % chunk)  # the next chunk boundary or the end
            pieces.append(((offset + start) // chunk, start, end))
            start = end
        return pieces

    def _mix(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if len(y) % 2:  # timm mixes image i with B-1-i: an odd piece (last partial batch, split chunk) stays unmixed
            return x, _smooth_one_hot(y, self.info.num_classes, self.hp.smoothing)
        state = np.random.get_state()  # timm draws lambda and the CutMix box from numpy's global generator
        np.random.seed(seed)
        try:
            return self.mixup(x, y)
        finally:
            np.random.set_state(state)

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, soft, _ = batch
        return self.soft_ce(self.model(x), soft), {}

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"main": self.model(x)}

    def export(self) -> NetworkExport:
        hp = self.hp
        architecture = vit_architecture(num_classes=self.info.num_classes, img_size=hp.img_size,
                                        patch_size=hp.patch_size, embed_dim=hp.embed_dim, depth=hp.depth,
                                        num_heads=hp.num_heads, distilled=self.distilled)
        return NetworkExport(self.model, architecture, hp.img_size, heads={"main": "the head on the CLS token"})


def _smooth_one_hot(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return F.one_hot(y, num_classes).float() * (1.0 - smoothing) + off
