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

A batch is whatever ``prepare`` returns. The built-in families differ (``batch_structure`` names it):
CNN methods (``ERMCNN``, ``LDAMDRW``) keep ``(x, y)``; ViT methods (``ERMViT``) mix once per step and
pass ``(x, soft_targets, y)``; distilled ViTs (``DeiT``, ``DeiTLT``) append the teacher's labels,
``(x, soft_targets, y, y_teacher)``. A subclass that overrides ``loss`` alone unpacks its parent's
structure. ``docs/plugins.md`` has a worked plugin for each family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import nn

from ltbench.config import RunConfig, TrainHparams
from ltbench.errors import UserError
from ltbench.exported import NetworkExport
from ltbench.seeding import seed_hash
from ltbench.weights import load_matching

if TYPE_CHECKING:
    from ltbench.data import DatasetInfo
    from ltbench.records import RunRecord

Batch = Any  # whatever ``prepare`` returns and ``loss`` consumes


@dataclass
class Upstream:
    """A finished run this method depends on (e.g. a teacher), keyed by role in ``requires``."""

    config: RunConfig
    record: RunRecord


def upstream_reference(config: RunConfig, role: str,
                       build: Callable[[str, tuple[str, ...]], RunConfig]) -> dict[str, RunConfig | str]:
    """``requires`` of a method with one ``role`` upstream run chosen by the hyperparameters ``{role}_run`` (an
    existing run: id, prefix or folder) or else ``build(preset, overrides)``: the run trained on demand, with
    ``{role}_preset`` ("" = this run's preset) and the KEY=VALUE items of ``{role}_overrides``."""
    hp = config.hparams
    if hp[f"{role}_run"]:
        return {role: hp[f"{role}_run"]}
    return {role: build(hp[f"{role}_preset"] or config.preset, tuple(hp[f"{role}_overrides"]))}


class BatchPosition(NamedTuple):
    """Where a micro-batch sits in training: the run's seed, the 0-based epoch and optimizer step of the epoch,
    and the position of the micro-batch's first image in the global batch (this process's shard start plus the
    micro-batches before it). The engine sets it before each ``prepare`` without hashing anything; a method
    that draws keyed randomness calls ``key()`` only when it needs it (ViT Mixup, while mixing is on)."""

    seed: int
    epoch: int
    index: int
    offset: int

    def key(self) -> int:
        """A seed of this optimizer step, the same on every process and for every micro-batch of the step."""
        return seed_hash(self.seed, "step", self.epoch, self.index)


class Method:
    """Base class of method plugins. Subclass, set ``Hparams`` and ``presets``, implement the hooks."""

    name: ClassVar[str]
    display_name: ClassVar[str] = ""  # how papers write it (figure titles, legends); "" = the name
    # Part of every run id: bump it whenever a change to the method's code changes its numbers, or finished
    # runs of the old code are reused silently.
    VERSION: ClassVar[int] = 1
    # What ``prepare`` returns, named for error messages and documentation.
    batch_structure: ClassVar[str] = "(x, y)"
    Hparams: ClassVar[type[TrainHparams]] = TrainHparams
    # preset name -> {"*": overrides for every dataset, "<dataset>": overrides for that dataset}, or a list of
    # such tables applied in order (a table that changes epochs rescales the schedule: stages.apply_layer)
    presets: ClassVar[dict[str, Any]] = {"default": {}}
    default_preset: ClassVar[str] = "default"
    # When True the engine excludes 1-D parameters and ``no_weight_decay()`` names from weight decay.
    filter_bias_and_bn: ClassVar[bool] = True
    # Dataset options this method needs by default, per dataset (e.g. DeiT-LT's frequency-sorted labels).
    data_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    # Set by the engine before each ``prepare``: a ``BatchPosition`` (run seed, epoch, step, the position of the
    # micro-batch's first image in the global batch). Randomness keyed by ``key()`` and the position (ViT Mixup)
    # is the same whatever the split of the global batch into micro-batches and processes.
    batch_position: BatchPosition = BatchPosition(0, 0, 0, 0)

    def __init__(self, hp: Any, info: DatasetInfo, device: torch.device, upstream: Mapping[str, Upstream]) -> None:
        """Build the model(s). ``hp`` is an instance of ``Hparams``, ``info`` the dataset's class counts, names,
        mean/std and number of classes, ``upstream`` the finished runs named by ``requires``. The engine moves
        every module of ``state_modules`` to ``device`` afterwards."""
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
        """The per-image training pipeline: a callable from a PIL image to a tensor (``ltbench.augment`` has the
        built-in ones). It may return a tuple of tensors for several views, as PaCo does."""
        raise NotImplementedError

    def eval_transform(self) -> Callable:
        """The per-image evaluation pipeline (deterministic): a callable from a PIL image to a tensor."""
        raise NotImplementedError

    # --- training hooks --------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        """Called before each training epoch with its 0-based index (switch phases here, e.g. DRW)."""
        self.epoch = epoch

    def prepare(self, x: torch.Tensor, y: torch.Tensor) -> Batch:
        """Turn one micro-batch of images ``x`` (on the device) and labels ``y`` into what ``loss`` unpacks.

        Runs once per step under ``torch.no_grad``, so SAM's second pass and gradient accumulation see the same
        batch; random choices (Mixup, teacher labels, momentum keys) belong here. Keep ``batch_structure`` in
        step with what it returns."""
        return x, y

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar to minimise on one prepared micro-batch, and named extra values to log (may be empty).

        ``batch`` is what ``prepare`` returned (``batch_structure``). The engine weights, accumulates and
        backpropagates the loss; the method never calls ``backward`` or steps the optimizer."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after each optimizer step."""

    # --- inference -------------------------------------------------------------------------
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits ``[batch, classes]`` per head for evaluation images; ``"main"`` is the reported one."""
        return {"main": self.trainable()(x)}

    # --- records ---------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What a downstream run needs to reuse this run's model (written to ``result.json``)."""
        return {}

    def diagnostics(self, x: torch.Tensor) -> dict[str, Any]:
        """Optional per-run analysis computed on a fixed evaluation subset."""
        return {}

    # --- weights in and out ----------------------------------------------------------------
    def export(self) -> NetworkExport:
        """The trained network alone, for ``ltbench export``: a module that a factory of the model card rebuilds,
        and how ``predict``'s heads come from it (:class:`ltbench.exported.NetworkExport`). The export checks on a
        probe batch that it gives ``predict``'s logits before anything is written."""
        raise UserError(f"Method {getattr(self, 'name', type(self).__name__)!r} cannot be exported: it does not "
                        f"describe its network (Method.export, docs/plugins.md).")

    def load_init(self, state: Mapping[str, torch.Tensor], note: Callable[[str], Any]) -> None:
        """Start from the weights of the ``init`` file, before training: every tensor of ``state`` that fits
        ``trainable()`` by name (:func:`ltbench.weights.load_matching`). A method that keeps a copy of its network
        (PaCo's momentum encoder) copies them there too."""
        load_matching(self.trainable(), state, self.info.num_classes, note, self.hp.init)


def compute_loss(method: Method, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``method.loss(batch)``, with a clear error when the loss unpacks a batch of another structure."""
    try:
        return method.loss(batch)
    except (TypeError, ValueError) as exc:
        if "unpack" not in str(exc) or not _raised_in_loss(method, exc):
            raise
        cls = type(method)
        raise UserError(
            f"Method {getattr(cls, 'name', cls.__name__)!r} ({cls.__module__}.{cls.__qualname__}) could not unpack "
            f"its batch in loss(): {exc}. The batch is what prepare() returns, {cls.batch_structure} for this "
            f"class, and here it was {describe_batch(batch)}. CNN methods get (x, y), ViT methods "
            f"(x, soft_targets, y), distilled ViTs (x, soft_targets, y, y_teacher); unpack the structure of the "
            f"class you subclass, or override prepare() (docs/plugins.md)."
        ) from exc


def _raised_in_loss(method: Method, exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc`` is a ``loss`` of the method's classes (not code it calls)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    losses = {getattr(vars(c)["loss"], "__code__", None) for c in type(method).__mro__ if "loss" in vars(c)}
    return tb is not None and tb.tb_frame.f_code in losses


def describe_batch(batch: Any) -> str:
    """A short structural description, e.g. ``a tuple of 2: (Tensor[32, 3, 32, 32] float32, Tensor[32] int64)``."""
    if isinstance(batch, torch.Tensor):
        return f"Tensor[{', '.join(map(str, batch.shape))}] {str(batch.dtype).removeprefix('torch.')}"
    if isinstance(batch, (tuple, list)):
        items = ", ".join(describe_batch(item) for item in batch)
        return f"a {type(batch).__name__} of {len(batch)}: ({items})"
    return type(batch).__name__
