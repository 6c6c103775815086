"""LDAM margins and loss, DRW weights with PyTorch's weighted mean, and PaCo's loss, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ltbench.errors import UserError
from ltbench.losses import (
    balanced_bce_loss,
    cb_focal_loss,
    effective_number_weights,
    ldam_loss,
    ldam_margins,
    log_prior,
    logit_adjusted_loss,
    paco_loss,
)


def test_ldam_margins_scale_as_inverse_fourth_root_with_max_m_on_the_rarest_class():
    # max_m * (n_min / n)^(1/4) with n_min = 1: 0.5 * (1, 1/2, 1/5, 1/10)
    margins = ldam_margins([10000, 625, 16, 1], max_m=0.5)
    assert margins.tolist() == pytest.approx([0.05, 0.1, 0.25, 0.5], abs=1e-7)


def test_ldam_loss_margin_on_true_class_only_scaled_by_s():
    margins = ldam_margins([16, 1], max_m=0.5)  # [0.25, 0.5]
    cosine = torch.tensor([[0.5, 0.2], [0.1, 0.3], [0.4, -0.1]])
    target = torch.tensor([0, 1, 0])
    # s * (cos - margin on the true class): [7.5, 6], [3, -6], [4.5, -3]
    # losses: log(1 + e^-1.5) = 0.2014133, log(1 + e^9) = 9.0001234, log(1 + e^-7.5) = 0.0005529
    assert ldam_loss(cosine, target, margins, 30.0).item() == pytest.approx(3.0673632, abs=1e-5)


def test_ldam_loss_weighted_mean_divides_by_the_sum_of_weights():
    margins = ldam_margins([16, 1], max_m=0.5)
    cosine = torch.tensor([[0.5, 0.2], [0.1, 0.3], [0.4, -0.1]])
    target = torch.tensor([0, 1, 0])
    weight = torch.tensor([0.25, 1.75])
    # (0.25 * 0.2014133 + 1.75 * 9.0001234 + 0.25 * 0.0005529) / (0.25 + 1.75 + 0.25), not / 3 (= 5.2669)
    assert ldam_loss(cosine, target, margins, 30.0, weight).item() == pytest.approx(7.0225367, abs=1e-5)


def test_effective_number_weights_hand_computed_and_normalised_to_num_classes():
    # (1 - 0.9) / (1 - 0.9^n) for n = 100, 10: 0.1000027, 0.1535306; scaled to sum to 2
    weights = effective_number_weights([100, 10], beta=0.9)
    assert weights.tolist() == pytest.approx([0.7888615, 1.2111385], abs=1e-6)
    assert effective_number_weights([100, 10, 1], beta=0.0).tolist() == [1.0, 1.0, 1.0]


def test_effective_number_weights_cifar10_if100_reference():
    # deitlt.md §3.2: the normalised DRW weights of CIFAR-10 IF100 with beta 0.9999
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    expected = [0.051, 0.077, 0.121, 0.195, 0.319, 0.525, 0.868, 1.443, 2.409, 3.993]
    weights = effective_number_weights(counts, beta=0.9999)
    assert weights.tolist() == pytest.approx(expected, abs=6e-4)
    assert weights.sum().item() == pytest.approx(10.0, abs=1e-5)


def test_counts_and_beta_are_validated():
    with pytest.raises(UserError, match="counts"):
        effective_number_weights([5, 0], beta=0.99)
    with pytest.raises(UserError, match="beta"):
        effective_number_weights([5, 1], beta=1.0)


def test_paco_loss_single_anchor_by_hand():
    # C = 2, uniform prior, zero centre logits; q = k = (1, 0) of class 0, one queue entry (0, 1) of class 1;
    # temperature = alpha = beta = gamma = 1. Centre logits u = log 0.5 each; sample logits: key 1, queue 0.
    # D = 0.5 + 0.5 + e + 1; L = -[(log 0.5 - log D) + (1 - log D)] / 2 = log D - 0.5 + 0.5 log 2 = 1.3980183
    query = torch.tensor([[1.0, 0.0]])
    contrast = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    loss = paco_loss(torch.zeros(1, 2), torch.log(torch.tensor([0.5, 0.5])), query, contrast, torch.tensor([0, 0, 1]),
                     torch.tensor([0]), alpha=1.0, beta=1.0, gamma=1.0, temperature=1.0)
    assert loss.item() == pytest.approx(1.3980183, abs=1e-6)


def _paco_reference(center, log_prior, query, contrast, contrast_labels, labels, alpha, beta, gamma, tau):
    """The loss written out per anchor with Python floats, straight from baselines.md §5.2."""
    total = 0.0
    for i in range(len(labels)):
        u = [float(center[i, c] + log_prior[c]) for c in range(center.shape[1])]
        v = {j: float(query[i] @ contrast[j]) / tau for j in range(len(contrast)) if j != i}
        log_d = math.log(sum(math.exp(x) for x in u) + gamma * sum(math.exp(x) for x in v.values()))
        positives = [j for j in v if contrast_labels[j] == labels[i]]
        numerator = beta * (u[labels[i]] - log_d) + alpha * sum(v[j] - log_d for j in positives)
        total += -numerator / (beta + alpha * len(positives))
    return total / len(labels)


def test_paco_loss_four_anchors_with_a_known_queue():
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 1, 2])
    query = F.normalize(torch.randn(4, 3, generator=gen), dim=1)
    keys = F.normalize(torch.randn(4, 3, generator=gen), dim=1)
    queue = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0]])
    queue_labels = torch.tensor([2, 1, 0, 1])
    contrast = torch.cat([query, keys, queue])
    contrast_labels = torch.cat([labels, labels, queue_labels])
    center = torch.tensor([[1.0, -0.5, 0.2], [0.3, 0.1, -1.0], [-0.2, 0.8, 0.0], [0.5, 0.5, 0.5]])
    log_prior = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    settings = {"alpha": 0.05, "beta": 1.0, "gamma": 0.7, "temperature": 0.2}
    loss = paco_loss(center, log_prior, query, contrast, contrast_labels, labels, **settings)
    expected = _paco_reference(center, log_prior, query, contrast, contrast_labels.tolist(), labels.tolist(),
                               settings["alpha"], settings["beta"], settings["gamma"], settings["temperature"])
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_paco_loss_without_contrast_is_balanced_softmax_cross_entropy():
    gen = torch.Generator().manual_seed(1)
    center = torch.randn(4, 3, generator=gen)
    labels = torch.tensor([0, 1, 2, 1])
    log_prior = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    query = F.normalize(torch.randn(4, 5, generator=gen), dim=1)
    loss = paco_loss(center, log_prior, query, query, labels, labels, alpha=0.0, beta=1.0, gamma=0.0,
                     temperature=0.1)
    assert loss.item() == pytest.approx(F.cross_entropy(center + log_prior, labels).item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Logit adjustment / Balanced Softmax and the class-balanced focal loss


def test_logit_adjusted_loss_adds_tau_log_prior_before_the_softmax():
    # counts (3, 1): prior (0.75, 0.25). Row 0, true class 0: margin 1 + ln .75 - ln .25 = 1 + ln 3, loss
    # log(1 + e^-(1 + ln 3)) = 0.1156710; row 1, true class 1: 2 - ln 3, log(1 + e^-(2 - ln 3)) = 0.3407530
    logits, target = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1])
    assert log_prior([3, 1]).tolist() == pytest.approx([math.log(0.75), math.log(0.25)], abs=1e-6)
    loss = logit_adjusted_loss(logits, target, log_prior([3, 1]), tau=1.0)
    assert loss.item() == pytest.approx((0.1156710 + 0.3407530) / 2, abs=1e-6)
    # tau = 0 is plain cross-entropy; tau = 2 doubles the offset
    plain = F.cross_entropy(logits, target)
    assert logit_adjusted_loss(logits, target, log_prior([3, 1]), tau=0.0).item() == pytest.approx(plain.item())
    doubled = F.cross_entropy(logits + 2 * torch.log(torch.tensor([0.75, 0.25])), target)
    assert logit_adjusted_loss(logits, target, log_prior([3, 1]), tau=2.0).item() == pytest.approx(doubled.item())


def test_balanced_softmax_is_logit_adjustment_at_tau_one():
    # Ren et al.: -log(n_y e^{z_y} / sum_c n_c e^{z_c}), written out with counts, not the prior
    counts = torch.tensor([500.0, 40.0, 3.0])
    logits = torch.tensor([[0.3, -1.2, 2.0], [1.5, 0.1, -0.4]])
    target = torch.tensor([2, 0])
    weighted = counts * logits.exp()
    balanced = -(weighted[torch.arange(2), target] / weighted.sum(1)).log().mean()
    adjusted = logit_adjusted_loss(logits, target, log_prior([500, 40, 3]), tau=1.0)
    assert adjusted.item() == pytest.approx(balanced.item(), abs=1e-6)


def test_cb_focal_loss_hand_computed():
    # sigmoid p = s(z); per class (1 - p_t)^gamma * BCE, weighted by the sample's class weight, / positives (2).
    # sample 0 (y = 0, w 0.5): z = (2, -1): (1 - s(2)) * -log s(2) = 0.0151302, s(-1) * -log(1 - s(-1)) = 0.0842490
    # sample 1 (y = 1, w 1.5): z = (0, 1): s(0) * -log(1 - s(0)) = 0.3465736, (1 - s(1)) * -log s(1) = 0.0842490
    logits, target = torch.tensor([[2.0, -1.0], [0.0, 1.0]]), torch.tensor([0, 1])
    weights = torch.tensor([0.5, 1.5])
    expected = (0.5 * (0.0151302 + 0.0842490) + 1.5 * (0.3465736 + 0.0842490)) / 2
    assert cb_focal_loss(logits, target, weights, gamma=1.0).item() == pytest.approx(expected, abs=1e-6)
    # gamma = 0: the weighted sigmoid cross-entropy
    bce = F.binary_cross_entropy_with_logits(logits, F.one_hot(target, 2).float(), reduction="none").sum(1)
    assert cb_focal_loss(logits, target, weights, gamma=0.0).item() == pytest.approx(
        ((weights[target] * bce).sum() / 2).item(), abs=1e-6)


def test_cb_focal_modulator_is_finite_for_large_logits():
    logits = torch.tensor([[80.0, -80.0], [-80.0, 80.0]], requires_grad=True)
    loss = cb_focal_loss(logits, torch.tensor([1, 0]), torch.ones(2), gamma=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all() and loss.item() > 50  # confidently wrong


def test_balanced_bce_adds_the_log_prior_inside_each_sigmoid():
    # counts (3, 1): z + log prior = (1 + ln .75, -1 + ln .25) = (0.7123179, -2.3862944); soft targets (0.8, 0.2):
    # -(0.8 log s(0.712) + 0.2 log(1 - s(0.712))) - (0.2 log s(-2.386) + 0.8 log(1 - s(-2.386))) = 1.1068213
    loss = balanced_bce_loss(torch.tensor([[1.0, -1.0]]), torch.tensor([[0.8, 0.2]]), log_prior([3, 1]), tau=1.0)
    assert loss.item() == pytest.approx(1.1068213, abs=1e-6)
    # summed over classes, averaged over the batch: two copies of the row give the same loss
    two = balanced_bce_loss(torch.tensor([[1.0, -1.0]] * 2), torch.tensor([[0.8, 0.2]] * 2), log_prior([3, 1]))
    assert two.item() == pytest.approx(1.1068213, abs=1e-6)
