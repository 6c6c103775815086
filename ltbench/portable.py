"""Portable long-tailed subsets: an in-memory LT dataset frozen into one compressed file.

``ltbench data export cifar10lt --rho 100 --out DIR`` writes exactly the images the LDAM-DRW rule keeps
(plus the test split, the kept indices and their rank fingerprint) as xz-compressed arrays, about
48 MB for CIFAR-10-LT rho=100 instead of 178 MB of originals. A dataset that finds no originals under
its data root loads such a file from ``<data root>/ltbench-subsets/``, after checking that its content
is what its name claims (class counts of the LT profile and the stored fingerprint).
"""

from __future__ import annotations

import dataclasses
import io
import json
import lzma
from pathlib import Path

import numpy as np

from ltbench.data import DatasetInfo, InMemorySplit, LTData, exp_profile_counts, rank_fingerprint
from ltbench.errors import UserError
from ltbench.records import atomic_write_bytes

FOLDER = "ltbench-subsets"


def subset_path(root: Path, dataset: str, rho: float, subsample_seed: int) -> Path:
    return root / FOLDER / f"{dataset}-rho{rho:g}-seed{subsample_seed}.npz.xz"


def export(data: LTData, path: Path) -> Path:
    if not isinstance(data.train, InMemorySplit) or not isinstance(data.test, InMemorySplit):
        raise UserError("Only in-memory datasets (CIFAR-LT, synthetic) can be exported as a portable subset.")
    ranks = data.info.extras.get("kept_ranks", [])
    meta = {k: v for k, v in dataclasses.asdict(data.info).items() if k != "extras"}
    meta["rank_fingerprint"] = rank_fingerprint(ranks) if ranks else None
    buffer = io.BytesIO()
    arrays = {"train_x": data.train.images, "train_y": data.train.labels, "test_x": data.test.images,
              "test_y": data.test.labels, "rank_lengths": np.array([len(r) for r in ranks], dtype=np.int64),
              "ranks": np.concatenate(ranks) if ranks else np.zeros(0, np.int64),
              "train_indices": data.train_indices if data.train_indices is not None else np.zeros(0, np.int64)}
    if data.val is not None:  # files written before val splits have none; they load without one
        arrays.update(val_x=data.val.images, val_y=data.val.labels,
                      val_indices=data.val_indices if data.val_indices is not None else np.zeros(0, np.int64))
        meta["extras"] = {"val_source": data.info.extras.get("val_source", "")}
    np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    atomic_write_bytes(path, lzma.compress(buffer.getvalue(), preset=6))
    return path


def load(path: Path, rho: float) -> LTData:
    """Read a subset back, checking its class counts follow the LT profile for ``rho`` and its fingerprint."""
    try:
        arrays = np.load(io.BytesIO(lzma.decompress(path.read_bytes())))
        meta = json.loads(arrays["meta"].tobytes().decode())
    except (OSError, lzma.LZMAError, ValueError, KeyError) as exc:
        raise UserError(f"{path} is not a readable ltbench subset ({exc}); export it again.") from exc
    ranks = np.split(arrays["ranks"], np.cumsum(arrays["rank_lengths"])[:-1]) if len(arrays["ranks"]) else []
    expected = exp_profile_counts(meta["train_counts"][0], meta["num_classes"], rho)
    counts = np.bincount(arrays["train_y"], minlength=meta["num_classes"]).tolist()
    if counts != expected or (ranks and rank_fingerprint(ranks) != meta["rank_fingerprint"]):
        raise UserError(f"{path} does not hold the subset its name claims (class counts {counts}); export it again.")
    extras = {"kept_ranks": ranks} if ranks else {}
    extras["val_source"] = meta.pop("extras", {}).get("val_source", f"none: {path.name} was exported before val "
                                                                    f"splits existed; export it again")
    meta = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items() if k != "rank_fingerprint"}
    info = DatasetInfo(**meta, extras=extras)
    train_indices = arrays["train_indices"] if len(arrays["train_indices"]) else None
    has_val = "val_y" in arrays.files
    return LTData(info, InMemorySplit(arrays["train_x"], arrays["train_y"]),
                  InMemorySplit(arrays["test_x"], arrays["test_y"]), train_indices,
                  val=InMemorySplit(arrays["val_x"], arrays["val_y"]) if has_val else None,
                  val_indices=arrays["val_indices"] if has_val and len(arrays["val_indices"]) else None)
