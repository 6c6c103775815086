"""``ldam_drw``: LDAM loss with deferred re-weighting (Cao et al., NeurIPS 2019); with SAM, the flat teacher.

The network ends in a cosine ("normed") classifier. Training subtracts the class margin
max_m * (n_min / n_j)^(1/4) from the true-class cosine only, scales every logit by s = 30 and takes
cross-entropy; inference gives s * cosine without margin (the cosine's argmax; the scale keeps softmax
confidences, hence ECE, at the temperature the loss trained: raw cosines gave ECE ~60 %). From the 0-based
epoch ``drw_epoch`` on, the cross-entropy is weighted per class by the effective number (beta 0.9999,
weights normalised to sum to C) with PyTorch's weighted-mean semantics (baselines.md §4.1-4.2).

Recipes: CIFAR (§4.3) = erm_cnn's schedule, max_m 0.5, DRW from epoch 160; ImageNet-LT / iNat (§4.4,
Saddle-LongTail) = ResNet-50, 90 epochs, cosine, max_m 0.3, DRW from epoch 60.
The ``sam`` preset is the LDAM-DRW+SAM teacher recipe of Saddle-LongTail and DeiT-LT (§6.2): a constant
radius 0.8 on CIFAR for all 200 epochs; on ImageNet-LT / iNat the step schedule 0.05 / 0.1 / 0.5 / 0.5
starting at 0-based epochs 0 / 5 / 60 / 75. Both SAM passes see the same margins and DRW weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from ltbench.methods.erm_cnn import ERMCNN, LARGE_DATASETS, SADDLE_LARGE, SHORT, TINY, CNNHparams

from ltbench.config import check
from ltbench.exported import NetworkExport
from ltbench.losses import effective_number_weights, ldam_loss, ldam_margins
from ltbench.resolve import layered


@dataclass
class LDAMHparams(CNNHparams):
    EPOCH_POINTS = (*CNNHparams.EPOCH_POINTS, "drw_epoch")

    classifier: str = "normed"
    max_m: float = 0.5  # margin of the rarest class
    scale: float = 30.0  # s, the logit scale
    drw_epoch: int = 160  # 0-based epoch from which the effective-number weights apply
    drw_beta: float = 0.9999

    def validate(self) -> None:
        super().validate()
        check(self.classifier == "normed", "ldam_drw needs classifier=normed (LDAM's margins are on cosine logits)")
        check(self.max_m >= 0, "max_m must be >= 0")
        check(self.scale > 0, "scale must be > 0")
        check(self.drw_epoch >= 0, "drw_epoch must be >= 0 (set it >= epochs to switch DRW off)")
        check(0 <= self.drw_beta < 1, "drw_beta must be in [0, 1)")


_LDAM_LARGE = {name: {"max_m": 0.3, "drw_epoch": 60} for name in LARGE_DATASETS}
LDAM_PAPER = layered({"*": {"workers": 8}}, SADDLE_LARGE, _LDAM_LARGE)
LDAM_SAM = {"*": {"sam_rho": 0.8},
            **{name: {"sam_rho": 0.0, "sam_rho_steps": [0.05, 0.1, 0.5, 0.5], "sam_rho_epochs": [5, 60, 75]}
               for name in LARGE_DATASETS}}
LDAM_TINY = layered(TINY, {"*": {"lr": 0.05, "drw_epoch": 1}})  # LDAM's s = 30 loss needs a larger lr to move


class LDAMDRW(ERMCNN):
    """LDAM margins on a cosine classifier, deferred re-weighting by effective number (CIFAR: from epoch 160)."""

    display_name = "LDAM-DRW"  # how papers write it (figure titles, legends)

    Hparams = LDAMHparams
    presets = {
        "paper": LDAM_PAPER,
        "sam": layered(LDAM_PAPER, LDAM_SAM),
        # the paper recipes at a quarter of the epochs: DRW at 40 of 50 (CIFAR) and 16 of 24 (large), SAM steps alike
        "short": [LDAM_PAPER, SHORT],
        "short_sam": [layered(LDAM_PAPER, LDAM_SAM), SHORT],
        "tiny": LDAM_TINY,
        "tiny_sam": layered(LDAM_TINY, LDAM_SAM),
    }
    teacher_logits = "s * cosine similarities of the pooled feature to the class vectors (no margin)"

    def __init__(self, hp: LDAMHparams, info, device, upstream) -> None:
        super().__init__(hp, info, device, upstream)
        self.margins = ldam_margins(info.train_counts, hp.max_m).to(device)
        self.class_weights = self.drw_weights(0)

    def drw_weights(self, epoch: int) -> torch.Tensor:
        """All ones before ``drw_epoch``, the effective-number weights from it on."""
        beta = self.hp.drw_beta if epoch >= self.hp.drw_epoch else 0.0
        return effective_number_weights(self.info.train_counts, beta).to(self.device)

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.class_weights = self.drw_weights(epoch)

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        cosine = self.model(x).float()
        return ldam_loss(cosine, y, self.margins, self.hp.scale, self.class_weights), {}

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"main": self.hp.scale * self.model(x).float()}

    def export(self) -> NetworkExport:
        return dataclasses.replace(super().export(), logit_scale=float(self.hp.scale))
