"""Experiment trackers (``--log tensorboard|csv|wandb|mlflow``): one small adapter per backend.

Each adapter receives the per-epoch rows the engine writes to ``metrics.jsonl`` and logs them flattened
(:func:`flatten`): ``train/loss`` (and the method's loss parts), ``train/lr``, ``train/images_per_s`` and, on
evaluated epochs, ``test/<head>/top1``, ``test/<head>/many|medium|few`` (training-count groups),
``test/<head>/paper_many|paper_medium|paper_few`` (DeiT-LT's index ranges, where defined) and
``test/<head>/ece`` for every head (``main``; ``cls`` and ``dist`` for distilled runs). The step is the
number of epochs completed (1-based). Trackers are a runtime choice: they never change the run id.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from ltbench.config import RunConfig
from ltbench.errors import UserError
from ltbench.records import RunRecord, atomic_write_bytes

# backend -> (module imported only when chosen, how to install it)
BACKENDS = {
    "tensorboard": ("tensorboardX", "pip install tensorboardX"),
    "csv": (None, None),
    "wandb": ("wandb", "pip install 'ltbench[wandb]' (or pip install wandb)"),
    "mlflow": ("mlflow", "pip install 'ltbench[mlflow]' (or pip install mlflow-skinny)"),
}


class Tracker(Protocol):
    def log_epoch(self, row: Mapping[str, Any]) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def parse_backends(values: Iterable[str]) -> tuple[str, ...]:
    """``--log`` values, repeatable or comma-separated, checked and de-duplicated in the order given."""
    names = [v.strip().lower() for item in values for v in item.split(",") if v.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise UserError(f"--log {unknown[0]!r} is not a tracker; choose from {', '.join(BACKENDS)} "
                        f"(repeat --log or separate them with commas).")
    for name in names:
        _import_backend(name)  # fail before training starts, not after the first epoch
    return tuple(dict.fromkeys(names))


def _import_backend(name: str) -> Any:
    module, install = BACKENDS[name]
    if module is None:
        return None
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"--log {name} needs the {module} package, which is not installed here: {install}. "
                        f"Or drop --log {name}; the run's metrics.jsonl has the same numbers.") from exc


def flatten(row: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, scalars) of one metrics.jsonl row; the step is the number of epochs completed."""
    scalars = {f"train/{k}": float(v) for k, v in row.get("train", {}).items()}
    scalars["train/lr"] = float(row["lr"])
    if "images_per_s" in row:
        scalars["train/images_per_s"] = float(row["images_per_s"])
    for split, block in (("test", row.get("eval", {})), ("val", row.get("val", {}))):
        for head, metrics in block.items():
            scalars.update(_head_scalars(f"{split}/{head}", metrics))
    return int(row["epoch"]), scalars


def _head_scalars(prefix: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    scalars = {f"{prefix}/top1": float(metrics["top1"])}
    if metrics.get("ece") is not None:
        scalars[f"{prefix}/ece"] = float(metrics["ece"])
    for rule, label in (("counts", ""), ("paper", "paper_")):
        for group, value in (metrics.get(rule) or {}).items():
            if value is not None:  # None: no class in that group
                scalars[f"{prefix}/{label}{group}"] = float(value)
    return scalars


class TensorBoardTracker:
    """Event files under ``<run folder>/tensorboard/`` (``tensorboard --logdir results/runs``)."""

    def __init__(self, record: RunRecord, config: RunConfig, history: list[dict[str, Any]]) -> None:
        tensorboardx = _import_backend("tensorboard")
        self.writer = tensorboardx.SummaryWriter(logdir=str(record.path / "tensorboard"))

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        step, scalars = flatten(row)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a job killed later keeps what was logged

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class CSVTracker:
    """``<run folder>/metrics.csv``: one row per epoch, rewritten whole (it includes epochs of earlier calls)."""

    def __init__(self, record: RunRecord, config: RunConfig, history: list[dict[str, Any]]) -> None:
        self.path = record.path / "metrics.csv"
        self.rows = [_csv_row(r) for r in history]

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        import pandas as pd

        self.rows.append(_csv_row(row))
        atomic_write_bytes(self.path, pd.DataFrame(self.rows).to_csv(index=False).encode())

    def close(self, failed: bool = False) -> None:
        pass  # every epoch is already on disk


def _csv_row(row: Mapping[str, Any]) -> dict[str, Any]:
    step, scalars = flatten(row)
    return {"epoch": step, **scalars}


class WandbTracker:
    """A Weights & Biases run with the ltbench run id (a resumed run continues it); project $WANDB_PROJECT
    or ``ltbench``; wandb's local files go under the run folder."""

    def __init__(self, record: RunRecord, config: RunConfig, history: list[dict[str, Any]]) -> None:
        wandb = _import_backend("wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ltbench"), id=record.run_id,
                              name=_run_name(config, record), config=config.to_dict(), dir=str(record.path),
                              resume="allow")

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        step, scalars = flatten(row)
        self.run.log(scalars, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MLflowTracker:
    """An MLflow run named after the ltbench run, in experiment $MLFLOW_EXPERIMENT_NAME or ``ltbench``, at
    MLflow's own tracking URI ($MLFLOW_TRACKING_URI); the config is logged as parameters."""

    def __init__(self, record: RunRecord, config: RunConfig, history: list[dict[str, Any]]) -> None:
        import pandas as pd

        self.mlflow = _import_backend("mlflow")
        self.mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "ltbench"))
        self.run = self.mlflow.start_run(run_name=_run_name(config, record), tags={"ltbench.run_id": record.run_id})
        params = pd.json_normalize(config.to_dict(), sep=".").iloc[0].to_dict()
        self.mlflow.log_params({k: str(v)[:500] for k, v in params.items()})  # MLflow's shortest value limit

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        step, scalars = flatten(row)
        self.mlflow.log_metrics(scalars, step=step)

    def close(self, failed: bool = False) -> None:
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


def _run_name(config: RunConfig, record: RunRecord) -> str:
    return f"{config.method} {config.dataset} seed {config.seed} ({record.run_id})"


ADAPTERS: dict[str, type] = {"tensorboard": TensorBoardTracker, "csv": CSVTracker, "wandb": WandbTracker,
                             "mlflow": MLflowTracker}


def open_trackers(names: Iterable[str], record: RunRecord, config: RunConfig,
                  history: list[dict[str, Any]]) -> list[Tracker]:
    """One tracker per chosen backend; ``history`` holds the rows of epochs trained by earlier calls."""
    return [ADAPTERS[name](record, config, history) for name in names]
