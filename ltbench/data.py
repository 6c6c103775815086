"""What every dataset plugin returns, and the long-tail arithmetic shared by all of them.

A dataset yields a :class:`DatasetInfo` plus a train, a test and (for model selection) a val split. A split is either
in memory (uint8 images, CIFAR and ``synthetic``) or a list of image files (ImageNet-LT, iNat,
Places-LT); the input pipeline in :mod:`ltbench.augment` knows how to feed both.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ltbench.errors import UserError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about a dataset that methods, the evaluator and the report need."""

    name: str
    num_classes: int
    train_counts: tuple[int, ...]
    image_size: int  # native side length of the stored images; for file lists, the standard input size (224)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...] = ()
    # The DeiT-LT / Saddle index-range split: head = [0, paper_split[0]), mid = [paper_split[0], paper_split[1]).
    paper_split: tuple[int, int] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    # True when the stored images differ in size (file lists): evaluation then always resizes and crops.
    variable_size: bool = False

    # extras a method or a teacher needs to be rebuilt without the data (the rest describe how the split was made)
    PORTABLE_EXTRAS: ClassVar[tuple[str, ...]] = ("label_map",)

    def portable(self) -> dict[str, Any]:
        """What result.json keeps so that a run's network can be rebuilt without its dataset (``ltbench export``)."""
        facts = {f: getattr(self, f) for f in ("name", "num_classes", "image_size", "variable_size")}
        facts.update(train_counts=[int(c) for c in self.train_counts], mean=list(self.mean), std=list(self.std),
                     class_names=list(self.class_names),
                     paper_split=list(self.paper_split) if self.paper_split else None,
                     extras={k: self.extras[k] for k in self.PORTABLE_EXTRAS if k in self.extras})
        return facts


@dataclass
class InMemorySplit:
    """Images as a uint8 array (N, H, W, 3) and integer labels."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FileListSplit:
    """Image files under ``root`` with integer labels (decoded on the fly)."""

    root: Path
    paths: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


Split = InMemorySplit | FileListSplit


@dataclass
class LTData:
    info: DatasetInfo
    train: Split
    test: Split
    train_indices: np.ndarray | None = None  # indices into the original balanced train set, when subsampled
    # The split for model selection, disjoint from train and test (ltbench.splits); None when the dataset has none,
    # and info.extras["val_source"] says how it was made or why there is none.
    val: Split | None = None
    val_indices: np.ndarray | None = None  # indices into the original balanced train set (CIFAR-LT)


@dataclass
class DatasetOptions:
    """Options of datasets without any (subclasses add fields such as ``rho``)."""


class Dataset:
    """Base class of dataset plugins: declare ``Options`` and implement :meth:`load`."""

    name: ClassVar[str]
    display_name: ClassVar[str] = ""  # how papers write it (figure titles); "" = the name
    VERSION: ClassVar[int] = 1
    Options: ClassVar[type] = DatasetOptions

    def __init__(self, options: Any, data_root: Path) -> None:
        self.options = options
        self.data_root = data_root

    def load(self) -> LTData:
        raise NotImplementedError

    @classmethod
    def profile_size(cls, options: Any) -> tuple[int, int] | None:
        """(images of the largest class before subsampling, number of classes), when known without loading
        the data; it bounds rho, since the rarest class keeps about n_max / rho images."""
        return None

    @classmethod
    def validate_options(cls, options: Any) -> None:
        for name, value in vars(options).items():  # numpy's RandomState takes seeds in [0, 2**32)
            if name.endswith("seed") and isinstance(value, int) and not 0 <= value < 2**32:
                raise UserError(f"The dataset option {name} must be in [0, 2**32), got {value}.")
        rho = getattr(options, "rho", None)
        if rho is None:
            return
        if not (rho >= 1 and math.isfinite(rho)):
            raise UserError(f"The imbalance ratio rho must be >= 1 and finite (rho = n_max / n_min), got {rho}.")
        size = cls.profile_size(options)
        if size and min(exp_profile_counts(size[0], size[1], rho)) < 1:
            n_max = size[0]
            # n_max * (1 / n_max) can round below 1 in floating point, and the count is truncated to 0
            largest = (f"{n_max}" if min(exp_profile_counts(n_max, size[1], n_max)) >= 1 else
                       f"just below {n_max} ({n_max} itself rounds the rarest class down to 0 images)")
            raise UserError(f"rho={rho:g} leaves the rarest class of {cls.name} with no training image (its largest "
                            f"class has {n_max}, the rarest keeps n_max / rho). The largest valid rho for "
                            f"{cls.name} here is {largest}.")


def default_data_root() -> Path:
    return Path(os.environ.get("LTBENCH_DATA", "data")).expanduser().resolve()


# ----------------------------------------------------------------------------------------------
# Long-tail profile and group arithmetic


def exp_profile_counts(n_max: float, num_classes: int, rho: float) -> list[int]:
    """Per-class counts n_i = floor(n_max * (1/rho)^(i/(C-1))), computed in LDAM-DRW's power form.

    The exp/log form gives off-by-one counts for the tail (spec baselines.md §1.1), so the power of
    ``imb_factor`` is used exactly as the reference code does.
    """
    if num_classes == 1:
        return [int(n_max)]
    imb_factor = 1.0 / rho
    return [int(n_max * (imb_factor ** (i / (num_classes - 1.0)))) for i in range(num_classes)]


def ldam_subsample(labels: np.ndarray, counts: Sequence[int], seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Select the LT subset exactly as LDAM-DRW (and PaCo, DeiT-LT, Saddle) do.

    Seeds numpy's legacy global-style RNG once, then for each class in ascending order shuffles
    the ascending indices of that class and keeps the first n_c. Returns the kept global indices
    (class blocks in class order) and, per class, the kept within-class ranks in shuffled order.
    """
    rng = np.random.RandomState(seed)
    kept, ranks = [], []
    for cls, n_keep in enumerate(counts):
        class_idx = np.flatnonzero(labels == cls)
        order = np.arange(len(class_idx))
        rng.shuffle(order)
        ranks.append(order[:n_keep].astype(np.int64))
        kept.append(class_idx[order[:n_keep]])
    return np.concatenate(kept).astype(np.int64), ranks


def rank_fingerprint(ranks: Sequence[np.ndarray]) -> str:
    """First 16 hex digits of sha256 over the little-endian int64 kept ranks, class by class."""
    digest = hashlib.sha256()
    for r in ranks:
        digest.update(np.asarray(r, dtype="<i8").tobytes())
    return digest.hexdigest()[:16]


def indices_sha256(indices: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


SHOT_GROUPS = ("many", "medium", "few")
MANY_ABOVE, FEW_BELOW = 100, 20  # the counts rule: many > 100 training images, medium 20..100, few < 20


def shot_group_of(count: int) -> str:
    """The standard OLTR rule on training counts: many > 100, medium 20..100, few < 20."""
    if count > MANY_ABOVE:
        return "many"
    if count >= FEW_BELOW:
        return "medium"
    return "few"


def shot_groups(train_counts: Sequence[int]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {g: [] for g in SHOT_GROUPS}
    for cls, count in enumerate(train_counts):
        groups[shot_group_of(count)].append(cls)
    return groups


def paper_groups(num_classes: int, split: tuple[int, int] | None) -> dict[str, list[int]] | None:
    """DeiT-LT's fixed index ranges (head / mid / tail), reported as many / medium / few."""
    if split is None:
        return None
    head_end, mid_end = split
    return {
        "many": list(range(0, head_end)),
        "medium": list(range(head_end, mid_end)),
        "few": list(range(mid_end, num_classes)),
    }


def frequency_order(counts: Sequence[int]) -> np.ndarray:
    """Class ids sorted by descending training count, exactly as DeiT-LT's ``np.argsort(-counts)``.

    That call ran numpy 1.24's default (unstable) introsort; newer numpy versions dispatch the same call to
    SIMD sorts that order ties differently per CPU, so the algorithm is reproduced here (:func:`numpy_introsort`).
    Ties decide which side of the head/mid/tail index boundaries equal-count classes land on.
    """
    return numpy_introsort([-int(c) for c in counts])


def numpy_introsort(values: Sequence[int]) -> np.ndarray:
    """The permutation numpy 1.24's ``np.argsort(values)`` returns (``aquicksort_`` in ``npysort/quicksort.cpp``):
    median-of-three quicksort down to partitions of 16, then insertion sort; heapsort past depth 2*log2(n)."""
    v, order = list(values), list(range(len(values)))
    stack: list[tuple[int, int, int]] = []
    lo, hi, depth = 0, len(v) - 1, 2 * (len(v).bit_length() - 1) if v else 0
    while True:
        if depth < 0:
            _heapsort(v, order, lo, hi)
        else:
            while hi - lo > 15:
                lo, hi, depth = _partition(v, order, lo, hi, depth, stack)
            _insertion_sort(v, order, lo, hi)
        if not stack:
            return np.asarray(order, dtype=np.int64)
        lo, hi, depth = stack.pop()


def _partition(v: list[int], a: list[int], lo: int, hi: int, depth: int,
               stack: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    mid = lo + ((hi - lo) >> 1)
    if v[a[mid]] < v[a[lo]]:
        a[mid], a[lo] = a[lo], a[mid]
    if v[a[hi]] < v[a[mid]]:
        a[hi], a[mid] = a[mid], a[hi]
    if v[a[mid]] < v[a[lo]]:
        a[mid], a[lo] = a[lo], a[mid]
    pivot = v[a[mid]]
    i, j = lo, hi - 1
    a[mid], a[j] = a[j], a[mid]
    while True:
        i += 1
        while v[a[i]] < pivot:
            i += 1
        j -= 1
        while pivot < v[a[j]]:
            j -= 1
        if i >= j:
            break
        a[i], a[j] = a[j], a[i]
    a[i], a[hi - 1] = a[hi - 1], a[i]
    depth -= 1
    if i - lo < hi - i:  # push the larger part, go on with the smaller
        stack.append((i + 1, hi, depth))
        return lo, i - 1, depth
    stack.append((lo, i - 1, depth))
    return i + 1, hi, depth


def _insertion_sort(v: list[int], a: list[int], lo: int, hi: int) -> None:
    for i in range(lo + 1, hi + 1):
        item, j = a[i], i
        while j > lo and v[item] < v[a[j - 1]]:
            a[j] = a[j - 1]
            j -= 1
        a[j] = item


def _heapsort(v: list[int], a: list[int], lo: int, hi: int) -> None:
    """numpy's ``aheapsort_`` on a[lo..hi] (1-based heap indices over the slice)."""
    n = hi - lo + 1

    def sift(k: int, size: int, item: int) -> None:
        j = 2 * k
        while j <= size:
            if j < size and v[a[lo + j - 1]] < v[a[lo + j]]:
                j += 1
            if not v[item] < v[a[lo + j - 1]]:
                break
            a[lo + k - 1] = a[lo + j - 1]
            k, j = j, 2 * j
        a[lo + k - 1] = item

    for k in range(n >> 1, 0, -1):
        sift(k, n, a[lo + k - 1])
    for size in range(n - 1, 0, -1):
        item = a[lo + size]
        a[lo + size] = a[lo]
        sift(1, size, item)
