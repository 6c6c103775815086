"""``crt``: classifier re-training (Kang et al., "Decoupling Representation and Classifier for Long-Tailed
Recognition", ICLR 2020), and the stage-2 base of ``tau_norm`` and ``lws``.

Stage 1 is an ordinary finished run (``erm_cnn`` by default: plain CE, instance-balanced sampling), declared in
``requires`` exactly as DeiT-LT declares its teacher: same dataset, rho, seed and preset name, found by config hash
or trained first, once. ``crt``, ``tau_norm`` and ``lws`` with the same stage-1 settings resolve to the same run,
so one trained backbone serves all three. ``--set stage1=ldam_drw`` (any recipe name DeiT-LT's teacher accepts),
``stage1_run=RUN`` (an existing run), ``stage1_preset`` and ``stage1_overrides`` choose another.

cRT: the stage-1 backbone is frozen (eval mode: BatchNorm keeps stage 1's running statistics), a freshly
initialised linear classifier is trained on its pooled features with class-balanced sampling (the engine's
``sampler=class_balanced``: Kang's ClassAwareSampler, 4 samples per class visit, max_c n_c x C samples per epoch).
Recipe of the released ImageNet-LT stage-2 configs (baselines.md §7.3): 10 epochs, SGD momentum 0.9, lr 0.2 at
batch 512 with a cosine schedule to 0, weight decay 5e-4 (batch 512 and wd 5e-4: unconfirmed, recalled from the
configs). CIFAR-LT has no released stage-2 recipe: the same 10 epochs at batch 128 with the lr scaled linearly
(0.05), a documented choice. Differences from the released code: docs/fidelity.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from ltbench.methods.erm_cnn import ERMCNN, LARGE_DATASETS, CNNHparams
from torch import nn

from ltbench.cnn import assembled_classifier, classifier_architecture
from ltbench.config import RunConfig, check
from ltbench.errors import UserError
from ltbench.exported import NetworkExport
from ltbench.method import upstream_reference
from ltbench.resolve import layered
from ltbench.teacher import TEACHERS, FrozenTeacher, teacher_config

# the stage-1 input pipeline on the large datasets (erm_cnn's), so stage 2 sees the images stage 1 was trained on
INPUT_PAPER = {name: {"arch": "resnet50", "img_size": 224, "augment": "imagenet", "workers": 16}
               for name in LARGE_DATASETS}
INPUT_TINY = {name: {"augment": "imagenet", "img_size": 64} for name in LARGE_DATASETS}
_STAGE2 = {"epochs": 10, "batch_size": 128, "lr": 0.05, "weight_decay": 5e-4, "sched": "cosine", "warmup_epochs": 0,
           "warmup_lr": 0.0, "milestones": [], "sampler": "class_balanced", "workers": 8}
STAGE2_PAPER = layered({"*": _STAGE2}, INPUT_PAPER, {name: {"batch_size": 512, "lr": 0.2} for name in LARGE_DATASETS})
# CPU: two epochs in batches of 16 on the tiny stage-1 run (ResNet-32; 64 px on the large datasets)
STAGE2_TINY = layered({"*": {**_STAGE2, "epochs": 2, "batch_size": 16, "lr": 0.02, "workers": 0}}, INPUT_TINY)
# Stage 2 is already short; `short` differs from `paper` only in the stage-1 run it uses (that run's `short`).
STAGE2_PRESETS = {"paper": STAGE2_PAPER, "short": STAGE2_PAPER, "tiny": STAGE2_TINY}

@dataclass
class DecoupledHparams(CNNHparams):
    stage1: str = "erm_cnn"  # the stage-1 recipe: a teacher name of deit/deitlt (erm_cnn, ldam_drw, paco, ..._sam)
    stage1_run: str = ""  # an existing finished run (id, prefix or folder) instead of a trained-on-demand one
    stage1_preset: str = ""  # the stage-1 run's preset; "" = this run's
    stage1_overrides: tuple[str, ...] = ()  # KEY=VALUE hyperparameters of the stage-1 run
    sampler: str = "class_balanced"  # the engine's sampler hook (augment.SAMPLERS)

    def validate(self) -> None:
        super().validate()
        check(self.stage1 in TEACHERS, f"stage1 must be one of {', '.join(sorted(TEACHERS))}, not {self.stage1!r} "
                                        f"(or give stage1_run=RUN)")


class Decoupled(ERMCNN):
    """Stage 2 on a frozen stage-1 backbone; subclasses say which classifier is built and trained (``build_head``)."""

    Hparams = DecoupledHparams
    presets = STAGE2_PRESETS

    @classmethod
    def requires(cls, config: RunConfig) -> dict[str, RunConfig | str]:
        return upstream_reference(config, "stage1", functools.partial(teacher_config, config,
                                                                      config.hparams["stage1"]))

    def build_model(self) -> nn.Module:
        """The trained head; the frozen stage-1 network (``self.stage1``) is rebuilt from its run folder."""
        self.stage1 = FrozenTeacher(self.upstream["stage1"], self.info, self.device).method
        self._check_same_input(self.stage1.hp)
        self.backbone = self.stage1.model.backbone
        return self.build_head(self.stage1.model.fc)

    def _check_same_input(self, stage1_hp: Any) -> None:
        mine = (self.hp.img_size, self.hp.augment)
        theirs = (getattr(stage1_hp, "img_size", None), getattr(stage1_hp, "augment", None))
        if mine != theirs:
            raise UserError(f"The stage-1 run was trained on {theirs[0]} px images with {theirs[1]!r} augmentation, "
                            f"this {self.name} run is set to {mine[0]} px with {mine[1]!r}; set img_size and augment "
                            f"to match (--set img_size=... --set augment=...).")

    def build_head(self, stage1_fc: nn.Module) -> nn.Module:
        raise NotImplementedError

    def prepare(self, x: torch.Tensor, y: torch.Tensor):
        """Pooled features of the frozen backbone, once per step (the engine runs ``prepare`` without gradients)."""
        return self.backbone(x).float(), y

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        features, y = batch
        return F.cross_entropy(self.model(features).float(), y), {}

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"main": self.model(self.backbone(x).float())}

    def describe(self) -> dict[str, Any]:
        return {}  # the network is stage 1's backbone plus this head; the run is not a standalone teacher

    def export(self) -> NetworkExport:
        """The frozen stage-1 backbone and this run's classifier as one plain Classifier."""
        fc, kind, scale = self.export_head()
        arch, n = self.stage1.hp.arch, self.info.num_classes
        network = assembled_classifier(arch, self.backbone, fc, n, kind)
        heads = {"main": f"{self.name}'s classifier on the frozen stage-1 feature"}
        architecture = classifier_architecture(arch, n, kind)
        return NetworkExport(network, architecture, self.hp.img_size, heads, logit_scale=scale)

    def export_head(self) -> tuple[nn.Module, str, list[float] | None]:
        """(the classifier module, its kind in cnn.CLASSIFIERS, per-class logit scales or None)."""
        return self.model, "linear", None

class CRT(Decoupled):
    """cRT: a re-initialised linear classifier trained on the frozen stage-1 features with class-balanced sampling."""

    display_name = "cRT"  # how papers write it (figure titles, legends)

    def build_head(self, stage1_fc: nn.Module) -> nn.Module:
        return nn.Linear(self.backbone.feat_dim, self.info.num_classes)
