"""``balanced_softmax``: Balanced Softmax cross-entropy (Ren et al., "Balanced Meta-Softmax", NeurIPS 2020).

Training minimises CE(z + log n_c, y); prediction uses the raw logits. Since log n_c = log(n_c / N) + log N and
softmax ignores a constant added to every logit, this is exactly ``logit_adjust`` at tau = 1, and the code is
shared (the name stays because it is what people search for). Not included: BALMS's meta-learned sampler for a
decoupled classifier stage. Recipe: the CNN baselines' (see ``logit_adjust``); the BALMS repository's own CIFAR
recipe is stronger (AutoAugment, Cutout, batch 512, baselines.md §7.1), so its numbers are not this recipe's.
"""

from __future__ import annotations

from ltbench.methods.erm_cnn import CNNHparams
from ltbench.methods.logit_adjust import LogitAdjust


class BalancedSoftmax(LogitAdjust):
    """Balanced Softmax: cross-entropy on z + log n_c in training (= logit adjustment with tau = 1)."""

    display_name = "Balanced Softmax"  # how papers write it (figure titles, legends)

    Hparams = CNNHparams  # no tau: Balanced Softmax is the tau = 1 case

    def tau(self) -> float:
        return 1.0
