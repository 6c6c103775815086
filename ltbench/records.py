"""Run folders: the only interface between training, sweeps and reports.

``results/runs/<run_id>/`` holds ``config.json``, ``env.json``, ``metrics.jsonl`` (one line per
epoch), ``checkpoint.pt`` (latest full state), ``result.json`` and ``DONE``. Every write is atomic
(temporary file + rename) and ``DONE`` is written last, so a folder without it is never trusted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ltbench.config import RunConfig
from ltbench.errors import UserError

CHECKPOINT = "checkpoint.pt"
DONE = "DONE"


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(path: Path, state: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
        return RunConfig.from_dict(self.read_json("config.json"))

    def result(self) -> dict[str, Any]:
        return self.read_json("result.json")

    def read_json(self, name: str) -> Any:
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"Run folder {self.path} has no readable {name} ({exc}).") from exc

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl atomically (on resume it is truncated to the checkpoint's epoch)."""
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        atomic_write_bytes(self.path / "metrics.jsonl", lines.encode())

    def load_checkpoint(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        if not self.checkpoint_path.exists():
            return None
        return torch.load(self.checkpoint_path, map_location=map_location, weights_only=True)

    def mark_done(self) -> None:
        atomic_write_bytes(self.path / DONE, b"")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock so that two processes (e.g. sweep trials sharing a teacher) never train one run twice."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def runs_dir(results: Path) -> Path:
    return results / "runs"


def run_record(results: Path, config: RunConfig) -> RunRecord:
    return RunRecord(runs_dir(results) / config.run_id)


def find_run(results: Path, ref: str) -> RunRecord:
    """A run by folder path, run id, or unique run-id prefix."""
    candidate = Path(ref)
    if (candidate / "config.json").is_file():
        return RunRecord(candidate.resolve())
    base = runs_dir(results)
    matches = sorted(p for p in base.glob(f"{ref}*") if (p / "config.json").is_file()) if base.is_dir() else []
    if len(matches) == 1:
        return RunRecord(matches[0])
    if not matches:
        raise UserError(f"No run {ref!r}: it is neither a run folder nor a run id under {base}.")
    raise UserError(f"Run id prefix {ref!r} is ambiguous under {base}: {', '.join(m.name for m in matches)}.")


def iter_runs(results: Path) -> Iterator[RunRecord]:
    base = runs_dir(results)
    if base.is_dir():
        for path in sorted(base.iterdir()):
            if (path / "config.json").is_file():
                yield RunRecord(path)
