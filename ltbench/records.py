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
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ltbench import schemas
from ltbench.atomic import FILE_MODE as FILE_MODE  # re-exported: writers import these from records
from ltbench.atomic import TMP_SUFFIX, atomic_torch_save, json_bytes
from ltbench.atomic import atomic_write_bytes as atomic_write_bytes
from ltbench.atomic import atomic_write_json as atomic_write_json
from ltbench.config import RunConfig, canonical_json
from ltbench.errors import UserError
from ltbench.run_lock import LOCK, locked
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
ENV = "env.json"  # one entry per session that trained the run
LOG = "log.txt"  # every line the run printed, each training session appended (ltbench.progress.RunLog)
RESULT_FIX = ("delete result.json and DONE, then run the same `ltbench run` command (it re-evaluates the final "
              "checkpoint)")
UNUSABLE_RUN_FIX = "Restore its original config.json, or move the folder away (the same settings then train afresh)."


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

    def result(self, trained: bool = True) -> dict[str, Any]:
        """result.json, checked against the digests DONE recorded and against its schema (``trained``: that of a
        trained run, with its final evaluation; else also a bench stand-in's, which has only class counts)."""
        problem = self.altered((RESULT, METRICS))
        if problem:
            raise UserError(f"Run {self.run_id} cannot be used: {problem}.")
        label = f"result.json of run {self.run_id}"
        payload = schemas.read_json(self.path / RESULT, RESULT_FIX, label)
        schemas.validated(schemas.TrainedResult if trained else schemas.ResultFile, payload, label, RESULT_FIX)
        return payload

    def read_json(self, name: str) -> Any:
        return schemas.read_json(self.path / name, f"Restore it, or move the run folder {self.path} away.")

    def metrics(self, note: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
        """The per-epoch rows; a torn last line (what a crash mid-append leaves) is skipped with a note."""
        path = self.path / METRICS
        try:
            lines = [(n, line) for n, line in enumerate(path.read_bytes().splitlines(), 1) if line.strip()]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise UserError(f"Cannot read {path} ({exc.strerror}); fix that, or move the run folder away.") from exc
        rows = []
        fix = "The file is corrupt, not just torn at its end. Restore it from a copy, or move the run folder away."
        for n, line in lines:
            try:
                row = schemas.parse_json(line, f"{path} line {n}", fix)
            except UserError:
                if n == lines[-1][0]:
                    if note:
                        note(f"note: ignored the torn last line {n} of {path} (a crash mid-write leaves one).")
                    break
                raise
            schemas.validated(schemas.MetricsRow, row, f"{path} line {n}", fix)
            rows.append(row)
        return rows

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl atomically (on resume it is truncated to the checkpoint's epoch)."""
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        atomic_write_bytes(self.path / METRICS, lines.encode())

    def write_checkpoint(self, state: dict[str, Any], config: RunConfig) -> None:
        """The training state, with the run id and config hash it belongs to (checked when it is loaded)."""
        atomic_torch_save(self.checkpoint_path, {**state, "origin": origin(config)})

    def load_checkpoint(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The latest checkpoint, None before the first epoch ends; an unreadable one, or one another run wrote
        (copied into this folder), is a UserError."""
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
        problem = self.foreign(ckpt.get("origin"), "checkpoint")
        if problem:
            raise self.checkpoint_error(problem)
        return ckpt

    def foreign(self, recorded: Any, what: str) -> str | None:
        """Why a file recording ``recorded`` as its origin does not belong to this run, or None. Files written
        before origins were recorded (2026-12) have none and are accepted."""
        if recorded is None:
            return None
        try:
            found = schemas.CheckpointOrigin.model_validate(recorded)
        except schemas.ValidationError as exc:
            return f"its record of the run that wrote it is damaged ({schemas.describe(exc)})"
        if found.run_id != self.run_id or not found.config_sha256.startswith(found.run_id):
            return (f"this {what} was written by run {found.run_id} (config sha256 {found.config_sha256[:16]}...), "
                    f"not by run {self.run_id}: it was copied from another run's folder")
        return None

    def checkpoint_error(self, reason: str) -> UserError:
        """Never discard a checkpoint silently: say what is wrong and how to retrain from scratch."""
        return UserError(f"The checkpoint {self.checkpoint_path} cannot be used ({reason}). Nothing was discarded. "
                         f"To retrain this run from epoch 0, delete that file (rm {self.checkpoint_path}) and run "
                         f"the same command again.")

    def finished_result(self, select: str = "final") -> tuple[dict[str, Any] | None, str | None]:
        """(the run's result, None), or (None, why a table leaves the run out): unfinished, altered after it
        finished, or a result.json that is missing, damaged or has no block for the selection rule ``select``
        (final | val | oracle)."""
        if not self.done:
            return None, f"unfinished ({epochs_logged(self.path)} epoch(s) logged)"
        if not (self.path / RESULT).is_file():
            return None, "DONE but no result.json"
        try:
            result = self.result(trained=False)  # a table reads the config from config.json, the numbers from here
        except UserError as exc:
            return None, str(exc).rstrip(".")
        block = BLOCK.get(select, select)  # a selection rule's block (ltbench.selection)
        if result.get(block) is None:
            return None, (_no_block(select, result) if select != "final" else
                          f"result.json of run {self.run_id} is damaged: it has no final block; {RESULT_FIX}")
        return result, None

    def altered(self, names: tuple[str, ...]) -> str | None:
        """Which of ``names`` changed since DONE recorded their sha256 (or the damage to DONE), or None.

        This catches accidents and careless edits, not a forger, who can rewrite DONE as well."""
        done = self.path / DONE
        try:
            data = done.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"its DONE marker cannot be read ({exc.strerror})"
        if not data.strip():
            return None  # written before digests were recorded (2026-12)
        try:
            digests = schemas.validated(schemas.DoneFile, schemas.parse_json(data, done, ""), done, "").sha256
        except UserError as exc:
            return f"{exc}".rstrip(". ") + f"; {RESULT_FIX}"
        for name in names:
            if name in digests and _sha256(self.path / name) != digests[name]:
                return (f"its {name} was changed after the run finished (it no longer matches the sha256 DONE "
                        f"recorded). Restore the original; or, to re-evaluate the final checkpoint, {RESULT_FIX}")
        return None

    def untrusted_config(self) -> dict[str, Any]:
        """Coordinates for a footnote about a folder whose config.json is missing or edited: the config as written,
        else the one result.json recorded, else unknown."""
        for name, key in (("config.json", None), (RESULT, "config")):
            with contextlib.suppress(UserError, KeyError, TypeError):
                payload = self.read_json(name)
                payload = payload[key] if key else payload
                schemas.validated(schemas.ConfigFile, payload, name, "")
                return payload
        return {"method": "unknown method", "dataset": "unknown dataset", "seed": "?"}

    def holds_a_run(self) -> bool:
        """Any folder with more than a lock and temporaries (a run that is only starting has nothing else yet)."""
        return self.path.is_dir() and any(p.name != LOCK and not p.name.endswith(TMP_SUFFIX)
                                          for p in self.path.iterdir())

    def eager_retry(self) -> dict[str, Any] | None:
        """The eager-retry marker (the error of the failed compiled attempt), or None."""
        payload = self.read_json(EAGER_RETRY) if (self.path / EAGER_RETRY).is_file() else None
        return payload if isinstance(payload, dict) or payload is None else {"error": repr(payload)[:200]}

    def mark_eager_retry(self, error: str, compile_mode: str) -> None:
        atomic_write_json(self.path / EAGER_RETRY, {"error": error, "compile_mode": compile_mode})

    def posthoc(self) -> dict[str, Any] | None:
        """The content of posthoc_la.json (validated, and written for this run), or None."""
        path = self.path / POSTHOC_FILE
        if not path.is_file():
            return None
        fix = f"Delete it (rm {path}); `ltbench eval {self.run_id} --adjust TAU` computes it again."
        payload = schemas.read_json(path, fix)
        if schemas.validated(schemas.PosthocFile, payload, path, fix).run_id != self.run_id:
            raise UserError(f"{path} belongs to run {payload['run_id']}, not to run {self.run_id}. {fix}")
        return payload

    def write_logits(self, logits: dict[str, Any], labels: Any, config: RunConfig) -> None:
        """The final test logits per head (numpy arrays) and the labels, with the run they belong to."""
        import numpy as np

        buffer = io.BytesIO()
        found = origin(config)
        np.savez_compressed(buffer, labels=labels, **logits, **{f"origin.{k}": np.array(v) for k, v in found.items()})
        atomic_write_bytes(self.path / LOGITS_FILE, buffer.getvalue())

    def saved_logits(self) -> dict[str, Any] | None:
        """The saved final test logits as numpy arrays per head plus ``labels``, or None; a damaged file, or one
        another run wrote, is a UserError."""
        path = self.path / LOGITS_FILE
        if not path.exists():
            return None
        fix = f"Delete it (rm {path}); `ltbench eval {self.run_id} --adjust TAU` then recomputes the logits."
        problem = self.altered((LOGITS_FILE,))
        arrays, reason = schemas.logits_arrays(path) if problem is None else ({}, problem)
        origin_found = {k.removeprefix("origin."): str(arrays.pop(k)) for k in list(arrays) if k.startswith("origin.")}
        reason = reason or self.foreign(origin_found or None, "logits file")
        if reason:
            raise UserError(f"The saved logits {path} cannot be used ({reason}). {fix}")
        return arrays

    def mark_done(self) -> None:
        """DONE, holding the sha256 of the files the result summarises (``altered`` checks them)."""
        names = [n for n in (RESULT, METRICS, LOGITS_FILE) if (self.path / n).is_file()]
        atomic_write_bytes(self.path / DONE, json_bytes({"sha256": {n: _sha256(self.path / n) for n in names}}))

    def write_env(self, session: dict[str, Any]) -> None:
        """Add this session's environment to env.json: one entry per session that trained the run, never
        rewritten (a run resumed on another machine or with other runtime options keeps both)."""
        atomic_write_json(self.path / ENV, {"sessions": [*self.env_sessions(), session]})

    def env_sessions(self) -> list[dict[str, Any]]:
        """The sessions env.json records (one dict before 2026-12: one session); damage is kept as a note."""
        try:
            payload = self.read_json(ENV) if (self.path / ENV).is_file() else {"sessions": []}
        except UserError as exc:
            return [{"unreadable_env_json": str(exc)}]
        sessions = payload.get("sessions") if isinstance(payload, dict) else None
        if isinstance(sessions, list) and all(isinstance(s, dict) for s in sessions):
            return sessions
        return [payload if isinstance(payload, dict) else {"unreadable_env_json": repr(payload)[:200]}]

    def lock(self, on_wait: Callable[[str], None] | None = None) -> contextlib.AbstractContextManager[None]:
        """Exclusive lock so that two processes (e.g. sweep trials sharing a teacher) never train one run twice
        (:func:`ltbench.run_lock.locked`)."""
        return locked(self.path, on_wait)


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
        payload = schemas.read_json(path, "")
        schemas.validated(schemas.ConfigFile, payload, "config.json", "")
        config = RunConfig.from_dict(payload)
        run_id = config.run_id
    except UserError as exc:
        return f"its config.json is unreadable ({str(exc).rstrip('. ')})"
    except (ValueError, TypeError, AttributeError) as exc:
        return f"its config.json is unreadable ({type(exc).__name__}: {exc})"
    if run_id != folder.name and config.legacy_run_id == folder.name:
        return ("it was written by an older ltbench (before 2026-11-28: its run id hashed runtime options such as "
                "workers, and its files count epochs from 0), which this version cannot read; the same command "
                f"trains it again as run {run_id}")
    if run_id != folder.name:
        return (f"its config.json hashes to run id {run_id}, not to the folder's name {folder.name}: it was edited "
                f"(or the folder renamed), so it no longer describes what was trained")
    return None


def origin(config: RunConfig) -> dict[str, str]:
    """What a checkpoint or logits file records about its run: the run id and the full sha256 of the config."""
    return {"run_id": config.run_id, "config_sha256": hashlib.sha256(canonical_json(config.identity()).encode())
            .hexdigest()}


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


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
