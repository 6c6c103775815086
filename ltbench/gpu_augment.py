"""Per-sample augmentation of in-memory uint8 datasets as batched tensor ops on the training device.

For datasets that fit in memory (CIFAR) the images stay on the GPU as uint8 and every per-image
augmentation of the CPU pipeline (:mod:`ltbench.augment`) runs as a few batched ops with per-sample
random parameters. RandomResizedCrop + flip is Pillow's separable crop-then-resize written as two
batched matmuls with per-sample coefficient matrices. RandAugment's ops fall into three families that
each cost one batched op per layer whatever op a sample drew: per-channel lookup tables (AutoContrast,
Equalize, Invert, Posterize, Solarize, SolarizeAdd, Brightness, Contrast: one ``gather``), affine warps
(Rotate, Shear, Translate: one 16-tap bicubic gather) and per-pixel blends (Color, Sharpness). Samples
that did not draw an op of a family keep their pixels through ``torch.where``, so nothing reads a mask
on the host and the per-batch path never synchronises. Values are integers between ops, as PIL stores
uint8 between ops.

The ops follow PIL's arithmetic (blend truncation, luma weights, Equalize's step rule, Geometry.c's
a = -1 cubic with truncation, Resample.c's a = -0.5 cubic with renormalised taps), so single ops agree
with PIL exactly or within one grey level; random parameters follow timm's sampling (ten rejection
attempts, magnitude noise, random negation). The tests check both, and whole-recipe statistics.

Mixup/CutMix are batch-level and stay in the methods (timm's ``Mixup`` works on device batches).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

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


# ----------------------------------------------------------------------------------------------
# The iterable the engine consumes


class DeviceBatches:
    """An epoch of augmented batches drawn from uint8 images that already live on the training device.

    Yields ``(x, y)``: float32 normalised NCHW images and int64 labels on the images' device. Every pass
    re-seeds its generators from ``seed``, so a pass is one reproducible epoch (the engine builds one per
    epoch with a per-epoch seed, as it does for the CPU loader). ``repeated_aug`` > 1 is DeiT's repeated
    augmentation on one process: each index ``repeated_aug`` times, epoch length floor(N / 256) * 256.

    ``batch_size`` is the global batch. As the engine's CPU loader does (``augment.MicroBatchSampler``, whose
    arithmetic is reused, so ``batch_sampler.steps`` and ``batch_sampler.group_sizes`` mean the same), each
    global batch is cut into this rank's shard and the shard into ``micro_batch``-sized pieces; ``drop_last``
    drops an incomplete global batch. Only slice bounds are computed on the host: the order stays on the device,
    except with ``sampler="class_balanced"`` (``augment.ClassBalancedSampler``), whose order is drawn on the host
    once per epoch.
    """

    def __init__(self, images_uint8_nhwc: torch.Tensor, labels: torch.Tensor, recipe: AugRecipe, batch_size: int, *,
                 seed: int, drop_last: bool, repeated_aug: int = 1, micro_batch: int | None = None, rank: int = 0,
                 world: int = 1, sampler: str = "instance") -> None:
        from ltbench.augment import MicroBatchSampler, epoch_order

        if images_uint8_nhwc.dtype != torch.uint8 or images_uint8_nhwc.dim() != 4 or images_uint8_nhwc.shape[-1] != 3:
            raise UserError(f"DeviceBatches needs uint8 RGB images shaped (N, H, W, 3), got "
                            f"{tuple(images_uint8_nhwc.shape)} {images_uint8_nhwc.dtype}.")
        if len(labels) != len(images_uint8_nhwc) or batch_size < 1 or repeated_aug < 1:
            raise UserError("DeviceBatches needs one label per image, batch_size >= 1 and repeated_aug >= 1.")
        self.images = images_uint8_nhwc
        self.labels = torch.as_tensor(labels).to(images_uint8_nhwc.device, torch.int64)
        self.recipe, self.seed, self.rank, self.repeated_aug = recipe, seed, rank, repeated_aug
        self.device = images_uint8_nhwc.device
        n = len(self.labels)
        self.samples = ((n // 256) * 256 if n >= 256 else n) if repeated_aug > 1 else n
        self.host_order = None  # class-balanced: an epoch_order drawn on the host
        if sampler != "instance":
            host_labels = torch.as_tensor(labels).cpu().numpy()
            self.host_order = lambda generator: epoch_order(n, host_labels, generator, sampler, repeated_aug)
            self.samples = len(self.host_order(torch.Generator()))
        micro = micro_batch or -(-batch_size // world)
        self.batch_sampler = MicroBatchSampler(range(self.samples), batch_size, micro, drop_last, rank, world)
        self.slices = [(chunk[0], chunk[-1] + 1) for chunk in self.batch_sampler]  # contiguous positions

    def __len__(self) -> int:
        return len(self.slices)

    def order(self, generator: torch.Generator) -> torch.Tensor:
        n = len(self.labels)
        if self.host_order is not None:
            host = torch.Generator().manual_seed(self.seed)
            return torch.as_tensor(list(self.host_order(host)), device=self.device)
        perm = torch.randperm(n, generator=generator, device=self.device)
        if self.repeated_aug > 1:  # expand/reshape rather than repeat_interleave, which may read sizes on the host
            perm = perm[:, None].expand(n, self.repeated_aug).reshape(-1)
        return perm[: self.samples]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # every rank draws the same order; augmentation randomness differs per rank
        order = self.order(torch.Generator(device=self.device).manual_seed(self.seed))
        generator = torch.Generator(device=self.device).manual_seed((self.seed * 0x9E3779B1 + self.rank + 1) % 2**62)
        for chunk in self._chunks():
            index = order[chunk[0][0]:chunk[-1][1]]
            x, y = augment_batch(self.images[index], self.recipe, generator), self.labels[index]
            offset = chunk[0][0]
            for start, stop in chunk:
                yield x[start - offset:stop - offset], y[start - offset:stop - offset]

    def _chunks(self) -> list[list[tuple[int, int]]]:
        """Consecutive micro-batches augmented together: small images cost kernel launches, not bandwidth, so
        up to ``CHUNK_PIXELS`` output pixels go through each op at once (one micro-batch at 224 px)."""
        budget = max(1, CHUNK_PIXELS // self.recipe.out_size ** 2)
        chunks: list[list[tuple[int, int]]] = []
        for start, stop in self.slices:
            last = chunks[-1] if chunks else None
            if last and last[-1][1] == start and stop - last[0][0] <= budget:
                last.append((start, stop))
            else:
                chunks.append([(start, stop)])
        return chunks


def augment_batch(images_uint8_nhwc: torch.Tensor, recipe: AugRecipe, generator: torch.Generator) -> torch.Tensor:
    """Apply ``recipe`` to a batch of uint8 NHWC images; returns float32 normalised NCHW images."""
    rng = _Random(generator, images_uint8_nhwc.device)
    if recipe.kind == "crop_flip":
        x = pad_crop_flip(images_uint8_nhwc, recipe.out_size, recipe.padding, recipe.hflip, rng)
    else:
        x = images_uint8_nhwc.permute(0, 3, 1, 2).float()
        if recipe.kind == "deit":
            x = random_resized_crop_flip(x, recipe, rng)
            if recipe.rand_ops:
                x = rand_augment(x, recipe, rng)
        elif x.shape[-1] != recipe.out_size or x.shape[-2] != recipe.out_size:
            zero, n = torch.zeros(len(x), device=x.device), len(x)
            x = resize_boxes(x, zero, zero, torch.full((n,), float(x.shape[-2]), device=x.device),
                             torch.full((n,), float(x.shape[-1]), device=x.device), recipe.out_size,
                             recipe.interpolation)
    x = normalize(x, recipe.mean, recipe.std)
    if recipe.re_prob > 0:
        x = random_erase(x, recipe, rng)
    return x.contiguous()


class _Random:
    """Draws from one generator on the batch's device (CUDA generator on CUDA: no host round trips)."""

    def __init__(self, generator: torch.Generator, device: torch.device) -> None:
        self.generator, self.device = generator, device

    def uniform(self, low: float, high: float, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        u = torch.rand(*shape, generator=self.generator, device=self.device, dtype=dtype)
        return u * (high - low) + low

    def bernoulli(self, p: float, shape: Sequence[int]) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator, device=self.device) < p

    def integers(self, high: torch.Tensor) -> torch.Tensor:
        """Uniform integers in [0, high) for each entry of a float tensor ``high``."""
        u = torch.rand(high.shape, generator=self.generator, device=self.device, dtype=high.dtype)
        return torch.minimum((u * high).floor(), high - 1)

    def normal(self, shape: Sequence[int], mean: float = 0.0, std: float = 1.0, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, device=self.device, dtype=dtype) * std + mean


def constant(values: Sequence[float], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant on the device, made once: ``torch.tensor(list, device=cuda)`` copies from pageable
    host memory, which blocks the host on every batch."""
    if torch.compiler.is_compiling():  # a compiled graph bakes the constant in; no cache needed
        return torch.tensor(list(values), dtype=dtype, device=device)
    return _constant(tuple(float(v) for v in values), torch.device(device), dtype)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device)


def exact_div(numerator: torch.Tensor | float, denominator: torch.Tensor | float) -> torch.Tensor:
    """IEEE division as Python does it: torch turns division by a scalar into a multiplication by its
    reciprocal, which moves some quotients by one ulp and then flips a truncation (int(level / 10 * 256))."""
    like = numerator if isinstance(numerator, torch.Tensor) else denominator
    assert isinstance(like, torch.Tensor)
    num = numerator if isinstance(numerator, torch.Tensor) else torch.full_like(like, numerator)
    den = denominator if isinstance(denominator, torch.Tensor) else torch.full_like(like, denominator)
    return num / den


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``ToTensor`` then ``Normalize`` on 0..255 values."""
    m = constant(mean, x.device, x.dtype).view(1, -1, 1, 1)
    s = constant(std, x.device, x.dtype).view(1, -1, 1, 1)
    return (x / 255.0 - m) / s


# ----------------------------------------------------------------------------------------------
# Geometry: crops, flips, resizing and RandAugment's affine warps


def pad_crop_flip(images_uint8_nhwc: torch.Tensor, size: int, padding: int, hflip: float, rng: _Random) -> torch.Tensor:
    """torchvision's RandomCrop(size, padding) with zero fill and RandomHorizontalFlip, as one gather."""
    n, height, width, _ = images_uint8_nhwc.shape
    padded = F.pad(images_uint8_nhwc, (0, 0, padding, padding, padding, padding))
    top = rng.integers(torch.full((n,), float(height + 2 * padding - size + 1), device=rng.device)).long()
    left = rng.integers(torch.full((n,), float(width + 2 * padding - size + 1), device=rng.device)).long()
    steps = torch.arange(size, device=rng.device)
    cols = torch.where(rng.bernoulli(hflip, (n, 1)), size - 1 - steps, steps)
    rows = top[:, None] + steps
    cols = left[:, None] + cols
    batch = torch.arange(n, device=rng.device)[:, None, None]
    out = padded[batch, rows[:, :, None], cols[:, None, :]]  # (n, size, size, 3)
    return out.permute(0, 3, 1, 2).float()


def sample_crop_boxes(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float], rng: _Random,
                      attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop's boxes (top, left, h, w), with its ten rejection attempts and central fallback."""
    area = height * width
    target = rng.uniform(scale[0], scale[1], (n, attempts), torch.float64) * area
    aspect = torch.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, attempts), torch.float64))
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    ok = (w <= width) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first accepted attempt
    found = ok.any(dim=1)
    fallback_h, fallback_w = _central_crop(height, width, ratio)
    w = torch.where(found, w.gather(1, first)[:, 0], float(fallback_w))
    h = torch.where(found, h.gather(1, first)[:, 0], float(fallback_h))
    top = torch.where(found, rng.integers(height - h + 1), float((height - fallback_h) // 2))
    left = torch.where(found, rng.integers(width - w + 1), float((width - fallback_w) // 2))
    return torch.stack([top, left, h, w], dim=1)


def _central_crop(height: int, width: int, ratio: Sequence[float]) -> tuple[int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def random_resized_crop_flip(x: torch.Tensor, recipe: AugRecipe, rng: _Random) -> torch.Tensor:
    """timm's RandomResizedCrop and the flip after it: PIL's crop-then-resize as two batched matmuls."""
    n, _, height, width = x.shape
    top, left, h, w = sample_crop_boxes(n, height, width, recipe.scale, recipe.ratio, rng).unbind(1)
    flip = rng.bernoulli(recipe.hflip, (n,))
    return resize_boxes(x, top, left, h, w, recipe.out_size, recipe.interpolation, flip)


def resize_boxes(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: torch.Tensor, w: torch.Tensor, size: int,
                 mode: str, flip: torch.Tensor | None = None) -> torch.Tensor:
    """PIL's ``img.crop(box).resize((size, size))`` per sample, horizontal pass first with a uint8 intermediate."""
    cols = resample_matrix(left, w, x.shape[-1], size, mode)  # (n, size, W)
    if flip is not None:
        cols = torch.where(flip.view(-1, 1, 1), cols.flip(1), cols)
    rows = resample_matrix(top, h, x.shape[-2], size, mode)  # (n, size, H)
    across = _round_u8(torch.einsum("bchw,bow->bcho", x, cols))
    return _round_u8(torch.einsum("bph,bcho->bcpo", rows, across))


def resample_matrix(start: torch.Tensor, length: torch.Tensor, full: int, size: int, mode: str) -> torch.Tensor:
    """Pillow's resampling coefficients (Resample.c ``precompute_coeffs``) for boxes [start, start + length) of a
    ``full``-long axis, as dense (n, size, full) matrices: support widened when shrinking, taps clipped to the
    box, weights renormalised."""
    support_1, kernel = (2.0, _cubic_kernel(-0.5)) if mode == "bicubic" else (1.0, _triangle)
    scale = exact_div(length.double(), float(size)).view(-1, 1, 1)
    filter_scale = scale.clamp(min=1.0)
    support = support_1 * filter_scale
    centre = (torch.arange(size, dtype=torch.float64, device=start.device).view(1, -1, 1) + 0.5) * scale
    xmin = (centre - support + 0.5).trunc().clamp(min=0)
    xmax = torch.minimum((centre + support + 0.5).trunc(), length.double().view(-1, 1, 1))
    tap = torch.arange(full, dtype=torch.float64, device=start.device).view(1, 1, -1) - start.double().view(-1, 1, 1)
    weights = kernel((tap - centre + 0.5) / filter_scale) * ((tap >= xmin) & (tap < xmax))
    total = weights.sum(-1, keepdim=True)
    return (weights / torch.where(total == 0, 1.0, total)).float()


def _cubic_kernel(a: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def kernel(t: torch.Tensor) -> torch.Tensor:
        t = t.abs()
        near = ((a + 2) * t - (a + 3)) * t * t + 1
        far = (((t - 5) * t + 8) * t - 4) * a
        return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))

    return kernel


def _triangle(t: torch.Tensor) -> torch.Tensor:
    return (1 - t.abs()).clamp(min=0)


def _round_u8(values: torch.Tensor) -> torch.Tensor:
    """Pillow's fixed-point resampling rounds half up and clips to 0..255."""
    return (values + 0.5).floor_().clamp_(0, 255)


def warp(x: torch.Tensor, coeffs: torch.Tensor, fill: Sequence[int], mode: str) -> torch.Tensor:
    """PIL's ``Image.transform(size, AFFINE, coeffs)`` per sample.

    ``coeffs`` (n, 6) maps output pixel centres (x + 0.5, y + 0.5) to input positions. Like PIL's
    Geometry.c: a source outside the image gives ``fill``; neighbours are clamped to the edge; bicubic is
    the a = -1 cubic (not Pillow's resize kernel) and the result is truncated, not rounded.
    """
    n, c, height, width = x.shape
    ys, xs = torch.meshgrid(torch.arange(height, device=x.device, dtype=torch.float32) + 0.5,
                            torch.arange(width, device=x.device, dtype=torch.float32) + 0.5, indexing="ij")
    a, b, c0, d, e, f = (v.float().view(-1, 1, 1) for v in coeffs.unbind(-1))
    x_in, y_in = a * xs + b * ys + c0, d * xs + e * ys + f
    inside = ((x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)).unsqueeze(1)
    offsets, kernel = ((-1, 0, 1, 2), _cubic_kernel(-1.0)) if mode == "bicubic" else ((0, 1), _triangle)
    x0, y0 = (x_in - 0.5).floor(), (y_in - 0.5).floor()
    dx, dy = x_in - 0.5 - x0, y_in - 0.5 - y0
    flat = x.reshape(n, c, height * width)
    cols = [((x0 + o).clamp(0, width - 1).long(), kernel(dx - o)) for o in offsets]
    out = torch.zeros_like(x)
    for oy in offsets:
        row, wy = (y0 + oy).clamp(0, height - 1).long() * width, kernel(dy - oy)
        for col, wx in cols:
            taps = flat.gather(2, (row + col).view(n, 1, -1).expand(n, c, -1)).view_as(x)
            out.addcmul_(taps, (wy * wx).unsqueeze(1))
    fill_t = constant(fill, x.device, x.dtype).view(1, -1, 1, 1)
    return torch.where(inside, _truncate_u8(out), fill_t)


IDENTITY_AFFINE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


# ----------------------------------------------------------------------------------------------
# RandAugment (timm's definitions, batched)


@dataclass
class OpArgs:
    """Per-sample magnitudes and random signs of one RandAugment layer, plus the recipe constants."""

    magnitude: torch.Tensor  # float64 (n,), already clipped to [0, magnitude_max]
    sign: torch.Tensor  # float64 (n,), +1 or -1: timm's _randomly_negate
    size: int
    translate_pct: float
    fill: tuple[int, int, int]
    interpolation: str
    level: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.level = exact_div(self.magnitude, LEVEL_DENOM)


def _posterize_bits(a: OpArgs, increasing: bool) -> torch.Tensor:
    bits = (a.level * 4).floor()
    return 4 - bits if increasing else bits


def _solarize_threshold(a: OpArgs, increasing: bool) -> torch.Tensor:
    thresh = (a.level * 256).floor().clamp(max=256)
    return 256 - thresh if increasing else thresh


def _enhance_factor(a: OpArgs, increasing: bool) -> torch.Tensor:
    if increasing:
        return (1.0 + a.sign * a.level * 0.9).clamp(min=0.1)
    return a.level * 1.8 + 0.1


def _blend_lut(degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, image, factor) as a LUT over image values (float32, truncated)."""
    values = torch.arange(256, dtype=torch.float32, device=factor.device)
    alpha = factor.float().view(-1, 1, 1)
    return _truncate_u8(degenerate + alpha * (values - degenerate))


def _truncate_u8(values: torch.Tensor) -> torch.Tensor:
    """(UINT8) of a float, with PIL's clipping at 0 and 255."""
    return values.clamp(0, 255).floor()


def _histograms(x: torch.Tensor) -> torch.Tensor:
    n, c = x.shape[:2]
    hist = torch.zeros(n, c, 256, dtype=torch.int64, device=x.device)
    return hist.scatter_add_(2, x.reshape(n, c, -1).long(), torch.ones(1, 1, 1, dtype=torch.int64,
                                                                     device=x.device).expand(n, c, x[0, 0].numel()))


def _gray(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L conversion (ITU-R 601-2 luma with its fixed-point rounding), exact in float32."""
    r, g, b = x.unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536).floor().unsqueeze(1)


def lut_autocontrast(x: torch.Tensor, a: OpArgs) -> torch.Tensor:
    lo = x.amin(dim=(2, 3)).double()[..., None]
    hi = x.amax(dim=(2, 3)).double()[..., None]
    values = torch.arange(256, dtype=torch.float64, device=x.device)
    scale = exact_div(255.0, (hi - lo).clamp(min=1))
    stretched = (values * scale - lo * scale).trunc().clamp(0, 255)
    return torch.where(hi > lo, stretched, values).float()


def lut_equalize(x: torch.Tensor, a: OpArgs) -> torch.Tensor:
    hist = _histograms(x)
    values = torch.arange(256, device=x.device)
    last = 255 - (hist > 0).flip(-1).to(torch.uint8).argmax(dim=-1, keepdim=True)  # last non-empty bin
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, last)) // 255
    before = hist.cumsum(-1) - hist  # pixels below each value
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255)
    usable = (step > 0) & ((hist > 0).sum(-1, keepdim=True) > 1)
    return torch.where(usable, lut, values).float()


def lut_invert(x: torch.Tensor, a: OpArgs) -> torch.Tensor:
    return (255 - torch.arange(256, dtype=torch.float32, device=x.device)).expand(*x.shape[:2], 256)


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    values = torch.arange(256, dtype=torch.float32, device=x.device)
    quantum = torch.pow(2.0, 8 - bits.float()).view(-1, 1, 1)  # 0 bits: everything maps to 0
    return ((values / quantum).floor() * quantum).expand(*x.shape[:2], 256)


def _solarize(x: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    values = torch.arange(256, dtype=torch.float32, device=x.device)
    return torch.where(values < thresh.float().view(-1, 1, 1), values, 255 - values).expand(*x.shape[:2], 256)


def lut_solarize_add(x: torch.Tensor, a: OpArgs) -> torch.Tensor:
    add = (a.level * 110).floor().clamp(max=128).float().view(-1, 1, 1)
    values = torch.arange(256, dtype=torch.float32, device=x.device)
    return torch.where(values < 128, (values + add).clamp(max=255), values).expand(*x.shape[:2], 256)


def _brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend_lut(torch.zeros((), device=x.device), factor).expand(*x.shape[:2], 256)


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = (_gray(x).double().mean(dim=(1, 2, 3)) + 0.5).floor().float().view(-1, 1, 1)
    return _blend_lut(mean, factor).expand(*x.shape[:2], 256)


def _color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    gray = _gray(x)
    return _truncate_u8(gray + factor.float().view(-1, 1, 1, 1) * (x - gray))


def _sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # PIL's SMOOTH kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 = (3x3 box sum + 4 x centre) / 13
    box_sum = F.avg_pool2d(x, 3, stride=1, divisor_override=1)
    smooth = (box_sum + 4 * x[:, :, 1:-1, 1:-1]) / 13
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = (smooth + 0.5).floor()  # PIL's 3x3 filter keeps the one-pixel border
    return _truncate_u8(degenerate + factor.float().view(-1, 1, 1, 1) * (x - degenerate))


def _affine(kind: str, a: OpArgs) -> torch.Tensor:
    """PIL AFFINE coefficients of timm's geometric ops (per sample, float64)."""
    one, zero = torch.ones_like(a.level), torch.zeros_like(a.level)
    signed = a.sign * a.level
    if kind == "ShearX":
        return torch.stack([one, signed * 0.3, zero, zero, one, zero], -1)
    if kind == "ShearY":
        return torch.stack([one, zero, zero, signed * 0.3, one, zero], -1)
    if kind == "TranslateXRel":
        return torch.stack([one, zero, signed * a.translate_pct * a.size, zero, one, zero], -1)
    if kind == "TranslateYRel":
        return torch.stack([one, zero, zero, zero, one, signed * a.translate_pct * a.size], -1)
    # Rotate: PIL's Image.rotate(degrees) about the centre, counter-clockwise for positive degrees.
    angle = -torch.deg2rad(signed * 30.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    centre = a.size / 2.0
    c = cos * -centre + sin * -centre + centre
    f = -sin * -centre + cos * -centre + centre
    return torch.stack([cos, sin, c, -sin, cos, f], -1)


LUT_FNS: dict[str, Callable[[torch.Tensor, OpArgs], torch.Tensor]] = {
    "AutoContrast": lut_autocontrast,
    "Equalize": lut_equalize,
    "Invert": lut_invert,
    "Posterize": lambda x, a: _posterize(x, _posterize_bits(a, False)),
    "PosterizeIncreasing": lambda x, a: _posterize(x, _posterize_bits(a, True)),
    "Solarize": lambda x, a: _solarize(x, _solarize_threshold(a, False)),
    "SolarizeIncreasing": lambda x, a: _solarize(x, _solarize_threshold(a, True)),
    "SolarizeAdd": lut_solarize_add,
    "Brightness": lambda x, a: _brightness(x, _enhance_factor(a, False)),
    "BrightnessIncreasing": lambda x, a: _brightness(x, _enhance_factor(a, True)),
    "Contrast": lambda x, a: _contrast(x, _enhance_factor(a, False)),
    "ContrastIncreasing": lambda x, a: _contrast(x, _enhance_factor(a, True)),
}
PIXEL_FNS: dict[str, Callable[[torch.Tensor, OpArgs], torch.Tensor]] = {
    "Color": lambda x, a: _color(x, _enhance_factor(a, False)),
    "ColorIncreasing": lambda x, a: _color(x, _enhance_factor(a, True)),
    "Sharpness": lambda x, a: _sharpness(x, _enhance_factor(a, False)),
    "SharpnessIncreasing": lambda x, a: _sharpness(x, _enhance_factor(a, True)),
}


def apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Map each (sample, channel) through its own 256-entry table."""
    n, c = x.shape[:2]
    return lut.gather(2, x.reshape(n, c, -1).long()).view_as(x)


def apply_op(x: torch.Tensor, name: str, magnitude: torch.Tensor, sign: torch.Tensor,
             recipe: AugRecipe) -> torch.Tensor:
    """One RandAugment op on every sample of ``x`` (0..255 floats) at per-sample magnitudes and signs."""
    args = _op_args(x, magnitude, sign, recipe)
    if name in LUT_FNS:
        return apply_lut(x, LUT_FNS[name](x, args))
    if name in PIXEL_FNS:
        return PIXEL_FNS[name](x, args)
    return warp(x, _affine(name, args), args.fill, args.interpolation)


def _op_args(x: torch.Tensor, magnitude: torch.Tensor, sign: torch.Tensor, recipe: AugRecipe) -> OpArgs:
    if x.shape[-1] != x.shape[-2]:
        raise UserError("Device RandAugment expects square images.")
    return OpArgs(magnitude.double(), sign.double(), x.shape[-1], recipe.translate_pct, recipe.fill_color,
                  recipe.interpolation)


def rand_augment(x: torch.Tensor, recipe: AugRecipe, rng: _Random) -> torch.Tensor:
    """timm's RandAugment: per layer each sample draws one op uniformly (with replacement) and applies it
    with probability ``rand_prob`` at a magnitude drawn from N(magnitude, std) clipped to [0, max]."""
    n = x.shape[0]
    ops = recipe.rand_ops
    for _ in range(recipe.rand_layers):
        choice = rng.integers(torch.full((n,), float(len(ops)), device=x.device)).long()
        choice = torch.where(rng.bernoulli(recipe.rand_prob, (n,)), choice, -1)  # -1: the layer is skipped
        x = _apply_layer(x, choice, _sample_magnitude(recipe, n, rng), _sample_sign(n, rng), recipe)
    return x


_COMPILED_LAYER: list[Callable | None] = []


def _apply_layer(x: torch.Tensor, choice: torch.Tensor, magnitude: torch.Tensor, sign: torch.Tensor,
                 recipe: AugRecipe) -> torch.Tensor:
    """One RandAugment layer. With LTBENCH_COMPILE_AUGMENT=1 it is compiled on CUDA (once per process, about
    90 s on an H200), fusing the few hundred full-image passes that bound the eager version's speed at 224 px;
    a failing compile falls back to the eager ops, which are the reference, with a warning."""
    if x.device.type != "cuda" or os.environ.get("LTBENCH_COMPILE_AUGMENT", "0") != "1":
        return _rand_layer(x, choice, magnitude, sign, recipe)
    if not _COMPILED_LAYER:
        _COMPILED_LAYER.append(torch.compile(_rand_layer, dynamic=True))
    compiled = _COMPILED_LAYER[0]
    if compiled is not None:
        try:
            return compiled(x, choice, magnitude, sign, recipe)
        except Exception as exc:  # any compiler failure: the eager ops are the reference
            warnings.warn(f"compiled device augmentation failed ({type(exc).__name__}: {exc}); running eagerly",
                          stacklevel=2)
            _COMPILED_LAYER[0] = None
    return _rand_layer(x, choice, magnitude, sign, recipe)


def _sample_magnitude(recipe: AugRecipe, n: int, rng: _Random) -> torch.Tensor:
    m, std = recipe.rand_magnitude, recipe.rand_magnitude_std
    if std == math.inf:
        magnitude = rng.uniform(0.0, m, (n,), torch.float64)
    elif std > 0:
        magnitude = rng.normal((n,), m, std, torch.float64)
    else:
        magnitude = torch.full((n,), float(m), dtype=torch.float64, device=rng.device)
    return magnitude.clamp(0.0, recipe.rand_magnitude_max)


def _sample_sign(n: int, rng: _Random) -> torch.Tensor:
    return torch.where(rng.bernoulli(0.5, (n,)), -1.0, 1.0).double()


def _rand_layer(x: torch.Tensor, choice: torch.Tensor, magnitude: torch.Tensor, sign: torch.Tensor,
                recipe: AugRecipe) -> torch.Tensor:
    args = _op_args(x, magnitude, sign, recipe)
    n = x.shape[0]
    lut = torch.arange(256, dtype=torch.float32, device=x.device).expand(n, x.shape[1], 256)
    coeffs = constant(IDENTITY_AFFINE, x.device, torch.float64).expand(n, 6)
    pixel_out, pixel_mask = x, torch.zeros(n, dtype=torch.bool, device=x.device)
    geometric = torch.zeros(n, dtype=torch.bool, device=x.device)
    for index, name in enumerate(recipe.rand_ops):
        chosen = choice == index
        if name in LUT_FNS:
            lut = torch.where(chosen.view(-1, 1, 1), LUT_FNS[name](x, args), lut)
        elif name in PIXEL_FNS:
            pixel_out = torch.where(chosen.view(-1, 1, 1, 1), PIXEL_FNS[name](x, args), pixel_out)
            pixel_mask = pixel_mask | chosen
        else:
            coeffs = torch.where(chosen.view(-1, 1), _affine(name, args), coeffs)
            geometric = geometric | chosen
    out = apply_lut(x, lut)  # identity tables for samples whose op is not a table
    out = torch.where(pixel_mask.view(-1, 1, 1, 1), pixel_out, out)
    if any(name in AFFINE_OPS for name in recipe.rand_ops):
        warped = warp(x, coeffs, args.fill, args.interpolation)
        out = torch.where(geometric.view(-1, 1, 1, 1), warped, out)
    return out


# ----------------------------------------------------------------------------------------------
# Random erasing (timm's RandomErasing, count 1, after normalisation)


def sample_erase_boxes(n: int, height: int, width: int, recipe: AugRecipe, rng: _Random,
                       attempts: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (top, left, h, w) and whether each sample is erased (probability, then ten attempts to fit)."""
    area = height * width
    target = rng.uniform(recipe.re_area[0], recipe.re_area[1], (n, attempts), torch.float64) * area
    aspect = torch.exp(rng.uniform(recipe.re_log_aspect[0], recipe.re_log_aspect[1], (n, attempts), torch.float64))
    h = torch.sqrt(target * aspect).round()
    w = torch.sqrt(target / aspect).round()
    ok = (w < width) & (h < height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    top, left = rng.integers(height - h + 1), rng.integers(width - w + 1)
    erase = rng.bernoulli(recipe.re_prob, (n,)) & ok.any(dim=1)
    return torch.stack([top, left, h, w], dim=1), erase


def random_erase(x: torch.Tensor, recipe: AugRecipe, rng: _Random) -> torch.Tensor:
    n, c, height, width = x.shape
    boxes, erase = sample_erase_boxes(n, height, width, recipe, rng)
    top, left, h, w = (v.view(-1, 1, 1, 1) for v in boxes.unbind(1))
    rows = torch.arange(height, device=x.device, dtype=torch.float64).view(1, 1, -1, 1)
    cols = torch.arange(width, device=x.device, dtype=torch.float64).view(1, 1, 1, -1)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w) & erase.view(-1, 1, 1, 1)
    if recipe.re_mode == "pixel":
        noise = rng.normal(x.shape)
    elif recipe.re_mode == "rand":
        noise = rng.normal((n, c, 1, 1))
    else:
        noise = torch.zeros((), device=x.device)
    return torch.where(inside, noise, x)
