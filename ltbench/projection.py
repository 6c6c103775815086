"""Projected GPU hours of a planned run, from a measured throughput table (``ltbench/reference/h200_throughput.csv``):
what ``ltbench reproduce --dry-run`` and ``--list`` print before anything trains."""

from __future__ import annotations

import io
from collections.abc import Mapping
from importlib.resources import files
from typing import Any

import pandas as pd

from ltbench import augment
from ltbench.config import EVAL_BUDGET, RunConfig
from ltbench.registry import DATASETS
from ltbench.resolve import dataset_options, hparams_of
from ltbench.sweep import Job

PROJECTION_TEXT = ("projected GPU hours = epochs x training images (max_c n_c x C per class-balanced epoch; none for "
                   "tau_norm, which trains nothing) / the training rate measured on one H200 for the same network and "
                   "batch (ltbench/reference/h200_throughput.csv, from docs/performance.md), halved with SAM's second "
                   "pass, + 5 % for evaluation (the default interval's budget); a decoupled stage 2 (crt, lws: a "
                   "classifier on frozen features) is projected at the full network's training rate, an upper bound; "
                   "n/a = no measured rate for that network")


def throughput_table() -> pd.DataFrame:
    text = files("ltbench").joinpath("reference/h200_throughput.csv").read_text()
    data = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    return pd.read_csv(io.StringIO(data))


def network_of(hparams: Mapping[str, Any]) -> str:
    """``resnet32@32`` or ``vit-384x6@32/4``: the network and input size, which set the training rate."""
    if "arch" in hparams:
        return f"{hparams['arch']}@{hparams['img_size']}"
    return f"vit-{hparams['embed_dim']}x{hparams['depth']}@{hparams['img_size']}/{hparams['patch_size']}"


def projected_hours(job: Job, table: pd.DataFrame) -> float | None:
    hp = hparams_of(job.config)
    epochs = max(0, hp.epochs - job.epochs_done)
    if epochs == 0:
        return 0.0  # finished, or a method that trains nothing (tau_norm)
    rows = table[(table["network"] == network_of(job.config.hparams)) & (table["batch"] == hp.batch_size)]
    rows = rows[rows["method"].isin([job.config.method, "*"])].sort_values("method", key=lambda m: m == "*")
    per_epoch = images_per_epoch(job.config, hp.sampler)
    if rows.empty or per_epoch is None:
        return None
    images = per_epoch * epochs
    rate = float(rows["images_per_s"].iloc[0]) / (2 if hp.uses_sam else 1)
    return images / rate * (1 + EVAL_BUDGET) / 3600


def train_counts(config: RunConfig) -> list[int] | None:
    """The run's per-class training counts, known without reading its dataset (None for a file list)."""
    dataset_cls = DATASETS.get(config.dataset)
    if not hasattr(dataset_cls, "train_counts"):
        return None
    return list(dataset_cls.train_counts(dataset_options(dataset_cls, None, dict(config.data))))


def images_per_epoch(config: RunConfig, sampler: str) -> int | None:
    """Training images of one epoch (``max_c n_c x C`` when ``sampler`` is class_balanced)."""
    counts = train_counts(config)
    if counts is None:
        return None
    return augment.class_balanced_epoch(counts) if sampler == "class_balanced" else sum(counts)


