"""``ltbench data verify``: check a copy of a list-file dataset before training on it.

Every split list is parsed leniently so that all malformed lines are reported (file and line); the
counts are compared with the published statistics; every image the lists name is opened and fully
decoded in parallel, as the training loader would. The sha256 of each list is printed because no
reference hashes are published: compare them with a trusted copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from ltbench.datasets.filelist_lt import FileListLT, out_of_range, read_list
from ltbench.errors import UserError
from ltbench.image_cache import parallel_map
from ltbench.registry import DATASETS


@dataclass
class SplitCheck:
    """What one split list holds, next to what is published about it (``None``: not known / not readable)."""

    split: str
    file: str
    found: bool
    sha256: str | None = None
    lines: int | None = None
    classes: int | None = None
    max_per_class: int | None = None
    min_per_class: int | None = None
    expected_sha256: str | None = None
    expected_lines: int | None = None
    expected_classes: int | None = None
    expected_max: int | None = None
    expected_min: int | None = None


@dataclass
class Problem:
    where: str  # file:line, or a file
    message: str
    standard: bool = False  # a difference from the published statistics (not a defect of the copy itself)

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class VerifyReport:
    dataset: str
    folder: str
    splits: list[SplitCheck] = field(default_factory=list)
    images_checked: int = 0
    images_missing: int = 0
    images_undecodable: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["problems"] = [str(p) for p in self.problems]
        out["ok"] = self.ok
        return out


def verify_dataset(dataset: str, data_root: Path, workers: int | None = None, expect_standard: bool = True,
                   progress: bool = True) -> VerifyReport:
    """Check lists, counts and images of a list-file dataset; never raises for problems of the copy itself."""

    cls = DATASETS.get(dataset)
    if not (isinstance(cls, type) and issubclass(cls, FileListLT)):
        names = ", ".join(n for n, c in DATASETS if isinstance(c, type) and issubclass(c, FileListLT))
        raise UserError(f"`ltbench data verify` checks datasets read from split lists ({names}); {dataset} is not "
                        f"one of them. `ltbench data info {dataset}` shows its counts.")
    folder = cls.find_folder(data_root)
    report = VerifyReport(dataset, str(folder), notes=cls.prepare_lists(folder))
    listings = _read_lists(cls, folder, report)
    train = listings.get("train")
    num_classes = _check_labels(cls, listings, report)
    for split, spec in cls.splits.items():
        report.splits.append(_split_check(split, spec, listings.get(split), num_classes, cls.num_classes))
    _note_overlaps(listings, report)
    _check_images(folder, listings, report, workers, progress)
    if expect_standard:  # after the defects of the copy, which matter more
        _compare_with_published(report)
    if train is not None and not report.problems:
        report.notes.append(f"{num_classes} classes from the train list")
    return report


def _read_lists(cls, folder: Path, report: VerifyReport) -> dict[str, Any]:

    listings = {}
    for split, spec in cls.splits.items():
        path = folder / spec.file
        if not path.is_file():
            report.problems.append(Problem(str(path), f"the {split} list is missing"))
            continue
        listing = read_list(path, strict=False)
        report.problems += [Problem(f"{path}:{line}", f"malformed line: {msg}") for line, msg in listing.problems]
        if spec.prefixes:
            off = sum(1 for p in listing.paths if not p.startswith(spec.prefixes))
            if off:
                report.notes.append(f"{path}: {off} paths do not start with {' or '.join(spec.prefixes)}, the prefix "
                                    f"of the reference copies")
        listings[split] = listing
    return listings


def _check_labels(cls, listings: dict[str, Any], report: VerifyReport) -> int:
    """Labels in the published range; train classes contiguous; eval labels among the train classes."""

    for listing in listings.values():
        for index in out_of_range(listing.labels, cls.num_classes):
            report.problems.append(Problem(listing.where(index), f"label {listing.labels[index]} is out of range "
                                                                 f"0..{cls.num_classes - 1}"))
    train = listings.get("train")
    if train is None or len(train.labels) == 0:
        return 0
    valid = train.labels[(train.labels >= 0) & (train.labels < cls.num_classes)]
    counts = np.bincount(valid)
    num_classes = len(counts)
    for empty in np.flatnonzero(counts == 0):
        report.problems.append(Problem(str(train.path), f"class {empty} has no training image (labels must be "
                                                        f"contiguous 0..{num_classes - 1})"))
    for split, listing in listings.items():
        if split == "train":
            continue
        unseen = np.flatnonzero((listing.labels >= num_classes) & (listing.labels < cls.num_classes))
        for index in unseen:
            report.problems.append(Problem(listing.where(index), f"label {listing.labels[index]} does not occur in "
                                                                 f"the train list ({num_classes} classes)"))
    return num_classes


def _split_check(split: str, spec, listing, num_classes: int, published_classes: int) -> SplitCheck:
    check = SplitCheck(split, spec.file, listing is not None, expected_sha256=spec.sha256, expected_lines=spec.lines,
                       expected_classes=published_classes, expected_max=spec.max_per_class,
                       expected_min=spec.min_per_class)
    if listing is None:
        return check
    labels = listing.labels[(listing.labels >= 0) & (listing.labels < max(num_classes, 1))]
    counts = np.bincount(labels, minlength=num_classes) if num_classes else np.zeros(0, dtype=int)
    check.sha256, check.lines = listing.sha256, listing.num_lines
    check.classes = int(np.count_nonzero(counts))
    if len(counts):
        check.max_per_class, check.min_per_class = int(counts.max()), int(counts.min())
    return check


def _compare_with_published(report: VerifyReport) -> None:
    for check in report.splits:
        if not check.found:
            continue
        pairs = [("lines", check.lines, check.expected_lines), ("classes", check.classes, check.expected_classes),
                 ("images in the largest class", check.max_per_class, check.expected_max),
                 ("images in the smallest class", check.min_per_class, check.expected_min),
                 ("sha256", check.sha256, check.expected_sha256)]
        for what, found, expected in pairs:
            if expected is not None and found != expected:
                report.problems.append(Problem(check.file, f"{what}: {_fmt(found)}, the published list has "
                                                           f"{_fmt(expected)}", standard=True))


def _note_overlaps(listings: dict[str, Any], report: VerifyReport) -> None:
    seen: dict[str, set[str]] = {split: set(listing.paths) for split, listing in listings.items()}
    for split, listing in listings.items():
        duplicates = len(listing.paths) - len(seen[split])
        if duplicates:
            report.notes.append(f"{listing.path.name}: {duplicates} lines repeat an earlier path")
    train = seen.get("train", set())
    for split, paths in seen.items():
        shared = len(train & paths) if split != "train" else 0
        if shared:
            report.notes.append(f"{shared} images of the {split} list are also in the train list")


def _check_images(folder: Path, listings: dict[str, Any], report: VerifyReport, workers: int | None,
                  progress: bool) -> None:

    first_seen: dict[str, tuple[Any, int]] = {}
    for listing in listings.values():
        for index, path in enumerate(listing.paths):
            first_seen.setdefault(path, (listing, index))
    paths = list(first_seen)
    report.images_checked = len(paths)
    results = parallel_map(lambda p: image_problem(folder / p), paths, workers)
    for path, problem in zip(paths, _track(results, len(paths), progress)):
        if problem is None:
            continue
        listing, index = first_seen[path]
        if problem == "missing":
            report.images_missing += 1
            report.problems.append(Problem(listing.where(index), f"image {folder / path} is missing"))
        else:
            report.images_undecodable += 1
            report.problems.append(Problem(listing.where(index), f"image {folder / path} {problem}"))


def image_problem(path: Path) -> str | None:
    """None if the image opens and decodes completely; "missing" or a reason otherwise."""
    try:
        with Image.open(path) as img:
            img.load()
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"cannot be decoded ({type(exc).__name__}: {exc})"
    return None


def _track(items: Iterable, total: int, enabled: bool) -> Iterator:
    if not enabled:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("decoding images"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("decode", total=total)
        for item in items:
            yield item
            bar.advance(task)


def _fmt(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def print_report(report: VerifyReport, console: Console, limit: int = 20) -> None:
    """A table of the lists against the published statistics, then images, problems and notes."""
    table = Table(title=f"{report.dataset} in {report.folder}")
    for col in ("split", "file", "lines", "classes", "max/class", "min/class"):
        table.add_column(col, justify="left" if col in ("split", "file") else "right")
    for c in report.splits:
        if not c.found:
            table.add_row(c.split, c.file, "[red]missing[/]", "", "", "")
            continue
        table.add_row(c.split, c.file, _versus(c.lines, c.expected_lines), _versus(c.classes, c.expected_classes),
                      _versus(c.max_per_class, c.expected_max), _versus(c.min_per_class, c.expected_min))
    console.print(table)
    for c in report.splits:
        if c.found:
            known = "matches the published hash" if c.sha256 == c.expected_sha256 else (
                "no published hash: compare with a trusted copy" if c.expected_sha256 is None else "[red]differs[/]")
            console.print(f"sha256 {c.file}: {c.sha256} ({known})", highlight=False, soft_wrap=True)
    console.print(f"images: {report.images_checked:,} checked, {report.images_missing:,} missing, "
                  f"{report.images_undecodable:,} not decodable", highlight=False)
    for problem in report.problems[:limit]:
        console.print(f"[red]problem[/] {problem}", highlight=False, soft_wrap=True)
    if len(report.problems) > limit:
        console.print(f"... and {len(report.problems) - limit:,} more problems (--json lists all)", highlight=False)
    for note in report.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True, style="dim")
    if any(p.standard for p in report.problems):
        console.print("Counts differ from the published lists; --no-expect-standard accepts a deliberate subset.",
                      highlight=False)
    verdict = "[green]OK[/]" if report.ok else f"[red]{len(report.problems):,} problem(s)[/]"
    console.print(f"{report.dataset}: {verdict}", highlight=False)


def _versus(found: int | None, expected: int | None) -> str:
    if found is None:
        return "-"
    if expected is None or found == expected:
        return f"{found:,}"
    return f"[yellow]{found:,}[/] (published {expected:,})"
