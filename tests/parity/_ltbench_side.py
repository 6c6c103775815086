"""ltbench's side of the parity checks: the ltbench names the checks compare, imported in one place. Stable
low-level modules (ltbench.losses, ltbench.cnn, ltbench.sam,
ltbench.models, ltbench.augment, ltbench.methods.<name>) are imported directly by the tests.

The engine's schedule and SAM-radius rules are methods of :class:`~ltbench.engine.Trainer`; the helpers below call
those methods on a minimal stand-in object that carries only the attributes they read, so the numbers compared are
produced by ltbench's own code, without building a whole run.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ltbench.config import update_offsets
from ltbench.engine import Trainer
from ltbench.records import run_record
from ltbench.registry import EVALUATORS, METHODS
from ltbench.resolve import hparams_of, make_config
from ltbench.runtime import Runtime
from ltbench.seeding import seed_hash
from ltbench.stages import load_data
from ltbench.teacher import teacher_input

__all__ = ["lr_per_step", "preset_hparams", "sam_rho", "seed_hash", "steps_and_offsets", "steps_per_epoch",
           "teacher_input", "trainer"]


def preset_hparams(method: str, dataset: str, preset: str = "paper", sets: tuple[str, ...] = ()) -> Any:
    """The typed, resolved hyperparameters of a method's preset on a dataset (what ``ltbench run`` trains)."""
    return hparams_of(make_config(method, dataset, preset=preset, sets=list(sets)))


def build_scheduler(hp: Any, optimizer: Any, steps_per_epoch: int) -> Any:
    """The timm scheduler the engine builds for ``hp`` (``Trainer._build_scheduler``)."""
    return Trainer._build_scheduler(SimpleNamespace(hp=hp, optimizer=optimizer, steps_per_epoch=steps_per_epoch))


class _Split:
    def __init__(self, labels: Any) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)


def steps_per_epoch(hp: Any, labels: Any, world: int = 1) -> int:
    """Optimizer steps of one epoch as the engine counts them (``Trainer._steps_per_epoch``)."""
    return steps_and_offsets(hp, labels, world)[0]


def steps_and_offsets(hp: Any, labels: Any, world: int = 1) -> tuple[int, list[float]]:
    """Optimizer steps of one epoch, and where each reads a per-step schedule (``config.update_offsets``), as the
    engine computes them in ``Trainer.__init__``."""
    fake = SimpleNamespace(hp=hp, data=SimpleNamespace(train=_Split(labels)), dist=SimpleNamespace(world=world))
    fake._sampler = lambda: Trainer._sampler(fake)
    steps = Trainer._steps_per_epoch(fake)
    return steps, update_offsets(hp, steps, fake.epoch_images)


def lr_per_step(hp: Any, optimizer: Any, steps: int, epochs: range, offsets: list[float] | None = None) -> list[float]:
    """The lr of every optimizer step of ``epochs``, stepped as ``Trainer.train_epoch`` steps the schedule:
    ``scheduler.step(epoch)`` per epoch, or ``step_update(epoch * steps + offsets[step])`` before each step
    (``offsets`` from :func:`steps_and_offsets`; by default the step itself)."""
    offsets = list(range(steps)) if offsets is None else offsets
    scheduler = build_scheduler(hp, optimizer, steps)
    out = []
    for epoch in epochs:
        if not hp.sched_per_step:
            scheduler.step(epoch)
        for step in range(steps):
            if hp.sched_per_step:
                scheduler.step_update(epoch * steps + offsets[step])
            out.append(optimizer.param_groups[0]["lr"])
    return out


def sam_rho(hp: Any, epoch: int) -> float:
    """The SAM radius of a 0-based epoch (``Trainer._sam_rho``)."""
    return Trainer._sam_rho(SimpleNamespace(hp=hp), epoch)


def trainer(method: str, dataset: str, tmp_path: Path, preset: str = "tiny", sets: tuple[str, ...] = ()) -> Any:
    """A real :class:`~ltbench.engine.Trainer` on CPU (data from ``dataset``, e.g. the generated ``synthetic``)."""
    config = make_config(method, dataset, preset=preset, sets=list(sets))
    runtime = Runtime(results=tmp_path, data_root=tmp_path, device="cpu", progress=False, echo=lambda *_: None)
    data = load_data(config, runtime)
    return Trainer(config, hparams_of(config), METHODS.get(method), data, EVALUATORS.get("longtail")(),
                   run_record(tmp_path, config), runtime, {})
