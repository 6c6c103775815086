"""``tau_norm``: tau-normalised classifier (Kang et al., ICLR 2020), a stage 2 that trains nothing.

The stage-1 linear classifier's class vectors are rescaled, w_c / ||w_c||^tau, and its bias is dropped
(baselines.md §7.3); logits are the frozen stage-1 features' dot products with them. Kang et al. pick tau on a
validation split (typically 0.7-1 on ImageNet-LT); here tau is stated (default 1: every class vector has unit
norm, which removes the norm imbalance CE training leaves) and can be changed with ``--set tau=T``. A run has
no training epochs (the engine's ``min_epochs = 0`` hook): it evaluates the normalised classifier and
checkpoints it. Stage 1 is found or trained as for ``crt``, so the same backbone serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from ltbench.methods.crt import INPUT_PAPER, INPUT_TINY, Decoupled, DecoupledHparams
from torch import nn

from ltbench.config import check
from ltbench.errors import UserError
from ltbench.resolve import layered


@dataclass
class TauNormHparams(DecoupledHparams):
    min_epochs: ClassVar[int] = 0
    epochs: int = 0
    warmup_epochs: int = 0  # nothing is trained
    tau: float = 1.0
    sampler: str = "instance"  # nothing is trained

    def validate(self) -> None:
        # first, so that --epochs N gets this message rather than one about an inherited schedule field
        check(self.epochs == 0, f"tau_norm trains nothing (it rescales the stage-1 classifier), so --epochs does not "
                                 f"apply: leave it out (epochs must be 0, not {self.epochs}); the stage-1 run's "
                                 f"epochs are set with --set stage1_overrides=epochs=N")
        super().validate()
        check(self.tau >= 0, "tau must be >= 0 (0 is the stage-1 classifier without its bias)")


class NormalisedClassifier(nn.Module):
    """Logits f . w_c / ||w_c||^tau, no bias. The rescaled weights are an ordinary parameter, so the engine builds
    its optimizer as for any method; with zero epochs it never steps."""

    def __init__(self, weight: torch.Tensor, tau: float) -> None:
        super().__init__()
        norms = weight.detach().float().norm(dim=1, keepdim=True)
        self.weight = nn.Parameter(weight.detach().float() / norms.pow(tau))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight)


class TauNorm(Decoupled):
    """tau-normalisation: stage-1 class vectors divided by ||w_c||^tau, bias dropped; no training (tau stated)."""

    display_name = "τ-norm"  # how papers write it (figure titles, legends)

    Hparams = TauNormHparams
    presets = {"paper": INPUT_PAPER, "short": INPUT_PAPER, "tiny": layered({"*": {"workers": 0}}, INPUT_TINY)}

    def build_head(self, stage1_fc: nn.Module) -> nn.Module:
        if not isinstance(stage1_fc, nn.Linear):
            raise UserError(f"tau_norm needs a stage-1 run with a linear classifier; {self.stage1.name} ends in "
                            f"{type(stage1_fc).__name__}, whose class vectors are already normalised.")
        return NormalisedClassifier(stage1_fc.weight, self.hp.tau)

    def export_head(self) -> tuple[nn.Module, str, list[float] | None]:
        """The rescaled class vectors as a linear layer with a zero bias (what a Classifier's fc holds)."""
        weight = self.model.weight.detach()
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        linear.load_state_dict({"weight": weight, "bias": torch.zeros(weight.shape[0])})
        return linear, "linear", None
