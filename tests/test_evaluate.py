"""The evaluator's numbers on hand-made logits."""

from __future__ import annotations

import pytest
import torch

from ltbench.data import DatasetInfo
from ltbench.evaluate import LongTailEvaluator, expected_calibration_error


def _info(counts, split=None):
    return DatasetInfo("t", len(counts), tuple(counts), 32, (0.5,) * 3, (0.5,) * 3, paper_split=split)


def test_group_means_are_means_of_per_class_accuracy_and_empty_groups_are_none():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0])  # class acc: 75, 50, 0
    logits = torch.nn.functional.one_hot(pred, 3).float() * 5
    out = LongTailEvaluator().evaluate({"main": logits}, labels, _info([500, 50, 150], split=(1, 2)))
    m = out["heads"]["main"]
    assert m["top1"] == pytest.approx(100 * 4 / 8)
    assert m["per_class"] == [75.0, 50.0, 0.0]
    assert m["counts"] == {"many": pytest.approx(37.5), "medium": 50.0, "few": None}
    assert m["paper"] == {"many": 75.0, "medium": 50.0, "few": 0.0}


def test_every_head_is_reported_and_absent_classes_are_skipped():
    labels = torch.tensor([0, 1])
    heads = {"cls": torch.tensor([[1.0, 0, 0], [0, 1, 0]]), "dist": torch.tensor([[0, 1.0, 0], [0, 1, 0]])}
    out = LongTailEvaluator().evaluate(heads, labels, _info([10, 10, 10]))["heads"]
    assert out["cls"]["top1"] == 100 and out["dist"]["top1"] == 50
    assert out["cls"]["per_class"][2] is None  # class 2 has no test image: not counted as 0
    assert out["cls"]["counts"]["few"] == 100.0 and out["cls"]["paper"] is None


def test_ece_by_hand():
    # two samples, both predicted with confidence ~0.9; one right, one wrong -> |0.5 - 0.9| = 0.4
    logits = torch.tensor([[torch.log(torch.tensor(9.0)), 0.0], [torch.log(torch.tensor(9.0)), 0.0]])
    assert expected_calibration_error(logits, torch.tensor([0, 1])) == pytest.approx(0.4, abs=1e-6)
