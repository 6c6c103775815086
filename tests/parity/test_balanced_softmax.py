"""Parity with jiawei-ren/BalancedMetaSoftmax-Classification: ``loss.BalancedSoftmaxLoss.balanced_softmax_loss``
(CE on z + log n_c) vs ltbench's ``balanced_softmax`` loss (``logit_adjusted_loss`` at tau = 1, log prior), value and
gradient in float64. The two differ by the constant log N inside the softmax, which cancels."""

from __future__ import annotations

import torch

from tests.parity._refcode import import_released, max_abs, record, repo

REPO = repo("BalancedMetaSoftmax-Classification")
C10_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_balanced_softmax_loss_and_gradient_float64():
    from ltbench.losses import log_prior, logit_adjusted_loss

    module = import_released(REPO, "loss.BalancedSoftmaxLoss")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, dtype=torch.float64, generator=gen).requires_grad_()
    labels = torch.randint(0, 10, (64,), generator=gen)
    theirs = module.balanced_softmax_loss(labels, logits, torch.tensor(C10_100), "mean")
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    ours = logit_adjusted_loss(logits, labels, log_prior(C10_100).double(), tau=1.0)
    (g_ours,) = torch.autograd.grad(ours, logits)
    # ltbench's prior is float32 (log_prior), the released counts enter in float64
    assert record("Balanced Softmax loss (float64 logits)", max_abs(ours, theirs)) <= 1e-6
    assert record("Balanced Softmax gradient (float64 logits)", max_abs(g_ours, g_theirs)) <= 1e-6
