"""CIFAR-10-LT and CIFAR-100-LT, built exactly as LDAM-DRW builds them (spec baselines.md §1).

The balanced originals are read from the standard python-pickle batches under the data root;
``ltbench data download`` fetches them. The long-tailed train set keeps, per class, the first n_i of
a legacy-numpy (seed 0) shuffle; the test set is the full balanced one.
"""

from __future__ import annotations

import pickle
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ltbench.config import recorded_if_set
from ltbench.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    Dataset,
    DatasetInfo,
    InMemorySplit,
    LTData,
    exp_profile_counts,
    ldam_subsample,
)
from ltbench.errors import UserError
from ltbench.portable import load as load_subset
from ltbench.portable import subset_path
from ltbench.splits import spare_val


@dataclass
class CIFARLTOptions:
    rho: float = 100.0  # imbalance ratio n_max / n_min
    subsample_seed: int = 0  # LDAM-DRW's rand_number; 0 reproduces every published CIFAR-LT number
    # The val split (ltbench.splits.spare_val), in the run id only when set: 0 = the standard size, 100 images per
    # class for CIFAR-10, 20 for CIFAR-100 (as ImageNet-LT's and Places-LT's official val lists)
    val_per_class: int = recorded_if_set(0)
    # the head class keeps all its images, so it has no spare one for val: move the missing ones out of training
    # (changes the training subset, hence the run id)
    val_fill_from_train: bool = recorded_if_set(False)


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a callable that CIFAR files never contain."""


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR python batches hold: dicts, lists, str/bytes, ints and numpy arrays.

    ``pickle.load`` would call any global a crafted file names (``os.system`` ...); here every global
    but numpy's array constructors is refused, and the caller checks the arrays' dtype and shape.
    """

    ALLOWED = frozenset({
        (module, name)
        for core in ("numpy.core", "numpy._core")  # numpy 1 and numpy 2 spell the module differently
        for module, name in ((f"{core}.multiarray", "_reconstruct"), (f"{core}.numeric", "_frombuffer"))
    } | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")})  # protocol 2 spells bytes via encode

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise RefusedGlobal(f"it refers to {module}.{name}, which a CIFAR batch never contains "
                                         f"(a crafted file could run code through it); refused")
        return super().find_class(module, name)


def load_cifar_pickle(path: Path) -> Any:
    """A CIFAR python-pickle file read with the restricted unpickler (latin1, as the originals need)."""
    with open(path, "rb") as fh:
        return _BatchUnpickler(fh, encoding="latin1").load()


class _CIFARLT(Dataset):
    Options = CIFARLTOptions
    VERSION = 1
    num_classes: ClassVar[int]
    # Both originals: balanced, 5000 (CIFAR-10) or 500 (CIFAR-100) per class. A copy of another size is refused:
    # its runs would carry the real dataset's run id. Tests of the reader patch these for their small fakes.
    train_images: ClassVar[int] = 50_000
    test_images: ClassVar[int] = 10_000
    folder: ClassVar[str]
    train_files: ClassVar[tuple[str, ...]]
    test_files: ClassVar[tuple[str, ...]]
    label_key: ClassVar[str]
    names_file: ClassVar[str]
    names_key: ClassVar[str]
    url: ClassVar[str]
    md5: ClassVar[str]
    paper_split: ClassVar[tuple[int, int]]
    val_per_class: ClassVar[int]  # the standard val size per class

    @classmethod
    def profile_size(cls, options: CIFARLTOptions) -> tuple[int, int]:
        return cls.train_images // cls.num_classes, cls.num_classes

    def load(self) -> LTData:
        portable = subset_path(self.data_root, self.name, self.options.rho, self.options.subsample_seed)
        if not self._originals_present() and portable.is_file():
            return load_subset(portable, self.options.rho)
        folder = self.locate()
        train_x, train_y = self._read(folder, self.train_files)
        test_x, test_y = self._read(folder, self.test_files)
        if (len(train_y), len(test_y)) != (self.train_images, self.test_images):
            raise UserError(
                f"{self.name}: the batches in {folder} hold {len(train_y):,} training and {len(test_y):,} test "
                f"images; the originals hold {self.train_images:,} and {self.test_images:,}. A partial or "
                f"resized copy is not {self.name}, and its runs would be recorded under the real dataset's run id. "
                f"Download it again (`ltbench data download {self.name}`), or point --data-root at an intact copy."
            )
        n_max = len(train_y) / self.num_classes
        counts = exp_profile_counts(n_max, self.num_classes, self.options.rho)
        _, ranks = ldam_subsample(train_y, counts, seed=self.options.subsample_seed)
        per_class = self.val_size(self.options)
        kept, val = spare_val(train_y, counts, self.options.subsample_seed, per_class, self.options.val_fill_from_train)
        given = np.bincount(train_y[val], minlength=self.num_classes).tolist()
        if self.options.val_fill_from_train:
            counts = np.bincount(train_y[kept], minlength=self.num_classes).tolist()
            if min(counts) == 0:
                raise UserError(f"{self.name}: val_fill_from_train with {per_class} val images per class leaves a "
                                f"class with no training image; lower data.val_per_class.")
            ranks = [r[:n] for r, n in zip(ranks, counts)]
        info = DatasetInfo(
            name=self.name,
            num_classes=self.num_classes,
            train_counts=tuple(counts),
            image_size=32,
            mean=CIFAR_MEAN,
            std=CIFAR_STD,
            class_names=self._class_names(folder),
            paper_split=self.paper_split,
            extras={"kept_ranks": ranks, "val_source": self._val_source(per_class, given)},
        )
        return LTData(info, InMemorySplit(train_x[kept], train_y[kept]), InMemorySplit(test_x, test_y), kept,
                      val=InMemorySplit(train_x[val], train_y[val]), val_indices=val)

    @classmethod
    def val_size(cls, options: CIFARLTOptions) -> int:
        return options.val_per_class or cls.val_per_class

    def _val_source(self, per_class: int, given: list[int]) -> str:
        short = {c: n for c, n in enumerate(given) if n < per_class}
        text = (f"{per_class} images per class of the CIFAR training set that the LT subset leaves unused (the next "
                f"ones of LDAM-DRW's shuffle after the kept ones)")
        if self.options.val_fill_from_train:
            return text + "; classes without enough unused images gave their last kept ones (val_fill_from_train)"
        if not short:
            return text
        listed = ", ".join(f"class {c}: {n}" for c, n in short.items())
        return (text + f"; classes that keep (almost) all their images have fewer ({listed}): the val top-1 leaves "
                f"them out or under-weights them (set data.val_fill_from_train=true to move some out of training)")

    @classmethod
    def validate_options(cls, options: CIFARLTOptions) -> None:
        super().validate_options(options)
        per_class = cls.train_images // cls.num_classes
        if not 0 <= options.val_per_class < per_class:
            raise UserError(f"{cls.name}: val_per_class must be in [0, {per_class}) (0 = the standard "
                            f"{cls.val_per_class}), got {options.val_per_class}.")

    @classmethod
    def train_counts(cls, options: CIFARLTOptions) -> list[int]:
        """Per-class training counts without reading the batches (the originals are balanced, 50,000 images)."""
        return exp_profile_counts(cls.train_images / cls.num_classes, cls.num_classes, options.rho)

    def _originals_present(self) -> bool:
        return any((c / self.train_files[0]).is_file() for c in (self.data_root / self.folder, self.data_root))

    def locate(self) -> Path:
        """The batches folder: ``<root>/<folder>`` or the root itself."""
        for candidate in (self.data_root / self.folder, self.data_root):
            if all((candidate / f).is_file() for f in self.train_files + self.test_files):
                return candidate
        raise UserError(
            f"{self.name}: the CIFAR python-pickle batches were not found in {self.data_root / self.folder} "
            f"(nor directly in {self.data_root}); expected files {', '.join(self.train_files + self.test_files)}. "
            f"Point --data-root (or LTBENCH_DATA) at the folder that contains {self.folder}/, "
            f"or fetch it with `ltbench data download {self.name} --data-root DIR` on a machine with internet "
            f"(a subset exported by `ltbench data export` is also read from {self.data_root / 'ltbench-subsets'})."
        )

    def _read(self, folder: Path, files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for name in files:
            path = folder / name
            try:
                batch = load_cifar_pickle(path)
                if not isinstance(batch.get("data"), np.ndarray) or batch["data"].dtype != np.uint8:
                    raise TypeError("its data entry is not a uint8 numpy array")
                data = batch["data"]
                target = np.asarray(batch[self.label_key], dtype=np.int64)
            except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as exc:
                raise UserError(
                    f"{self.name}: {path} is not a readable CIFAR python-pickle batch ({type(exc).__name__}: {exc}). "
                    f"Delete the folder and download it again, or point --data-root at an intact copy."
                ) from exc
            if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(target):
                raise UserError(
                    f"{self.name}: {path} has data of shape {data.shape} and {len(target)} labels; "
                    f"expected (N, 3072) uint8 with N labels. The copy is corrupt: download it again."
                )
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(target)
        x, y = np.concatenate(images), np.concatenate(labels)
        per_class = np.bincount(y, minlength=self.num_classes)
        if y.min() < 0 or y.max() >= self.num_classes or len(set(per_class.tolist())) != 1:
            raise UserError(
                f"{self.name}: the batches in {folder} have per-class counts {per_class.tolist()}; the CIFAR "
                f"originals are balanced with {self.num_classes} classes. The copy is incomplete or corrupt."
            )
        return np.ascontiguousarray(x), y

    def _class_names(self, folder: Path) -> tuple[str, ...]:
        path = folder / self.names_file
        try:
            names = tuple(str(name) for name in load_cifar_pickle(path)[self.names_key])
        except RefusedGlobal as exc:  # a crafted file is an error, a missing or odd one only costs the names
            raise UserError(f"{self.name}: {path} is not a CIFAR meta file: {exc}.") from exc
        except (OSError, KeyError, pickle.UnpicklingError, EOFError, TypeError, ValueError):
            names = ()
        return names if len(names) == self.num_classes else tuple(str(i) for i in range(self.num_classes))

    @classmethod
    def download(cls, data_root: Path, url: str | None = None, md5: str | None = None) -> Path:
        """Fetch and unpack the original archive into ``data_root`` (atomic: unpack, then rename)."""
        from torchvision.datasets.utils import check_integrity

        data_root.mkdir(parents=True, exist_ok=True)
        target = data_root / cls.folder
        if target.exists():
            return target
        url, md5 = url or cls.url, md5 or cls.md5
        with tempfile.TemporaryDirectory(dir=data_root, prefix=".download-") as tmp:
            archive = Path(tmp) / "archive.tar.gz"
            try:
                with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
            except OSError as exc:
                raise UserError(
                    f"Downloading {cls.name} from {url} failed ({exc}). Without internet, copy the "
                    f"{cls.folder}/ folder of the python-pickle release into {data_root} by hand."
                ) from exc
            if not check_integrity(str(archive), md5):
                raise UserError(f"The archive downloaded from {url} does not have md5 {md5}; not unpacking it.")
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            (Path(tmp) / cls.folder).rename(target)
        return target


class CIFAR10LT(_CIFARLT):
    """CIFAR-10-LT: 10 classes, n_max 5000; rho 100 keeps 12,406 training images."""

    display_name = "CIFAR-10-LT"  # how papers write it (figure titles, legends)

    name = "cifar10lt"
    num_classes = 10
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    label_key = "labels"
    names_file, names_key = "batches.meta", "label_names"
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    md5 = "c58f30108f718f92721af3b95e74349a"
    paper_split = (3, 7)
    val_per_class = 100


class CIFAR100LT(_CIFARLT):
    """CIFAR-100-LT: 100 classes, n_max 500; rho 100 keeps 10,847 training images."""

    display_name = "CIFAR-100-LT"  # how papers write it (figure titles, legends)

    name = "cifar100lt"
    num_classes = 100
    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    label_key = "fine_labels"
    names_file, names_key = "meta", "fine_label_names"
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    md5 = "eb9058c3a382ffc7106e4002c42a8d85"
    paper_split = (36, 71)
    val_per_class = 20
