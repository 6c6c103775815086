"""``logit_adjust``: logit-adjusted cross-entropy (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021).

Training minimises CE(z + tau * log(prior), y) with prior_c = n_c / N and tau = 1 (the paper's default);
prediction uses the raw logits z, so the model learns to score classes as if the training set were
balanced. The same idea applied after training (subtract tau * log(prior) from a CE model's logits) is
``ltbench eval RUN --adjust TAU``, available for every run. ``balanced_softmax`` is this method at tau = 1
(the losses coincide exactly; see :func:`ltbench.losses.logit_adjusted_loss`).

Recipe: the CNN baselines' recipes, as for ``erm_cnn`` (LDAM-DRW's ResNet-32 schedule on CIFAR; Saddle-LongTail's
ResNet-50 recipe on ImageNet-LT / iNat), so the methods differ only in the loss. The paper's own CIFAR runs
used google-research/logit_adjustment's schedule and CIFAR-LT files, which differ (docs/fidelity.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from ltbench.methods.erm_cnn import ERMCNN, CNNHparams

from ltbench.config import check
from ltbench.losses import log_prior, logit_adjusted_loss

# The CNN presets without the SAM variants: no published radius exists for these losses.
CNN_PRESETS = {name: ERMCNN.presets[name] for name in ("paper", "short", "tiny")}


@dataclass
class LogitAdjustHparams(CNNHparams):
    tau: float = 1.0  # strength of the log-prior added to the training logits

    def validate(self) -> None:
        super().validate()
        check(self.tau >= 0, "tau must be >= 0 (0 is plain cross-entropy)")


class LogitAdjust(ERMCNN):
    """Logit-adjusted cross-entropy: tau * log(prior) added to the logits in training only (Menon et al. 2021)."""

    display_name = "Logit adjustment"  # how papers write it (figure titles, legends)

    Hparams = LogitAdjustHparams
    presets = CNN_PRESETS

    def __init__(self, hp: CNNHparams, info, device, upstream) -> None:
        super().__init__(hp, info, device, upstream)
        self.log_prior = log_prior(info.train_counts).to(device)

    def tau(self) -> float:
        return self.hp.tau

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        return logit_adjusted_loss(self.model(x).float(), y, self.log_prior, self.tau()), {}
