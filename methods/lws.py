"""``lws``: learnable weight scaling (Kang et al., ICLR 2020), a stage 2 on the frozen stage-1 network.

The stage-1 classifier (weights and bias) stays frozen; a per-class scale f_c, initialised to 1, multiplies its
logits, f_c (w_c . x + b_c), as the released ``DotProduct_Classifier``'s ``scales`` do, and only those C numbers
are trained, with class-balanced sampling and cRT's stage-2 recipe (docs: ``crt``). Stage 1 is found or trained
as for ``crt``, so the same backbone serves ``crt``, ``tau_norm`` and ``lws``.
"""

from __future__ import annotations

import torch
from ltbench.methods.crt import Decoupled
from torch import nn


class ScaledClassifier(nn.Module):
    """A frozen classifier whose logits are multiplied by learnable per-class scales."""

    def __init__(self, classifier: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.classifier = classifier.requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features) * self.scales


class LWS(Decoupled):
    """LWS: learnable per-class scales on the frozen stage-1 classifier, trained with class-balanced sampling."""

    display_name = "LWS"  # how papers write it (figure titles, legends)

    def build_head(self, stage1_fc: nn.Module) -> nn.Module:
        return ScaledClassifier(stage1_fc, self.info.num_classes)

    def export_head(self) -> tuple[nn.Module, str, list[float] | None]:
        """The stage-1 classifier; its learnt scales multiply the logits."""
        return self.model.classifier, self.stage1.hp.classifier, self.model.scales.detach().tolist()
