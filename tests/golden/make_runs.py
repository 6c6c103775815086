"""Writes the fake run folders under tests/golden/runs/ that the report golden tests read.

Numbers are invented (a seeded RNG shaped like long-tailed results) and only the files the report
reads are written. Regenerate with `.venv/bin/python tests/golden/make_runs.py`, then the expected
outputs with `LTBENCH_REGEN_GOLDEN=1 .venv/bin/pytest tests/test_report.py`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from ltbench.config import RunConfig

ROOT = Path(__file__).resolve().parent / "runs"
PAPER_SPLIT = {"cifar10lt": (3, 7), "cifar100lt": (36, 71)}
NUM_CLASSES = {"cifar10lt": 10, "cifar100lt": 100}


def counts(dataset: str, rho: float) -> list[int]:
    c = NUM_CLASSES[dataset]
    n_max = 50000 // c
    return [int(n_max * (1 / rho) ** (i / (c - 1))) for i in range(c)]


def groups(train_counts: list[int], per_class: np.ndarray, dataset: str) -> tuple[dict, dict]:
    def mean(idx):
        return None if not idx else round(float(per_class[idx].mean()), 4)

    by_count = {"many": [i for i, n in enumerate(train_counts) if n > 100],
                "medium": [i for i, n in enumerate(train_counts) if 20 <= n <= 100],
                "few": [i for i, n in enumerate(train_counts) if n < 20]}
    head, mid = PAPER_SPLIT[dataset]
    by_index = {"many": list(range(head)), "medium": list(range(head, mid)), "few": list(range(mid, len(train_counts)))}
    return {g: mean(i) for g, i in by_count.items()}, {g: mean(i) for g, i in by_index.items()}


def head(rng: np.random.RandomState, train_counts: list[int], dataset: str, level: float, tilt: float) -> dict:
    logc = np.log(np.asarray(train_counts, dtype=float))
    per_class = np.clip(level + tilt * (logc - logc.mean()) + rng.normal(0, 3, len(train_counts)), 0, 100).round(2)
    by_count, by_index = groups(train_counts, per_class, dataset)
    return {"top1": round(float(per_class.mean()), 4), "per_class": per_class.tolist(),
            "ece": round(float(rng.uniform(2, 12)), 4), "counts": by_count, "paper": by_index}


def write_run(method: str, dataset: str, rho: float, seed: int, preset: str = "paper", heads: tuple = ("main",),
              level: float = 70.0, done: bool = True, hparams: dict | None = None) -> None:
    hp = {"epochs": 1200 if preset == "paper" else 100, "sam_rho": 0.0, "sam_rho_steps": [], **(hparams or {})}
    config = {"method": method, "dataset": dataset, "data": {"rho": rho, "subsample_seed": 0}, "hparams": hp,
              "seed": seed, "preset": preset, "versions": {"schema": 1, "method": 1, "dataset": 1}}
    run_id = RunConfig.from_dict(config).run_id  # readers refuse a folder not named by its config's hash
    # the invented numbers are seeded by the digest these folders had before they were named by run id
    number_seed = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    folder = ROOT / run_id
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    epochs_done = hp["epochs"] if done else 3
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(1, epochs_done + 1)))
    if not done:
        return
    rng = np.random.RandomState(int(hashlib.sha256(number_seed.encode()).hexdigest()[:8], 16))
    train_counts = counts(dataset, rho)
    tilts = {"main": 6.0, "cls": 12.0, "dist": -2.0}
    final = {h: head(rng, train_counts, dataset, level + (0 if h == "main" else -6), tilts[h]) for h in heads}
    best = {h: head(rng, train_counts, dataset, level + 1.0, tilts[h]) for h in heads}
    upstream = {"teacher": {"run_id": "0" * 12, "method": "paco", "top1": 80.0}} if method == "deitlt" else {}
    result = {"run_id": run_id, "config": config, "method": method, "dataset": dataset, "class_counts": train_counts,
              "final": {"epoch": hp["epochs"], "heads": final}, "best": {"epoch": hp["epochs"] - 6, "heads": best},
              "epoch_numbering": "1-based: epoch 1 is the first; an epoch field names the epoch just completed",
              "upstream": upstream, "wall_time_s": 3600.0, "images_per_s": 1000.0, "parameters": 85_000_000}
    (folder / "result.json").write_text(json.dumps(result, sort_keys=True) + "\n")
    (folder / "DONE").write_text("")


def main() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    distilled = ("main", "cls", "dist")
    deitlt = {"teacher": "paco_sam", "drw_epoch": 1100}
    for seed in (0, 1, 2):
        write_run("erm_vit", "cifar10lt", 100.0, seed, level=62.0)
        write_run("erm_vit", "cifar10lt", 100.0, seed, preset="short", level=55.0)
        write_run("deitlt", "cifar10lt", 100.0, seed, heads=distilled, level=86.0, hparams=deitlt)
        write_run("deitlt", "cifar100lt", 100.0, seed, heads=distilled, level=54.0, hparams=deitlt)
    for seed in (0, 1):
        write_run("erm_vit", "cifar10lt", 50.0, seed, level=70.0)
    write_run("erm_vit", "cifar10lt", 50.0, 2, level=70.0, done=False)  # interrupted: excluded, footnoted
    write_run("erm_vit", "cifar100lt", 100.0, 0, level=35.0)  # one seed only: marked (n=1)
    make_selection_runs()


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------------------------
# Run folders with known curves, where the three selection rules pick three different epochs (tests/test_selection.py)

SELECTION_ROOT = Path(__file__).resolve().parent / "selection" / "runs"
TEST_CURVE = (50.0, 70.0, 60.0, 65.0)  # per evaluated epoch: final = epoch 4, oracle = epoch 2 (70)
VAL_CURVE = (48.0, 60.0, 66.0, 62.0)  # val = epoch 3 (66), where test is 60
# logit_adjust minus erm_cnn per (seed, subsample_seed) at the epochs final and val pick
GAIN_FINAL = {(0, 0): 1.0, (1, 0): 2.0, (2, 0): 0.5, (0, 1): 1.5, (1, 1): 1.0, (2, 1): 2.0}
GAIN_VAL = {(0, 0): -1.0, (1, 0): 0.5, (2, 0): 2.0, (0, 1): -0.5, (1, 1): 1.0, (2, 1): 0.0}


def curve_offset(seed: int, subset: int) -> float:
    return 0.5 * seed + 1.0 * subset


def curves(method: str, seed: int, subset: int) -> tuple[list[float], list[float]]:
    """(test top-1, val top-1) per epoch of one run."""
    e = curve_offset(seed, subset)
    test = [v + e for v in TEST_CURVE]
    if method == "logit_adjust":
        test = [test[0] + 1, test[1] + 1, test[2] + GAIN_VAL[seed, subset], test[3] + GAIN_FINAL[seed, subset]]
    return test, [v + e for v in VAL_CURVE]


def flat_metrics(top1: float) -> dict:
    """Metrics of a head whose ten classes all score ``top1`` (1000 test images each)."""
    return {"top1": top1, "per_class": [top1] * 10, "ece": 5.0, "counts": {"many": top1, "medium": top1, "few": None},
            "paper": {"many": top1, "medium": top1, "few": top1}}


def write_curve_run(method: str, seed: int, subset: int) -> None:
    config = {"method": method, "dataset": "cifar10lt", "data": {"rho": 100.0, "subsample_seed": subset},
              "hparams": {"epochs": 4, "eval_every": 1}, "seed": seed, "preset": "default",
              "versions": {"schema": 1, "method": 1, "dataset": 1}}
    run_id = RunConfig.from_dict(config).run_id
    folder = SELECTION_ROOT / run_id
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    test, val = curves(method, seed, subset)
    rows = [{"epoch": e, "eval": {"main": {k: v for k, v in flat_metrics(t).items() if k != "per_class"}},
             "val": {"main": {k: v for k, v in flat_metrics(v).items() if k != "per_class"}}}
            for e, (t, v) in enumerate(zip(test, val), start=1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    val_epoch, oracle_epoch = 1 + int(np.argmax(val)), 1 + int(np.argmax(test))
    val_heads = {"main": {k: v for k, v in flat_metrics(max(val)).items() if k != "per_class"}}
    result = {"run_id": run_id, "config": config, "method": method, "dataset": "cifar10lt",
              "class_counts": counts("cifar10lt", 100.0),
              "final": {"epoch": 4, "heads": {"main": flat_metrics(test[-1])}, "val_heads": {
                  "main": {k: v for k, v in flat_metrics(val[-1]).items() if k != "per_class"}}},
              "val": {"epoch": val_epoch, "heads": {"main": flat_metrics(test[val_epoch - 1])}, "val_heads": val_heads},
              "best": {"epoch": oracle_epoch, "heads": {"main": flat_metrics(test[oracle_epoch - 1])}},
              "eval_class_counts": {"test": [1000] * 10, "val": [0] + [100] * 9},
              "val_split": {"images": 900, "source": "spare CIFAR training images (invented for the golden runs)"},
              "epoch_numbering": "1-based: epoch 1 is the first; an epoch field names the epoch just completed",
              "eval_every": 1, "upstream": {}}
    (folder / "result.json").write_text(json.dumps(result, sort_keys=True) + "\n")
    (folder / "DONE").write_text("")


def make_selection_runs() -> None:
    shutil.rmtree(SELECTION_ROOT, ignore_errors=True)
    for method in ("erm_cnn", "logit_adjust"):
        for seed, subset in GAIN_FINAL:
            write_curve_run(method, seed, subset)
