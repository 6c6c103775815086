"""The decode-and-resize cache of the list-file datasets (``cache_resized``): every image decoded once, its
shorter side resized, stored as JPEG under ``<data-root>/.ltbench-cache``; and the thread pool that decodes in
parallel (also used by ``ltbench data verify``)."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ltbench.errors import UserError

CACHE_FOLDER = ".ltbench-cache"


class Listing(Protocol):
    """What the cache needs of a parsed split list (``filelist_lt.ListFile``)."""

    path: Path
    paths: list[str]
    labels: np.ndarray
    sha256: str

    def where(self, index: int) -> str: ...


def write_atomic(target: Path, data: bytes) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except OSError as exc:
        raise UserError(f"Cannot write {target} ({exc.strerror or exc}); make its folder writable.") from exc



def build_resized_cache(source_root: Path, cache_root: Path, listing: Listing, size: int,
                        workers: int | None = None) -> None:
    """Store every image of ``listing`` under ``cache_root`` at the same relative path, decoded once and
    resized so its shorter side is ``size`` (smaller images are copied). Missing files are built in
    parallel; a marker named after the list's sha256 skips the scan next time."""
    marker = cache_root / f".complete-{listing.path.name}-{listing.sha256[:16]}"
    if marker.is_file():
        return
    errors = parallel_map(_resize_one(source_root, cache_root, size), listing.paths, workers)
    for index, error in enumerate(_progress(errors, len(listing.paths), f"caching {listing.path.name}")):
        if error:
            raise UserError(f"{listing.where(index)}: image {source_root / listing.paths[index]} {error}. "
                            f"Run `ltbench data verify` to list every problem of the copy.")
    write_atomic(marker, b"")


def parallel_map(func: Callable[[Any], Any], items: list, workers: int | None = None,
                 chunk: int = 4096) -> Iterator[Any]:
    """``func`` over ``items`` on a thread pool (PIL decodes and resizes without the GIL), results in order.
    Work is submitted a chunk at a time so that half a million images never means half a million futures."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for start in range(0, len(items), chunk):
            yield from pool.map(func, items[start:start + chunk])


def _resize_one(source_root: Path, cache_root: Path, size: int) -> Callable[[str], str | None]:
    def work(relative: str) -> str | None:
        target = cache_root / relative
        if target.is_file():
            return None
        source = source_root / relative
        try:
            with Image.open(source) as img:
                if min(img.size) <= size:
                    write_atomic(target, source.read_bytes())  # never upsample: keep the original bytes
                    return None
                img.draft("RGB", (size, size))  # JPEG: let libjpeg decode at a reduced scale >= size
                rgb = img.convert("RGB")
            scale = size / min(rgb.size)
            resized = rgb.resize((max(size, round(rgb.width * scale)), max(size, round(rgb.height * scale))),
                                 Image.Resampling.BICUBIC)
        except FileNotFoundError:
            return "is missing"
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return f"cannot be decoded ({exc})"
        write_atomic(target, _jpeg_bytes(resized))
        return None

    return work


def _jpeg_bytes(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=95, subsampling=0)  # 4:4:4, high quality: one extra lossy step only
    return out.getvalue()


def _progress(items, total: int, description: str):
    """Iterate with a rich progress bar on stderr (quiet when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import track

    console = Console(stderr=True)
    if not console.is_terminal:
        yield from items
        return
    yield from track(items, total=total, description=description, console=console, transient=True)
