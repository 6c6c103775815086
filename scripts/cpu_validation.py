"""CPU stand-in for the GPU validation of issues #3 and #4 (used when no GPU time is available).

Real CIFAR-10-LT rho=100; CNN recipes at 8 epochs with the schedule shape of the 200-epoch recipe
(warm-up, lr x0.01 at 80% and 90%, DRW from 80%), then tiny ViTs (erm_vit, deit, deitlt) distilled from
those CNN runs. Numbers are far below the published full-recipe ones by construction; the point is the
ordering. Usage: python scripts/cpu_validation.py --data-root ../shared/data --results results/cpu-validation
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ltbench import stages
from ltbench.engine import Runtime

CNN_SHAPE = ["epochs=8", "warmup_epochs=1", "warmup_lr=0.02", "milestones=7,8", "eval_every=2", "workers=0"]
VIT_SHAPE = ["workers=0", "eval_every=2"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--vit-epochs", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)  # two threads on two shared cores run many times slower than one
    runtime = Runtime(results=args.results.resolve(), data_root=args.data_root.resolve(), device="cpu",
                      progress=False, echo=lambda m: print(m, flush=True))

    def run(method: str, preset: str, sets: list[str], epochs: int | None = None):
        cfg = stages.make_config(method, "cifar10lt", rho=100, preset=preset, epochs=epochs, sets=sets)
        start = time.time()
        record = stages.ensure(cfg, runtime)
        main_head = record.result()["final"]["heads"]["main"]
        print(f"{method} {sets[-1] if sets else ''}: top1 {main_head['top1']:.2f} "
              f"({time.time() - start:.0f}s) -> {record.run_id}", flush=True)
        return record

    erm = run("erm_cnn", "paper", CNN_SHAPE)
    run("ldam_drw", "paper", [*CNN_SHAPE, "drw_epoch=6"])
    ldam_sam = run("ldam_drw", "paper", [*CNN_SHAPE, "drw_epoch=6", "sam_rho=0.8"])
    vit_epochs = args.vit_epochs
    run("erm_vit", "tiny", VIT_SHAPE, epochs=vit_epochs)
    run("deit", "tiny", [*VIT_SHAPE, f"teacher_run={erm.run_id}"], epochs=vit_epochs)
    run("deitlt", "tiny", [*VIT_SHAPE, f"drw_epoch={vit_epochs - 2}", f"teacher_run={ldam_sam.run_id}"],
        epochs=vit_epochs)


if __name__ == "__main__":
    main()
