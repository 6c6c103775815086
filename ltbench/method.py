"""The Method plugin interface: a small class with typed hyperparameters and a handful of hooks.

The engine owns the loop (devices, precision, accumulation, SAM, optimizer and schedule,
checkpoints, evaluation). A method says what to train and how to score a batch:

* ``__init__`` builds the model(s) from the hyperparameters and :class:`DatasetInfo`;
* ``train_transform`` / ``eval_transform`` name the per-image input pipeline;
* ``prepare`` turns a raw batch into what the loss needs, once per step and without gradients
  (Mixup/CutMix, teacher labels, momentum-encoder keys), so SAM's second pass sees the same batch;
* ``loss`` returns the scalar to minimise and a few detached tensors to log;
* ``after_step`` updates non-gradient state (momentum encoders, queues);
* ``predict`` returns logits per head; ``"main"`` is the one reported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ltbench.config import RunConfig, TrainHparams

if TYPE_CHECKING:
    from ltbench.data import DatasetInfo
    from ltbench.records import RunRecord

Batch = Any  # whatever ``prepare`` returns and ``loss`` consumes


@dataclass
class Upstream:
    """A finished run this method depends on (e.g. a teacher), keyed by role in ``requires``."""

    config: RunConfig
    record: RunRecord


class Method:
    """Base class of method plugins. Subclass, set ``Hparams`` and ``presets``, implement the hooks."""

    name: ClassVar[str]
    VERSION: ClassVar[int] = 1
    Hparams: ClassVar[type[TrainHparams]] = TrainHparams
    # preset name -> {"*": overrides for every dataset, "<dataset>": overrides for that dataset}
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {"default": {}}
    default_preset: ClassVar[str] = "default"
    # When True the engine excludes 1-D parameters and ``no_weight_decay()`` names from weight decay.
    filter_bias_and_bn: ClassVar[bool] = True
    # Dataset options this method needs by default, per dataset (e.g. DeiT-LT's frequency-sorted labels).
    data_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, hp: Any, info: DatasetInfo, device: torch.device, upstream: Mapping[str, Upstream]) -> None:
        self.hp = hp
        self.info = info
        self.device = device
        self.upstream = upstream
        self.epoch = 0

    # --- declared dependencies -------------------------------------------------------------
    @classmethod
    def requires(cls, config: RunConfig) -> dict[str, RunConfig | str]:
        """Upstream runs (teachers) that must be finished before this run starts.

        A value is either a config (trained first if missing) or a reference to an existing run
        (a run id, id prefix or folder path), which must be finished.
        """
        return {}

    # --- modules ---------------------------------------------------------------------------
    def trainable(self) -> nn.Module:
        """The module whose parameters the optimizer updates (and the EMA tracks)."""
        return self.model  # type: ignore[attr-defined]

    def state_modules(self) -> dict[str, nn.Module]:
        """Every module whose state must be checkpointed; the trainable one included."""
        return {"model": self.trainable()}

    def compile(self, **options: Any) -> None:
        """torch.compile what ``loss`` and ``predict`` call (``--compile``); by default the trainable module's
        forward. A method that calls other entry points of its model compiles those instead."""
        self.trainable().compile(**options)

    # --- input pipeline --------------------------------------------------------------------
    def train_transform(self) -> Callable:
        raise NotImplementedError

    def eval_transform(self) -> Callable:
        raise NotImplementedError

    # --- training hooks --------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def prepare(self, x: torch.Tensor, y: torch.Tensor) -> Batch:
        return x, y

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after each optimizer step."""

    # --- inference -------------------------------------------------------------------------
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"main": self.trainable()(x)}

    # --- records ---------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What a downstream run needs to reuse this run's model (written to ``result.json``)."""
        return {}

    def diagnostics(self, x: torch.Tensor) -> dict[str, Any]:
        """Optional per-run analysis computed on a fixed evaluation subset."""
        return {}
