"""Parity with XuZhengzhuo/LiVT: Bal-BCE (``util.loss.BCE_loss(type='Bal')``) and, as a released PyTorch
implementation of logit adjustment, its ``Bal_CE_loss`` (which cites google-research/logit_adjustment, whose own
release is TensorFlow and is not installed here), vs ltbench's ``balanced_bce_loss`` and ``logit_adjusted_loss``;
logit adjustment is also checked against the paper's formula, CE(z + tau log pi). float64 logits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.parity._refcode import import_released, max_abs, record, repo

REPO = repo("LiVT")
C10_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def _batch(soft: bool):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 10, dtype=torch.float64, generator=gen).requires_grad_()
    labels = torch.randint(0, 10, (32,), generator=gen)
    targets = torch.softmax(torch.randn(32, 10, dtype=torch.float64, generator=gen), 1) if soft else \
        F.one_hot(labels, 10).double()
    return logits, labels, targets


@pytest.mark.parametrize("bal_bias", ["log_odds", "log_prior"])
def test_bal_bce_loss_and_gradient_float64(bal_bias):
    """LiVT's Bal-BCE (util/loss.py BCE_loss, type Bal) adds log(pi_c) - log(1 - pi_c), the prior's logit, to every
    logit: ltbench's default ``bal_bias=log_odds`` (methods/livt.py, VERSION 2) is equal to it. The option
    ``bal_bias=log_prior`` (ltbench before VERSION 2: tau log(pi_c), the logit-adjustment offset) is not: on
    CIFAR-10-LT rho=100 (pi_0 = 0.40) its bias differs by -log(1 - pi_c), up to 0.52."""
    from ltbench.methods.livt import BAL_BIASES

    from ltbench.losses import balanced_bce_loss

    module = import_released(REPO, "util.loss")
    logits, _, targets = _batch(soft=True)
    theirs_fn = module.BCE_loss(SimpleNamespace(smoothing=0.1, cls_num=C10_100), type="Bal")
    theirs_fn.pi = theirs_fn.pi.double()
    theirs = theirs_fn(logits, targets)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    ours = balanced_bce_loss(logits, targets, BAL_BIASES[bal_bias](C10_100).double(), tau=1.0)
    (g_ours,) = torch.autograd.grad(ours, logits)
    note = "" if bal_bias == "log_odds" else "the documented option: differs by design"
    grad_diff = record(f"LiVT Bal-BCE gradient, bal_bias={bal_bias} (float64)", max_abs(g_ours, g_theirs), note)
    loss_diff = record(f"LiVT Bal-BCE loss on Mixup targets, bal_bias={bal_bias} (float64)",
                       max_abs(ours, theirs), note)
    if bal_bias == "log_odds":
        assert max(grad_diff, loss_diff) <= 1e-6  # float32 prior of the released side, computed again in float64
    else:
        assert loss_diff > 0.05


def test_bal_bce_reduction_matches_with_the_bias_removed():
    """The rest of Bal-BCE, with both biases set to zero (uniform prior on our side, pi = 1/2 on theirs, whose
    logit is 0): C * mean over B x C = sum over classes, mean over the batch."""
    from ltbench.losses import balanced_bce_loss

    module = import_released(REPO, "util.loss")
    logits, _, targets = _batch(soft=True)
    theirs_fn = module.BCE_loss(SimpleNamespace(smoothing=0.1, cls_num=C10_100), type="Bal")
    theirs_fn.pi = torch.full((10,), 0.5, dtype=torch.float64)
    theirs = theirs_fn(logits, targets)
    ours = balanced_bce_loss(logits, targets, torch.zeros(10, dtype=torch.float64), tau=1.0)
    assert record("LiVT Bal-BCE reduction (zero bias, float64)", max_abs(ours, theirs)) <= 1e-12


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_logit_adjusted_loss_vs_livt_bal_ce_and_the_formula(tau):
    from ltbench.losses import log_prior, logit_adjusted_loss

    module = import_released(REPO, "util.loss")
    logits, labels, one_hot = _batch(soft=False)
    theirs_fn = module.Bal_CE_loss(SimpleNamespace(cls_num=C10_100, bal_tau=tau))
    theirs_fn.prior = theirs_fn.prior.double()  # built as float32; the same log prior in float64
    theirs = theirs_fn(logits, one_hot)
    ours = logit_adjusted_loss(logits, labels, log_prior(C10_100).double(), tau=tau)
    prior = torch.tensor(C10_100, dtype=torch.float64) / sum(C10_100)
    formula = F.cross_entropy(logits + tau * prior.log(), labels)
    assert record(f"logit adjustment tau={tau} vs LiVT Bal_CE_loss (float64)", max_abs(ours, theirs)) <= 1e-6
    assert record(f"logit adjustment tau={tau} vs the paper's formula (float64)", max_abs(ours, formula)) <= 1e-6
