"""A CIFAR teacher's test accuracy on inputs normalised with ImageNet statistics, the tensor DeiT-LT's released code
feeds it (its student transform is timm's), beside the CIFAR statistics it was trained with (docs/fidelity.md, 2).

    python scripts/teacher_normalisation.py RESULTS DATA_ROOT [METHOD PRESET]   # default: ldam_drw short

RESULTS holds the finished teacher run of METHOD / PRESET on cifar10lt rho 100; DATA_ROOT the CIFAR-10 batches.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from ltbench.datasets.cifar_lt import load_cifar_pickle

from ltbench import resolve, stages
from ltbench.data import IMAGENET_MEAN, IMAGENET_STD
from ltbench.method import Upstream
from ltbench.records import run_record
from ltbench.runtime import Runtime
from ltbench.teacher import FrozenTeacher


def main(results: Path, data_root: Path, method: str = "ldam_drw", preset: str = "short") -> None:
    config = resolve.make_config(method, "cifar10lt", rho=100, preset=preset)
    info = stages.load_data(config, Runtime(results=results, data_root=data_root, device="cpu")).info
    teacher = FrozenTeacher(Upstream(config, run_record(results, config)), info, torch.device("cpu"))
    batch = load_cifar_pickle(data_root / "cifar-10-batches-py" / "test_batch")
    x = torch.from_numpy(np.asarray(batch["data"]).reshape(-1, 3, 32, 32)).float() / 255
    y = torch.as_tensor(batch["labels"])
    print(f"teacher {teacher.run_id} ({method}, {preset}); paper split head 0-2 / mid 3-6 / tail 7-9")
    for name, mean, std in (("cifar", info.mean, info.std), ("imagenet", IMAGENET_MEAN, IMAGENET_STD)):
        normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        pred = torch.cat([teacher.labels(part) for part in normalised.split(1000)])
        per_class = [100 * (pred[y == c] == c).float().mean().item() for c in range(10)]
        print(f"{name:8s} top-1 {100 * (pred == y).float().mean():.2f}  head / mid / tail "
              f"{np.mean(per_class[:3]):.2f} / {np.mean(per_class[3:7]):.2f} / {np.mean(per_class[7:]):.2f}  "
              f"per class {' '.join(f'{p:.1f}' for p in per_class)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:5])
