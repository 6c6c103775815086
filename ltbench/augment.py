"""Per-image augmentation recipes and the data loaders that apply them.

Recipes come from timm and torchvision (DeiT's RandAugment pipeline, LDAM's crop+flip); batch-level
mixing (Mixup/CutMix) happens in a method's ``prepare`` on the training device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Sampler
from torchvision import transforms as T

from ltbench import config, distributed
from ltbench.data import DatasetInfo, FileListSplit, InMemorySplit, Split
from ltbench.errors import UserError


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


def mae_train(info: DatasetInfo, img_size: int, crop_scale_min: float = 0.2) -> Callable:
    """MAE's pretraining transform: RandomResizedCrop (scale 0.2-1, bicubic) and flip, nothing else."""
    crop = T.RandomResizedCrop(img_size, scale=(crop_scale_min, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor(), normalize(info)])


def resize_eval(info: DatasetInfo, img_size: int) -> Callable:
    """Evaluation: fixed-size native images as they are; otherwise DeiT's resize-256/crop-224 ratio."""
    if img_size == info.image_size and not info.variable_size:
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


class MicroBatchSampler(Sampler[list[int]]):
    """Cuts an epoch's order into global batches, each into this rank's shard, each shard into micro-batches.

    Every rank draws the same order, so the global batches are those of a single process. ``drop_last``
    drops an incomplete *global* batch (a final one smaller than the number of ranks is always dropped).
    ``steps`` lists, per optimizer step, (micro-batches on this rank, size of the global batch).
    """

    def __init__(self, order: Sampler[int], global_batch: int, micro_batch: int, drop_last: bool,
                 rank: int = 0, world: int = 1) -> None:
        self.order, self.global_batch, self.micro = order, global_batch, micro_batch
        self.rank, self.world = rank, world
        n = len(order)  # type: ignore[arg-type]
        sizes = [global_batch] * (n // global_batch)
        if n % global_batch >= world and not drop_last:
            sizes.append(n % global_batch)
        self.steps = [(-(-len(self._shard(size)) // micro_batch), size) for size in sizes]
        self.length = sum(sizes)

    @property
    def group_sizes(self) -> list[int]:
        return [micro for micro, _ in self.steps]

    def _shard(self, size: int) -> range:
        return distributed.shard(size, self.rank, self.world)

    def __len__(self) -> int:
        return sum(self.group_sizes)

    def __iter__(self):
        indices = list(self.order)[: self.length]
        for start in range(0, self.length, self.global_batch):
            chunk = indices[start : start + self.global_batch]
            mine = [chunk[i] for i in self._shard(len(chunk))]
            for offset in range(0, len(mine), self.micro):
                yield mine[offset : offset + self.micro]


SAMPLERS = config.SAMPLERS


class ClassBalancedSampler(Sampler[int]):
    """Class-balanced sampling as Kang et al.'s ``ClassAwareSampler`` (classifier-balancing, ICLR 2020).

    Classes are visited in a random order reshuffled after every pass over them; each visit takes
    ``samples_per_visit`` (4 in the released configs) consecutive indices from that class's own random cycle,
    also reshuffled whenever it wraps. An epoch draws max_c n_c x C samples, so every class is seen as often as
    the largest one. Difference: the cycles restart every epoch from the epoch's seed (the released sampler keeps
    its iterators across epochs), so each epoch is reproducible on its own and a resumed run draws the same.
    """

    def __init__(self, labels: Sequence[int], generator: torch.Generator, samples_per_visit: int = 4) -> None:
        labels_np = np.asarray(labels)
        self.by_class = [np.flatnonzero(labels_np == c) for c in np.unique(labels_np)]
        self.generator, self.per_visit = generator, samples_per_visit
        self.length = class_balanced_length(labels_np)

    def __len__(self) -> int:
        return self.length

    def _cycle(self, items: np.ndarray):
        while True:
            yield from items[torch.randperm(len(items), generator=self.generator).numpy()]

    def __iter__(self):
        classes = self._cycle(np.arange(len(self.by_class)))
        members = [self._cycle(indices) for indices in self.by_class]
        order: list[int] = []
        while len(order) < self.length:
            stream = members[next(classes)]
            order += [int(next(stream)) for _ in range(self.per_visit)]
        return iter(order[: self.length])


def class_balanced_length(labels: Sequence[int]) -> int:
    """Samples in a class-balanced epoch of these labels (:func:`class_balanced_epoch` of their class counts)."""
    return class_balanced_epoch(np.bincount(np.asarray(labels)))


def class_balanced_epoch(counts: Sequence[int]) -> int:
    """Samples in a class-balanced epoch: the largest class's count times the number of classes present."""
    present = [int(c) for c in counts if c > 0]
    return max(present) * len(present)


def epoch_order(n: int, labels: Sequence[int], generator: torch.Generator, sampler: str = "instance",
                repeated_aug: int = 1) -> Sampler[int]:
    """The order of one epoch's samples: a shuffle (``instance``), DeiT's repeated augmentation, or class-balanced."""
    if sampler not in SAMPLERS:
        raise UserError(f"sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}.")
    if sampler == "class_balanced":
        if repeated_aug > 1:
            raise UserError("sampler=class_balanced cannot be combined with repeated_aug > 1; set repeated_aug=1.")
        return ClassBalancedSampler(labels, generator)
    if repeated_aug > 1:
        return RepeatSampler(n, repeated_aug, generator)
    return torch.utils.data.RandomSampler(range(n), generator=generator)


def train_loader(split: Split, transform: Callable, global_batch: int, micro_batch: int, *, seed: int, workers: int,
                 drop_last: bool, repeated_aug: int = 1, pin_memory: bool = False, rank: int = 0,
                 world: int = 1, sampler: str = "instance") -> DataLoader:
    """A loader of micro-batches whose shuffle and augmentation randomness are fixed by ``seed`` (one per epoch)."""
    generator = torch.Generator().manual_seed(seed)
    dataset = SplitDataset(split, transform)
    order = epoch_order(len(dataset), split.labels, generator, sampler, repeated_aug)
    batches = MicroBatchSampler(order, global_batch, micro_batch, drop_last, rank, world)
    return DataLoader(dataset, batch_sampler=batches, generator=generator, num_workers=workers,
                      pin_memory=pin_memory, worker_init_fn=_seed_worker, **_worker_options(split, workers, False))


def eval_loader(split: Split, transform: Callable, batch_size: int, workers: int,
                indices: Sequence[int] | None = None, pin_memory: bool = False,
                persistent_workers: bool | None = None) -> DataLoader:
    """In-order batches. ``persistent_workers=None``: on for image files, as one loader serves every evaluation."""
    dataset: torch.utils.data.Dataset = SplitDataset(split, transform)
    if indices is not None:
        dataset = torch.utils.data.Subset(dataset, list(indices))
    if persistent_workers is None:
        persistent_workers = isinstance(split, FileListSplit)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                      **_worker_options(split, workers, persistent_workers))


def _worker_options(split: Split, workers: int, persistent: bool) -> dict[str, Any]:
    """Options torch accepts only with workers > 0; decoding image files gets a deeper prefetch queue."""
    if workers <= 0:
        return {}
    return {"persistent_workers": persistent, "prefetch_factor": 4 if isinstance(split, FileListSplit) else None}


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and python follow from it so that
    # PIL-based ops (which use `random`) are reproducible too.
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# ----------------------------------------------------------------------------------------------
# CNN-baseline recipes (LDAM-DRW / Saddle on ImageNet-LT and iNat, PaCo's two views)


class Cutout:
    """Zero one ``size`` x ``size`` square of a tensor image, centred uniformly (clipped at the border)."""

    def __init__(self, size: int = 16) -> None:
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(0, cy - self.size // 2), min(h, cy + self.size // 2)
        x0, x1 = max(0, cx - self.size // 2), min(w, cx + self.size // 2)
        img = img.clone()
        img[..., y0:y1, x0:x1] = 0
        return img


class RandomGaussianBlur:
    """PIL Gaussian blur with a radius drawn uniformly from ``sigma`` (MoCo v2 / SimCLR style)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        from PIL import ImageFilter

        radius = float(torch.empty(()).uniform_(*self.sigma))
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class TwoViews:
    """Apply two transforms to the same image; the loader collates them into ``[first, second]``."""

    def __init__(self, first: Callable, second: Callable) -> None:
        self.first, self.second = first, second

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [self.first(img), self.second(img)]


def imagenet_crop_jitter(info: DatasetInfo, img_size: int) -> Callable:
    """Saddle-LongTail's ImageNet-LT / iNat training transform: RandomResizedCrop, flip, ColorJitter(0.4, 0.4, 0.4)."""
    return T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4, 0.0),
                      T.ToTensor(), normalize(info)])


def center_crop_eval(info: DatasetInfo, img_size: int) -> Callable:
    """The torchvision ImageNet evaluation: bilinear resize of the short side to 256/224 x size, centre crop."""
    resize = int(round(img_size * 256 / 224))
    return T.Compose([T.Resize(resize), T.CenterCrop(img_size), T.ToTensor(), normalize(info)])


def simclr_view(info: DatasetInfo, img_size: int, crop_scale: tuple[float, float], hue: float,
                jitter_prob: float, flip_first: bool) -> Callable:
    """PaCo's "sim" key view: random resized crop, colour jitter, grayscale 0.2, Gaussian blur 0.5, flip."""
    crop = [T.RandomResizedCrop(img_size, scale=crop_scale)]
    flip = [T.RandomHorizontalFlip()]
    colour = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, hue)], p=jitter_prob), T.RandomGrayscale(p=0.2),
              T.RandomApply([RandomGaussianBlur((0.1, 2.0))], p=0.5)]
    ops = crop + flip + colour if flip_first else crop + colour + flip
    return T.Compose([*ops, T.ToTensor(), normalize(info)])


def paco_cifar_views(info: DatasetInfo, img_size: int = 32, cutout: int = 16) -> TwoViews:
    """PaCo's CIFAR views: (crop+flip, AutoAugment CIFAR-10 policy, Cutout 16) and a SimCLR key view."""
    query = T.Compose([T.RandomCrop(img_size, padding=4), T.RandomHorizontalFlip(),
                       T.AutoAugment(T.AutoAugmentPolicy.CIFAR10), T.ToTensor(), Cutout(cutout), normalize(info)])
    key = simclr_view(info, img_size, crop_scale=(0.2, 1.0), hue=0.1, jitter_prob=0.8, flip_first=True)
    return TwoViews(query, key)


def paco_imagenet_views(info: DatasetInfo, img_size: int = 224, rand_augment: str = "rand-n2-m10-mstd0.5") -> TwoViews:
    """PaCo's ImageNet-LT / iNat views: ("randcls") crop, flip, jitter, timm RandAugment; ("sim") SimCLR view."""
    from timm.data.auto_augment import rand_augment_transform

    _patch_timm_posterize()
    hparams = {"translate_const": int(img_size * 0.45), "img_mean": tuple(round(255 * m) for m in info.mean)}
    query = T.Compose([T.RandomResizedCrop(img_size, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
                       T.ColorJitter(0.4, 0.4, 0.4, 0.0), rand_augment_transform(rand_augment, hparams),
                       T.ToTensor(), normalize(info)])
    key = simclr_view(info, img_size, crop_scale=(0.08, 1.0), hue=0.0, jitter_prob=1.0, flip_first=False)
    return TwoViews(query, key)


def group_steps(loader: Iterable, sizes: list[int]) -> Iterator[list]:
    """Micro-batches grouped into optimizer steps of the given sizes."""
    items = iter(loader)
    for size in sizes:
        yield [next(items) for _ in range(size)]


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value
