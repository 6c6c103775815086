"""The three epoch-selection rules, named the same in every file, table and command.

- ``final``: the last epoch (the default; no selection at all).
- ``val``: the evaluated epoch with the best main-head top-1 on the validation split; test is reported at it.
- ``oracle``: the evaluated epoch with the best main-head top-1 on the test split, as the released code of
  LDAM-DRW, PaCo and DeiT-LT keeps it. It selects on the test set, so it is optimistic and always labelled.

``result.json`` holds one block per rule: ``final``, ``val`` and ``best`` (the oracle block, under the key it had
before the rules were named). Ties keep the earliest epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ltbench.data import LTData
from ltbench.errors import UserError

RULES = ("final", "val", "oracle")
BLOCK = {"final": "final", "val": "val", "oracle": "best"}  # the result.json key of each rule's block
RULE_TEXT = {
    "final": "final = the last epoch (no selection)",
    "val": "val = the evaluated epoch with the best main-head top-1 on the val split, test reported at that epoch",
    "oracle": "oracle = the evaluated epoch with the best main-head top-1 on the test split (selects on test: "
              "optimistic, the protocol of LDAM-DRW's, PaCo's and DeiT-LT's released code)",
}
MAIN = "main"


def rule_named(select: str) -> str:
    """``select`` when it names a rule; ``best`` (the oracle rule's old name) and anything else are refused."""
    if select == "best":
        raise UserError("--select best is now called --select oracle (it selects the epoch on the test set); the "
                        "three rules are final, val and oracle (docs/protocol.md).")
    if select not in RULES:
        raise UserError(f"--select {select!r} is not one of {', '.join(RULES)}.")
    return select


def summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Per-epoch metrics without the per-class vectors (those go to result.json)."""
    return {head: {k: v for k, v in m.items() if k != "per_class"} for head, m in metrics["heads"].items()}


def public(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics without the private ``_logits`` / ``_labels`` entries."""
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def pick_oracle(current: dict[str, Any] | None, epoch: int, test: Mapping[str, Any]) -> dict[str, Any]:
    """The oracle block after an evaluated epoch: this epoch's test metrics if their top-1 beats the block's."""
    if current is None or test["heads"][MAIN]["top1"] > current["heads"][MAIN]["top1"]:
        return {"epoch": epoch, **public(test)}
    return current


def pick_val(current: dict[str, Any] | None, epoch: int, test: Mapping[str, Any],
             val: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The val block after an evaluated epoch: this epoch's test metrics (and its val summary under ``val_heads``)
    if its val top-1 beats the block's. The test numbers never decide."""
    if val is None:
        return current
    val_heads = summary(val)
    if current is None or val_heads[MAIN]["top1"] > current["val_heads"][MAIN]["top1"]:
        return {"epoch": epoch, **public(test), "val_heads": val_heads}
    return current


def rule_block(result: Mapping[str, Any], rule: str) -> Mapping[str, Any] | None:
    """A result.json's block for ``rule`` (None when the run has none, e.g. no val split)."""
    return result.get(BLOCK[rule])


def selection_fields(epochs: int, test: Mapping[str, Any], val: Mapping[str, Any] | None,
                     oracle: dict[str, Any] | None, val_block: dict[str, Any] | None, data: LTData) -> dict[str, Any]:
    """result.json's blocks of the three rules, what they mean, and the facts a bootstrap needs (images per class
    of each evaluated split)."""
    final = {"epoch": epochs, **test, **({"val_heads": summary(val)} if val is not None else {})}
    counts = {"test": np.bincount(data.test.labels, minlength=data.info.num_classes).tolist()}
    if data.val is not None:
        counts["val"] = np.bincount(data.val.labels, minlength=data.info.num_classes).tolist()
    return {"final": final, "best": oracle, "val": val_block,
            "selection": "; ".join(RULE_TEXT.values()) + " (result.json keeps the oracle block under 'best')",
            "eval_class_counts": counts,
            "val_split": {"images": len(data.val) if data.val is not None else 0,
                          "source": data.info.extras.get("val_source", "none")}}
