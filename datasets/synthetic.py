"""A generated long-tailed dataset for fast CPU tests and demos: any number of classes, any rho.

Each class has a fixed random low-frequency colour template; an image is its class template,
randomly shifted, plus pixel noise. The signal is easy but not trivial, so a tiny model learns it
in an epoch or two and head classes are learned before tail classes, as on real LT data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ltbench.config import recorded_if_set
from ltbench.data import Dataset, DatasetInfo, InMemorySplit, LTData, exp_profile_counts
from ltbench.errors import UserError


@dataclass
class SyntheticOptions:
    rho: float = 10.0
    num_classes: int = 10
    n_max: int = 200  # training images of the most frequent class
    n_test: int = 20  # test images per class (balanced)
    image_size: int = 32
    noise: float = 0.6  # pixel noise relative to the template contrast
    data_seed: int = 0
    n_val: int = recorded_if_set(20)  # val images per class (balanced), drawn after the test images


class SyntheticLT(Dataset):
    """``synthetic``: generated LT images with learnable class structure (no files needed)."""

    display_name = "Synthetic-LT"  # how papers write it (figure titles, legends)

    name = "synthetic"
    Options = SyntheticOptions
    VERSION = 1

    @classmethod
    def train_counts(cls, options: SyntheticOptions) -> list[int]:
        """Per-class training counts (every class keeps at least one image)."""
        return [max(1, c) for c in exp_profile_counts(options.n_max, options.num_classes, options.rho)]

    @classmethod
    def profile_size(cls, options: SyntheticOptions) -> tuple[int, int]:
        return options.n_max, options.num_classes

    @classmethod
    def validate_options(cls, options: SyntheticOptions) -> None:
        """The sizes first: rho's check computes the class counts from them."""
        sizes = {"num_classes": (options.num_classes, 2), "n_max": (options.n_max, 1),
                 "n_test": (options.n_test, 1), "n_val": (options.n_val, 0), "image_size": (options.image_size, 8)}
        for key, (value, low) in sizes.items():
            if value < low:
                raise UserError(f"The synthetic dataset option {key} must be >= {low}, got {value} "
                                f"(--set data.{key}=N).")
        super().validate_options(options)

    def load(self) -> LTData:
        opt = self.options
        rng = np.random.RandomState(opt.data_seed)
        templates = _templates(rng, opt.num_classes, opt.image_size)
        counts = self.train_counts(opt)
        train_y = np.repeat(np.arange(opt.num_classes), counts)
        test_y = np.repeat(np.arange(opt.num_classes), opt.n_test)
        train_x = _render(rng, templates, train_y, opt.noise)
        test_x = _render(rng, templates, test_y, opt.noise)
        val_y = np.repeat(np.arange(opt.num_classes), opt.n_val)  # after test: train and test stay as they were
        val_x = _render(rng, templates, val_y, opt.noise)
        head_end = max(1, round(opt.num_classes * 0.3))
        mid_end = max(head_end + 1, round(opt.num_classes * 0.7))
        info = DatasetInfo(
            name=self.name,
            num_classes=opt.num_classes,
            train_counts=tuple(counts),
            image_size=opt.image_size,
            mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25),
            class_names=tuple(f"class_{i}" for i in range(opt.num_classes)),
            paper_split=(head_end, min(mid_end, opt.num_classes)),
            extras={"val_source": f"{opt.n_val} generated images per class, drawn after the test images"},
        )
        return LTData(info, InMemorySplit(train_x, train_y), InMemorySplit(test_x, test_y),
                      val=InMemorySplit(val_x, val_y) if opt.n_val else None)


def _templates(rng: np.random.RandomState, num_classes: int, size: int) -> np.ndarray:
    coarse = rng.uniform(-1, 1, size=(num_classes, 4, 4, 3))
    reps = -(-size // 4)
    return np.kron(coarse, np.ones((1, reps, reps, 1)))[:, :size, :size]


def _render(rng: np.random.RandomState, templates: np.ndarray, labels: np.ndarray, noise: float) -> np.ndarray:
    size = templates.shape[1]
    shifts = rng.randint(-size // 8, size // 8 + 1, size=(len(labels), 2))
    images = np.empty((len(labels), size, size, 3), dtype=np.float32)
    for i, (label, (dy, dx)) in enumerate(zip(labels, shifts)):
        images[i] = np.roll(templates[label], (dy, dx), axis=(0, 1))
    images += noise * rng.standard_normal(images.shape).astype(np.float32)
    return np.clip(128 + 60 * images, 0, 255).astype(np.uint8)
