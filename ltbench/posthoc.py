"""Post-hoc logit adjustment (Menon et al., ICLR 2021) for any finished run, ViTs included: no retraining.

Every head's test logits z become z - tau * log(prior), prior_c = n_c / N from the run's training counts, and are
evaluated like any result. The logits are the run's saved final-epoch ``test_logits.npz`` (``--save-logits``);
when there is none they are recomputed from the final checkpoint and saved there, so later taus are instant.
Results go to ``posthoc_la.json`` in the run folder, one block per tau, never into ``result.json``: an adjusted
number is a separate, labelled result (``ltbench eval RUN --adjust TAU``, ``ltbench report --adjust TAU``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ltbench.errors import UserError
from ltbench.losses import log_prior
from ltbench.records import RunRecord, atomic_write_bytes, atomic_write_json

POSTHOC_FILE = "posthoc_la.json"
LOGITS_FILE = "test_logits.npz"
RULE = "argmax of z - tau * log(n_c / N) on every head's final-epoch test logits (Menon et al. 2021, post-hoc)"


def tau_key(tau: float) -> str:
    """The text a tau is stored and labelled under (1.0 -> "1", 0.5 -> "0.5")."""
    return f"{tau:g}"


def posthoc_label(method: str, tau: float | str) -> str:
    return f"{method} + post-hoc LA τ={tau_key(float(tau))}"


def adjust_logits(logits: Mapping[str, torch.Tensor], counts: Sequence[int], tau: float) -> dict[str, torch.Tensor]:
    """Every head's logits minus tau * log(prior)."""
    offset = tau * log_prior(counts)
    return {head: values.float() - offset for head, values in logits.items()}


def posthoc_adjust(record: RunRecord, runtime, taus: Sequence[float]) -> dict[str, Any]:
    """Evaluate a finished run at each tau; merges the blocks into ``posthoc_la.json`` and returns its content."""
    from ltbench import stages
    from ltbench.registry import EVALUATORS

    if not record.done:
        raise UserError(f"Run {record.run_id} is not finished (no DONE marker): post-hoc adjustment uses the final "
                        f"epoch's logits. Finish it first (run the same `ltbench run` command).")
    if not all(math.isfinite(tau) and tau >= 0 for tau in taus):
        raise UserError(f"--adjust takes tau >= 0 (1 is the paper's choice), got {', '.join(map(str, taus))}.")
    result = record.result()
    logits, labels, source = final_logits(record, runtime)
    info = stages.load_data(record.config(), runtime).info
    evaluator = EVALUATORS.get("longtail")()
    path = record.path / POSTHOC_FILE
    payload = record.read_json(POSTHOC_FILE) if path.exists() else {"run_id": record.run_id, "rule": RULE, "taus": {}}
    for tau in taus:
        metrics = evaluator.evaluate(adjust_logits(logits, result["class_counts"], tau), labels, info)
        payload["taus"][tau_key(tau)] = {"epoch": result["final"]["epoch"], "logits": source, **metrics}
    atomic_write_json(path, payload)
    return payload


def final_logits(record: RunRecord, runtime) -> tuple[dict[str, torch.Tensor], torch.Tensor, str]:
    """(logits per head, labels, "saved" | "recomputed"): the saved final test logits, or recomputed and saved."""
    path = record.path / LOGITS_FILE
    if path.exists():
        with np.load(path) as saved:
            arrays = {name: torch.from_numpy(saved[name]) for name in saved.files}
        labels = arrays.pop("labels")
        return arrays, labels, "saved"
    from ltbench.reevaluate import restored_trainer

    trainer, _ = restored_trainer(record, runtime)
    metrics = trainer._evaluate_full(trainer._eval_loader(), keep_logits=True)
    logits, labels = metrics["_logits"], metrics["_labels"]
    buffer = io.BytesIO()
    np.savez_compressed(buffer, labels=labels.numpy(), **{k: v.numpy() for k, v in logits.items()})
    atomic_write_bytes(path, buffer.getvalue())
    return logits, labels, "recomputed"
