"""Weights files from outside a run folder: export folders and the files the ``init`` hyperparameter starts from.

An export folder (``ltbench export``, :mod:`ltbench.export`) holds :data:`WEIGHTS`, the network alone in safetensors,
and :data:`CARD`, its model card, which records the weights' sha256; :func:`export_weights_path` checks the pair.

``init`` names a local file: a safetensors file, a torch checkpoint (``.pth`` / ``.pt`` / ``.bin``, as timm and
torchvision save them: a state dict, or one nested under :data:`NESTED_KEYS`; loaded with ``weights_only``, so it
runs no code) or an export folder. :func:`read_state_dict` checks that it holds a mapping of names to tensors and
:func:`load_matching` loads what fits a model by name. The run id hashes the file's sha256 (:func:`weights_sha256`),
never its path. torch is imported only where weights are read: resolving a config hashes the file without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ltbench import schemas
from ltbench.errors import UserError
from ltbench.records import file_sha256

if TYPE_CHECKING:
    import torch
    from torch import nn

CARD = "model_card.json"
WEIGHTS = "model.safetensors"
NESTED_KEYS = ("state_dict", "model", "module")  # where training scripts (timm, torchvision, DeiT) nest the weights
SHOWN = 6  # names listed in a note before "and N more"
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


def weights_file(path: Path) -> Path:
    """The file whose bytes are the weights ``path`` names: the file itself, or an export folder's safetensors."""
    if path.is_dir():
        return export_weights_path(path, read_card(path))
    if not path.is_file():
        raise UserError(f"init={path}: no such file or folder. Give a local weights file (.safetensors, .pth, .pt) or "
                        f"an ltbench export folder; nothing is downloaded.")
    return path


def weights_sha256(path: Path) -> str:
    """The sha256 a run id hashes for ``init=path``: of the file, or of an export folder's weights."""
    file = weights_file(path)
    digest = file_sha256(file)
    if digest is None:
        raise UserError(f"init={path}: {file} cannot be read; check its permissions.")
    return digest


def read_init(path: str, expected_sha256: str) -> dict[str, torch.Tensor]:
    """The state dict of ``init``, refused when the file changed since the run id hashed it."""
    found = weights_sha256(Path(path))
    if found != expected_sha256:
        raise UserError(f"init={path} changed after this run's id was computed from it (sha256 {found[:16]}..., the "
                        f"run recorded {expected_sha256[:16]}...). Restore the file, or run the command again: the "
                        f"new file is a new run.")
    return read_state_dict(Path(path))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A mapping of names to tensors from a safetensors file, a torch checkpoint or an export folder."""
    import torch

    file = weights_file(path)
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            payload: Any = load_file(file)
        else:
            payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - safetensors, pickle and zip readers raise many kinds for a bad file
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"init={path}: {file.name} is not a readable weights file ({first}). Give a .safetensors "
                        f"file or a torch checkpoint of tensors only (torch.save(model.state_dict(), PATH)).") from exc
    for key in NESTED_KEYS:
        if isinstance(payload, Mapping) and isinstance(payload.get(key), Mapping):
            payload = payload[key]
            break
    if not isinstance(payload, Mapping) or not payload:
        raise UserError(f"init={path}: {file.name} holds {type(payload).__name__}, not a mapping of parameter names to "
                        f"tensors (a state dict, or one under {', '.join(map(repr, NESTED_KEYS))}).")
    wrong = [str(k) for k, v in payload.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if wrong:
        raise UserError(f"init={path}: {file.name} is not a state dict: {_listed(wrong)} are not named tensors.")
    return dict(payload)


def load_matching(model: nn.Module, state: Mapping[str, torch.Tensor], num_classes: int,
                  note: Callable[[str], Any], source: str) -> None:
    """Load every tensor of ``state`` whose name and shape fit ``model``; say what was left out.

    A ``module.`` prefix (DistributedDataParallel's) is dropped, and names are tried under ``backbone.`` as well
    (torchvision's ResNet keys in ltbench's :class:`~ltbench.cnn.Classifier`). A classifier whose number of classes
    differs is skipped, the usual fine-tuning start; any other shape that differs is an error, and so is a file of
    which nothing fits."""
    own = model.state_dict()
    state = _aligned(state, own)
    classifier = _classifier_tensors(model, num_classes)
    fitting = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    skipped = [k for k in own if k in state and k in classifier and k not in fitting]
    wrong = [f"{k} is {tuple(v.shape)} there, {tuple(own[k].shape)} here" for k, v in state.items()
             if k in own and k not in fitting and k not in skipped]
    if wrong:
        raise UserError(f"init {source} does not fit this model: {'; '.join(wrong[:3])}. Its architecture settings "
                        f"(img_size, patch_size, embed_dim, depth, arch, ...) must be this run's.")
    if not fitting:
        raise UserError(f"init {source}: none of its {len(state)} tensors fits this model by name (its names: "
                        f"{_listed(list(state))}; this model's: {_listed(list(own))}). Is it of this architecture?")
    model.load_state_dict(fitting, strict=False)
    parts = [f"init: loaded {len(fitting)} of this model's {len(own)} tensors from {source}"]
    if skipped:
        parts.append(f"kept the classifier freshly initialised ({_listed(skipped)}: another number of classes than "
                     f"this run's {num_classes})")
    missing = [k for k in own if k not in fitting and k not in skipped]
    unused = [k for k in state if k not in own]
    parts += [f"not in the file, kept as initialised: {_listed(missing)}"] if missing else []
    parts += [f"in the file but not in this model, ignored: {_listed(unused)}"] if unused else []
    note("; ".join(parts) + ".")


def _aligned(state: Mapping[str, torch.Tensor], own: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    prefixed = {(f"backbone.{k}" if f"backbone.{k}" in own else k): v for k, v in state.items()}
    return prefixed if sum(k in own for k in prefixed) > sum(k in own for k in state) else dict(state)


def _classifier_tensors(model: nn.Module, num_classes: int) -> set[str]:
    """The parameters of the layers that output one score per class (a ViT's head / head_dist, a CNN's fc)."""
    return {f"{name}.{param}".lstrip(".") for name, module in model.named_modules()
            if getattr(module, "out_features", None) == num_classes
            for param, _ in module.named_parameters(recurse=False)}


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more
