"""Per-image augmentation recipes and the data loaders that apply them.

Recipes come from timm and torchvision (DeiT's RandAugment pipeline, LDAM's crop+flip); batch-level
mixing (Mixup/CutMix) happens in a method's ``prepare`` on the training device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Sampler
from torchvision import transforms as T

from ltbench.data import DatasetInfo, FileListSplit, InMemorySplit, Split


class SplitDataset(torch.utils.data.Dataset):
    """A split as a torch Dataset of (transformed image, label)."""

    def __init__(self, split: Split, transform: Callable) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(self.image(index)), int(self.split.labels[index])

    def image(self, index: int) -> Image.Image:
        if isinstance(self.split, InMemorySplit):
            return Image.fromarray(self.split.images[index])
        assert isinstance(self.split, FileListSplit)
        with Image.open(self.split.root / self.split.paths[index]) as img:
            return img.convert("RGB")


def _posterize_any_bits(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, also for 0 bits: RandAugment 'inc1' at magnitude 10 asks for 0 bits (an all-black
    image in the Pillow versions DeiT used); Pillow >= 11 raises instead, so that case is made explicit."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = _posterize_any_bits


def normalize(info: DatasetInfo) -> T.Normalize:
    return T.Normalize(info.mean, info.std)


def crop_flip(info: DatasetInfo, padding: int = 4) -> Callable:
    """LDAM-DRW's CIFAR training transform: zero-padded random crop and horizontal flip."""
    return T.Compose([T.RandomCrop(info.image_size, padding=padding), T.RandomHorizontalFlip(), T.ToTensor(),
                      normalize(info)])


def deit_train(info: DatasetInfo, img_size: int, auto_augment: str | None, re_prob: float,
               scale: tuple[float, float] = (0.08, 1.0)) -> Callable:
    """DeiT's training transform from timm: RandomResizedCrop (bicubic), flip, RandAugment, erasing."""
    from timm.data import create_transform

    _patch_timm_posterize()
    return create_transform(
        input_size=img_size, is_training=True, auto_augment=auto_augment or None, interpolation="bicubic",
        re_prob=re_prob, re_mode="pixel", re_count=1, mean=info.mean, std=info.std, color_jitter=0.3, scale=scale,
    )


def resize_eval(info: DatasetInfo, img_size: int) -> Callable:
    """Evaluation: native images as they are; upsampled models get DeiT's resize-256/crop-224 ratio."""
    if img_size == info.image_size:
        return T.Compose([T.ToTensor(), normalize(info)])
    resize = int(round(img_size * 256 / 224))
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(img_size),
                      T.ToTensor(), normalize(info)])


class RepeatSampler(Sampler[int]):
    """DeiT's repeated augmentation on one process: each index ``repeats`` times, epoch length kept.

    Like DeiT's RASampler, an epoch draws floor(N / 256) * 256 samples (all N when N < 256), so it
    covers about N / repeats distinct images, each seen ``repeats`` times.
    """

    def __init__(self, n: int, repeats: int, generator: torch.Generator) -> None:
        self.n, self.repeats, self.generator = n, repeats, generator
        self.length = (n // 256) * 256 if n >= 256 else n

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).repeat_interleave(self.repeats)
        return iter(order[: self.length].tolist())


def train_loader(split: Split, transform: Callable, batch_size: int, *, seed: int, workers: int, drop_last: bool,
                 repeated_aug: int = 1, pin_memory: bool = False) -> DataLoader:
    """A loader whose shuffle and augmentation randomness are fixed by ``seed`` (one per epoch)."""
    generator = torch.Generator().manual_seed(seed)
    dataset = SplitDataset(split, transform)
    sampler = RepeatSampler(len(dataset), repeated_aug, generator) if repeated_aug > 1 else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, generator=generator,
        num_workers=workers, drop_last=drop_last, pin_memory=pin_memory, worker_init_fn=_seed_worker,
        persistent_workers=False,
    )


def eval_loader(split: Split, transform: Callable, batch_size: int, workers: int,
                indices: Sequence[int] | None = None, pin_memory: bool = False) -> DataLoader:
    dataset: torch.utils.data.Dataset = SplitDataset(split, transform)
    if indices is not None:
        dataset = torch.utils.data.Subset(dataset, list(indices))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and python follow from it so that
    # PIL-based ops (which use `random`) are reproducible too.
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
