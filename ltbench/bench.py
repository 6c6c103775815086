"""``ltbench bench``: time the real training step end to end and model-only, side by side.

The bench builds the same :class:`~ltbench.engine.Trainer` a run builds (same config resolution, data,
method, optimizer, SAM, EMA, precision, micro-batching) and drives ``Trainer.step`` with the engine's own
input path (``Trainer._train_batches``: device augmentation or loader workers, per ``--augment-on``).
It then repeats ``Trainer.step`` on one pre-made batch already on the device, so the ratio of the two rates
is what the input path costs. Nothing is written to the results folder; a teacher that has not been
trained yet is replaced by a randomly initialised stand-in of the same architecture (same FLOPs).

Timing: the device is synchronised only at the edges of each timed region. "Data wait" is the host time
spent blocked on the next batch for loader workers, and the GPU time of the augmentation kernels
(CUDA events, read after the timed region) for device augmentation.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ltbench import stages
from ltbench.augment import group_steps, to_device
from ltbench.config import RunConfig
from ltbench.engine import Trainer
from ltbench.errors import UserError
from ltbench.method import Upstream
from ltbench.records import RunRecord, atomic_write_json, find_run, run_record
from ltbench.registry import METHODS
from ltbench.resolve import hparams_of
from ltbench.runtime import Runtime


def bench(config: RunConfig, runtime: Runtime, *, steps: int = 10, warmup: int | None = None) -> dict[str, Any]:
    """Measure ``steps`` optimizer steps end to end and model-only after ``warmup`` (default ``steps``) of each."""
    if steps < 1:
        raise UserError("--steps must be at least 1.")
    warmup = steps if warmup is None else warmup
    hp = hparams_of(config)
    if hp.epochs == 0:
        raise UserError(f"{config.method} trains nothing (epochs=0): there is no training step to time; its run only "
                        f"evaluates (`ltbench run` takes about one evaluation of the test split).")
    data = stages.load_data(config, runtime)
    with tempfile.TemporaryDirectory(prefix="ltbench-bench-") as scratch:
        upstream, stand_ins = _upstream(config, runtime, data.info, Path(scratch))
        record = run_record(Path(scratch) / "student", config)  # never written: the bench keeps no run
        trainer = stages.build_trainer(config, runtime, upstream, data=data, record=record, hp=hp)
        trainer.method.on_epoch_start(0)
        trainer.method.trainable().train()
        device = trainer.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stream = _steps(trainer)
        try:
            end_to_end, last_batch = _time_end_to_end(trainer, stream, warmup, steps)
        finally:
            stream.close()
        fixed = [(to_device(x, device), to_device(y, device)) for x, y in last_batch[0]]
        flops = _count_flops(trainer, fixed, last_batch[1])
        model_only = _time_model_only(trainer, fixed, last_batch[1], warmup, steps)
        evaluation = _time_evaluation(trainer, batches=max(2, steps))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return _report(config, hp, trainer, end_to_end, model_only, evaluation, flops, peak, stand_ins, steps,
                       warmup)


def bench_pipeline(config: RunConfig, runtime: Runtime, *, steps: int = 10, warmup: int | None = None
                   ) -> dict[str, Any]:
    """``bench`` of a run and, depth first, of every upstream stage it would train (teachers), with the
    projected wall time of the whole pipeline (every stage's training and evaluation, run one after another).
    Stages already finished in the results folder (or given as ``teacher_run``) count 0 h."""
    report = bench(config, runtime, steps=steps, warmup=warmup)
    stages_ = {}
    for role, ref in METHODS.get(config.method).requires(config).items():
        # a run given by id or folder, or one already finished in --results, is not trained again: 0 h
        if isinstance(ref, str) or run_record(runtime.results, ref).done:
            stages_[role] = {"already_trained": True, "run_id": getattr(ref, "run_id", ref),
                             "pipeline_projected_hours": 0.0}
            continue
        stages_[role] = bench_pipeline(ref, runtime, steps=steps, warmup=warmup)
    report["upstream_benches"] = stages_
    report["pipeline_projected_hours"] = report["projected_hours"] + sum(
        sub["pipeline_projected_hours"] for sub in stages_.values())
    return report


# ----------------------------------------------------------------------------------------------
# Inputs


def _steps(trainer: Trainer) -> Iterator[tuple[list, int]]:
    """(micro-batches, global batch size) of consecutive optimizer steps, epoch after epoch, from the
    engine's own per-epoch input path."""
    for epoch in itertools.count():
        batches = trainer._train_batches(epoch)
        sampler = batches.batch_sampler
        for micro_batches, (_, size) in zip(group_steps(batches, sampler.group_sizes), sampler.steps):
            yield micro_batches, size


def _upstream(config: RunConfig, runtime: Runtime, info, scratch: Path) -> tuple[dict[str, Upstream], list[str]]:
    """Finished upstream runs from the results folder; missing ones get a random-weight stand-in."""
    upstream, stand_ins = {}, []
    for role, ref in METHODS.get(config.method).requires(config).items():
        if isinstance(ref, str):
            record = find_run(runtime.results, ref)
            upstream[role] = Upstream(record.config(), record)
            continue
        record = run_record(runtime.results, ref)
        if not record.done:
            record = _stand_in(ref, info, scratch)
            stand_ins.append(role)
        upstream[role] = Upstream(ref, record)
    return upstream, stand_ins


def _stand_in(config: RunConfig, info, scratch: Path) -> RunRecord:
    """A finished-looking run folder holding a freshly initialised model of ``config``'s method."""
    method_cls = METHODS.get(config.method)
    if method_cls.requires(config):
        raise UserError(f"The bench cannot stand in for {config.method}: it needs upstream runs of its own. "
                        f"Train it first (ltbench run) and point --results at its folder.")
    record = run_record(scratch / "upstream", config)
    record.path.mkdir(parents=True, exist_ok=True)
    method = method_cls(hparams_of(config), info, torch.device("cpu"), {})
    atomic_write_json(record.path / "config.json", config.to_dict())
    modules = {name: module.state_dict() for name, module in method.state_modules().items()}
    record.write_checkpoint({"modules": modules}, config)
    atomic_write_json(record.path / "result.json", {"class_counts": list(info.train_counts), **method.describe()})
    record.mark_done()
    return record


# ----------------------------------------------------------------------------------------------
# Timed regions


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _DataTimer:
    """Time spent producing batches: host wall time, or GPU time when augmentation runs on the GPU."""

    def __init__(self, trainer: Trainer) -> None:
        self.on_gpu = trainer.device.type == "cuda" and getattr(trainer, "device_inputs", None) is not None
        self.host_s, self.events = 0.0, []

    @contextlib.contextmanager
    def measure(self):
        if self.on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
            return
        t0 = time.perf_counter()
        yield
        self.host_s += time.perf_counter() - t0

    def seconds(self) -> float:  # after the region's final synchronisation
        return sum(s.elapsed_time(e) for s, e in self.events) / 1000 if self.on_gpu else self.host_s


def _time_end_to_end(trainer: Trainer, stream: Iterator, warmup: int, steps: int) -> tuple[dict[str, float], Any]:
    batch = None
    for _ in range(warmup):
        batch = next(stream)
        trainer.step(batch[0], 0, global_size=batch[1])
    timer, images = _DataTimer(trainer), 0
    _sync(trainer.device)
    start = time.perf_counter()
    for _ in range(steps):
        with timer.measure():
            batch = next(stream)
        trainer.step(batch[0], 0, global_size=batch[1])
        images += sum(len(y) for _, y in batch[0])
    _sync(trainer.device)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "images": images, "data_s": timer.seconds()}, batch


def _time_model_only(trainer: Trainer, fixed: list, size: int, warmup: int, steps: int) -> dict[str, float]:
    for _ in range(warmup):
        trainer.step(fixed, 0, global_size=size)
    _sync(trainer.device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(fixed, 0, global_size=size)
    _sync(trainer.device)
    return {"wall_s": time.perf_counter() - start, "images": steps * sum(len(y) for _, y in fixed)}


def _time_evaluation(trainer: Trainer, batches: int) -> dict[str, float]:
    """The engine's evaluation path (eval loader with its workers, bf16 on GPU, every head) over its first
    ``batches`` batches, after one untimed batch."""
    loader = trainer._eval_loader()
    for module in trainer.method.state_modules().values():
        module.eval()
    trainer.predict(itertools.islice(iter(loader), 1))
    _sync(trainer.device)
    start = time.perf_counter()  # loading and decoding included, as in a real evaluation
    _, labels = trainer.predict(itertools.islice(iter(loader), batches))
    _sync(trainer.device)
    trainer.method.trainable().train()
    return {"wall_s": time.perf_counter() - start, "images": len(labels)}


def _count_flops(trainer: Trainer, fixed: list, size: int) -> int:
    """FLOPs of one whole optimizer step (teacher forward, student forward and backward, SAM's second pass),
    counted eagerly from the aten ops torch dispatches."""
    from torch.utils.flop_counter import FlopCounterMode

    stance = torch.compiler.set_stance("force_eager") if trainer.runtime.compile else contextlib.nullcontext()
    with stance, FlopCounterMode(display=False) as counter:
        trainer.step(fixed, 0, global_size=size)
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------
# Report


def _report(config: RunConfig, hp, trainer: Trainer, end_to_end: dict[str, float], model_only: dict[str, float],
            evaluation: dict[str, float], flops: int, peak_gib: float | None, stand_ins: list[str], steps: int,
            warmup: int) -> dict[str, Any]:
    device = trainer.device
    on_device = getattr(trainer, "device_inputs", None) is not None
    per_step_images = model_only["images"] / steps
    e2e_ips = end_to_end["images"] / end_to_end["wall_s"]
    model_ips = model_only["images"] / model_only["wall_s"]
    flops_per_image = flops / per_step_images
    step_rate = steps / end_to_end["wall_s"]
    total_steps = trainer.steps_per_epoch * hp.epochs
    train_hours = total_steps / step_rate / 3600
    evaluations = sum(trainer.evaluates_after(epoch) for epoch in range(hp.epochs))
    eval_ips = evaluation["images"] / evaluation["wall_s"]
    eval_hours = evaluations * len(trainer.data.test) / eval_ips / 3600
    return {
        "method": config.method,
        "dataset": config.dataset,
        "preset": config.preset,
        "run_id": config.run_id,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "input_path": "device" if on_device else "loader",
        "workers": None if on_device else trainer._workers(),
        "global_batch": hp.batch_size,
        "micro_batch": trainer.micro,
        "precision": str(trainer.amp).removeprefix("torch.") if trainer.amp else "float32",
        "compile": trainer.runtime.compile,
        "compile_mode": trainer.runtime.compile_mode if trainer.runtime.compile else None,
        "cuda_graphs": trainer.cuda_graphs,
        "steps": steps,
        "warmup_steps": warmup,
        "stand_in_upstream": stand_ins,
        "images_per_s_end_to_end": e2e_ips,
        "images_per_s_model_only": model_ips,
        "end_to_end_over_model_only": e2e_ips / model_ips,
        "data_wait_fraction": min(1.0, end_to_end["data_s"] / end_to_end["wall_s"]),
        "step_s_end_to_end": end_to_end["wall_s"] / steps,
        "step_s_model_only": model_only["wall_s"] / steps,
        "flops_per_image": flops_per_image,
        "tflops_end_to_end": flops_per_image * e2e_ips / 1e12,
        "tflops_model_only": flops_per_image * model_ips / 1e12,
        "peak_gpu_memory_gib": peak_gib,
        "steps_per_epoch": trainer.steps_per_epoch,
        "epochs": hp.epochs,
        "images_per_s_eval": eval_ips,
        "eval_every": trainer.eval_every,
        "evaluations": evaluations,
        "projected_train_hours": train_hours,
        "projected_eval_hours": eval_hours,
        "projected_hours": train_hours + eval_hours,
        "eval_share": eval_hours / (train_hours + eval_hours),
        "projection": "optimizer steps of the full schedule at the end-to-end rate, plus every scheduled "
                      "evaluation of the test split at the measured evaluation rate",
    }


def format_report(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows for the terminal."""
    def num(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    workers = "" if report["workers"] is None else f" ({report['workers']} workers)"
    return [
        ("setup", f"{report['method']} on {report['dataset']}, preset {report['preset']}, {report['device']}"
                  f"{' (' + report['gpu'] + ')' if report['gpu'] else ''}, {report['precision']}"),
        ("batch", f"global {report['global_batch']}, micro {report['micro_batch']}, input path "
                  f"{report['input_path']}{workers}, "
                  f"{report['steps']} timed steps after {report['warmup_steps']} warm-up"),
        ("img/s end to end", num(report["images_per_s_end_to_end"], ",.1f")),
        ("img/s model only", num(report["images_per_s_model_only"], ",.1f")),
        ("end to end / model only", num(report["end_to_end_over_model_only"], ".3f")),
        ("time waiting for data", num(100 * report["data_wait_fraction"], ".1f") + " %"),
        ("GFLOP per image (step)", num(report["flops_per_image"] / 1e9, ".3f")),
        ("TFLOP/s end to end", num(report["tflops_end_to_end"], ".3f")),
        ("TFLOP/s model only", num(report["tflops_model_only"], ".3f")),
        ("peak GPU memory", num(report["peak_gpu_memory_gib"], ".2f") + (" GiB" if report["peak_gpu_memory_gib"]
                                                                         is not None else "")),
        ("img/s evaluation", num(report["images_per_s_eval"], ",.1f")),
        ("projected training time", f"{_duration(report['projected_train_hours'])} for {report['epochs']} epochs x "
                                    f"{report['steps_per_epoch']} steps"),
        ("projected evaluation time", f"{_duration(report['projected_eval_hours'])} for {report['evaluations']} "
                                      f"evaluations (every {report['eval_every']} epochs; "
                                      f"{100 * report['eval_share']:.1f} % of the total)"),
        ("projected total", _duration(report["projected_hours"])),
        *([("note", f"random-weight stand-in for: {', '.join(report['stand_in_upstream'])}")]
          if report["stand_in_upstream"] else []),
        *_pipeline_rows(report),
    ]


def _pipeline_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    if "upstream_benches" not in report:
        return []
    rows = []
    for role, sub in report["upstream_benches"].items():
        if sub.get("already_trained"):
            rows.append((f"{role}", f"run {sub['run_id']} already trained: 0 h"))
            continue
        rows += [(f"{role}: {label}", value) for label, value in format_report(sub)
                 if label in {"setup", "img/s end to end", "projected total", "pipeline total"}]
    return [*rows, ("pipeline total", f"{_duration(report['pipeline_projected_hours'])} (every stage, one after "
                                      f"another, evaluation included)")]


def _duration(hours: float) -> str:
    if hours >= 1:
        return f"{hours:,.2f} h"
    minutes = hours * 60
    return f"{minutes:.1f} min" if minutes >= 1 else f"{minutes * 60:.1f} s"
