"""Export folders' layout: the network alone in safetensors (:data:`WEIGHTS`) beside its model card (:data:`CARD`).

``ltbench export`` (:mod:`ltbench.export`) writes them; the card records the weights' sha256, and
:func:`export_weights_path` checks the pair, so a half-written or mixed export is never loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ltbench import schemas
from ltbench.errors import UserError
from ltbench.records import file_sha256

CARD = "model_card.json"
WEIGHTS = "model.safetensors"
EXPORT_FIX = "Export the run again (ltbench export RUN --out DIR)."


def read_card(folder: Path) -> dict[str, Any]:
    """The validated model card of an export folder."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; give the folder `ltbench export` wrote.")
    if not (folder / CARD).is_file():
        raise UserError(f"{folder} holds no {CARD}, so it is not an ltbench export folder. {EXPORT_FIX}")
    payload = schemas.read_json(folder / CARD, EXPORT_FIX)
    schemas.validated(schemas.ExportCard, payload, folder / CARD, EXPORT_FIX)
    return payload


def export_weights_path(folder: Path, card: Mapping[str, Any]) -> Path:
    """The export's safetensors file, refused when it is not the one its card describes (a torn or mixed export)."""
    path = folder / WEIGHTS
    found = file_sha256(path)
    if found is None:
        raise UserError(f"{path} is missing or unreadable. {EXPORT_FIX}")
    if found != card["weights_sha256"]:
        raise UserError(f"{path} is not the file its {CARD} describes (sha256 {found[:16]}..., the card says "
                        f"{card['weights_sha256'][:16]}...): it was replaced or is half-written. {EXPORT_FIX}")
    return path
