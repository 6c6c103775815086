"""``cb_focal``: class-balanced focal loss (Cui et al., "Class-Balanced Loss Based on Effective Number of Samples",
CVPR 2019).

Sigmoid focal loss with per-sample weights w_{y} = (1 - beta) / (1 - beta^{n_y}) normalised to sum to C, from the
first epoch (no deferral), normalised by the number of positives (:func:`ltbench.losses.cb_focal_loss`). As the
paper prescribes for its sigmoid losses, the classifier bias starts at b = -log((1 - pi) / pi) with pi = 0.1, so
each class starts with probability 0.1 and the many negatives do not swamp early training. beta = 0.9999 and
gamma = 1.0 are the values of the released scripts (the paper tunes them per dataset from beta in {0.9, 0.99,
0.999, 0.9999} and gamma in {0.5, 1, 2}; baselines.md §7.4). Prediction: the raw logits (the sigmoid's argmax).

Recipe: the CNN baselines' (LDAM-DRW's ResNet-32 schedule on CIFAR, which LDAM took from this paper; Saddle's
ResNet-50 on ImageNet-LT / iNat). Differences from the released code are listed in docs/fidelity.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from ltbench.methods.erm_cnn import ERMCNN, CNNHparams
from ltbench.methods.logit_adjust import CNN_PRESETS
from torch import nn

from ltbench.config import check
from ltbench.losses import cb_focal_loss, effective_number_weights


@dataclass
class CBFocalHparams(CNNHparams):
    cb_beta: float = 0.9999  # effective-number beta of the class weights
    focal_gamma: float = 1.0
    prior_init: float = 0.1  # pi of the classifier-bias initialisation b = -log((1 - pi) / pi)

    def validate(self) -> None:
        super().validate()
        check(self.classifier == "linear", "cb_focal needs classifier=linear (its bias carries the prior init)")
        check(0 <= self.cb_beta < 1, "cb_beta must be in [0, 1)")
        check(self.focal_gamma >= 0, "focal_gamma must be >= 0")
        check(0 < self.prior_init < 1, "prior_init must be in (0, 1)")


class CBFocal(ERMCNN):
    """Class-balanced sigmoid focal loss: effective-number weights (beta 0.9999), gamma 1, prior-initialised bias."""

    display_name = "CB focal"  # how papers write it (figure titles, legends)

    Hparams = CBFocalHparams
    presets = CNN_PRESETS

    def __init__(self, hp: CBFocalHparams, info, device, upstream) -> None:
        super().__init__(hp, info, device, upstream)
        self.class_weights = effective_number_weights(info.train_counts, hp.cb_beta).to(device)

    def build_model(self) -> nn.Module:
        model = super().build_model()
        pi = self.hp.prior_init
        nn.init.constant_(model.fc.bias, -math.log((1 - pi) / pi))
        return model

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        return cb_focal_loss(self.model(x).float(), y, self.class_weights, self.hp.focal_gamma), {}
