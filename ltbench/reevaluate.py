"""``ltbench eval RUN --recompute``: rebuild a run's method from its folder and evaluate its checkpoint."""

from __future__ import annotations

from typing import Any

from ltbench.engine import Trainer
from ltbench.errors import UserError
from ltbench.records import RunRecord, atomic_write_json
from ltbench.runtime import Runtime
from ltbench.selection import selection_fields
from ltbench.stages import build_trainer


def restored_trainer(record: RunRecord, runtime: Runtime) -> tuple[Trainer, dict[str, Any]]:
    """The run's Trainer with its latest checkpoint loaded (upstream runs found, never trained), and that checkpoint."""
    config = record.config()
    ckpt = record.load_checkpoint()
    if ckpt is None:
        raise UserError(f"Run {record.run_id} has no checkpoint yet ({record.checkpoint_path}); nothing to evaluate.")
    trainer = build_trainer(config, runtime, record=record)
    trainer.restore(ckpt)
    return trainer, ckpt


def reevaluate(record: RunRecord, runtime: Runtime) -> dict[str, Any]:
    """Evaluate the latest checkpoint; writes ``eval.json`` (never touches ``result.json``)."""
    config = record.config()
    trainer, ckpt = restored_trainer(record, runtime)
    metrics = trainer._evaluate_full(trainer._eval_loader())
    fields = selection_fields(ckpt["epoch"], metrics, trainer.evaluate_val(), ckpt.get("best"), ckpt.get("best_val"),
                              trainer.data)
    result = {"run_id": record.run_id, "method": config.method, "dataset": config.dataset, "config": config.to_dict(),
              **fields, "note": f"re-evaluated from the checkpoint after epoch {ckpt['epoch']}"}
    atomic_write_json(record.path / "eval.json", result)
    return result
