"""Parity with vandit15/Class-balanced-loss-pytorch (the PyTorch port linked from richardaecn/class-balanced-loss's
README; the authors' own code is TensorFlow): ``class_balanced_loss.CB_loss(loss_type="focal")`` vs ltbench's
``cb_focal_loss`` with ``effective_number_weights``, value and gradient in float64, at the released scripts'
beta 0.9999 and gamma 0.5 / 1 / 2."""

from __future__ import annotations

import pytest
import torch

from tests.parity._refcode import import_released, max_abs, record, repo

REPO = repo("Class-balanced-loss-pytorch")
C10_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_cb_focal_loss_and_gradient_float64(gamma):
    from ltbench.losses import cb_focal_loss, effective_number_weights

    module = import_released(REPO, "class_balanced_loss")
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(64, 10, dtype=torch.float64, generator=gen)).requires_grad_()
    labels = torch.randint(0, 10, (64,), generator=gen)
    # the port's one-hot labels are float32 and its weights a float32 tensor: both promote to float64 here
    theirs = module.CB_loss(labels, logits, C10_100, 10, "focal", 0.9999, gamma)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    ours = cb_focal_loss(logits, labels, effective_number_weights(C10_100, 0.9999), gamma)
    (g_ours,) = torch.autograd.grad(ours, logits)
    # both sides round the class weights to float32 (rounding at the last bit differs: ~2e-9 relative on the loss)
    assert record(f"CB focal loss, gamma {gamma} (float64 logits)", max_abs(ours, theirs)) <= 1e-7
    assert record(f"CB focal gradient, gamma {gamma} (float64 logits)", max_abs(g_ours, g_theirs)) <= 1e-7
