"""CPU outcome check (issue #21): the released LDAM-DRW script, and Saddle-LongTail's LDAM-DRW + SAM script, beside
``ltbench run --method ldam_drw`` on real CIFAR-10-LT (rho = 100), on the same shortened schedule.

    python scripts/parity/outcome.py pair --recipe ldam_drw --seeds 0 1 2 --scratch /tmp/ltbench-outcome
    python scripts/parity/outcome.py pair --recipe ldam_drw_sam --seeds 0 1 2 --scratch /tmp/ltbench-outcome
    python scripts/parity/outcome.py table --scratch /tmp/ltbench-outcome

``pair`` starts, for each seed, the released side and the ltbench side at the same time (one process each, the same
``--threads`` and ``--workers``) and waits for both; a finished (recipe, side, seed) is not run again. ``run`` is
what ``pair`` starts. ``table`` prints mean +- std per side and checks that both sides followed the same per-epoch lr.
The checkouts come from ``$LTBENCH_REFERENCE_CODE`` (scripts/parity/fetch_reference.md); the data from
``--data-root`` (a folder holding ``cifar-10-batches-py``).

What this driver changes in the released script. It runs a copy of the released repository in the scratch folder
(the checkout is not touched) and changes, in memory or in that copy, only this:

1. Device: ``.cuda()`` is the identity and a CUDA float tensor is a CPU one (this machine has no GPU).
2. Schedule: ``adjust_learning_rate``'s phases (warm-up to epoch 5, x0.01 after 160, x0.0001 after 180 of 200) and
   DRW's ``idx = epoch // 160`` start at the 0-based epochs ltbench's ``--epochs N`` rescaling gives
   (``ltbench.config.rescale_epochs``: at 10 epochs, warm-up epoch 0 at lr/5, x0.01 from 8, x0.0001 from 9, DRW from
   8). Within a phase the released rule is kept (the warm-up rises linearly from lr/5).
3. Evaluation: ``validate`` runs only after the last epoch (an evaluation does not change training: no RNG is drawn,
   no weights change) and is the driver's own loop over the released ``val_loader``, recording per-class accuracy.
   ltbench evaluates only after the last epoch too (``eval_every`` = epochs).
4. Packages this machine lacks (scikit-learn, wandb, scipy) are stubbed when absent: their names import, and calling
   one raises. At these arguments only the replaced ``validate`` (confusion_matrix), ``utils.plot_confusion_matrix``
   (not called) and switched-off options (``--log_results``, ``--rho_schedule linear``) use them.
5. Data: ``./data/cifar-10-batches-py`` links to ``--data-root``'s copy, and torchvision's md5 check is skipped (the
   copy lacks the ``filenames`` key; the pixels are the originals).
6. ``torch.set_num_threads(--threads)``; ``--workers`` is passed as ``-j``; ``-p 1000`` prints less.
7. Timing: ``train`` is wrapped with a clock; img/s = training images / seconds inside ``train``, as ltbench's
   ``images_per_s`` counts only training passes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

RECIPES = {  # recipe: (released folder, released script, its extra arguments, ltbench preset)
    "ldam_drw": ("LDAM-DRW", "cifar_train.py", [], "paper"),
    "ldam_drw_sam": ("Saddle-LongTail", "cifar_train_sam.py", ["--rho", "0.8", "--rho_schedule", "none"], "sam"),
}
RELEASED_ARGS = ["--dataset", "cifar10", "--loss_type", "LDAM", "--train_rule", "DRW", "--imb_type", "exp",
                 "--imb_factor", "0.01", "-p", "1000"]
DRW_LINE = "idx = epoch // 160"


def schedule_points(preset: str, epochs: int) -> dict[str, int]:
    """The 0-based first epochs of warm-up end, the two lr decays and DRW in ltbench's ``--epochs`` rescaling."""
    from ltbench.resolve import hparams_of, make_config

    hp = hparams_of(make_config("ldam_drw", "cifar10lt", rho=100, preset=preset, epochs=epochs))
    first, second = (m - 1 for m in hp.milestones)  # timm applies milestone m from epoch m - 1
    return {"warmup": hp.warmup_epochs, "decay_1": first, "decay_2": second, "drw": hp.drw_epoch,
            "lr": hp.lr, "warmup_lr": hp.warmup_lr}


def released_lr(points: dict[str, int], base_lr: float, epoch: int) -> float:
    """The released ``adjust_learning_rate`` with its phase boundaries moved to ``points``."""
    if epoch < points["warmup"]:
        return base_lr * (1 + 4 * epoch / points["warmup"]) / 5
    if epoch >= points["decay_2"]:
        return base_lr * 0.0001
    if epoch >= points["decay_1"]:
        return base_lr * 0.01
    return base_lr


def patch_cuda_away() -> None:
    import torch

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.FloatTensor = torch.FloatTensor
    torch.cuda.set_device = lambda *a, **k: None


class _Absent(types.ModuleType):
    """A stand-in for a package this machine lacks: importing any of its names works, calling one fails loudly."""

    __path__: list[str] = []

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def absent(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{name} is stubbed by the outcome driver (not installed here)")
        return absent


class _AbsentFinder:
    """Serves ``_Absent`` modules for the named top-level packages and every submodule of them."""

    def __init__(self, tops: set[str]) -> None:
        self.tops = tops

    def find_spec(self, name, path=None, target=None):
        import importlib.machinery

        if name.split(".")[0] in self.tops:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        return _Absent(spec.name)

    def exec_module(self, module):
        pass


def stub_missing(tops: list[str]) -> None:
    import importlib.util

    absent = {top for top in tops if importlib.util.find_spec(top) is None}
    if absent:
        print(f"stubbed (not installed): {sorted(absent)}", flush=True)
        sys.meta_path.append(_AbsentFinder(absent))


def prepare_copy(source: Path, dest: Path, script: str, points: dict[str, int]) -> Path:
    """A copy of the released repository with DRW's start moved (change 2); the checkout is left alone."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(".git", "assets"))
    text = (dest / script).read_text()
    if text.count(DRW_LINE) != 1:
        raise SystemExit(f"{script}: expected one '{DRW_LINE}' line, the released code changed")
    (dest / script).write_text(text.replace(DRW_LINE, f"idx = int(epoch >= {points['drw']})"))
    return dest


def run_released(args: argparse.Namespace, out: Path) -> dict:
    folder, script, extra, preset = RECIPES[args.recipe]
    points = schedule_points(preset, args.epochs)
    work = args.scratch / args.recipe / f"released-seed{args.seed}"
    copy = prepare_copy(Path(os.environ["LTBENCH_REFERENCE_CODE"]) / folder, work / "src", script, points)
    (work / "data").mkdir(parents=True, exist_ok=True)
    link = work / "data" / "cifar-10-batches-py"
    if not link.exists():
        link.symlink_to(args.data_root.resolve() / "cifar-10-batches-py")
    os.chdir(work)
    sys.path.insert(0, str(copy))
    import torch
    import torchvision

    torch.set_num_threads(args.threads)
    patch_cuda_away()
    torchvision.datasets.CIFAR10._check_integrity = lambda self: True
    stub_missing(["sklearn", "wandb", "scipy"])
    sys.argv = [script, *RELEASED_ARGS, *extra, "--epochs", str(args.epochs), "--seed", str(args.seed),
                "-j", str(args.workers)]
    module = __import__(script[:-3])
    log: dict = {"epochs": [], "train_seconds": 0.0, "train_images": 0}
    train = module.train

    def adjust_learning_rate(optimizer, epoch, run_args):
        for group in optimizer.param_groups:
            group["lr"] = released_lr(points, run_args.lr, epoch)

    def timed_train(loader, model, criterion, optimizer, epoch, *rest):
        start = time.perf_counter()
        train(loader, model, criterion, optimizer, epoch, *rest)
        log["train_seconds"] += time.perf_counter() - start
        log["train_images"] += len(loader.dataset)
        weights = getattr(criterion, "weight", None)
        log["epochs"].append({"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                              "drw": weights is not None and float(weights.std()) > 0})
        log["model"] = model

    def final_validate(loader, model, criterion, epoch, *rest, **kwargs):
        if epoch < args.epochs - 1:
            return 0.0
        log["per_class"] = evaluate(model, loader)
        return sum(log["per_class"]) / len(log["per_class"])

    module.adjust_learning_rate, module.train, module.validate = adjust_learning_rate, timed_train, final_validate
    module.main()
    return summary("released", log["per_class"], log["train_images"], log["train_seconds"], log["epochs"], points)


def evaluate(model, loader) -> list[float]:
    import torch

    model.eval()
    correct, total = torch.zeros(10), torch.zeros(10)
    with torch.no_grad():
        for images, labels in loader:
            pred = model(images).argmax(dim=1)
            total += torch.bincount(labels, minlength=10)
            correct += torch.bincount(labels[pred == labels], minlength=10)
    return (100.0 * correct / total).tolist()


def summary(side: str, per_class: list[float], images: int, seconds: float, epochs: list[dict], points: dict) -> dict:
    """Top-1, the shot groups by both of ltbench's rules (counts: many > 100 > medium >= 20 > few; paper: DeiT-LT's
    index ranges head 0-2 / mid 3-6 / tail 7-9) and img/s of one side."""
    from ltbench.datasets.cifar_lt import CIFAR10LT

    from ltbench.data import paper_groups, shot_groups

    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # CIFAR-10-LT rho = 100 (baselines.md)
    rules = {"counts": shot_groups(counts), "paper": paper_groups(10, CIFAR10LT.paper_split)}
    groups = {f"{rule}.{name}": sum(per_class[c] for c in classes) / len(classes)
              for rule, named in rules.items() for name, classes in named.items() if classes}
    return {"side": side, "top1": sum(per_class) / len(per_class), "per_class": per_class, "groups": groups,
            "images_per_s": images / seconds, "train_seconds": seconds, "epochs": epochs, "points": points}


def run_ltbench(args: argparse.Namespace, out: Path) -> dict:
    from ltbench.records import iter_runs

    preset = RECIPES[args.recipe][3]
    results = args.scratch / args.recipe / f"ltbench-seed{args.seed}"
    cmd = ["ltbench", "run", "--method", "ldam_drw", "--dataset", "cifar10lt", "--rho", "100", "--preset", preset,
           "--epochs", str(args.epochs), "--seed", str(args.seed), "--threads", str(args.threads),
           "--workers", str(args.workers), "--data-root", str(args.data_root), "--results", str(results), "--quiet",
           "--set", f"eval_every={args.epochs}"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    (record,) = [r for r in iter_runs(results) if r.done]
    result, why = record.finished_result()
    if result is None:
        raise SystemExit(f"ltbench run unusable: {why}")
    main = result["final"]["heads"]["main"]
    epochs = [{"epoch": row["epoch"] - 1, "lr": row["lr"]} for row in record.metrics()]
    points = schedule_points(preset, args.epochs)
    out_summary = summary("ltbench", main["per_class"], 0, 1.0, epochs, points)
    out_summary.update(images_per_s=result["images_per_s"], train_seconds=result["wall_time_s"],
                       top1_reported=main["top1"], run_id=record.run_id)
    return out_summary


def run_one(args: argparse.Namespace) -> None:
    out = args.scratch / args.recipe / f"{args.side}-seed{args.seed}.json"
    if out.is_file():
        print(f"{out} exists: nothing to run")
        return
    result = (run_released if args.side == "released" else run_ltbench)(args, out)
    result.update(recipe=args.recipe, seed=args.seed, threads=args.threads, workers=args.workers,
                  epochs_run=args.epochs)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)  # a killed run leaves no result a later table would trust


def run_pairs(args: argparse.Namespace) -> None:
    """Each seed's two sides at the same time, one process each, so both see the same machine load."""
    for seed in args.seeds:
        procs = []
        for side in ("released", "ltbench"):
            log = args.scratch / args.recipe / f"{side}-seed{seed}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, "run", "--side", side, "--recipe", args.recipe, "--seed", str(seed),
                   "--epochs", str(args.epochs), "--threads", str(args.threads), "--workers", str(args.workers),
                   "--scratch", str(args.scratch), "--data-root", str(args.data_root)]
            procs.append((side, subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT)))
        for side, proc in procs:
            if proc.wait():
                print(f"{args.recipe} seed {seed} {side}: exit {proc.returncode}, see its .log", flush=True)
        print(f"{time.strftime('%H:%M:%S')} {args.recipe} seed {seed} done", flush=True)


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f} (n = 1)" if values else "-"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def print_table(args: argparse.Namespace) -> None:
    columns = ["top1", "counts.many", "counts.medium", "paper.many", "paper.medium", "paper.few", "images_per_s"]
    print("| recipe | side | seeds | top-1 | many / medium (counts) | head / mid / tail (paper) | img/s |")
    print("|---|---|---|---|---|---|---|")
    for recipe in RECIPES:
        runs = {side: [json.loads(p.read_text()) for p in sorted((args.scratch / recipe).glob(f"{side}-seed*.json"))]
                for side in ("released", "ltbench")}
        for side, rows in runs.items():
            if not rows:
                continue
            cell = {c: mean_std([r["top1"] if c == "top1" else r["images_per_s"] if c == "images_per_s"
                                 else r["groups"][c] for r in rows]) for c in columns}
            seeds = ",".join(str(r["seed"]) for r in rows)
            print(f"| {recipe} | {side} | {seeds} | {cell['top1']} | {cell['counts.many']} / {cell['counts.medium']}"
                  f" | {cell['paper.many']} / {cell['paper.medium']} / {cell['paper.few']} | {cell['images_per_s']} |")
        check_same_schedule(recipe, runs)


def check_same_schedule(recipe: str, runs: dict[str, list[dict]]) -> None:
    lrs = {side: {tuple(round(e["lr"], 12) for e in r["epochs"]) for r in rows} for side, rows in runs.items() if rows}
    if len(lrs) == 2 and lrs["released"] != lrs["ltbench"]:
        print(f"\n{recipe}: the per-epoch lr differs between the sides: {lrs}")
    elif lrs:
        print(f"\n{recipe}: per-epoch lr on both sides {sorted(next(iter(lrs.values())))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "pair", "table"):
        p = sub.add_parser(name)
        p.add_argument("--scratch", type=Path, required=True, help="a folder outside the repository")
        if name == "table":
            continue
        p.add_argument("--recipe", choices=sorted(RECIPES), required=True)
        p.add_argument("--epochs", type=int, default=10)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--workers", type=int, default=0)
        p.add_argument("--data-root", type=Path, default=Path("/work/shared/data"))
        if name == "run":
            p.add_argument("--side", choices=["released", "ltbench"], required=True)
            p.add_argument("--seed", type=int, required=True)
        else:
            p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    if "LTBENCH_REFERENCE_CODE" not in os.environ and args.command != "table":
        raise SystemExit("set LTBENCH_REFERENCE_CODE to the folder of checkouts (scripts/parity/fetch_reference.md)")
    args.scratch = args.scratch.resolve()
    {"run": run_one, "pair": run_pairs, "table": print_table}[args.command](args)


if __name__ == "__main__":
    main()
