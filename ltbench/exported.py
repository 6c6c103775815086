"""An exported network: what a method's ``export`` hook gives, the card's preprocessing, and :func:`load_model`.

``ltbench export`` (:mod:`ltbench.export`) writes the network's state dict exactly as its card's ``architecture``
builds it, so ``timm.create_model(...)`` or ``ltbench.cnn.Classifier(...)`` loads it strictly with nothing from
ltbench. :func:`load_model` does that and wraps the network in an :class:`ExportedModel`: the card's heads, its
preprocessing (the run's own evaluation pipeline, described step by step) and its class names. A card can name only
the two factories of :func:`build_network` and the steps of :data:`STEPS`: loading one runs no other code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import transforms as T

from ltbench.cnn import CLASSIFIER_FACTORY, Classifier
from ltbench.errors import UserError
from ltbench.models import TIMM_FACTORY, distilled_heads
from ltbench.weights import EXPORT_FIX, export_weights_path, read_card


@dataclass
class NetworkExport:
    """What :meth:`ltbench.method.Method.export` returns: the trained network alone and how ``predict`` reads it."""

    module: nn.Module  # built as ``architecture`` says, holding the run's weights
    architecture: dict[str, Any]  # {"factory": ..., "kwargs": {...}} (and "name", timm's entry point)
    input_size: int  # the side of the square images the network is fed
    heads: dict[str, str]  # head -> what its logits are; "main" is the head a report shows
    # logits: main = module(x) | distilled: cls and dist from models.distilled_heads, main their mean (DeiT's)
    outputs: str = "logits"
    logit_scale: float | list[float] | None = None  # every head times this (LDAM's s, LWS's per-class scales)


def build_network(architecture: Mapping[str, Any]) -> nn.Module:
    """The freshly initialised network a card's architecture names; no factory but these two is ever called."""
    factory, kwargs = architecture["factory"], dict(architecture["kwargs"])
    try:
        if factory == CLASSIFIER_FACTORY:
            return Classifier(**kwargs)
        if factory == TIMM_FACTORY:
            import timm

            if not timm.is_model(architecture.get("name") or ""):
                raise UserError(f"timm has no model {architecture.get('name')!r} (timm {timm.__version__}).")
            return timm.create_model(architecture["name"], pretrained=False, **kwargs)
    except TypeError as exc:
        raise UserError(f"The card's architecture cannot be built ({exc}). {EXPORT_FIX}") from exc
    raise UserError(f"The card names the factory {factory!r}; ltbench builds only {TIMM_FACTORY} and "
                    f"{CLASSIFIER_FACTORY}. {EXPORT_FIX}")


def architecture_call(architecture: Mapping[str, Any]) -> str:
    """The Python call that builds the network, as the card prints it."""
    args = [repr(architecture["name"]), "pretrained=False"] if architecture["factory"] == TIMM_FACTORY else []
    args += [f"{key}={value!r}" for key, value in architecture["kwargs"].items()]
    return f"{architecture['factory']}({', '.join(args)})"


# --- preprocessing: the run's evaluation pipeline as data ------------------------------------------------------
STEPS: dict[str, Callable[[dict[str, Any]], Callable]] = {
    "resize": lambda s: T.Resize(s["size"], interpolation=T.InterpolationMode(s["interpolation"]),
                                 antialias=s["antialias"]),
    "center_crop": lambda s: T.CenterCrop(s["size"]),
    "to_tensor": lambda s: T.ToTensor(),
    "normalize": lambda s: T.Normalize(s["mean"], s["std"]),
}


def describe_transform(transform: Callable, input_size: int) -> list[dict[str, Any]]:
    """A torchvision evaluation pipeline as steps of :data:`STEPS`. A pipeline without a resize (native-size images
    fed as they are) gets a resize and a centre crop to ``input_size`` first: a no-op on native-size images, and
    what lets other sizes in."""
    steps = [_step(t) for t in (transform.transforms if isinstance(transform, T.Compose) else [transform])]
    if not any(step["op"] == "resize" for step in steps):
        steps = [_step(T.Resize(input_size, interpolation=T.InterpolationMode.BICUBIC)),
                 _step(T.CenterCrop(input_size)), *steps]
    return steps


def _step(transform: Callable) -> dict[str, Any]:
    if isinstance(transform, T.Resize):
        return {"op": "resize", "size": transform.size, "interpolation": transform.interpolation.value,
                "antialias": transform.antialias}
    if isinstance(transform, T.CenterCrop):
        return {"op": "center_crop", "size": list(transform.size)}
    if isinstance(transform, T.ToTensor):
        return {"op": "to_tensor"}
    if isinstance(transform, T.Normalize):
        return {"op": "normalize", "mean": [float(v) for v in transform.mean], "std": [float(v) for v in transform.std]}
    raise UserError(f"The run's evaluation pipeline has a {type(transform).__name__} step, which an export cannot "
                    f"describe (it knows {', '.join(STEPS)}).")


def preprocessing(steps: list[dict[str, Any]]) -> T.Compose:
    """The torchvision pipeline a card's steps describe (from a PIL image to the network's input tensor)."""
    try:
        return T.Compose([STEPS[step["op"]](step) for step in steps])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"The card's preprocessing step is not one ltbench knows ({exc!r}). {EXPORT_FIX}") from exc


# --- the model --------------------------------------------------------------------------------------------------
class ExportedModel(nn.Module):
    """An exported network ready to predict: ``model(x)`` gives the logits of the head ``model.head`` for a batch of
    preprocessed images and ``model.heads(x)`` those of every head; ``model.preprocess`` turns one PIL image into
    the network's input; ``model.class_names`` and ``model.card`` come from the model card."""

    def __init__(self, network: nn.Module, card: Mapping[str, Any], head: str | None = None) -> None:
        super().__init__()
        self.network, self.card = network, dict(card)
        self.preprocess = preprocessing(card["preprocessing"])
        self.class_names = tuple(card["class_names"])
        self.head = head or card["default_head"]
        if self.head not in card["heads"]:
            raise UserError(f"This export has no head {self.head!r}; its heads are {', '.join(card['heads'])}.")
        for name in ("logit_scale", "logit_offset"):
            value = card.get(name)
            self.register_buffer(name, None if value is None else torch.tensor(value, dtype=torch.float32))

    def heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every head's logits, as the run's ``predict`` gave them (then scaled and offset as the card says)."""
        if self.card["outputs"] == "distilled":
            cls_logits, dist_logits = distilled_heads(self.network, x)
            raw = {"main": (cls_logits + dist_logits) / 2, "cls": cls_logits, "dist": dist_logits}
        else:
            raw = {"main": self.network(x)}
        return {name: self._adjusted(logits) for name, logits in raw.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(x)[self.head]

    def _adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logit_offset is not None:
            logits = logits + self.logit_offset
        return logits


def load_model(folder: str | Path, head: str | None = None, device: str | torch.device = "cpu") -> ExportedModel:
    """The network ``ltbench export`` wrote into ``folder``, in eval mode on ``device``, with its preprocessing.

    ``head`` picks the logits ``model(x)`` returns (default: the card's ``default_head``, the one the report shows;
    a distilled ViT also has ``cls`` and ``dist``). The card is validated and the weights checked against its sha256.
    """
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    card = read_card(folder)
    network = build_network(card["architecture"])
    path = export_weights_path(folder, card)
    try:
        network.load_state_dict(load_file(path))
    except Exception as exc:  # noqa: BLE001 - names or shapes not the architecture's (RuntimeError), a bad file
        raise UserError(f"The weights {path} do not load into the card's architecture "
                        f"({' '.join(str(exc).split())[:300]}). {EXPORT_FIX}") from exc
    return ExportedModel(network, card, head).to(device).eval()
