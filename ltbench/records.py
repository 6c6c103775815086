"""Run folders: the only interface between training, sweeps and reports, and the only code that reads them.

``results/runs/<run_id>/`` holds ``config.json``, ``env.json``, ``metrics.jsonl`` (one line per
epoch), ``checkpoint.pt`` (latest full state), ``result.json`` and ``DONE``. Every write is atomic
(temporary file + rename) and ``DONE`` is written last, so a folder without it is never trusted.

Epochs in these files count from 1, as people do: the ``epoch`` of a metrics line and of ``result.json``'s
``final`` / ``best`` is the epoch just completed (1 = the first), and ``checkpoint.pt``'s ``epoch`` is the number
of epochs done. ``result.json`` says so under ``epoch_numbering``. (Hyperparameters that name points of the
schedule, such as ``milestones`` or ``drw_epoch``, keep their published 0-based meaning.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from ltbench.config import RunConfig
from ltbench.errors import UserError
from ltbench.selection import BLOCK

if TYPE_CHECKING:
    import torch

CHECKPOINT = "checkpoint.pt"
EPOCH_NUMBERING = "1-based: epoch 1 is the first; an epoch field names the epoch just completed"
DONE = "DONE"
RESULT = "result.json"
METRICS = "metrics.jsonl"
EAGER_RETRY = "eager_retry.json"  # its compiled first epoch failed on CUDA, so it trained eagerly (stages)
POSTHOC_FILE = "posthoc_la.json"  # post-hoc logit adjustment results (ltbench.posthoc)
LOGITS_FILE = "test_logits.npz"  # the final test logits per head (--save-logits, or recomputed by posthoc)
LOCK = ".lock"
TMP_SUFFIX = ".tmp"  # atomic writes go through .<name>.<random>.tmp next to the target
UNUSABLE_RUN_FIX = "Restore its original config.json, or move the folder away (the same settings then train afresh)."


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
def _replaced_atomically(path: Path) -> Iterator[BinaryIO]:
    """A temporary file next to ``path``; once written it is fsynced and renamed over ``path``.

    A failure (a kill, a full disk, no permission) leaves ``path`` as it was; an OSError becomes a
    UserError naming the file and the reason.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as exc:
        raise write_error(path, exc) from exc
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
            raise write_error(path, exc) from exc
        raise


def write_error(path: Path, exc: OSError) -> UserError:
    return UserError(f"Could not write {path}: {exc.strerror or exc}. Nothing was replaced (the previous version "
                     f"of the file, if any, is intact); fix that and run the same command again (an interrupted run "
                     f"resumes from its last checkpoint).")


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    with _replaced_atomically(path) as fh:
        fh.write(payload)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(path: Path, state: dict) -> None:
    import torch  # here, not at the top: reports read run folders without importing torch

    # Through a Python file object, a full disk is an OSError (ENOSPC) rather than a C++ stream error.
    with _replaced_atomically(path) as fh:
        torch.save(state, fh)


@dataclass
class RunRecord:
    """A run folder on disk."""

    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def done(self) -> bool:
        return (self.path / DONE).is_file()

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    def config(self) -> RunConfig:
        """The run's configuration, refused when config.json does not describe what the folder holds."""
        problem = config_problem(self.path)
        if problem:
            raise UserError(f"Run folder {self.path} cannot be used: {problem}. {UNUSABLE_RUN_FIX}")
        return RunConfig.from_dict(self.read_json("config.json"))

    def result(self) -> dict[str, Any]:
        return self.read_json("result.json")

    def read_json(self, name: str) -> Any:
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"Run folder {self.path} has no readable {name} ({exc}).") from exc

    def metrics(self, note: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
        """The per-epoch rows; a torn last line (what a crash mid-append leaves) is skipped with a note."""
        path = self.path / "metrics.jsonl"
        try:
            lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
        except FileNotFoundError:
            return []
        rows = []
        for n, line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                if n == lines[-1][0]:
                    if note:
                        note(f"note: ignored the torn last line {n} of {path} (a crash mid-write leaves one).")
                    break
                raise UserError(f"{path} line {n} is not valid JSON ({exc.msg}): the file is corrupt, not just "
                                f"torn at its end. Restore it from a copy, or move the run folder away.") from exc
            if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
                raise UserError(f"{path} line {n} is not a metrics row (a JSON object with an integer epoch): "
                                f"the file is corrupt. Restore it from a copy, or move the run folder away.")
            rows.append(row)
        return rows

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl atomically (on resume it is truncated to the checkpoint's epoch)."""
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        atomic_write_bytes(self.path / "metrics.jsonl", lines.encode())

    def load_checkpoint(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The latest checkpoint, None before the first epoch ends; an unreadable one is a UserError."""
        import torch

        if not self.checkpoint_path.exists():
            return None
        try:
            ckpt = torch.load(self.checkpoint_path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, ... for a bad file
            raise self.checkpoint_error(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") \
                from exc
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("modules"), dict):
            raise self.checkpoint_error("not an ltbench checkpoint: it holds no model modules")
        return ckpt

    def checkpoint_error(self, reason: str) -> UserError:
        """Never discard a checkpoint silently: say what is wrong and how to retrain from scratch."""
        return UserError(f"The checkpoint {self.checkpoint_path} cannot be used ({reason}). Nothing was discarded. "
                         f"To retrain this run from epoch 0, delete that file (rm {self.checkpoint_path}) and run "
                         f"the same command again.")

    def finished_result(self, select: str = "final") -> tuple[dict[str, Any] | None, str | None]:
        """(the run's result, None), or (None, why a table leaves the run out): unfinished, or a result.json that
        is missing or lacks a top-1 for the block of the selection rule ``select`` (final | val | oracle)."""
        if not self.done:
            return None, f"unfinished ({epochs_logged(self.path)} epoch(s) logged)"
        if not (self.path / RESULT).is_file():
            return None, "DONE but no result.json"
        try:
            result = json.loads((self.path / RESULT).read_text())
            block = BLOCK.get(select, select)  # a selection rule's block (ltbench.selection)
            if select != "final" and isinstance(result, dict) and result.get(block) is None:
                return None, _no_block(select, result)
            heads = result[block]["heads"]
            if not heads or not all(isinstance(m["top1"], (int, float)) for m in heads.values()):
                raise ValueError("no head with a top-1")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return None, (f"result.json of run {self.run_id} is damaged ({type(exc).__name__}: {exc}); delete it "
                          f"and DONE, then run the same `ltbench run` command, which re-evaluates the final checkpoint")
        return result, None

    def untrusted_config(self) -> dict[str, Any]:
        """Coordinates for a footnote about a folder whose config.json is missing or edited: the config as written,
        else the one result.json recorded, else unknown."""
        for name, key in (("config.json", None), (RESULT, "config")):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                payload = json.loads((self.path / name).read_text())
                payload = payload[key] if key else payload
                if isinstance(payload, dict) and {"method", "dataset"} <= set(payload):
                    return payload
        return {"method": "unknown method", "dataset": "unknown dataset", "seed": "?"}

    def holds_a_run(self) -> bool:
        """Any folder with more than a lock and temporaries (a run that is only starting has nothing else yet)."""
        return self.path.is_dir() and any(p.name != LOCK and not p.name.endswith(TMP_SUFFIX)
                                          for p in self.path.iterdir())

    def eager_retry(self) -> dict[str, Any] | None:
        """The eager-retry marker (the error of the failed compiled attempt), or None."""
        return self.read_json(EAGER_RETRY) if (self.path / EAGER_RETRY).is_file() else None

    def mark_eager_retry(self, error: str, compile_mode: str) -> None:
        atomic_write_json(self.path / EAGER_RETRY, {"error": error, "compile_mode": compile_mode})

    def posthoc(self) -> dict[str, Any] | None:
        """The content of posthoc_la.json, or None."""
        return self.read_json(POSTHOC_FILE) if (self.path / POSTHOC_FILE).is_file() else None

    def saved_logits(self) -> dict[str, Any] | None:
        """The saved final test logits as numpy arrays per head plus ``labels``, or None."""
        import numpy as np

        if not (self.path / LOGITS_FILE).exists():
            return None
        with np.load(self.path / LOGITS_FILE) as saved:
            return {name: saved[name] for name in saved.files}

    def mark_done(self) -> None:
        atomic_write_bytes(self.path / DONE, b"")

    @contextlib.contextmanager
    def lock(self, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Exclusive lock so that two processes (e.g. sweep trials sharing a teacher) never train one run twice.

        The lock file holds the holder's pid; ``on_wait`` hears once, with that pid, when another process holds it.

        The holder removes temporaries that a killed writer left behind; a failure before anything was
        written (e.g. the data did not load) removes the folder again, so no empty run folder remains.
        """
        fh = self._acquire(on_wait)
        try:
            for stale in self.path.glob(f".*{TMP_SUFFIX}"):
                stale.unlink(missing_ok=True)
            yield
        except BaseException:
            if {p.name for p in self.path.iterdir()} <= {LOCK}:
                with contextlib.suppress(OSError):
                    (self.path / LOCK).unlink()
                    self.path.rmdir()
            raise
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def _acquire(self, on_wait: Callable[[str], None] | None) -> IO[str]:
        while True:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                fh = open(self.path / LOCK, "a")  # noqa: SIM115 - held until lock() releases it
            except OSError as exc:
                raise write_error(self.path / LOCK, exc) from exc
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait:
                    on_wait(f"waiting for run {self.run_id} (held by pid {self._lock_holder()}: another process is "
                            f"training it)")
                    on_wait = None  # once
                fcntl.flock(fh, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fh.fileno()).st_ino == os.stat(self.path / LOCK).st_ino:
                    fh.truncate(0)  # append mode: the pid lands at the start
                    fh.write(f"{os.getpid()}\n")
                    fh.flush()
                    return fh
            fh.close()  # the previous holder removed its empty folder while we waited: lock the new one

    def _lock_holder(self) -> str:
        try:
            return (self.path / LOCK).read_text().strip() or "unknown"
        except OSError:
            return "unknown"


def runs_dir(results: Path) -> Path:
    return results / "runs"


def run_record(results: Path, config: RunConfig) -> RunRecord:
    return RunRecord(runs_dir(results) / config.run_id)


RUN_ID_PREFIX = re.compile(r"[0-9a-f]{4,12}")


def find_run(results: Path, ref: str) -> RunRecord:
    """A run by run id, unambiguous run-id prefix (4+ characters), or path to a run folder (with a ``/``).

    The run's config.json is checked to hash to its folder name, so an edited or deleted one is refused.
    """
    if "/" in ref or os.sep in ref:
        folder = Path(ref).expanduser()
        if not folder.is_dir():
            raise UserError(f"No run folder {ref!r}: that path is not a folder.")
        record = RunRecord(folder.resolve())
    elif RUN_ID_PREFIX.fullmatch(ref):
        record = RunRecord(_one_match(runs_dir(results), ref))
    else:
        raise UserError(f"{ref!r} is not a run reference: give a run id, an unambiguous prefix of at least 4 of "
                        f"its characters (0-9, a-f), or a path to a run folder (containing a /, e.g. ./{ref}).")
    record.config()  # refuses a folder whose config.json is missing or does not hash to its name
    return record


def _one_match(base: Path, prefix: str) -> Path:
    matches = sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith(prefix)) if base.is_dir() else []
    if not matches:
        raise UserError(f"No run {prefix!r} under {base}: no run id starts with it.")
    if len(matches) > 1:
        raise UserError(f"Run id prefix {prefix!r} is ambiguous under {base}; it matches "
                        f"{', '.join(m.name for m in matches)}. Give more characters.")
    return matches[0]


def config_problem(folder: Path) -> str | None:
    """Why ``folder/config.json`` cannot be trusted to describe what the folder holds, or None.

    The run id is the hash of the config, so a config.json that does not hash to its folder's name was
    edited (or the folder renamed): the numbers in the folder were produced by another configuration.
    """
    path = folder / "config.json"
    if not path.is_file():
        return "it has no config.json (deleted?), so what it trained is unknown"
    try:
        config = RunConfig.from_dict(json.loads(path.read_text()))
        run_id = config.run_id
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        return f"its config.json is unreadable ({type(exc).__name__}: {exc})"
    if run_id != folder.name and config.legacy_run_id == folder.name:
        return ("it was written by an older ltbench (before 2026-11-28: its run id hashed runtime options such as "
                "workers, and its files count epochs from 0), which this version cannot read; the same command "
                f"trains it again as run {run_id}")
    if run_id != folder.name:
        return (f"its config.json hashes to run id {run_id}, not to the folder's name {folder.name}: it was edited "
                f"(or the folder renamed), so it no longer describes what was trained")
    return None


def _no_block(rule: str, result: dict[str, Any]) -> str:
    """Why a finished run has no block for a selection rule."""
    if rule != "val":
        return f"no evaluated epoch to select by the {rule} rule"
    if "val_split" not in result:
        return "no val evaluation (trained before val splits existed: retrain it to select on val)"
    return f"no val split ({result['val_split'].get('source', 'none')})"


def tau_key(tau: float) -> str:
    """The text a tau is stored and labelled under (1.0 -> "1", 0.5 -> "0.5")."""
    return f"{tau:g}"


def posthoc_label(method: str, tau: float | str) -> str:
    return f"{method} + post-hoc LA τ={tau_key(float(tau))}"


def epochs_logged(folder: Path) -> int:
    """The number of lines of a run folder's metrics.jsonl (0 without one)."""
    try:
        with open(folder / METRICS, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return 0


TUNES = "tunes"
TUNE_MANIFEST = "tune.json"


def tune_dir(results: Path, tune_id: str) -> Path:
    """``<results>/tunes/<tune_id>/``: Ray's files of a search and its manifest (ltbench.tuning)."""
    return results / TUNES / tune_id


def write_tune_manifest(results: Path, tune_id: str, payload: dict[str, Any]) -> Path:
    path = tune_dir(results, tune_id) / TUNE_MANIFEST
    atomic_write_json(path, payload)
    return path


def tune_manifests(results: Path) -> list[dict[str, Any]]:
    """Every search's manifest under ``results`` (a damaged one is an error naming it)."""
    out = []
    for path in sorted((results / TUNES).glob(f"*/{TUNE_MANIFEST}")):
        try:
            payload = json.loads(path.read_text())
            if not isinstance(payload, dict) or not isinstance(payload.get("trials"), list):
                raise ValueError("no list of trials")
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is not a readable tune manifest ({exc}); delete it and run the same "
                            f"`ltbench tune` command again (its trials are reused).") from exc
        out.append(payload)
    return out


def run_state(results: Path, run_id: str) -> tuple[str, int]:
    """``(done | partial | new, epochs finished)`` read from the run folder alone."""
    folder = runs_dir(results) / run_id
    if (folder / DONE).is_file():
        return "done", epochs_logged(folder)
    if (folder / CHECKPOINT).is_file():
        return "partial", epochs_logged(folder)
    return "new", 0


def iter_runs(results: Path) -> Iterator[RunRecord]:
    base = runs_dir(results)
    if base.is_dir():
        for path in sorted(base.iterdir()):
            if (path / "config.json").is_file():
                yield RunRecord(path)
