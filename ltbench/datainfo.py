"""``ltbench data info``: what a long-tailed dataset looks like, with fingerprints for exact reproduction."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ltbench import config as cfgmod
from ltbench.data import default_data_root, indices_sha256, paper_groups, rank_fingerprint, shot_groups
from ltbench.registry import DATASETS
from ltbench.resolve import dataset_options
from ltbench.splits import describe_split


def dataset_summary(dataset: str, rho: float | None, sets: Sequence[str], data_root: Path | None) -> dict[str, Any]:
    cls = DATASETS.get(dataset)
    overrides, _ = cfgmod.parse_set_options(sets)
    options = dataset_options(cls, rho, overrides)
    data = cls(options, (data_root or default_data_root()).resolve()).load()
    info = data.info
    groups = shot_groups(info.train_counts)
    summary: dict[str, Any] = {
        "dataset": dataset,
        "options": cfgmod.to_jsonable(options),
        "num_classes": info.num_classes,
        "train_total": int(sum(info.train_counts)),
        "test_total": len(data.test),
        "class_counts": list(info.train_counts),
        "imbalance_ratio": max(info.train_counts) / max(1, min(info.train_counts)),
        "groups_counts_rule": {g: len(c) for g, c in groups.items()},
    }
    paper = paper_groups(info.num_classes, info.paper_split)
    if paper is not None:
        summary["groups_paper_split"] = {g: len(c) for g, c in paper.items()}
    if "kept_ranks" in info.extras:
        summary["rank_fingerprint"] = rank_fingerprint(info.extras["kept_ranks"])
    if data.train_indices is not None:
        summary["train_indices_sha256"] = indices_sha256(data.train_indices)
    summary.update(_split_facts(data))
    return summary


def _split_facts(data: Any) -> dict[str, Any]:
    """Every split's size, class counts and content fingerprint, and how val was made (or why there is none)."""
    facts: dict[str, Any] = {"val_total": len(data.val) if data.val is not None else 0,
                             "val_source": data.info.extras.get("val_source", "none")}
    if data.val_indices is not None:
        facts["val_indices_sha256"] = indices_sha256(data.val_indices)
    if "test_source" in data.info.extras:
        facts["test_source"] = data.info.extras["test_source"]
    facts["splits"] = {name: describe_split(split, data.info.num_classes)
                       for name, split in (("train", data.train), ("val", data.val), ("test", data.test))}
    return facts
