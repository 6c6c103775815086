"""Searches' manifests: ``<results>/tunes/<tune_id>/tune.json``, written by ltbench.tuning and read by the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ltbench.atomic import atomic_write_json
from ltbench.errors import UserError

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
