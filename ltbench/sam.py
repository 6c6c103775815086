"""Sharpness-Aware Minimization (Foret et al., 2021) as two calls around the engine's second pass.

Non-adaptive SAM as in the implementation Saddle-LongTail uses: after the first backward,
epsilon = rho * g / (||g||_2 + 1e-12) with the global L2 norm over all parameters; the weights move
to w + epsilon, the engine recomputes the gradient there, the weights move back and the base
optimizer (which owns momentum and weight decay) steps with that second gradient. Both passes run
in train mode, so BatchNorm running statistics are updated twice per step, as in the reference code.
All tensor work uses foreach kernels: no per-parameter Python arithmetic in the step.
"""

from __future__ import annotations

import torch
from torch import nn


class SAM:
    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._active: list[torch.Tensor] = []
        self._eps: list[torch.Tensor] = []

    @torch.no_grad()
    def ascend(self, rho: float) -> torch.Tensor:
        """Move to w + epsilon; returns ||epsilon|| (equal to rho up to the 1e-12 guard)."""
        self._active = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in self._active]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        scale = rho / (norm + 1e-12)
        self._eps = torch._foreach_mul(grads, scale)
        torch._foreach_add_(self._active, self._eps)
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self._eps)))

    @torch.no_grad()
    def descend(self) -> None:
        """Return to w, keeping the gradient computed at w + epsilon for the optimizer step."""
        torch._foreach_sub_(self._active, self._eps)
        self._active, self._eps = [], []
