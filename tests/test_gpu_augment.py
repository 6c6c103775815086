"""The batched device augmentation against the PIL/timm/torchvision pipeline it replaces (CPU tensors).

Three levels of evidence: each RandAugment op and the crop/resize kernel agree pixel by pixel with PIL
(exactly, or within one grey level where PIL truncates a double that we compute in float32); the
random parameters (crop boxes, erasing boxes, flips, offsets) have the CPU pipeline's distributions; and
the whole recipes produce the same output statistics over a couple of thousand images.

Statistical tolerances are 4.5 standard errors of the difference of two independent means (a false alarm
rate of about 1e-5 per comparison), plus a small absolute allowance for the known one-grey-level
rounding differences. Every sample is seeded, so a test either always passes or always fails.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import auto_augment as aa
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from ltbench import augment, gpu_kernels, gpu_randaugment, gpu_recipe
from ltbench import gpu_augment as ga
from ltbench.data import CIFAR_MEAN, CIFAR_STD, DatasetInfo
from ltbench.errors import UserError
from ltbench.gpu_augment import AugRecipe, DeviceBatches

INFO = DatasetInfo("cifar-like", 10, (10,) * 10, 32, CIFAR_MEAN, CIFAR_STD)
DEIT = AugRecipe.deit(CIFAR_MEAN, CIFAR_STD, 32, "rand-m9-mstd0.5-inc1", re_prob=0.25)
Z = 4.5


def realish_images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """Smooth colour fields with texture and a per-image tonal range: unlike uniform noise, they give
    AutoContrast, Equalize, Contrast and the interpolating warps something to do."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 5, 5, generator=g)
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    texture = 0.08 * torch.randn(n, 3, size, size, generator=g)
    field = smooth + texture
    lo = field.amin(dim=(1, 2, 3), keepdim=True)
    hi = field.amax(dim=(1, 2, 3), keepdim=True)
    low = torch.rand(n, 1, 1, 1, generator=g) * 100
    high = 150 + torch.rand(n, 1, 1, 1, generator=g) * 105
    out = low + (field - lo) / (hi - lo) * (high - low)
    return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float()


def assert_same_mean(a: np.ndarray, b: np.ndarray, what: str, allowance: float = 0.0) -> None:
    """Two independent samples of a per-image statistic have the same expectation (within Z standard errors)."""
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    diff = abs(a.mean() - b.mean())
    assert diff <= Z * se + allowance, f"{what}: {a.mean():.4f} vs {b.mean():.4f} (se {se:.4f})"


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_threshold(n: int, m: int) -> float:
    # two-sample Kolmogorov-Smirnov critical value at alpha = 1e-4: c(alpha) = sqrt(-ln(alpha / 2) / 2)
    return math.sqrt(-math.log(0.5e-4) / 2) * math.sqrt((n + m) / (n * m))


# ----------------------------------------------------------------------------------------------
# The iterable


def _indexed_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose first pixel encodes their index, and labels derived from the index."""
    images = torch.from_numpy(realish_images(n))
    images[:, 0, 0, 0] = torch.arange(n) % 256
    images[:, 0, 0, 1] = torch.arange(n) // 256
    return images, (torch.arange(n) * 7) % 10


def _decode_index(x: torch.Tensor, recipe: AugRecipe) -> torch.Tensor:
    mean, std = torch.tensor(recipe.mean), torch.tensor(recipe.std)
    pixel = ((x[:, :, 0, 0] * std + mean) * 255).round().long()
    return pixel[:, 0] + 256 * pixel[:, 1]


def test_batches_shapes_labels_and_epoch_length():
    images, labels = _indexed_images(600)
    plain = AugRecipe(kind="none", mean=CIFAR_MEAN, std=CIFAR_STD)
    batches = DeviceBatches(images, labels, plain, 64, seed=0, drop_last=False)
    assert len(batches) == 10
    seen = []
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, 32, 32)
        index = _decode_index(x, plain)
        assert torch.equal(y, labels[index])  # labels travel with their images
        seen.append(index)
    order = torch.cat(seen)
    assert sorted(order.tolist()) == list(range(600)) and not torch.equal(order, torch.arange(600))
    assert len(DeviceBatches(images, labels, plain, 64, seed=0, drop_last=True)) == 9
    for recipe in (DEIT, AugRecipe.crop_flip(CIFAR_MEAN, CIFAR_STD, 32), replace(DEIT, out_size=48)):
        x, y = next(iter(DeviceBatches(images, labels, recipe, 16, seed=1, drop_last=True)))
        assert x.shape == (16, 3, recipe.out_size, recipe.out_size) and x.dtype == torch.float32 and x.is_contiguous()


def test_repeated_augmentation_keeps_deit_epoch_length():
    images, labels = _indexed_images(600)
    plain = AugRecipe(kind="none", mean=CIFAR_MEAN, std=CIFAR_STD)
    batches = DeviceBatches(images, labels, plain, 100, seed=0, drop_last=False, repeated_aug=3)
    order = torch.cat([_decode_index(x, plain) for x, _ in batches])
    assert len(order) == 512 and len(batches) == 6  # floor(600 / 256) * 256 samples
    counts = torch.bincount(order, minlength=600)
    assert (counts == 3).sum() == 170 and (counts == 2).sum() == 1 and (counts == 0).sum() == 429
    assert torch.equal(order[:3], order[:1].repeat(3))  # repeats are consecutive, as DeiT's RASampler


def test_micro_batches_and_rank_shards_follow_the_engine_loader():
    images, labels = _indexed_images(300)
    plain = AugRecipe(kind="none", mean=CIFAR_MEAN, std=CIFAR_STD)
    single = DeviceBatches(images, labels, plain, 64, seed=2, drop_last=True)
    whole = torch.cat([_decode_index(x, plain) for x, _ in single])
    shards = []
    for rank in (0, 1):
        batches = DeviceBatches(images, labels, plain, 64, seed=2, drop_last=True, micro_batch=12, rank=rank, world=2)
        assert batches.batch_sampler.group_sizes == [3] * 4 and batches.batch_sampler.steps[0] == (3, 64)
        assert [len(y) for _, y in batches][:3] == [12, 12, 8]
        shards.append(torch.cat([_decode_index(x, plain) for x, _ in batches]).view(4, 32))
    assert torch.equal(torch.cat(shards, dim=1).view(-1), whole)  # the ranks split the single-process batches


def test_an_epoch_is_reproducible_from_its_seed():
    images, labels = _indexed_images(96)
    first = [(x.clone(), y.clone()) for x, y in DeviceBatches(images, labels, DEIT, 32, seed=3, drop_last=True)]
    again = DeviceBatches(images, labels, DEIT, 32, seed=3, drop_last=True)
    for _ in range(2):  # a second pass over the same object is the same epoch again
        for (xa, ya), (xb, yb) in zip(first, again, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = next(iter(DeviceBatches(images, labels, DEIT, 32, seed=4, drop_last=True)))
    assert not torch.equal(other[0], first[0][0])


def test_per_batch_path_never_reads_device_values(monkeypatch):
    """On CUDA any of these would block the host until the GPU catches up."""
    images, labels = _indexed_images(300)
    batches = DeviceBatches(images, labels, DEIT, 64, seed=0, drop_last=False, repeated_aug=3)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("host synchronisation in the per-batch path")

    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    assert sum(len(y) for _, y in batches) == 256


def test_bad_input_is_refused_clearly():
    with pytest.raises(UserError, match="uint8 RGB"):
        DeviceBatches(torch.zeros(4, 3, 8, 8), torch.zeros(4), DEIT, 2, seed=0, drop_last=False)
    with pytest.raises(UserError, match="does not implement"):
        AugRecipe(kind="deit", rand_ops=("Cutout",))


# ----------------------------------------------------------------------------------------------
# Translating the CPU transforms


def test_recipes_are_read_from_the_cpu_transforms():
    crop_flip = AugRecipe.from_transform(augment.crop_flip(INFO))
    assert crop_flip == AugRecipe.crop_flip(CIFAR_MEAN, CIFAR_STD, 32)
    deit = AugRecipe.from_transform(augment.deit_train(INFO, 32, "rand-m9-mstd0.5-inc1", 0.25))
    assert replace(deit, mean=CIFAR_MEAN, std=CIFAR_STD) == DEIT
    assert len(DEIT.rand_ops) == 15 and DEIT.rand_layers == 2 and DEIT.rand_prob == 0.5
    assert DEIT.rand_magnitude == 9 and DEIT.rand_magnitude_std == 0.5 and DEIT.fill_color == (125, 123, 114)
    # without RandAugment timm adds ColorJitter, which has no device version: the caller keeps the CPU loader
    assert AugRecipe.from_transform(augment.deit_train(INFO, 32, "", 0.25)) is None


# ----------------------------------------------------------------------------------------------
# Pixel-level agreement with PIL


def _timm_op(name: str, image: np.ndarray, magnitude: float, sign: float) -> np.ndarray:
    hparams = {"translate_const": 14, "img_mean": DEIT.fill_color, "interpolation": str_to_pil_interp("bicubic")}
    op = aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
    negate = random.random
    random.random = lambda: 0.9 if sign < 0 else 0.1  # timm's _randomly_negate negates when random() > 0.5
    try:
        args = aa.LEVEL_TO_ARG[name](magnitude, op.hparams) if aa.LEVEL_TO_ARG[name] else ()
    finally:
        random.random = negate
    return np.asarray(aa.NAME_TO_OP[name](Image.fromarray(image), *args, **op.kwargs))


NON_INCREASING = ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness")


@pytest.mark.parametrize("name", gpu_recipe.RAND_INCREASING_OPS + NON_INCREASING)
def test_each_randaugment_op_matches_pil(name):
    augment._patch_timm_posterize()  # Pillow >= 11 refuses 0 bits; DeiT's Pillow returned black
    images = realish_images(6, seed=1)
    for magnitude in (9.0, 10.0, 3.7):
        for sign in (1.0, -1.0):
            ref = np.stack([_timm_op(name, im, magnitude, sign) for im in images]).astype(int)
            n = len(images)
            out = gpu_randaugment.apply_op(to_float(images), name, torch.full((n,), magnitude),
                                           torch.full((n,), sign), DEIT)
            diff = np.abs(out.permute(0, 2, 3, 1).numpy().astype(int) - ref)
            if name in gpu_recipe.AFFINE_OPS:
                # PIL truncates a double-precision cubic sum; float32 lands on the other side now and then
                assert diff.max() <= 1 and (diff > 0).mean() < 0.03, (name, magnitude, sign, diff.max())
            else:
                assert diff.max() == 0, (name, magnitude, sign, diff.max())


@pytest.mark.parametrize(("size", "mode"), [(32, "bicubic"), (48, "bicubic"), (24, "bicubic"), (40, "bilinear")])
def test_crop_resize_matches_torchvision_on_pil(size, mode):
    images = realish_images(32, seed=2)
    rng = np.random.RandomState(size)
    h, w = rng.randint(3, 33, 32), rng.randint(3, 33, 32)
    top, left = rng.randint(0, 33 - h), rng.randint(0, 33 - w)
    flip = rng.rand(32) < 0.5
    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[mode]
    ref = []
    for k in range(32):
        out = TF.resized_crop(Image.fromarray(images[k]), top[k], left[k], h[k], w[k], [size, size], interp)
        ref.append(np.asarray(TF.hflip(out) if flip[k] else out))
    boxes = [torch.tensor(v, dtype=torch.float64) for v in (top, left, h, w)]
    out = gpu_kernels.resize_boxes(to_float(images), *boxes, size, mode, torch.from_numpy(flip))
    diff = np.abs(out.permute(0, 2, 3, 1).numpy().astype(int) - np.stack(ref).astype(int))
    # Pillow sums with 22-bit fixed-point coefficients and rounds the horizontal pass to uint8: float32 sums
    # round the other way at near-halves, and a one-level intermediate difference can grow to two through
    # the cubic's negative lobes in the vertical pass
    assert diff.max() <= 2 and (diff > 1).mean() < 1e-3 and diff.mean() < 0.1


# ----------------------------------------------------------------------------------------------
# Distributions of the random parameters


def test_crop_flip_offsets_and_flips_match_torchvision():
    n = 2500
    # rows encode (row + 1) in red, columns (col + 1) in green: a crop reveals its offset and direction
    rows, cols = np.meshgrid(np.arange(1, 33), np.arange(1, 33), indexing="ij")
    image = np.stack([rows, cols, np.full_like(rows, 200)], axis=-1).astype(np.uint8)
    images = np.repeat(image[None], n, axis=0)
    seed_all(0)
    cpu = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()])
    cpu_out = np.stack([np.asarray(cpu(Image.fromarray(im))) for im in images]).astype(int)
    rng = gpu_kernels.BatchRandom(torch.Generator().manual_seed(0), torch.device("cpu"))
    dev_out = gpu_kernels.pad_crop_flip(torch.from_numpy(images), 32, 4, 0.5, rng)
    dev_out = dev_out.permute(0, 2, 3, 1).numpy().astype(int)
    for out in (cpu_out, dev_out):
        assert set(np.unique(out[..., 2])) <= {0, 200}  # zero padding, nothing interpolated
    stats = [_crop_offsets(out) for out in (cpu_out, dev_out)]
    for top, left, flipped in stats:
        assert abs(flipped.mean() - 0.5) < Z * math.sqrt(0.25 / n)
        counts = np.bincount(top * 9 + left, minlength=81)
        assert counts.size == 81 and _chi_square_uniform(counts) < 150  # df 80: p ~ 1e-5 at 150
    assert ks_statistic(stats[0][0], stats[1][0]) < ks_threshold(n, n)
    assert ks_statistic(stats[0][1], stats[1][1]) < ks_threshold(n, n)


def _crop_offsets(out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top, left) in the padded image and whether the crop was flipped, from the encoded pixels."""
    red, green = out[..., 0], out[..., 1]  # output row and columns 10..21 always show real pixels
    top = (red[:, 16, :].max(axis=1) - 1) + 4 - 16
    flipped = green[:, 16, 17] < green[:, 16, 14]
    col_at_16 = green[:, 16, 16] - 1
    left = np.where(flipped, col_at_16 + 4 - (31 - 16), col_at_16 + 4 - 16)
    return top, left, flipped


def _chi_square_uniform(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def test_random_resized_crop_boxes_match_timm():
    n = 4000
    seed_all(0)
    cpu = np.array([RandomResizedCropAndInterpolation.get_params(Image.new("RGB", (32, 32)), DEIT.scale, DEIT.ratio)
                    for _ in range(n)])
    rng = gpu_kernels.BatchRandom(torch.Generator().manual_seed(0), torch.device("cpu"))
    dev = gpu_kernels.sample_crop_boxes(n, 32, 32, DEIT.scale, DEIT.ratio, rng).numpy()
    for column, what in enumerate(("top", "left", "height", "width")):
        assert ks_statistic(cpu[:, column], dev[:, column]) < ks_threshold(n, n), what
    assert ks_statistic(cpu[:, 2] * cpu[:, 3], dev[:, 2] * dev[:, 3]) < ks_threshold(n, n)
    assert (dev[:, 0] + dev[:, 2] <= 32).all() and (dev[:, 1] + dev[:, 3] <= 32).all() and (dev[:, 2:] >= 1).all()


def test_random_erasing_matches_timm():
    n, fill = 4000, 7.0
    seed_all(0)
    eraser = RandomErasing(0.25, mode="pixel", device="cpu")
    cpu = torch.stack([eraser(torch.full((3, 32, 32), fill)) for _ in range(n)])
    rng = gpu_kernels.BatchRandom(torch.Generator().manual_seed(0), torch.device("cpu"))
    dev = gpu_kernels.random_erase(torch.full((n, 3, 32, 32), fill), DEIT, rng)
    stats = []
    for out in (cpu, dev):
        erased = out != fill
        area = erased[:, 0].float().mean(dim=(1, 2)).numpy()
        assert torch.equal(erased[:, 0], erased[:, 1])  # one box through all channels
        noise = out[erased]
        assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02  # per-pixel standard normal noise
        stats.append(area)
    cpu_area, dev_area = stats
    assert_same_mean(cpu_area > 0, dev_area > 0, "fraction of images erased")
    assert abs((dev_area > 0).mean() - 0.25) < Z * math.sqrt(0.25 * 0.75 / n)
    assert ks_statistic(cpu_area[cpu_area > 0], dev_area[dev_area > 0]) < ks_threshold(
        int((cpu_area > 0).sum()), int((dev_area > 0).sum()))


# ----------------------------------------------------------------------------------------------
# Whole recipes


def _per_image_stats(out: torch.Tensor, source: torch.Tensor, recipe: AugRecipe) -> dict[str, np.ndarray]:
    """Per-image channel means and stds, mean |output - source| and the fraction of erased pixels.

    Un-erased normalised pixels lie on the lattice (k / 255 - mean) / std; erasing noise does not."""
    mean = torch.tensor(recipe.mean).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std).view(1, 3, 1, 1)
    level = (out * std + mean) * 255
    erased = ((level - level.round()).abs() > 1e-3).any(dim=1).float()
    stats = {f"mean{c}": out[:, c].mean(dim=(1, 2)).numpy() for c in range(3)}
    stats |= {f"std{c}": out[:, c].std(dim=(1, 2)).numpy() for c in range(3)}
    stats["abs_diff_to_source"] = (out - source).abs().mean(dim=(1, 2, 3)).numpy()
    stats["erased_fraction"] = erased.mean(dim=(1, 2)).numpy()
    return stats


def _compare_recipes(cpu_transform, recipe: AugRecipe, n: int, seed: int) -> dict[str, tuple[float, float]]:
    images = realish_images(n, seed=seed)
    seed_all(seed)
    cpu = torch.stack([cpu_transform(Image.fromarray(im)) for im in images])
    generator = torch.Generator().manual_seed(seed)
    dev = torch.cat([ga.augment_batch(torch.from_numpy(images[i:i + 500]), recipe, generator)
                     for i in range(0, n, 500)])
    source = gpu_kernels.normalize(to_float(images), recipe.mean, recipe.std)
    a, b = _per_image_stats(cpu, source, recipe), _per_image_stats(dev, source, recipe)
    for key in a:
        assert_same_mean(a[key], b[key], key, allowance=0.005)
    return {key: (float(a[key].mean()), float(b[key].mean())) for key in a}


def test_crop_flip_recipe_matches_torchvision_statistics():
    recipe = AugRecipe.from_transform(augment.crop_flip(INFO))
    means = _compare_recipes(augment.crop_flip(INFO), recipe, 2000, seed=5)
    assert means["erased_fraction"] == (0.0, 0.0)


def test_deit_recipe_matches_timm_statistics():
    augment._patch_timm_posterize()
    cpu = augment.deit_train(INFO, 32, "rand-m9-mstd0.5-inc1", 0.25)
    recipe = AugRecipe.from_transform(cpu)
    means = _compare_recipes(cpu, recipe, 2000, seed=6)
    cpu_erased, dev_erased = means["erased_fraction"]
    assert 0.02 < dev_erased < 0.08  # p 0.25 x mean area about 0.18 of the image
    assert means["abs_diff_to_source"][1] > 0.5  # the recipe does change the images
