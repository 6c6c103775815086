"""Batched device kernels of the augmentation recipes: per-sample randomness, crops, flips, resizing, affine warps
and random erasing, in PIL's and timm's arithmetic (see :mod:`ltbench.gpu_augment`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ltbench.gpu_recipe import AugRecipe


class BatchRandom:
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




# Geometry: crops, flips, resizing and RandAugment's affine warps


def pad_crop_flip(images_uint8_nhwc: torch.Tensor, size: int, padding: int, hflip: float,
                  rng: BatchRandom) -> torch.Tensor:
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


def sample_crop_boxes(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float], rng: BatchRandom,
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


def random_resized_crop_flip(x: torch.Tensor, recipe: AugRecipe, rng: BatchRandom) -> torch.Tensor:
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
    return torch.where(inside, truncate_u8(out), fill_t)


def truncate_u8(values: torch.Tensor) -> torch.Tensor:
    """(UINT8) of a float, with PIL's clipping at 0 and 255."""
    return values.clamp(0, 255).floor()


IDENTITY_AFFINE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)




# Random erasing (timm's RandomErasing, count 1, after normalisation)


def sample_erase_boxes(n: int, height: int, width: int, recipe: AugRecipe, rng: BatchRandom,
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


def random_erase(x: torch.Tensor, recipe: AugRecipe, rng: BatchRandom) -> torch.Tensor:
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

