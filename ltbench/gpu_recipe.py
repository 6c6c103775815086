"""The device recipe of a training transform: what :mod:`ltbench.gpu_augment` can run for a CPU pipeline.

:meth:`AugRecipe.from_transform` reads a torchvision/timm transform (crop and flip, DeiT's RandomResizedCrop,
RandAugment, random erasing, normalisation) into a frozen recipe, or None when some step has no device equivalent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ltbench.errors import UserError

KINDS = ("none", "crop_flip", "deit")

# timm's RandAugment op names (both the "increasing" and the original variants) -> our families.
LUT_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "Solarize", "SolarizeIncreasing",
           "SolarizeAdd", "Brightness", "BrightnessIncreasing", "Contrast", "ContrastIncreasing")
PIXEL_OPS = ("Color", "ColorIncreasing", "Sharpness", "SharpnessIncreasing")
AFFINE_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
LEVEL_DENOM = 10.0  # timm's magnitude scale: M10 = the strongest level
CHUNK_PIXELS = 4096 * 32 * 32  # output pixels augmented per batch of ops (bounds the device memory it takes)


@dataclass(frozen=True)
class AugRecipe:
    """What to do to each training image; mirrors the CPU transforms of :mod:`ltbench.augment`.

    ``none``: normalise only (resize when ``out_size`` differs). ``crop_flip``: LDAM's zero-padded random
    crop and flip. ``deit``: timm's RandomResizedCrop, flip, RandAugment (``rand_ops`` empty = off) and
    random erasing (``re_prob`` 0 = off), the ops in that order, normalisation before erasing.
    """

    kind: str = "none"
    out_size: int = 32
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    padding: int = 4  # crop_flip
    scale: tuple[float, float] = (0.08, 1.0)  # deit: RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # deit: RandomResizedCrop aspect ratio range
    interpolation: str = "bicubic"  # bicubic | bilinear, for the crop and RandAugment's warps
    hflip: float = 0.5
    rand_ops: tuple[str, ...] = ()  # RandAugment op names (timm's), drawn uniformly with replacement
    rand_layers: int = 2
    rand_prob: float = 0.5  # each drawn op is applied with this probability
    rand_magnitude: float = 9.0
    rand_magnitude_std: float = 0.5  # inf: uniform in [0, magnitude]
    rand_magnitude_max: float = LEVEL_DENOM
    translate_pct: float = 0.45
    fill: tuple[int, int, int] | None = None  # warp fill colour; None = round(255 * mean), as timm
    re_prob: float = 0.0
    re_area: tuple[float, float] = (0.02, 1 / 3)
    re_log_aspect: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3))
    re_mode: str = "pixel"  # pixel | rand | const

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"Unknown augmentation recipe kind {self.kind!r}; expected one of {', '.join(KINDS)}.")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise UserError(f"Device augmentation supports bicubic or bilinear, not {self.interpolation!r}.")
        unknown = sorted(set(self.rand_ops) - set(LUT_OPS + PIXEL_OPS + AFFINE_OPS))
        if unknown:
            raise UserError(f"Device RandAugment does not implement {', '.join(unknown)}.")
        if self.re_mode not in ("pixel", "rand", "const"):
            raise UserError(f"Unknown random-erasing mode {self.re_mode!r}; expected pixel, rand or const.")

    @property
    def fill_color(self) -> tuple[int, int, int]:
        return self.fill or tuple(min(255, round(255 * m)) for m in self.mean)  # type: ignore[return-value]

    @classmethod
    def crop_flip(cls, mean: Sequence[float], std: Sequence[float], size: int, padding: int = 4) -> AugRecipe:
        return cls(kind="crop_flip", out_size=size, mean=tuple(mean), std=tuple(std), padding=padding)

    @classmethod
    def deit(cls, mean: Sequence[float], std: Sequence[float], size: int, auto_augment: str | None = None,
             re_prob: float = 0.0, scale: tuple[float, float] = (0.08, 1.0)) -> AugRecipe:
        """The recipe of ``augment.deit_train``: ``auto_augment`` is a timm string such as rand-m9-mstd0.5-inc1."""
        base = cls(kind="deit", out_size=size, mean=tuple(mean), std=tuple(std), scale=tuple(scale), re_prob=re_prob)
        if not auto_augment:
            return base
        from timm.data.auto_augment import rand_augment_transform

        if not auto_augment.startswith("rand"):
            raise UserError(f"Device augmentation implements RandAugment ('rand-...'), not {auto_augment!r}.")
        from timm.data.transforms import str_to_pil_interp

        hparams = {"translate_const": 0, "img_mean": base.fill_color, "interpolation": str_to_pil_interp("bicubic")}
        try:
            return _with_rand_augment(base, rand_augment_transform(auto_augment, hparams))
        except _Unsupported as exc:
            raise UserError(f"Device augmentation cannot run {auto_augment!r}: {exc}.") from exc

    @classmethod
    def from_transform(cls, transform: Any) -> AugRecipe | None:
        """Translate a torchvision/timm ``Compose`` built by :mod:`ltbench.augment` into a recipe.

        Returns None when the pipeline holds anything without a device equivalent, so the caller can
        fall back to the CPU loader instead of silently training with a different augmentation.
        """
        try:
            return _recipe_from_transforms(list(getattr(transform, "transforms", [transform])))
        except _Unsupported:
            return None


class _Unsupported(Exception):
    pass


def _with_rand_augment(recipe: AugRecipe, rand_augment: Any) -> AugRecipe:
    ops = rand_augment.ops
    if rand_augment.choice_weights is not None or len({op.prob for op in ops}) != 1:
        raise _Unsupported("weighted op choice or unequal op probabilities")
    first = ops[0]
    resample = first.kwargs.get("resample")
    if isinstance(resample, (tuple, list)):
        raise _Unsupported("random interpolation")
    mstd = first.hparams.get("magnitude_std", 0.0)
    return replace(recipe, rand_ops=tuple(op.name for op in ops), rand_layers=rand_augment.num_layers,
                   rand_prob=float(first.prob), rand_magnitude=float(first.magnitude),
                   rand_magnitude_std=float(mstd), rand_magnitude_max=float(first.magnitude_max or LEVEL_DENOM),
                   translate_pct=float(first.hparams.get("translate_pct", 0.45)),
                   fill=tuple(int(v) for v in first.kwargs["fillcolor"]),
                   interpolation=_interp_name(resample) if resample is not None else recipe.interpolation)


def _interp_name(mode: Any) -> str:
    name = str(getattr(mode, "name", mode)).lower()
    for candidate in ("bicubic", "bilinear"):
        if candidate in name:
            return candidate
    if str(mode) in ("2", "3"):  # PIL's integer codes: 2 bilinear, 3 bicubic
        return {"2": "bilinear", "3": "bicubic"}[str(mode)]
    raise _Unsupported(f"interpolation {mode!r}")


def _recipe_from_transforms(steps: list[Any]) -> AugRecipe:
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
    from torchvision import transforms as T

    fields: dict[str, Any] = {"kind": "none", "hflip": 0.0}
    rand_augment = None
    for step in steps:
        if isinstance(step, T.RandomCrop) and not isinstance(step, T.RandomResizedCrop):
            if step.fill != 0 or step.padding_mode != "constant" or not isinstance(step.padding, int):
                raise _Unsupported("RandomCrop padding")
            fields.update(kind="crop_flip", out_size=_side(step.size), padding=step.padding)
        elif isinstance(step, (RandomResizedCropAndInterpolation, T.RandomResizedCrop)):
            fields.update(kind="deit", out_size=_side(step.size), scale=tuple(step.scale), ratio=tuple(step.ratio),
                          interpolation=_interp_name(step.interpolation))
        elif isinstance(step, T.RandomHorizontalFlip):
            fields["hflip"] = float(step.p)
        elif isinstance(step, RandAugment):
            rand_augment = step
        elif isinstance(step, (T.ToTensor, MaybeToTensor)):
            continue
        elif isinstance(step, T.Normalize):
            fields.update(mean=tuple(float(v) for v in step.mean), std=tuple(float(v) for v in step.std))
        elif isinstance(step, RandomErasing):
            if step.min_count != 1 or step.max_count != 1 or step.num_splits > 1:
                raise _Unsupported("random erasing with several boxes")
            fields.update(re_prob=float(step.probability), re_area=(step.min_area, step.max_area),
                          re_log_aspect=tuple(step.log_aspect_ratio), re_mode=step.mode or "const")
        else:
            raise _Unsupported(type(step).__name__)
    if "mean" not in fields:
        raise _Unsupported("no Normalize")
    recipe = AugRecipe(**fields)
    if rand_augment is not None:
        if recipe.kind != "deit":
            raise _Unsupported("RandAugment outside the deit recipe")
        recipe = _with_rand_augment(recipe, rand_augment)
    return recipe


def _side(size: Any) -> int:
    sizes = [size] if isinstance(size, int) else list(size)
    if len(set(sizes)) != 1:
        raise _Unsupported("non-square output")
    return int(sizes[0])
