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
