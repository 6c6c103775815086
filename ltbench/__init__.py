"""ltbench: a benchmark harness for long-tailed image recognition."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``ltbench.load_model``, imported on first use: ``import ltbench`` and ``ltbench --help`` stay free of torch."""
    if name == "load_model":
        from ltbench.exported import load_model

        return load_model
    raise AttributeError(f"module 'ltbench' has no attribute {name!r}")
