"""Shared fixtures: the real CIFAR-10 copy (when present), fast CLI invocation, tiny run settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LTBENCH_SHARED_DATA", REPO.parent / "shared" / "data"))

# Fast settings for a tiny ViT on `synthetic`: no loader processes, light augmentation.
FAST_VIT = ["workers=0", "auto_augment=", "re_prob=0", "mixup=0", "cutmix=0", "crop_scale_min=0.6"]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models, thousands of small ops: on a busy 2-core machine torch's spinning second thread made
    tests ten times slower or worse. Subprocess tests set OMP_NUM_THREADS themselves."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def cifar_root() -> Path:
    if not (SHARED_DATA / "cifar-10-batches-py" / "data_batch_1").is_file():
        pytest.skip(f"real CIFAR-10 not found under {SHARED_DATA} (set LTBENCH_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture
def cli(tmp_path):
    """Invoke the CLI in-process; returns a function (args) -> click Result."""
    from ltbench.cli import main

    runner = CliRunner()

    def invoke(*args: str, expect: int | None = 0):
        result = runner.invoke(main, list(args), catch_exceptions=False)
        if expect is not None:
            assert result.exit_code == expect, result.output
        return result

    return invoke


def set_args(*items: str) -> list[str]:
    out: list[str] = []
    for item in items:
        out += ["--set", item]
    return out
