"""Atomic writes: a file is replaced whole or not at all, and a full disk is a message naming the folder.

Every file of a run folder (and exported subsets, sweep state, verdicts) is written to a temporary
``.<name>.<random>.tmp`` next to it, flushed and fsynced, then renamed over the target, and the folder is
fsynced after the rename; so a reader sees the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ltbench.errors import UserError

TMP_SUFFIX = ".tmp"  # atomic writes go through .<name>.<random>.tmp next to the target


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; run folders get the mode any other file of this process would get (0644 under
# the usual umask 022), so a team can share a results folder. Read once: os.umask can only be read by setting it.
FILE_MODE = 0o666 & ~_process_umask()


def _fsync_dir(folder: Path) -> None:
    """Persist a rename: without this a power cut can forget it even though the file's data is on disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replaced_atomically(path: Path, size: int = 0) -> Iterator[BinaryIO]:
    """A temporary file next to ``path``; once written it is fsynced and renamed over ``path``.

    A failure (a kill, a full disk, no permission) leaves ``path`` as it was; an OSError becomes a
    UserError naming the file and the reason (for a full disk also the folder's free space and ``size``,
    the bytes the file needs).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as exc:
        raise write_error(path, exc, size) from exc
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(path, exc, size) from exc
        raise


def write_error(path: Path, exc: OSError, size: int = 0) -> UserError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason += f" ({space_needed(path.parent, size)})"
    return UserError(f"Could not write {path}: {reason}. Nothing was replaced (the previous version of the file, "
                     f"if any, is intact); fix that and run the same command again (an interrupted run resumes "
                     f"from its last checkpoint).")


def space_needed(folder: Path, size: int) -> str:
    """What a full-disk message says about ``folder``: its free space and what one file of ``size`` bytes needs."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return f"free at least {_mb(size)} in {folder}"
    return f"{folder} has {_mb(free)} free; the file needs about {_mb(size)}: free that much, or choose another " \
           f"--results folder"


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def disk_is_full(folder: Path, size: int) -> bool:
    """Whether ``folder`` lacks room for ``size`` more bytes (torch reports a full disk as a RuntimeError)."""
    try:
        return shutil.disk_usage(folder).free < size + (1 << 16)
    except OSError:
        return False


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    with replaced_atomically(path, len(payload)) as fh:
        fh.write(payload)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, json_bytes(payload))


def json_bytes(payload: Any) -> bytes:
    """The bytes a JSON file of a run folder holds (so a digest can be taken of exactly what is written)."""
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()


def atomic_torch_save(path: Path, state: dict) -> None:
    import torch  # here, not at the top: reports read run folders without importing torch

    size = _tensor_bytes(state)
    try:
        with replaced_atomically(path, size) as fh:
            torch.save(state, fh)
    except RuntimeError as exc:
        # torch's zip writer turns the ENOSPC of the file object into "[enforce fail ...] unexpected pos"
        if not disk_is_full(path.parent, size):
            raise
        raise write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), size) from exc


def _tensor_bytes(value: Any) -> int:
    """About the bytes ``torch.save`` writes for ``value``: the sum of its tensors' storage."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 64
