"""RandAugment as batched device ops: timm's op definitions and sampling, grouped into lookup-table, affine and
per-pixel families that each cost one batched op per layer (see :mod:`ltbench.gpu_augment`)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ltbench.errors import UserError
from ltbench.gpu_kernels import IDENTITY_AFFINE, BatchRandom, constant, exact_div, truncate_u8, warp
from ltbench.gpu_recipe import AFFINE_OPS, LEVEL_DENOM, AugRecipe

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
    return truncate_u8(degenerate + alpha * (values - degenerate))


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
    return truncate_u8(gray + factor.float().view(-1, 1, 1, 1) * (x - gray))


def _sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # PIL's SMOOTH kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 = (3x3 box sum + 4 x centre) / 13
    box_sum = F.avg_pool2d(x, 3, stride=1, divisor_override=1)
    smooth = (box_sum + 4 * x[:, :, 1:-1, 1:-1]) / 13
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = (smooth + 0.5).floor()  # PIL's 3x3 filter keeps the one-pixel border
    return truncate_u8(degenerate + factor.float().view(-1, 1, 1, 1) * (x - degenerate))


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


def rand_augment(x: torch.Tensor, recipe: AugRecipe, rng: BatchRandom) -> torch.Tensor:
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


def _sample_magnitude(recipe: AugRecipe, n: int, rng: BatchRandom) -> torch.Tensor:
    m, std = recipe.rand_magnitude, recipe.rand_magnitude_std
    if std == math.inf:
        magnitude = rng.uniform(0.0, m, (n,), torch.float64)
    elif std > 0:
        magnitude = rng.normal((n,), m, std, torch.float64)
    else:
        magnitude = torch.full((n,), float(m), dtype=torch.float64, device=rng.device)
    return magnitude.clamp(0.0, recipe.rand_magnitude_max)


def _sample_sign(n: int, rng: BatchRandom) -> torch.Tensor:
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


