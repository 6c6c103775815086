"""The exclusive lock of a run folder: two processes given one configuration never train it twice."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from ltbench.atomic import TMP_SUFFIX, write_error
from ltbench.errors import UserError

LOCK = ".lock"


@contextlib.contextmanager
def locked(folder: Path, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold ``folder/.lock`` exclusively (``flock``) while the body runs.

    The lock file holds the holder's pid; ``on_wait`` hears once, with that pid, when another process holds it.
    The holder removes temporaries that a killed writer left behind; a failure before anything was written
    (e.g. the data did not load) removes the folder again, so no empty run folder remains.
    """
    fh = _acquire(folder, on_wait)
    try:
        for stale in folder.glob(f".*{TMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
        yield
    except BaseException:
        if {p.name for p in folder.iterdir()} <= {LOCK}:
            with contextlib.suppress(OSError):
                (folder / LOCK).unlink()
                folder.rmdir()
        raise
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _acquire(folder: Path, on_wait: Callable[[str], None] | None) -> IO[str]:
    while True:
        _refuse_dangling_link(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fh = open(folder / LOCK, "a")  # noqa: SIM115 - held until locked() releases it
        except OSError as exc:
            raise write_error(folder / LOCK, exc) from exc
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait(f"waiting for run {folder.name} (held by pid {_holder(folder)}: another process is "
                        f"training it)")
                on_wait = None  # once
            fcntl.flock(fh, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fh.fileno()).st_ino == os.stat(folder / LOCK).st_ino:
                fh.truncate(0)  # append mode: the pid lands at the start
                fh.write(f"{os.getpid()}\n")
                fh.flush()
                return fh
        fh.close()  # the previous holder removed its empty folder while we waited: lock the new one


def _refuse_dangling_link(folder: Path) -> None:
    if folder.is_symlink() and not folder.exists():
        raise UserError(f"The run folder {folder} is a symbolic link to {os.readlink(folder)}, which does not "
                        f"exist. Create that folder (or mount its disk), or remove the link to train here afresh.")


def _holder(folder: Path) -> str:
    try:
        return (folder / LOCK).read_text().strip() or "unknown"
    except OSError:
        return "unknown"
