"""``erm_cnn``: a CNN trained with plain cross-entropy; the base class of the CNN baselines and teachers.

CIFAR recipe (LDAM-DRW's ``cifar_train.py``, baselines.md §4.3): ResNet-32 with a linear classifier,
SGD (momentum 0.9, no Nesterov) with lr 0.1 and weight decay 2e-4 on *every* parameter, batch 128,
200 epochs, lr 0.1*e/5 over the first five (1-based) epochs, x0.01 after epoch 160 and again after
180, zero-padded random crop and flip. ImageNet-LT / iNat recipe (Saddle-LongTail's, §4.4): ResNet-50
from scratch, batch 256, 90 epochs, cosine to 0 without warm-up, lr 0.2 / wd 2e-4 (ImageNet-LT) or
lr 0.1 / wd 1e-4 (iNat), RandomResizedCrop + flip + ColorJitter 0.4, resize-256/centre-crop-224 test.

The schedule is timm's, stepped once per 0-based epoch e. timm warms up linearly from ``warmup_lr``
over ``warmup_epochs`` and applies milestone m from e = m - 1, so LDAM's schedule is exactly
``warmup_epochs=4, warmup_lr=0.02, milestones=(161, 181), decay_rate=0.01`` (lr 0.02, 0.04, ..., 0.1 at
e = 4; 1e-3 from e = 160; 1e-5 from e = 180); a test checks every epoch's lr.

SAM (``--set sam_rho=R`` or the ``sam`` preset) runs in the engine: both passes in train mode, so
BatchNorm running statistics are updated twice per step, as in the reference implementation.
This run can serve as a teacher: ``result.json`` holds a ``teacher_spec`` (architecture, input size,
normalisation, class names) and ``predict`` returns the classifier's logits as ``"main"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ltbench import augment
from ltbench.cnn import BACKBONES, CLASSIFIERS, Classifier, classifier_architecture
from ltbench.config import TrainHparams, check
from ltbench.exported import NetworkExport
from ltbench.method import Method
from ltbench.resolve import layered

AUGMENTS = ("cifar", "imagenet")
LARGE_DATASETS = ("imagenetlt", "inat2018")


@dataclass
class CNNHparams(TrainHparams):
    arch: str = "resnet32"  # resnet32 (CIFAR ResNet, option-A shortcuts; resnet8: its n = 1 sibling) | resnet50
    img_size: int = 32  # network input side; 224 for ResNet-50 on the large datasets
    augment: str = "cifar"  # cifar: crop+flip | imagenet: RandomResizedCrop, flip, ColorJitter 0.4
    classifier: str = "linear"  # linear | normed (cosine)
    # LDAM-DRW's CIFAR recipe in timm's terms (see the module docstring)
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    sched: str = "multistep"
    warmup_epochs: int = 4
    warmup_lr: float = 0.02
    milestones: tuple[int, ...] = (161, 181)
    decay_rate: float = 0.01
    workers: int = 4
    precision: str = "fp32"  # LDAM-DRW, Saddle-LongTail and PaCo train in fp32; SAM's step is sensitive to rounding

    def validate(self) -> None:
        super().validate()
        check(self.arch in BACKBONES, f"arch must be one of {', '.join(BACKBONES)}, not {self.arch!r}")
        check(self.classifier in CLASSIFIERS, f"classifier must be one of {', '.join(CLASSIFIERS)}")
        check(self.augment in AUGMENTS, f"augment must be one of {', '.join(AUGMENTS)}, not {self.augment!r}")
        check(self.img_size >= 8, "img_size must be >= 8")


# Saddle-LongTail's ResNet-50 recipe for ImageNet-LT and iNat (baselines.md §4.4), shared by erm_cnn and ldam_drw.
_LARGE = {"arch": "resnet50", "img_size": 224, "augment": "imagenet", "epochs": 90, "batch_size": 256,
          "sched": "cosine", "warmup_epochs": 0, "warmup_lr": 0.0, "milestones": [], "workers": 16}
SADDLE_LARGE = {"imagenetlt": {**_LARGE, "lr": 0.2, "weight_decay": 2e-4},
                "inat2018": {**_LARGE, "lr": 0.1, "weight_decay": 1e-4}}
# GPU validation: the paper recipe at a quarter of the epochs (50 CIFAR, 24 large), applied after it as a second
# table, so every epoch point scales with it (decays at 0-based 40 and 45 of 50, warm-up 1 epoch; DRW and SAM steps).
SHORT = {"*": {"epochs": 50, "eval_every": 5, "workers": 8},
         **{name: {"epochs": 24, "workers": 16} for name in LARGE_DATASETS}}
# CPU: two epochs of ResNet-32 at a constant lr 0.02 in batches of 16 (enough steps to learn `synthetic` in two
# epochs); the large datasets at 64 px with their own augmentation.
TINY = {"*": {"epochs": 2, "batch_size": 16, "lr": 0.02, "warmup_epochs": 0, "warmup_lr": 0.0, "milestones": [],
              "workers": 0},
        **{name: {"augment": "imagenet", "img_size": 64} for name in LARGE_DATASETS}}

ERM_PAPER = layered({"*": {"workers": 8}}, SADDLE_LARGE)
# Saddle's CE+SAM radii on CIFAR (0.1 / 0.2, baselines.md §6.2); plain CE on ResNet-50 has no published radius,
# so the large datasets get Foret et al.'s ImageNet ResNet-50 radius 0.05 (a documented choice).
ERM_SAM = {"*": {"sam_rho": 0.1}, "cifar100lt": {"sam_rho": 0.2}, **{n: {"sam_rho": 0.05} for n in LARGE_DATASETS}}


class ERMCNN(Method):
    """ResNet-32 / ResNet-50 with plain cross-entropy (LDAM-DRW's CIFAR recipe, Saddle's large-dataset one)."""

    display_name = "CE"  # how papers write it (figure titles, legends)

    Hparams = CNNHparams
    presets = {
        "paper": ERM_PAPER,
        "sam": layered(ERM_PAPER, ERM_SAM),
        "short": [ERM_PAPER, SHORT],
        "short_sam": [layered(ERM_PAPER, ERM_SAM), SHORT],
        "tiny": TINY,
        "tiny_sam": layered(TINY, ERM_SAM),
    }
    default_preset = "paper"
    filter_bias_and_bn = False  # the reference code decays every parameter, BatchNorm and biases included

    def __init__(self, hp: CNNHparams, info, device, upstream) -> None:
        super().__init__(hp, info, device, upstream)
        self.model = self.build_model()

    def build_model(self) -> nn.Module:
        return Classifier(self.hp.arch, self.info.num_classes, self.hp.classifier)

    # --- input pipeline --------------------------------------------------------------------
    def train_transform(self) -> Callable:
        if self.hp.augment == "imagenet":
            return augment.imagenet_crop_jitter(self.info, self.hp.img_size)
        return augment.crop_flip(self.info)

    def eval_transform(self) -> Callable:
        if self.hp.augment == "imagenet":
            return augment.center_crop_eval(self.info, self.hp.img_size)
        return augment.resize_eval(self.info, self.hp.img_size)

    # --- training --------------------------------------------------------------------------
    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        return F.cross_entropy(self.model(x).float(), y), {}

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"main": self.model(x)}

    # --- teacher role ----------------------------------------------------------------------
    teacher_logits = "the classifier on the pooled backbone feature"

    def export(self) -> NetworkExport:
        architecture = classifier_architecture(self.hp.arch, self.info.num_classes, self.hp.classifier)
        return NetworkExport(self.model, architecture, self.hp.img_size, heads={"main": self.teacher_logits})

    def describe(self) -> dict[str, Any]:
        """What a student needs to rebuild and feed this run's network without typing shapes or paths."""
        hp, info = self.hp, self.info
        return {"teacher_spec": {
            "arch": hp.arch, "classifier": hp.classifier, "input_size": hp.img_size,
            "mean": list(info.mean), "std": list(info.std), "num_classes": info.num_classes,
            "label_space": "dataset", "class_names": list(info.class_names), "logits": self.teacher_logits,
            "modules": sorted(self.state_modules()),
        }}
