"""Losses of the CNN baselines: LDAM with deferred re-weighting, PaCo's parametric contrastive loss, the
logit-adjusted (= Balanced Softmax) cross-entropy, the class-balanced sigmoid focal loss and LiVT's Balanced BCE.

Written from the equations in baselines.md §4 and §5; the reference implementations' numerics are
kept where they change results: DRW uses PyTorch's *weighted mean* (sum_i w_{y_i} l_i / sum_i w_{y_i}),
the LDAM margin touches the true class only, and PaCo adds the log-prior to the centre logits in
training only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ltbench.errors import UserError


def _counts_tensor(counts: Sequence[int]) -> torch.Tensor:
    counts_t = torch.as_tensor(list(counts), dtype=torch.float64)
    if counts_t.numel() == 0 or bool((counts_t < 1).any()):
        raise UserError("Class counts must all be >= 1 (a class without training images has no weight or margin).")
    return counts_t


def effective_number_weights(counts: Sequence[int], beta: float) -> torch.Tensor:
    """Class-balanced weights w_j = (1 - beta) / (1 - beta^n_j) (Cui et al. 2019), normalised to sum to C.

    ``beta = 0`` gives all ones (DRW's first phase). Computed in float64, returned as float32.
    """
    if not 0.0 <= beta < 1.0:
        raise UserError(f"The effective-number beta must be in [0, 1), got {beta}.")
    counts_t = _counts_tensor(counts)
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts_t))
    return (weights * len(counts_t) / weights.sum()).float()


def ldam_margins(counts: Sequence[int], max_m: float) -> torch.Tensor:
    """Delta_j = max_m * (n_min / n_j)^(1/4): proportional to n_j^(-1/4), the rarest class gets ``max_m``."""
    inv_root = _counts_tensor(counts).pow(-0.25)
    return (inv_root * (max_m / inv_root.max())).float()


def ldam_loss(cosine: torch.Tensor, target: torch.Tensor, margins: torch.Tensor, scale: float,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Label-distribution-aware margin loss on cosine logits.

    The true-class logit is lowered by its class margin, every logit is scaled by ``scale`` (s = 30)
    and softmax cross-entropy is taken; ``weight`` (DRW) gives PyTorch's weighted mean over the batch.
    No margin is applied at inference.
    """
    true_class = F.one_hot(target, cosine.shape[1]).to(cosine.dtype)
    adjusted = cosine - true_class * margins.to(cosine.dtype)[target].unsqueeze(1)
    return F.cross_entropy(scale * adjusted, target, weight=weight)


def paco_loss(center_logits: torch.Tensor, log_prior: torch.Tensor, query: torch.Tensor, contrast: torch.Tensor,
              contrast_labels: torch.Tensor, labels: torch.Tensor, *, alpha: float, beta: float, gamma: float,
              temperature: float) -> torch.Tensor:
    """Parametric contrastive loss (Cui et al. 2021, baselines.md §5.2), averaged over the B anchors.

    ``center_logits`` (B, C): the linear classifier W h + b on the anchors' pooled features; ``log_prior``
    (C,): log(n_c / N), added here only (logit adjustment in training). ``query`` (B, d): the anchors'
    normalised projections. ``contrast`` (M, d) with ``contrast_labels`` (M,): the contrast set, whose
    first B rows are the anchors themselves (queries, then keys, then the queue); row i never contrasts
    with column i. For anchor i with u = centre logits + log prior and v_j = q_i . a_j / temperature:

        D_i = sum_c exp(u_c) + gamma * sum_{j != i} exp(v_j)
        L_i = -[beta (u_{y_i} - log D_i) + alpha sum_{j in P(i)} (v_j - log D_i)] / (beta + alpha |P(i)|)

    where P(i) are the same-class contrast samples other than i.
    """
    batch, num_classes = center_logits.shape
    center = center_logits + log_prior
    sample = query @ contrast.t() / temperature
    not_self = torch.ones_like(sample, dtype=torch.bool)
    not_self[torch.arange(batch), torch.arange(batch)] = False
    positives = (labels.unsqueeze(1) == contrast_labels.unsqueeze(0)) & not_self

    logits = torch.cat([center, sample], dim=1)
    # log of the denominator weights: 1 for centres, gamma for samples, 0 (excluded) for self
    sample_log_w = torch.where(not_self, torch.log(torch.tensor(gamma, dtype=logits.dtype, device=logits.device)),
                               torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))
    log_w = torch.cat([torch.zeros_like(center), sample_log_w], dim=1)
    log_prob = logits - torch.logsumexp(logits + log_w, dim=1, keepdim=True)

    pos_weight = torch.cat([beta * F.one_hot(labels, num_classes).to(logits.dtype), alpha * positives.to(logits.dtype)],
                           dim=1)
    # self entries have a finite log_prob and zero weight, so they drop out of the numerator as well
    per_anchor = -(pos_weight * log_prob).sum(dim=1) / pos_weight.sum(dim=1)
    return per_anchor.mean()


def log_prior(counts: Sequence[int]) -> torch.Tensor:
    """log(n_c / N) per class, float32: the offset of logit adjustment."""
    counts_t = _counts_tensor(counts)
    return (counts_t / counts_t.sum()).log().float()


def logit_adjusted_loss(logits: torch.Tensor, target: torch.Tensor, log_prior: torch.Tensor,
                        tau: float = 1.0) -> torch.Tensor:
    """Cross-entropy on ``logits + tau * log_prior`` (Menon et al. 2021); inference uses the raw logits.

    With tau = 1 this *is* Balanced Softmax (Ren et al. 2020), CE(z + log n_c): log n_c = log prior_c + log N and
    softmax ignores the constant log N.
    """
    return F.cross_entropy(logits + tau * log_prior.to(logits.dtype), target)


def cb_focal_loss(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor,
                  gamma: float) -> torch.Tensor:
    """Class-balanced sigmoid focal loss (Cui et al. 2019, baselines.md §7.4).

    One-vs-all sigmoid per class with p_t = sigmoid(z_c) for the true class and 1 - sigmoid(z_c) otherwise:
    sum over samples and classes of w_{y_i} (1 - p_t)^gamma BCE(z_c, 1[c = y_i]), divided by the number of
    positives (the batch size). The modulating factor is computed in log space, as the reference code does.
    """
    labels = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    # (1 - p_t)^gamma = exp(-gamma * (y z + log(1 + e^-z))), stable for large |z|
    modulator = torch.exp(-gamma * (labels * logits + F.softplus(-logits))) if gamma else 1.0
    weights = class_weights.to(logits.dtype)[target].unsqueeze(1)
    return (weights * modulator * bce).sum() / labels.sum()


def prior_log_odds(counts: Sequence[int]) -> torch.Tensor:
    """log(pi_c) - log(1 - pi_c) per class, float32 (pi_c = n_c / N): the prior's logit, the offset that makes
    a one-vs-all sigmoid balanced, as LiVT's released Bal-BCE adds it (util/loss.py ``_bal_sigmod_bias``)."""
    counts_t = _counts_tensor(counts)
    prior = counts_t / counts_t.sum()
    return (prior.log() - (1 - prior).log()).float()


def balanced_bce_loss(logits: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor,
                      tau: float = 1.0) -> torch.Tensor:
    """Balanced binary cross-entropy (LiVT, Xu et al. 2023): one-vs-all sigmoid BCE on ``logits + tau * bias``
    against (soft, e.g. Mixup) ``targets``, summed over classes and averaged over the batch; inference uses the
    raw logits. ``bias`` is :func:`prior_log_odds` in LiVT's released code, or :func:`log_prior` (the
    logit-adjustment offset carried over to the sigmoid)."""
    adjusted = logits + tau * bias.to(logits.dtype)
    return F.binary_cross_entropy_with_logits(adjusted, targets.to(logits.dtype), reduction="sum") / len(logits)
