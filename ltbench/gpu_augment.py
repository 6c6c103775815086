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

from collections.abc import Iterator

import torch

from ltbench.augment import MicroBatchSampler, epoch_order
from ltbench.errors import UserError
from ltbench.gpu_kernels import (
    BatchRandom,
    normalize,
    pad_crop_flip,
    random_erase,
    random_resized_crop_flip,
    resize_boxes,
)
from ltbench.gpu_randaugment import rand_augment
from ltbench.gpu_recipe import CHUNK_PIXELS, AugRecipe

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
    rng = BatchRandom(generator, images_uint8_nhwc.device)
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


