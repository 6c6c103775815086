"""Post-hoc logit adjustment (Menon et al., ICLR 2021) for any finished run, ViTs included: no retraining.

Every head's test logits z become z - tau * log(prior), prior_c = n_c / N from the run's training counts, and are
evaluated like any result. The logits are the run's saved final-epoch ``test_logits.npz`` (``--save-logits``);
when there is none they are recomputed from the final checkpoint and saved there, so later taus are instant.
Results go to ``posthoc_la.json`` in the run folder, one block per tau, never into ``result.json``: an adjusted
number is a separate, labelled result (``ltbench eval RUN --adjust TAU``, ``ltbench report --adjust TAU``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ltbench.errors import UserError
from ltbench.evaluate import DEFAULT_EVALUATOR
from ltbench.losses import log_prior
from ltbench.records import (
    POSTHOC_FILE,
    RunRecord,
    atomic_write_json,
    tau_key,
)
from ltbench.reevaluate import restored_trainer
from ltbench.registry import EVALUATORS
from ltbench.stages import load_data

RULE = "argmax of z - tau * log(n_c / N) on every head's final-epoch test logits (Menon et al. 2021, post-hoc)"


def adjust_logits(logits: Mapping[str, torch.Tensor], counts: Sequence[int], tau: float) -> dict[str, torch.Tensor]:
    """Every head's logits minus tau * log(prior)."""
    offset = tau * log_prior(counts)
    return {head: values.float() - offset for head, values in logits.items()}


def posthoc_adjust(record: RunRecord, runtime, taus: Sequence[float]) -> dict[str, Any]:
    """Evaluate a finished run at each tau; merges the blocks into ``posthoc_la.json`` and returns its content."""
    if not record.done:
        raise UserError(f"Run {record.run_id} is not finished (no DONE marker): post-hoc adjustment uses the final "
                        f"epoch's logits. Finish it first (run the same `ltbench run` command).")
    check_taus(taus)
    result = record.result()
    logits, labels, source = final_logits(record, runtime)
    info = load_data(record.config(), runtime).info
    evaluator = EVALUATORS.get(DEFAULT_EVALUATOR)()
    path = record.path / POSTHOC_FILE
    payload = record.posthoc() or {"run_id": record.run_id, "rule": RULE, "taus": {}}
    for tau in taus:
        metrics = evaluator.evaluate(adjust_logits(logits, result["class_counts"], tau), labels, info)
        payload["taus"][tau_key(tau)] = {"epoch": result["final"]["epoch"], "logits": source, **metrics}
    atomic_write_json(path, payload)
    return payload


def check_taus(taus: Sequence[float]) -> None:
    if not all(math.isfinite(tau) and tau >= 0 for tau in taus):
        raise UserError(f"--adjust takes tau >= 0 (1 is the paper's choice), got {', '.join(map(str, taus))}.")


def final_logits(record: RunRecord, runtime) -> tuple[dict[str, torch.Tensor], torch.Tensor, str]:
    """(logits per head, labels, "saved" | "recomputed"): the saved final test logits, or recomputed and saved."""
    saved = record.saved_logits()
    if saved is not None:
        arrays = {name: torch.from_numpy(values) for name, values in saved.items()}
        labels = arrays.pop("labels")
        return arrays, labels, "saved"
    trainer, _ = restored_trainer(record, runtime)
    metrics = trainer._evaluate_full(trainer._eval_loader(), keep_logits=True)
    logits, labels = metrics["_logits"], metrics["_labels"]
    record.write_logits({k: v.numpy() for k, v in logits.items()}, labels.numpy(), record.config())
    return logits, labels, "recomputed"


TAU_GRID = tuple(k / 4 for k in range(9))  # 0, 0.25, ..., 2: the range papers search (1 is Menon et al.'s)
AUTO_RULE = ("tau of TAU_GRID with the best main-head top-1 on the val split (final-epoch logits), the smallest of "
             "ties; test is evaluated at that tau only")


def auto_adjust(record: RunRecord, runtime) -> dict[str, Any]:
    """Choose tau on val by the val selection rule, then evaluate test at it; recorded under ``auto`` in
    posthoc_la.json beside the per-tau blocks."""
    if not record.done:
        raise UserError(f"Run {record.run_id} is not finished (no DONE marker): --adjust auto uses the final epoch.")
    trainer, _ = restored_trainer(record, runtime)
    if trainer.data.val is None or not len(trainer.data.val):
        raise UserError(f"Run {record.run_id}'s dataset has no val split ({trainer.data.info.extras.get('val_source')}"
                        f"), so tau cannot be chosen without the test set; give --adjust TAU explicitly instead.")
    val = trainer._evaluate_full(trainer._eval_loader(trainer.data.val), keep_logits=True)
    counts, evaluator = record.result()["class_counts"], EVALUATORS.get(DEFAULT_EVALUATOR)()
    scores = {tau_key(tau): evaluator.evaluate(adjust_logits(val["_logits"], counts, tau), val["_labels"],
                                               trainer.data.info)["heads"]["main"]["top1"] for tau in TAU_GRID}
    best = max(TAU_GRID, key=lambda tau: scores[tau_key(tau)])  # max keeps the first (smallest) of ties
    payload = posthoc_adjust(record, runtime, [best])
    payload["auto"] = {"tau": tau_key(best), "rule": AUTO_RULE, "val_top1": scores}
    atomic_write_json(record.path / POSTHOC_FILE, payload)
    return payload
