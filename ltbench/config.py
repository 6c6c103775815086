"""Typed, validated hyperparameters and the frozen, hashed configuration of one run.

Precedence when resolving a run: dataclass defaults < preset (``"*"`` then the dataset's own entry)
< ``--epochs`` < ``--set key=value``. The resolved values are written to ``config.json`` and hashed
into the run id, so the same resolved configuration always maps to the same run folder. Values the
other settings make inert (``TrainHparams.inert_fields``, e.g. ``auto_augment`` under ``augment=none``)
are reset to their defaults first, so they do not change the run id; an inert combination a method
does not declare there still does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ltbench.errors import UserError
from ltbench.runtime import RUNTIME_OPTIONS

SCHEMA_VERSION = 1

def recorded_if_set(default: Any) -> Any:
    """A field added after schema 1 (an engine hook, a dataset's val option): it enters config.json and the run id
    only when it differs from its default, so the runs made before it keep their ids."""
    return field(default=default, metadata={"recorded_if_set": True})


engine_hook = recorded_if_set  # a TrainHparams hook


def hparams_dict(hp: Any) -> dict[str, Any]:
    """The JSON form of typed hyperparameters or dataset options as config.json records and the run id hashes
    them: every field, except those declared with :func:`recorded_if_set` left at their defaults."""
    payload = to_jsonable(hp)
    for f in dataclasses.fields(hp):
        if f.metadata.get("recorded_if_set") and getattr(hp, f.name) == f.default:
            del payload[f.name]
    return payload


@dataclass
class TrainHparams:
    """Settings every method shares; methods subclass this and add their own fields."""

    # Fields that name 0-based epochs of the schedule; changing ``epochs`` rescales them (rescale_epochs).
    # ``milestones`` are timm's (a decay applies from epoch m - 1). Subclasses extend the tuple.
    EPOCH_POINTS: ClassVar[tuple[str, ...]] = ("warmup_epochs", "milestones", "sam_rho_epochs")
    # Hook: a method that trains nothing (tau-normalisation) sets 0 and epochs = 0; its run evaluates the model
    # as built and checkpoints it.
    min_epochs: ClassVar[int] = 1

    epochs: int = 200
    batch_size: int = 128  # the global batch: micro-batches x accumulation x devices
    lr: float = 0.1
    lr_base_batch: int = 0  # >0: lr is given per this batch and scaled linearly (DeiT: 512)
    lr_scale_batch: int = 0  # the batch the scaling uses; 0 = batch_size (DeiT-LT's code excludes accumulation)
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    weight_decay: float = 2e-4
    sched: str = "multistep"  # multistep | cosine
    sched_per_step: bool = False  # step the schedule at fractional epochs (DeiT) instead of once per epoch
    warmup_epochs: int = 0
    warmup_lr: float = 0.0  # lr at the first warm-up epoch
    min_lr: float = 0.0
    milestones: tuple[int, ...] = ()
    decay_rate: float = 0.1
    sam_rho: float = 0.0  # >0: Sharpness-Aware Minimization with this radius
    sam_rho_steps: tuple[float, ...] = ()  # step schedule of the SAM radius; overrides sam_rho when set
    sam_rho_epochs: tuple[int, ...] = ()  # 0-based epochs at which sam_rho_steps[1:] start
    ema_decay: float = 0.0  # >0: keep an EMA of the model weights (saved; evaluated only with eval_ema)
    eval_ema: bool = False
    # Evaluate on the test split every N epochs and always at the last; 0 = the smallest interval at which
    # evaluation costs at most 5 % of the training compute (eval_interval).
    eval_every: int = 0
    repeated_aug: int = 1  # DeiT's repeated augmentation: each image N times per epoch, epoch length kept
    workers: int = 2
    # Autocast dtype on a GPU (the CPU always trains in fp32): bf16 | fp16 (autocast + GradScaler) | fp32
    precision: str = "bf16"
    # Engine hooks (declared here so that every method takes them with --set). They were added after schema 1,
    # so in config.json and the run id they appear only when set away from their defaults (engine_hook()); a
    # method that declared one of them itself before keeps its own declaration, always recorded.
    nesterov: bool = engine_hook(False)  # Nesterov momentum for optimizer=sgd (the CNN recipes: classical momentum)
    opt_betas: tuple[float, ...] = engine_hook(())  # AdamW betas; () = timm's (0.9, 0.999)
    layer_decay: float = engine_hook(0.0)  # >0: timm's layer-wise lr decay for ViTs
    warmup_prefix: bool = engine_hook(False)  # the schedule after the warm-up spans the remaining epochs (PaCo)
    drop_last: bool = engine_hook(False)  # drop the last incomplete batch of each epoch
    sampler: str = engine_hook("instance")  # instance | class_balanced (augment.SAMPLERS)
    # (gpus, accum_iter): read the per-step schedule where a released loop on that many GPUs, accumulating that many
    # iterations, last stepped it before each optimizer step (update_offsets); () = at the step itself
    sched_released_layout: tuple[int, ...] = engine_hook(())
    # A local weights file to start from (ltbench.weights: a timm / torchvision checkpoint, a safetensors file or an
    # ltbench export folder). The run id hashes the file's sha256 (init_sha256, which resolve computes), not its path.
    init: str = engine_hook("")
    init_sha256: str = engine_hook("")

    def validate(self) -> None:
        """Reject contradictory or out-of-range settings with a message that says which field."""
        check_finite(self)
        check(self.epochs >= self.min_epochs, f"epochs must be >= {self.min_epochs}")
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(self.lr > 0, "lr must be > 0")
        check(0 <= self.momentum < 1, "momentum must be in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay must be >= 0")
        check(0 < self.decay_rate <= 1, "decay_rate (the lr factor at each milestone) must be in (0, 1]")
        check(self.warmup_lr >= 0 and self.min_lr >= 0, "warmup_lr and min_lr must be >= 0")
        check(0 <= self.ema_decay < 1, "ema_decay must be in [0, 1) (0 = no EMA)")
        check(self.lr_base_batch >= 0 and self.lr_scale_batch >= 0, "lr_base_batch and lr_scale_batch must be >= 0")
        check(self.workers >= 0, "workers must be >= 0")
        check(self.warmup_epochs >= 0 and min((*self.milestones, *self.sam_rho_epochs), default=0) >= 0,
               "warmup_epochs, milestones and sam_rho_epochs must be >= 0")
        check(min(self.sam_rho_steps, default=0) >= 0, "sam_rho_steps must be >= 0")
        check(self.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}, not {self.sampler!r}")
        check(not (self.sampler == "class_balanced" and self.repeated_aug > 1),
              "sampler=class_balanced cannot be combined with repeated_aug > 1; set repeated_aug=1")
        check(len(self.opt_betas) in (0, 2) and all(0 <= b < 1 for b in self.opt_betas),
              "opt_betas must be two numbers in [0, 1) (or empty for the optimizer's defaults)")
        check(0 <= self.layer_decay <= 1, "layer_decay must be in [0, 1] (0 = off)")
        layout = self.sched_released_layout
        check(not layout or (len(layout) == 2 and min(layout) >= 1 and self.sched_per_step
                             and self.batch_size % (layout[0] * layout[1]) == 0),
              "sched_released_layout must be empty or (gpus, accum_iter) >= 1 dividing batch_size, with "
              "sched_per_step=true (--set sched_released_layout= switches it off)")
        check(self.init or not self.init_sha256, "init_sha256 is computed from the file init names: set init=PATH")
        check(self.optimizer in {"sgd", "adamw"}, f"optimizer must be sgd or adamw, not {self.optimizer!r}")
        check(self.sched in {"multistep", "cosine"}, f"sched must be multistep or cosine, not {self.sched!r}")
        check(self.sam_rho >= 0, "sam_rho must be >= 0")
        check(
            not self.sam_rho_steps or len(self.sam_rho_steps) == len(self.sam_rho_epochs) + 1,
            "sam_rho_steps needs exactly one more value than sam_rho_epochs",
        )
        check(self.eval_every >= 0, "eval_every must be >= 0 (0 = automatic, at most 5 % of training compute)")
        check(self.repeated_aug >= 1, "repeated_aug must be >= 1")
        check(self.warmup_epochs < self.epochs or self.epochs <= 1, "warmup_epochs must be < epochs")
        check(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, not "
                                             f"{self.precision!r}")
        check(not (self.precision == "fp16" and self.uses_sam), "precision=fp16 cannot be combined with SAM "
                                                                 "(its ascent step needs unscaled gradients)")

    def inert_fields(self) -> tuple[str, ...]:
        """Fields the other settings make ineffective (subclasses name theirs, e.g. RandAugment without
        augmentation); :meth:`without_inert` resets them so they cannot split one experiment into two run ids."""
        return ()

    def without_inert(self) -> TrainHparams:
        defaults = type(self)()
        return dataclasses.replace(self, **{name: getattr(defaults, name) for name in self.inert_fields()})

    @property
    def uses_sam(self) -> bool:
        return uses_sam(self.sam_rho, self.sam_rho_steps)

    def effective_lr(self) -> float:
        if not self.lr_base_batch:
            return self.lr
        return self.lr * (self.lr_scale_batch or self.batch_size) / self.lr_base_batch


PRECISIONS = ("bf16", "fp16", "fp32")


def uses_sam(sam_rho: float, sam_rho_steps: Iterable[float] = ()) -> bool:
    """Whether a run trains with SAM: a constant radius or a radius schedule (also for a raw config.json)."""
    return sam_rho > 0 or bool(tuple(sam_rho_steps))
SAMPLERS = ("instance", "class_balanced")  # how a training epoch draws its images (ltbench.augment.epoch_order)


EVAL_BUDGET = 0.05  # the default evaluation interval keeps evaluation under this share of training compute


def eval_interval(hp: TrainHparams, train_images_per_epoch: int, eval_images: int) -> int:
    """``hp.eval_every``, or for 0 the smallest interval within EVAL_BUDGET.

    An evaluation image costs one forward pass, a training image about three (forward and backward; six with
    SAM's second pass); teachers and extra views only make training dearer, so the interval errs long.
    """
    if hp.eval_every:
        return hp.eval_every
    passes = 6 if hp.uses_sam else 3
    return max(1, math.ceil(eval_images / (EVAL_BUDGET * passes * max(1, train_images_per_epoch))))


def update_offsets(hp: TrainHparams, steps: int, epoch_images: int) -> list[float]:
    """Where in its epoch, in optimizer updates, each of the ``steps`` updates reads a per-step schedule.

    By default update k reads it at k. With ``sched_released_layout = (gpus, accum)`` it reads it where DeiT-LT's
    released ``train_one_epoch`` last stepped it: that loop steps the schedule at epoch + i / L at loader
    iterations i % accum == 0 and at the last one, and updates at (i + 1) % accum == 0 and at the last one, with
    L = ceil(epoch_images / gpus / per-GPU batch) iterations per GPU. So update k reads it at iteration accum * k,
    and the last update at L - 1.
    """
    if not hp.sched_released_layout:
        return list(range(steps))
    gpus, accum = hp.sched_released_layout
    iterations = math.ceil(epoch_images // gpus / (hp.batch_size // (gpus * accum)))
    if math.ceil(iterations / accum) != steps:
        raise UserError(f"sched_released_layout {gpus} GPUs x {accum} accumulations makes "
                        f"{math.ceil(iterations / accum)} updates an epoch where this run makes {steps}; unset it.")
    iteration = [accum * k for k in range(steps - 1)] + [iterations - 1]
    return [i / iterations * steps for i in iteration]


def rescale_epochs(hp: TrainHparams, epochs: int, keep: Iterable[str] = ()) -> TrainHparams:
    """``hp`` with ``epochs`` and every epoch point of its schedule scaled by ``epochs / hp.epochs``.

    A point p becomes floor(p * ratio + 0.5) (rounded half up). Phases keep existing where the new length allows:
    a point inside the old run stays inside the new one (at most ``epochs - 1``: a DRW phase or an lr decay keeps
    its last epoch) and, from two epochs on, a point after epoch 0 stays after it (a warm-up or a pre-DRW phase
    keeps its first epoch); a point past the old end (a phase switched off) stays past the new end. Fields named
    in ``keep`` (given explicitly) are not touched.
    """
    def scale(point: int) -> int:
        scaled = (2 * point * epochs + hp.epochs) // (2 * hp.epochs)  # exact: a float ratio rounds some halves down
        if point >= hp.epochs:
            return max(scaled, epochs)
        return min(max(scaled, min(point, 1)), epochs - 1)

    changes: dict[str, Any] = {"epochs": epochs}
    for name in set(type(hp).EPOCH_POINTS) - set(keep):
        value = getattr(hp, name)
        if name == "milestones":  # timm applies milestone m from epoch m - 1
            changes[name] = tuple(scale(m - 1) + 1 for m in value)
        elif isinstance(value, tuple):
            changes[name] = tuple(scale(v) for v in value)
        else:
            changes[name] = scale(value)
    return dataclasses.replace(hp, **changes)


def check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(f"Invalid hyperparameter: {message}.")


def check_finite(hp: Any) -> None:
    """Every float setting of every method is a finite number: inf and nan pass any range check written as
    ``x > 0`` or ``x < 0``, and a run trained with them diverges."""
    for f in dataclasses.fields(hp):
        value = getattr(hp, f.name)
        values = value if isinstance(value, tuple) else (value,)
        bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
        check(not bad, f"{f.name} must be a finite number, not {bad[0] if bad else ''}")


# ----------------------------------------------------------------------------------------------
# Coercion of "key=value" strings and override dicts into typed dataclass fields


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# One ``--set KEY=TEXT`` may give several values, an axis of a sweep (``ltbench run`` takes one).
SWEEP_SEPARATOR = "|"
SWEEP_RULE = ("A comma separates the values of a field that is not a tuple (lr=0.1,0.05 is two values); a tuple field "
              "keeps its commas for its items (milestones=160,180 is one value) and takes | between values "
              "(milestones=160,180|120,160 is two); | separates the values of any field.")


def is_tuple_field(annotation: Any) -> bool:
    """Whether a field holds a tuple (``tuple[int, ...]``, also ``tuple[int, ...] | None``)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(is_tuple_field(a) for a in typing.get_args(annotation))
    return typing.get_origin(annotation) is tuple


def set_values(text: str, annotation: Any) -> list[str]:
    """The values of one ``--set KEY=TEXT`` for a field of this type, in order, repeats dropped (:data:`SWEEP_RULE`)."""
    if SWEEP_SEPARATOR in text:
        parts = text.split(SWEEP_SEPARATOR)
    elif "," in text and not is_tuple_field(annotation):
        parts = text.split(",")
    else:
        return [text]
    return list(dict.fromkeys(part.strip() for part in parts))


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert ``value`` (a string from the CLI or a JSON value) to the field's declared type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null"}):
            return None
        return coerce(value, args[0], key)
    if origin is tuple:
        item_type = typing.get_args(annotation)[0]
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        try:
            return tuple(coerce(v, item_type, key) for v in value)
        except UserError as exc:  # e.g. milestones=160,180;120,160: say how a tuple field is written
            raise UserError(f"{exc} {key} holds a tuple: a comma separates its items, | separates the values of "
                            f"a sweep ({key}=A,B|C,D is two values).") from exc
    try:
        if annotation is bool:
            return _to_bool(value)
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{key}={value!r} is not a valid {annotation.__name__}.") from exc
    raise UserError(f"{key}: unsupported field type {annotation!r}.")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(value)


def apply_overrides(instance: Any, overrides: Mapping[str, Any], what: str) -> Any:
    """Return a copy of a dataclass instance with typed overrides; unknown keys list the valid ones."""
    types_ = field_types(type(instance))
    unknown = sorted(set(overrides) - set(types_))
    if unknown:
        raise UserError(
            f"Unknown {what} key(s) {', '.join(unknown)}. Valid keys: {', '.join(sorted(types_))}."
        )
    typed = {k: coerce(v, types_[k], k) for k, v in overrides.items()}
    return dataclasses.replace(instance, **typed)


def parse_set_options(items: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Split ``--set key=value`` items into (method hparams, dataset options ``data.key=value``)."""
    hparams: dict[str, str] = {}
    data: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set expects key=value, got {item!r}.")
        if key.startswith("data."):
            data[key[5:]] = value
        else:
            hparams[key] = value
    return hparams, data


def read_yaml_mapping(path: Any, what: str, expected: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (a search space); ``expected`` says what it maps. Read by
    :func:`ltbench.schemas.load_yaml`, which refuses alias bombs and oversized files."""
    from pathlib import Path

    from ltbench.schemas import load_yaml

    payload = load_yaml(Path(path), what)
    if payload is None:
        return {}
    if not isinstance(payload, Mapping):
        raise UserError(f"The {what} {path} must be a mapping: {expected}.")
    return dict(payload)


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def canonical_json(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"))


# ----------------------------------------------------------------------------------------------


def _without_runtime_items(value: Any) -> Any:
    """A list of ``KEY=VALUE`` overrides for an upstream run (``teacher_overrides``) without its runtime items."""
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return [v for v in value if v.partition("=")[0].strip() not in RUNTIME_OPTIONS]
    return value


# Hyperparameters that say where a file is: the run id hashes the file's content instead (init -> init_sha256), so the
# same file at another path is the same run and a changed file a new one.
LOCATIONS = frozenset({"init"})


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's numbers. Runtime choices (device, paths) are not part of it."""

    method: str
    dataset: str
    data: Mapping[str, Any]
    hparams: Mapping[str, Any]
    seed: int = 0
    preset: str = "default"
    versions: Mapping[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return hashlib.sha256(canonical_json(self.identity()).encode()).hexdigest()[:12]

    @property
    def legacy_run_id(self) -> str:
        """The id ltbench gave this config before runtime options left the hash (folders made before 2026-11-28)."""
        return hashlib.sha256(canonical_json(self.to_dict()).encode()).hexdigest()[:12]

    def identity(self) -> dict[str, Any]:
        """What the run id hashes: the configuration without runtime options (:data:`RUNTIME_OPTIONS`) and file
        locations (:data:`LOCATIONS`)."""
        payload = self.to_dict()
        payload["hparams"] = {k: _without_runtime_items(v) for k, v in payload["hparams"].items()
                              if k not in RUNTIME_OPTIONS and k not in LOCATIONS}
        return payload

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in payload.items() if k in names})
