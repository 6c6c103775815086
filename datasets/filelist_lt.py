"""ImageNet-LT, iNaturalist-2018 and Places-LT, read from the standard split lists (spec baselines.md §2).

Each list has one ``<relative path> <label>`` line per image; paths are relative to the folder that
holds the lists (``<data-root>/imagenet_lt/``, ``<data-root>/inat2018/``, ``<data-root>/places_lt/``,
or the data root itself). The lists come from OLTR / classifier-balancing and cannot be shipped here;
``docs/datasets.md`` names the files and ``ltbench data verify`` checks a copy. The train list alone
defines the class counts, hence many/medium/few. ``sort_by_frequency`` renumbers classes by descending
train count (DeiT-LT's and Saddle's label space, where their head/mid/tail index ranges apply).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ltbench.config import recorded_if_set
from ltbench.data import IMAGENET_MEAN, IMAGENET_STD, Dataset, DatasetInfo, FileListSplit, LTData, frequency_order
from ltbench.errors import UserError
from ltbench.image_cache import CACHE_FOLDER, build_resized_cache, write_atomic
from ltbench.splits import CARVE_SHARE, carve_val

INAT_MEAN = (0.466, 0.471, 0.380)
INAT_STD = (0.195, 0.194, 0.192)
LINE_FORMAT = "`<relative path> <integer label>`"


@dataclass(frozen=True)
class SplitSpec:
    """A standard split list and what is published about it (``None`` = not known)."""

    file: str
    lines: int | None
    max_per_class: int | None
    min_per_class: int | None
    prefixes: tuple[str, ...]  # path prefixes seen in the reference copies (empty: not recorded)
    sha256: str | None = None  # not published for any of the lists: compare with a trusted copy instead


@dataclass
class ListFile:
    """A parsed split list: paths, labels (int64), the sha256 of its bytes, and problems found (lenient mode)."""

    path: Path
    paths: list[str]
    labels: np.ndarray
    sha256: str
    num_lines: int
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line number, message)
    line_numbers: np.ndarray | None = None  # line of each entry, when malformed lines were skipped

    def subset(self, indices: np.ndarray) -> ListFile:
        """The entries at ``indices`` (a carved split), still naming the list they come from."""
        return ListFile(self.path, [self.paths[i] for i in indices], self.labels[indices], self.sha256, self.num_lines)

    def where(self, index: int) -> str:
        """``file:line`` of the index-th parsed entry."""
        line = index + 1 if self.line_numbers is None else int(self.line_numbers[index])
        return f"{self.path}:{line}"


def read_list(path: Path, strict: bool = True) -> ListFile:
    """Parse a split list. ``strict``: the first bad line is a :class:`UserError` naming file and line; otherwise
    bad lines are skipped and returned as problems (for ``ltbench data verify``). A line is bad when it is not
    ``<path> <label>``, when its path leaves the list's folder (``../``, or absolute outside it: ltbench would
    train on, or with ``cache_resized`` write, files elsewhere) or when it repeats an earlier path."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")  # a byte-order mark is not part of the first path
    except OSError as exc:
        raise UserError(f"Cannot read the split list {path} ({exc.strerror or exc}).") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not a UTF-8 text file ({exc}); a split list has one {LINE_FORMAT} per line. "
                        f"The file is corrupt or not a split list: fetch it again.") from exc
    lines = text.rstrip().splitlines()
    paths: list[str] = []
    labels: list[int] = []
    problems: list[tuple[int, str]] = []
    numbers: list[int] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        entry, message = _entry(line, path.parent, first_line)
        if entry is None:
            if strict:
                raise UserError(f"{path}:{number}: {message}. Every line of a split list must be a relative image "
                                f"path inside {path.parent}, one space and a 0-based class label, each image once; "
                                f"fix the line or fetch an intact copy of the list (see docs/datasets.md).")
            problems.append((number, message))
            continue
        first_line[entry[0]] = number
        paths.append(entry[0])
        labels.append(entry[1])
        if problems:
            numbers.append(number)
    if strict and not paths:
        raise UserError(f"The split list {path} has no entries; fetch an intact copy (see docs/datasets.md).")
    line_numbers = None
    if problems:  # entries before the first problem sit on their own index + 1
        line_numbers = np.concatenate([np.arange(1, len(paths) - len(numbers) + 1), np.asarray(numbers, dtype=int)])
    return ListFile(path, paths, np.asarray(labels, dtype=np.int64), hashlib.sha256(raw).hexdigest(), len(lines),
                    problems, line_numbers)


def _entry(line: str, root: Path, first_line: dict[str, int]) -> tuple[tuple[str, int] | None, str]:
    """((relative path, label), "") of a list line, or (None, what is wrong with it)."""
    parts = line.rsplit(None, 1)
    label = _int_or_none(parts[1]) if len(parts) == 2 else None
    if label is None:
        return None, f"malformed line: expected {LINE_FORMAT}, got {line[:120]!r}"
    if not -2**31 <= label < 2**31:  # no dataset has this many classes, and int64 arrays would overflow
        return None, f"the label {parts[1][:30]} is far outside any class range"
    relative = inside(root, parts[0])
    if relative is None:
        return None, f"the path {parts[0][:120]!r} leaves the dataset's folder {root}"
    if relative in first_line:
        return None, f"the path {relative[:120]!r} repeats line {first_line[relative]} (an image is listed once)"
    return (relative, label), ""


def inside(root: Path, path: str) -> str | None:
    """``path`` relative to ``root`` (normalised, without ``..``), or None when it points outside ``root``."""
    joined = os.path.normpath(os.path.join(os.path.abspath(root), path))
    base = os.path.normpath(os.path.abspath(root))
    if os.path.commonpath([joined, base]) != base or joined == base:
        return None
    return Path(os.path.relpath(joined, base)).as_posix()


def _int_or_none(token: str) -> int | None:
    if not token.lstrip("-").isdigit():
        return None
    try:
        return int(token)
    except ValueError:  # digits int() refuses, such as superscripts
        return None


def out_of_range(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Indices of labels outside 0..num_classes-1."""
    return np.flatnonzero((labels < 0) | (labels >= num_classes))


def class_names_from_paths(paths: list[str], labels: np.ndarray, num_classes: int) -> tuple[str, ...]:
    """Each class's folder, taken from its first train image, without the top-level split folder."""
    names = [str(c) for c in range(num_classes)]
    classes, first = np.unique(labels, return_index=True)
    for cls, index in zip(classes.tolist(), first.tolist()):
        folder = os.path.dirname(paths[index])
        names[cls] = folder.split("/", 1)[-1] if "/" in folder else folder or str(cls)
    return tuple(names)


# ----------------------------------------------------------------------------------------------
# Datasets


@dataclass
class FileListOptions:
    eval_split: str = "test"  # the list evaluated every epoch: the reporting split, or "val" for model selection
    sort_by_frequency: bool = False  # renumber classes by descending train count (DeiT-LT / Saddle label space)
    cache_resized: int = 0  # >0: decode once, shorter side resized to this, JPEG files under <data-root>/.ltbench-cache


@dataclass
class INatOptions(FileListOptions):
    eval_split: str = "val"  # iNat-2018 has no labelled test set; LT papers report on val
    # >0: a val split carved from the training list (ltbench.splits.carve_val), changing training and the run id
    carve_val_per_class: int = recorded_if_set(0)


class FileListLT(Dataset):
    """Base of the list-file datasets: locate and parse the lists, count classes, optionally cache."""

    Options = FileListOptions
    VERSION = 1
    folder: ClassVar[str]
    splits: ClassVar[dict[str, SplitSpec]]
    num_classes: ClassVar[int]  # published class count (the loaded count comes from the train list)
    paper_split: ClassVar[tuple[int, int] | None]  # DeiT-LT index ranges, valid in the frequency-sorted space
    mean: ClassVar[tuple[float, float, float]] = IMAGENET_MEAN
    std: ClassVar[tuple[float, float, float]] = IMAGENET_STD
    image_size: ClassVar[int] = 224
    source: ClassVar[str]  # where the lists come from, for error messages
    layout: ClassVar[str]  # what the image tree looks like, for error messages

    @classmethod
    def validate_options(cls, options: Any) -> None:
        if options.eval_split not in cls.splits or options.eval_split == "train":
            allowed = " or ".join(s for s in cls.splits if s != "train")
            raise UserError(f"{cls.name}: eval_split must be {allowed}, not {options.eval_split!r}.")
        if options.cache_resized < 0 or 0 < options.cache_resized < 32:
            raise UserError(f"{cls.name}: cache_resized must be 0 (off) or a shorter side of at least 32 pixels, "
                            f"not {options.cache_resized}.")

    # --- locating the files -------------------------------------------------------------------
    @classmethod
    def find_folder(cls, data_root: Path) -> Path:
        """``<data-root>/<folder>`` or the data root itself: the first that holds the train list."""
        candidates = [data_root / cls.folder, data_root]
        for candidate in candidates:
            if cls.has_train_list(candidate):
                return candidate
        raise UserError(cls.missing_message(candidates, cls.splits["train"].file))

    @classmethod
    def has_train_list(cls, folder: Path) -> bool:
        return (folder / cls.splits["train"].file).is_file()

    @classmethod
    def prepare_lists(cls, folder: Path) -> list[str]:
        """Make the lists readable (iNat converts its JSON here); returns what was done."""
        return []

    @classmethod
    def missing_message(cls, searched: list[Path], file: str) -> str:
        files = ", ".join(spec.file for spec in cls.splits.values())
        where = " nor in ".join(map(str, searched))
        return (f"{cls.name}: the split list {file} was not found in {where}. {cls.display_name} is read from the "
                f"standard lists {files}, placed next to the image tree they point into ({cls.layout}). The lists "
                f"come from {cls.source} and cannot be shipped with ltbench; docs/datasets.md lists the expected "
                f"files and line counts. Point --data-root (or LTBENCH_DATA) at the folder that contains "
                f"{cls.folder}/, then run `ltbench data verify {cls.name}`.")

    def list_path(self, folder: Path, split: str) -> Path:
        path = folder / self.splits[split].file
        if not path.is_file():
            raise UserError(self.missing_message([folder], self.splits[split].file))
        return path

    # --- loading --------------------------------------------------------------------------------
    def load(self) -> LTData:
        opt = self.options
        folder = self.find_folder(self.data_root)
        self.prepare_lists(folder)
        train = read_list(self.list_path(folder, "train"))
        test = read_list(self.list_path(folder, opt.eval_split))
        train, val, val_source = self.val_split(folder, train)
        counts = self.list_counts(train)
        self.check_labels(test, len(counts), f"the classes of the train list {train.path}")
        names = class_names_from_paths(train.paths, train.labels, len(counts))
        extras: dict[str, Any] = {"lists": {"train": str(train.path), opt.eval_split: str(test.path)},
                                  "list_sha256": {"train": train.sha256, opt.eval_split: test.sha256},
                                  "val_source": val_source, "test_source": f"the list {test.path.name}"}
        val_labels = val.labels if val is not None else None
        train_labels, test_labels, paper_split = train.labels, test.labels, None
        if opt.sort_by_frequency:
            order = frequency_order(counts)
            label_map = np.empty(len(counts), dtype=np.int64)
            label_map[order] = np.arange(len(counts))
            train_labels, test_labels = label_map[train_labels], label_map[test_labels]
            val_labels = label_map[val_labels] if val is not None else None
            counts, names = counts[order], tuple(names[i] for i in order)
            extras["label_map"] = label_map.tolist()  # original label -> frequency rank (DeiT-LT's --map-targets)
            if len(counts) == self.num_classes:  # DeiT-LT's index ranges: the full, sorted label space only
                paper_split = self.paper_split
        root = folder
        if opt.cache_resized:
            root = self.cache_folder(opt.cache_resized)
            for listing in (train, test, *([val] if val is not None else [])):
                build_resized_cache(folder, root, listing, opt.cache_resized)
        info = DatasetInfo(name=self.name, num_classes=len(counts), train_counts=tuple(counts.tolist()),
                           image_size=self.image_size, mean=self.mean, std=self.std, class_names=names,
                           paper_split=paper_split, extras=extras, variable_size=True)
        return LTData(info, FileListSplit(root, train.paths, train_labels),
                      FileListSplit(root, test.paths, test_labels),
                      val=FileListSplit(root, val.paths, val_labels) if val is not None else None)

    def val_split(self, folder: Path, train: ListFile) -> tuple[ListFile, ListFile | None, str]:
        """(the training list, the val list or None, how val was made): the official val list, unless it is the
        split evaluated as test or absent."""
        spec = self.splits.get("val")
        if spec is None or self.options.eval_split == "val":
            return train, None, "none: the val list is the split reported as test"
        if not (folder / spec.file).is_file():
            return train, None, f"none: {folder / spec.file} was not found"
        val = read_list(folder / spec.file)
        self.check_labels(val, int(train.labels.max()) + 1, f"the classes of the train list {train.path}")
        return train, val, f"the official val list {spec.file}, disjoint from train and test"

    @classmethod
    def check_labels(cls, listing: ListFile, num_classes: int, what: str) -> None:
        bad = out_of_range(listing.labels, num_classes)
        if len(bad):
            raise UserError(f"{listing.where(bad[0])}: label {listing.labels[bad[0]]} is out of range 0.."
                            f"{num_classes - 1} ({what}). Use the lists of one release of {cls.display_name}, "
                            f"unmodified; `ltbench data verify {cls.name}` lists every problem.")

    @classmethod
    def list_counts(cls, train: ListFile) -> np.ndarray:
        """Images per class; labels must lie in the published range and every class up to the largest must occur
        (a subset of the first classes is allowed, which is what tests and quick experiments use)."""
        if len(train.labels) == 0:
            raise UserError(f"The train list {train.path} has no entries.")
        cls.check_labels(train, cls.num_classes, f"{cls.display_name} has {cls.num_classes} classes")
        counts = np.bincount(train.labels)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            raise UserError(f"{train.path}: classes {_head(empty.tolist())} have no training image, but the labels "
                            f"must be contiguous 0..{len(counts) - 1}. The list is truncated or not a standard list.")
        return counts

    def cache_folder(self, size: int) -> Path:
        return self.data_root / CACHE_FOLDER / self.name / f"short{size}"


def _head(values: list[int], n: int = 5) -> str:
    shown = ", ".join(map(str, values[:n]))
    return shown + (f" and {len(values) - n} more" if len(values) > n else "")


class ImageNetLT(FileListLT):
    """ImageNet-LT (OLTR lists): 1000 classes, 115,846 train images; reported on the 50k test list."""

    name = "imagenetlt"
    folder = "imagenet_lt"
    display_name = "ImageNet-LT"  # how papers write it (messages, figure titles, legends)
    splits = {
        "train": SplitSpec("ImageNet_LT_train.txt", 115_846, 1280, 5, ("train/",)),
        "val": SplitSpec("ImageNet_LT_val.txt", 20_000, 20, 20, ("train/",)),
        "test": SplitSpec("ImageNet_LT_test.txt", 50_000, 50, 50, ("val/",)),
    }
    num_classes = 1000
    paper_split = (390, 835)
    source = "OLTR (Liu et al., CVPR 2019) and the classifier-balancing / PaCo repositories"
    layout = ("train/nXXXXXXXX/nXXXXXXXX_N.JPEG from the ILSVRC-2012 train set, and val/nXXXXXXXX/"
              "ILSVRC2012_val_000NNNNN.JPEG: the ILSVRC-2012 val images in per-synset folders")


class INat2018(FileListLT):
    """iNaturalist 2018: 8142 classes, 437,513 train images; reported on the 24,426-image val list."""

    name = "inat2018"
    Options = INatOptions
    folder = "inat2018"
    display_name = "iNaturalist 2018"  # how papers write it (messages, figure titles, legends)
    splits = {
        "train": SplitSpec("iNaturalist18_train.txt", 437_513, 1000, 2, ("train_val2018/",)),
        "val": SplitSpec("iNaturalist18_val.txt", 24_426, 3, 3, ("train_val2018/",)),
    }
    json_files = {"train": "train2018.json", "val": "val2018.json"}
    num_classes = 8142
    paper_split = (842, 4543)
    mean, std = INAT_MEAN, INAT_STD
    source = ("classifier-balancing / PaCo (or are converted from the competition's train2018.json and "
              "val2018.json, which ltbench does when the .txt lists are missing)")
    layout = "train_val2018/<Supercategory>/<category_id>/<hash>.jpg"

    @classmethod
    def has_train_list(cls, folder: Path) -> bool:
        return super().has_train_list(folder) or (folder / cls.json_files["train"]).is_file()

    def val_split(self, folder: Path, train: ListFile) -> tuple[ListFile, ListFile | None, str]:
        """iNat's only val list is the one LT papers report as test: a val for selection is carved from train."""
        per_class = self.options.carve_val_per_class
        if not per_class:
            return train, None, ("none: iNat-2018's val list is its reported test split; set "
                                 "data.carve_val_per_class=N to carve a val split from the training list")
        keep, held = carve_val(train.labels, per_class)
        source = (f"carved from {train.path.name}: min({per_class}, n_c // {CARVE_SHARE}) images per class (seed 0) "
                  f"left training; classes with fewer than {CARVE_SHARE} training images have no val image")
        return train.subset(keep), train.subset(held), source

    @classmethod
    def prepare_lists(cls, folder: Path) -> list[str]:
        done = []
        for split, json_name in cls.json_files.items():
            target, source = folder / cls.splits[split].file, folder / json_name
            if not target.is_file() and source.is_file():
                count = convert_inat_json(source, target)
                done.append(f"converted {source} -> {target} ({count} lines)")
        return done


class PlacesLT(FileListLT):
    """Places-LT (OLTR lists): 365 classes, 62,500 train images; reported on the 36.5k test list."""

    name = "placeslt"
    folder = "places_lt"
    display_name = "Places-LT"  # how papers write it (messages, figure titles, legends)
    splits = {
        "train": SplitSpec("Places_LT_train.txt", 62_500, 4980, 5, ("data_256/", "train/")),
        "val": SplitSpec("Places_LT_val.txt", 7_300, 20, 20, ()),
        "test": SplitSpec("Places_LT_test.txt", 36_500, 100, 100, ()),
    }
    num_classes = 365
    paper_split = None  # DeiT-LT published no Places-LT index split
    source = "OLTR (Liu et al., CVPR 2019) and the classifier-balancing / PaCo repositories"
    layout = ("data_256/<letter>/<scene>/<id>.jpg in the PaCo copy or train/<scene>/<id>.jpg in the "
              "classifier-balancing copy, from Places365-Standard")


# ----------------------------------------------------------------------------------------------
# iNaturalist JSON -> list


def convert_inat_json(source: Path, target: Path) -> int:
    """Write ``file_name category_id`` per image, in the JSON's image order (as classifier-balancing's
    gen_lists.py does); annotations are matched by ``image_id`` rather than by position. Atomic."""
    try:
        with open(source, encoding="utf-8") as fh:
            payload = json.load(fh)
        category = {a["image_id"]: a["category_id"] for a in payload["annotations"]}
        images = payload["images"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{source} is not an iNaturalist-2018 annotation file with 'images' and 'annotations' "
                        f"({type(exc).__name__}: {exc}). Fetch train2018.json / val2018.json again.") from exc
    lines = []
    for k, image in enumerate(images):
        try:
            lines.append(f"{image['file_name']} {int(category[image['id']])}\n")
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{source}: images[{k}] ({image!r:.120}) has no file_name, id or matching annotation "
                            f"with an integer category_id; the file is incomplete.") from exc
    write_atomic(target, "".join(lines).encode("utf-8"))
    return len(lines)
