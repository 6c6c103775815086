"""From logits to the numbers LT papers report: top-1, per-class accuracy, shot groups, ECE.

Group accuracies are means of per-class accuracies inside the group, under two rules: ``counts``
(training count > 100 / 20..100 / < 20, the OLTR rule) and ``paper`` (DeiT-LT's fixed index
ranges). An empty group is ``None``, never 0. All predictions are gathered before anything is
computed, so no per-shard averaging can creep in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from ltbench.data import DatasetInfo, paper_groups, shot_groups


class Evaluator:
    """Base class of evaluator plugins: logits per head + labels -> a JSON-able metrics dict."""

    name: ClassVar[str]
    VERSION: ClassVar[int] = 1

    def evaluate(self, logits: Mapping[str, torch.Tensor], labels: torch.Tensor, info: DatasetInfo) -> dict[str, Any]:
        raise NotImplementedError


DEFAULT_EVALUATOR = "longtail"  # the entry-point name of LongTailEvaluator, the evaluator every run uses


class LongTailEvaluator(Evaluator):
    """``longtail``: top-1, per-class accuracy, many/medium/few under both rules, and ECE, per head."""

    ece_bins: int = 15

    def evaluate(self, logits: Mapping[str, torch.Tensor], labels: torch.Tensor, info: DatasetInfo) -> dict[str, Any]:
        labels = labels.long().cpu()
        groups = {"counts": shot_groups(info.train_counts), "paper": paper_groups(info.num_classes, info.paper_split)}
        heads = {}
        for head, head_logits in logits.items():
            heads[head] = head_metrics(head_logits.float().cpu(), labels, info.num_classes, groups, self.ece_bins)
        return {"heads": heads}


def head_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 groups: Mapping[str, Mapping[str, list[int]] | None], ece_bins: int = 15) -> dict[str, Any]:
    pred = logits.argmax(dim=1)
    per_class = per_class_accuracy(pred, labels, num_classes)
    out: dict[str, Any] = {
        "top1": 100.0 * (pred == labels).float().mean().item(),
        "per_class": [None if np.isnan(a) else round(float(a), 4) for a in per_class],
        "ece": 100.0 * expected_calibration_error(logits, labels, ece_bins),
    }
    for rule, rule_groups in groups.items():
        out[rule] = None if rule_groups is None else {g: group_mean(per_class, c) for g, c in rule_groups.items()}
    return out


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Accuracy (%) of each class; NaN for a class absent from the evaluation labels."""
    correct = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    total = torch.bincount(labels, minlength=num_classes).double()
    acc = 100.0 * correct / total
    return acc.numpy()


def group_mean(per_class: np.ndarray, classes: list[int]) -> float | None:
    values = per_class[classes] if classes else np.array([])
    values = values[~np.isnan(values)]
    return None if len(values) == 0 else float(values.mean())


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins over the max softmax probability (Guo et al., 2017)."""
    conf, pred = logits.softmax(dim=1).max(dim=1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=conf.dtype)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            gap = correct[in_bin].mean().item() - conf[in_bin].double().mean().item()
            ece += in_bin.double().mean().item() * abs(gap)
    return ece


@torch.no_grad()
def predict_split(predict, loader, device: torch.device,
                  autocast_dtype: torch.dtype | None) -> tuple[dict, torch.Tensor]:
    """Run ``predict`` over a loader; return logits per head (float32, CPU) and labels."""
    outputs: dict[str, list[torch.Tensor]] = {}
    labels = []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            heads = predict(x)
        for name, value in heads.items():
            outputs.setdefault(name, []).append(value.float())
        labels.append(y)
    return {k: torch.cat(v).cpu() for k, v in outputs.items()}, torch.cat(labels)
