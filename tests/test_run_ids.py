"""Run ids are a promise: a refactoring must not move any finished run to a new folder.

``golden/run_ids.json`` pins the id of every built-in method on every dataset family under its default preset, its
``tiny`` preset and a shortened ``short`` preset with a ``--set`` (246 configs, recorded before the layering pass of
issue #20). Regenerate it only with a deliberate VERSION bump of a method, and say so in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

from ltbench.resolve import make_config

PINNED = json.loads((Path(__file__).parent / "golden" / "run_ids.json").read_text())


def test_every_pinned_config_keeps_its_run_id():
    changed = []
    for method, dataset, rho, preset, epochs, sets, run_id in PINNED:
        config = make_config(method, dataset, rho=rho, preset=preset, epochs=epochs, sets=sets, seed=1)
        if config.run_id != run_id:
            changed.append(f"{method}/{dataset}/{preset}: {run_id} -> {config.run_id}")
    assert not changed, changed
    assert len(PINNED) >= 200
