"""Validation splits, disjoint from training and test, and the fingerprints that pin every split.

Three constructions, one per kind of dataset (docs/protocol.md):

- CIFAR-LT: the long-tailed subset leaves most training images unused, so val takes, per class, the next
  images of LDAM-DRW's own shuffle after the kept ones (:func:`spare_val`). The default training subset is
  untouched. The head class keeps all its images, so by default it has no val image; ``val_fill_from_train``
  moves the missing ones out of training (the last of the kept order), which changes the subset and the run id.
- ImageNet-LT and Places-LT: their official val lists (read by the dataset).
- iNaturalist-2018, which has none: :func:`carve_val` holds a few images per class out of the training list.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from ltbench.data import FileListSplit, InMemorySplit, Split, ldam_subsample

CARVE_SHARE = 5  # a carved val takes at most 1/5 of a class's training images, so a 2-image class keeps both


def full_orders(labels: np.ndarray, num_classes: int, seed: int) -> list[np.ndarray]:
    """Per class, the whole of LDAM-DRW's shuffled order. A shuffle consumes the RNG by the class size only, so
    the first n_c of each order are exactly the kept ranks of :func:`ltbench.data.ldam_subsample`."""
    sizes = np.bincount(labels, minlength=num_classes).tolist()
    return ldam_subsample(labels, sizes, seed)[1]


def spare_val(labels: np.ndarray, counts: Sequence[int], seed: int, per_class: int,
              fill_from_train: bool) -> tuple[np.ndarray, np.ndarray]:
    """(kept training indices, val indices) into the balanced training set.

    Val takes ranks ``[start, start + per_class)`` of each class's shuffled order, with ``start = n_c`` (the images
    right after the kept ones) or, with ``fill_from_train``, ``min(n_c, size - per_class)``: a class without
    enough spare images then gives its last kept ones. Training keeps ranks ``[0, min(n_c, start))``, in the
    published order, so without ``fill_from_train`` the kept indices are exactly the published subset's.
    """
    kept, val = [], []
    for cls, order in enumerate(full_orders(labels, len(counts), seed)):
        class_idx = np.flatnonzero(labels == cls)
        n_keep = counts[cls]
        start = min(n_keep, len(order) - per_class) if fill_from_train else n_keep
        start = max(start, 0)
        kept.append(class_idx[order[:min(n_keep, start)]])
        val.append(class_idx[order[start:start + per_class]])
    return np.concatenate(kept).astype(np.int64), np.concatenate(val).astype(np.int64)


def carve_val(labels: np.ndarray, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, val indices) of a list: per class ``min(per_class, n_c // CARVE_SHARE)`` images, drawn
    with a fixed seed, move to val. Classes with fewer than CARVE_SHARE images keep all of them (no val image)."""
    rng = np.random.RandomState(seed)
    train, val = [], []
    for cls in range(int(labels.max()) + 1 if len(labels) else 0):
        idx = np.flatnonzero(labels == cls)
        take = min(per_class, len(idx) // CARVE_SHARE)
        chosen = np.sort(rng.permutation(idx)[:take])
        val.append(chosen)
        train.append(np.setdiff1d(idx, chosen))
    keep = np.sort(np.concatenate(train)) if train else np.zeros(0, np.int64)
    return keep.astype(np.int64), np.sort(np.concatenate(val)).astype(np.int64) if val else np.zeros(0, np.int64)


def split_fingerprint(split: Split) -> str:
    """First 16 hex digits of a sha256 over a split's content: pixels and labels in memory, "path label" lines for
    a file list. Two splits with the same fingerprint hold the same images with the same labels in the same order."""
    digest = hashlib.sha256()
    if isinstance(split, InMemorySplit):
        digest.update(np.ascontiguousarray(split.images).tobytes())
        digest.update(np.asarray(split.labels, dtype="<i8").tobytes())
    elif isinstance(split, FileListSplit):
        for path, label in zip(split.paths, split.labels.tolist()):
            digest.update(f"{path} {label}\n".encode())
    return digest.hexdigest()[:16]


def describe_split(split: Split | None, num_classes: int) -> dict[str, object] | None:
    """Size, per-class counts and fingerprint of a split (None: the dataset has no such split)."""
    if split is None:
        return None
    return {"images": len(split), "class_counts": np.bincount(split.labels, minlength=num_classes).tolist(),
            "fingerprint": split_fingerprint(split)}
