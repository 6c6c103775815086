"""``deit``: a distilled ViT (CLS + DIST tokens, two heads) with hard distillation from a CNN teacher.

DeiT (Touvron et al., ICML 2021) as the DeiT-LT paper's baseline: the teacher is an in-distribution
CNN trained with plain cross-entropy (``erm_cnn``) on the same long-tailed data; it labels the same
Mixup/CutMix-ed batch the student sees; L = (1 - a) * softCE(CLS, mixed targets) + a * CE(DIST, y_t)
with a = 0.5, no re-weighting. Predictions average the two heads' logits; each head is also reported.
As DeiT-LT's released code: inputs are normalised with ImageNet's mean/std on every dataset and the teacher
gets that same tensor, resized bicubically without antialiasing (``normalize``, ``teacher_antialias``).
The teacher run is found by config hash in the results folder or trained first (``requires``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from ltbench.methods.erm_vit import VIT_PRESETS, ERMViT, ViTHparams

from ltbench import analysis
from ltbench.config import RunConfig, check
from ltbench.exported import NetworkExport
from ltbench.method import upstream_reference
from ltbench.models import distilled_heads
from ltbench.teacher import TEACHERS, FrozenTeacher, teacher_config

FREQUENCY_SORTED = {"imagenetlt": {"sort_by_frequency": True}, "inat2018": {"sort_by_frequency": True}}


@dataclass
class DeiTHparams(ViTHparams):
    teacher: str = "erm_cnn"  # a name in TEACHERS
    teacher_run: str = ""  # an existing finished run (id, prefix or folder) instead of a trained-on-demand one
    teacher_preset: str = ""  # the teacher's preset; "" = the student's (a SAM teacher takes its SAM variant)
    teacher_overrides: tuple[str, ...] = ()  # KEY=VALUE hyperparameters of the teacher run, e.g. epochs=100
    distillation_alpha: float = 0.5
    teacher_antialias: bool = False  # True: antialias the resize to the teacher's size (released code: no)

    def validate(self) -> None:
        super().validate()
        check(self.teacher in TEACHERS, f"teacher must be one of {', '.join(sorted(TEACHERS))}, not "
                                         f"{self.teacher!r} (or give teacher_run=RUN)")
        check(0.0 <= self.distillation_alpha <= 1.0, "distillation_alpha must be in [0, 1]")


class DeiT(ERMViT):
    """Distilled ViT with hard distillation from an in-distribution CE-trained CNN (the DeiT baseline)."""

    display_name = "DeiT"  # how papers write it (figure titles, legends)

    name = "deit"
    Hparams = DeiTHparams
    batch_structure = "(x, soft_targets, y, y_teacher)"
    presets = VIT_PRESETS
    distilled = True
    data_defaults: ClassVar[dict[str, dict[str, Any]]] = FREQUENCY_SORTED

    @classmethod
    def requires(cls, config: RunConfig) -> dict[str, RunConfig | str]:
        return upstream_reference(config, "teacher", functools.partial(teacher_config, config,
                                                                       config.hparams["teacher"]))

    def __init__(self, hp: DeiTHparams, info, device, upstream) -> None:
        super().__init__(hp, info, device, upstream)
        self.teacher = FrozenTeacher(upstream["teacher"], info, device, antialias=hp.teacher_antialias)
        self.heads = functools.partial(distilled_heads, self.model)  # (CLS logits, DIST logits)

    def compile(self, **options: Any) -> None:
        """Both heads come from ``forward_features``, not ``forward``: compile the two-head call itself."""
        self.heads = torch.compile(self.heads, **options)

    def prepare(self, x: torch.Tensor, y: torch.Tensor):
        """The teacher labels exactly the (augmented, mixed) images the student sees."""
        x, soft, y = super().prepare(x, y)
        return x, soft, y, self.teacher.labels(x)

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, soft, _, y_teacher = batch
        cls_logits, dist_logits = self.heads(x)
        loss_cls = self.soft_ce(cls_logits, soft)
        loss_dist = F.cross_entropy(dist_logits, y_teacher)
        return self._combine(loss_cls, loss_dist)

    def _combine(self, loss_cls: torch.Tensor, loss_dist: torch.Tensor):
        a = self.hp.distillation_alpha
        return (1 - a) * loss_cls + a * loss_dist, {"loss_cls": loss_cls, "loss_dist": loss_dist}

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cls_logits, dist_logits = self.heads(x)
        return {"main": (cls_logits + dist_logits) / 2, "cls": cls_logits, "dist": dist_logits}

    def export(self) -> NetworkExport:
        heads = {"main": "(CLS + DIST) / 2, the head the report shows", "cls": "the head on the CLS token",
                 "dist": "the head on the DIST token (learnt from the teacher)"}
        return dataclasses.replace(super().export(), outputs="distilled", heads=heads)

    def describe(self) -> dict[str, Any]:
        resize = "bicubic, " + ("antialiased" if self.hp.teacher_antialias else "no antialiasing")
        return {"teacher": {"run_id": self.teacher.run_id, "input_size": self.teacher.input_size, "resize": resize,
                            "input_normalisation": self.hp.normalize}}

    def diagnostics(self, x: torch.Tensor) -> dict[str, Any]:
        self.model.eval()
        return {"mean_attention_distance_px": analysis.mean_attention_distance(self.model, x),
                "cls_dist_cosine": analysis.cls_dist_cosine(self.model, x), "images": len(x)}
