"""Seeds: one stable hash from a run's seed and a purpose, and seeding every RNG a run uses from it."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def seed_hash(*parts: Any) -> int:
    """A 31-bit seed derived from its parts, stable across Python versions and processes."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
