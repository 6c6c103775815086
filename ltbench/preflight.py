"""What a command says before it trains: the resolved recipe in one line, the projected wall time on this device,
and the guard that keeps a long CPU run from starting by accident.

The projection is ``ltbench bench``'s made cheap enough to run before every command that trains (a bench step of the
paper recipe on a CPU takes minutes): the run's network alone, built from its hyperparameters with constant weights
(no initialisation to pay for), does forward and backward passes on a batch of constant images on the run's device
and threads, a batch of about PROBE_FLOPS (one image of a ViT-B at 224 px, 128 of the tiny ViT). That time per image,
x the training images of the epochs left to train (x 2 with SAM's second pass), is the projection: a lower bound.
The data pipeline, evaluation, a teacher's forward pass and the optimizer step come on top; for the tiny ViT on
CIFAR-10-LT they took longer than the passes themselves (README, "Set up and run"). A run whose training compute
(FLOPs counted on the meta device, nothing computed) stays under the limit even at FLOOR_FLOPS_PER_S is not timed at
all: tests and tiny runs pay nothing.

On a CPU, a projection past CPU_LIMIT_HOURS needs ``--yes`` (on a terminal, a question instead): the paper recipe of
a ViT, 1,200 epochs at 224 px, would otherwise start quietly on a laptop. GPU runs are not timed or guarded here;
``ltbench bench`` measures them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ltbench.cnn import Classifier
from ltbench.config import RunConfig, uses_sam
from ltbench.errors import UserError
from ltbench.models import vit
from ltbench.projection import images_per_epoch, network_of, train_counts
from ltbench.records import run_state
from ltbench.registry import DATASETS, METHODS
from ltbench.resolve import hparams_of
from ltbench.runtime import Runtime

CPU_LIMIT_HOURS = 1.0  # a CPU run projected past this asks for --yes
# A training rate below any measured on the 2-core development machine (a tiny ViT on two threads shared with other
# jobs: 4 GFLOP/s at 64 images a step), so a run under the limit at this rate is under it for sure, untimed.
FLOOR_FLOPS_PER_S = 0.25e9
PROBE_FLOPS = 25e9  # the probe's step holds about this much compute (a tenth of a second to seconds on a CPU)...
PROBE_MAX_IMAGES = 256  # ...in at most this many images (or the run's batch)
PROBE_STEPS, PROBE_SECONDS = 2, 1.0  # timed: up to 2 steps after the warm-up, while they take less than 1 s in all


@dataclass
class Stage:
    """One run to train: its config, the epochs left, and what they cost."""

    config: RunConfig
    epochs: int
    images: int | None  # training images of those epochs (None: a file-list dataset, counted only when loaded)
    flops_per_image: float | None  # forward + backward (x 2 with SAM); None: a network ltbench cannot build alone
    seconds_per_image: float | None = None  # timed by the probe

    @property
    def flops(self) -> float | None:
        return None if self.images is None or self.flops_per_image is None else self.images * self.flops_per_image

    @property
    def hours(self) -> float | None:
        if self.epochs == 0:
            return 0.0
        if self.images is None or self.seconds_per_image is None:
            return None
        return self.images * self.seconds_per_image * _sam_passes(self.config) / 3600


@dataclass
class Projection:
    stages: list[Stage]
    device: str
    threads: int
    timed: bool = True  # False: --yes was given, nothing to decide
    probed: dict[str, int] = field(default_factory=dict)  # network -> images of its timed step

    @property
    def unknown(self) -> list[Stage]:
        return [s for s in self.stages if s.epochs and (s.images is None or s.flops_per_image is None)]

    @property
    def flops(self) -> float:
        return sum(s.flops or 0.0 for s in self.stages)

    @property
    def hours(self) -> float | None:
        """The projected wall time; None when it was not timed (GPU, clearly small) or a stage has no projection."""
        hours = [s.hours for s in self.stages]
        return None if self.unknown or None in hours else sum(h or 0.0 for h in hours)

    @property
    def clearly_small(self) -> bool:
        return not self.unknown and self.flops / FLOOR_FLOPS_PER_S < CPU_LIMIT_HOURS * 3600

    def text(self) -> str:
        """One line: how long, how it was projected."""
        if not self.stages:
            return "projected: nothing to train"
        runs = f"{len(self.stages)} runs, " if len(self.stages) > 1 else ""
        compute = f"{runs}{flops_text(self.flops)} of training compute"
        if self.unknown:
            names = ", ".join(sorted({s.config.method for s in self.unknown}))
            return (f"projected: n/a for {names} (its network, or its dataset's size, is known only when it trains); "
                    f"{compute} for the rest")
        if self.hours is None:
            return f"projected: {compute} ({self._why_untimed()})"
        timed = ", ".join(f"{net} timed on {k} image(s) a step" for net, k in self.probed.items())
        return (f"projected: at least {duration(self.hours)} on this CPU with {self.threads} thread(s) for {compute} "
                f"(the network's forward and backward passes alone, {timed}, x every training image; data loading, "
                f"augmentation and evaluation come on top)")


    def _why_untimed(self) -> str:
        if not self.timed:
            return "not timed: --yes"
        if self.device != "cpu":
            return "`ltbench bench` measures the time on a GPU"
        return f"under {CPU_LIMIT_HOURS:g} h even at {FLOOR_FLOPS_PER_S / 1e9:g} GFLOP/s, so not timed"


def flops_text(flops: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12)):
        if flops >= scale:
            return f"{flops / scale:,.1f} {unit}"
    return f"{flops / 1e9:,.1f} GFLOP"


def duration(hours: float) -> str:
    if hours >= 48:
        return f"{hours / 24:,.0f} days" if hours < 24 * 365 else f"{hours / 24 / 365:,.1f} years"
    if hours >= 1:
        return f"{hours:.1f} h"
    return f"{hours * 60:.0f} min" if hours * 60 >= 1 else f"{hours * 3600:.0f} s"


# ----------------------------------------------------------------------------------------------
# The recipe


def recipe_line(config: RunConfig, runtime: Runtime) -> str:
    """The resolved recipe in one line, e.g. ``erm_vit on synthetic rho=10, seed 0, preset paper: 1200 epochs of 660
    images, vit-768x12@224/16, batch 1024, lr 0.0005 adamw cosine, 8 loader workers; cpu, 2 threads``."""
    hp = hparams_of(config)
    images = images_per_epoch(config, getattr(hp, "sampler", "instance"))
    data = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in _data_shown(config).items())
    network = _network_text(config.hparams)
    sam = ", SAM" if hp.uses_sam else ""
    workers = runtime.workers if runtime.workers is not None else hp.workers
    device = runtime.torch_device()
    threads = f", {runtime.cpu_threads()} thread(s)" if device.type == "cpu" else ""
    return (f"recipe: {config.method} on {config.dataset}{' ' + data if data else ''}, seed {config.seed}, preset "
            f"{config.preset}: {hp.epochs} epochs{f' of {images:,} images' if images is not None else ''}"
            f"{', ' + network if network else ''}, batch {hp.batch_size}, lr {hp.effective_lr():g} {hp.optimizer} "
            f"{hp.sched}{sam}, {workers} loader workers; {device}{threads}")


def _data_shown(config: RunConfig) -> dict[str, Any]:
    """rho, and the dataset options set away from their defaults."""
    defaults = vars(DATASETS.get(config.dataset).Options())
    return {k: v for k, v in config.data.items() if k == "rho" or defaults.get(k, v) != v}


def _network_text(hparams: dict[str, Any]) -> str | None:
    try:
        return network_of(hparams)
    except KeyError:  # a plugin's own network
        return None


# ----------------------------------------------------------------------------------------------
# The stages and their cost


def stages_to_train(configs: Iterable[RunConfig], results: Path, stop_after: int | None = None) -> list[Stage]:
    """The runs these configs train, upstream runs (teachers) first, each with the epochs left (at most
    ``stop_after``, a time-boxed call); finished runs and runs given by reference train nothing."""
    seen: dict[str, Stage] = {}
    for config in configs:
        _add_stage(config, Path(results), stop_after, seen)
    return list(seen.values())


def _add_stage(config: RunConfig, results: Path, stop_after: int | None, seen: dict[str, Stage]) -> None:
    if config.run_id in seen:
        return
    status, done = run_state(results, config.run_id)
    if status == "done":
        return
    for ref in METHODS.get(config.method).requires(config).values():
        if isinstance(ref, RunConfig):
            _add_stage(ref, results, stop_after, seen)
    hp = hparams_of(config)
    epochs = max(0, hp.epochs - done)
    epochs = epochs if stop_after is None else min(epochs, stop_after)
    per_epoch = images_per_epoch(config, getattr(hp, "sampler", "instance"))
    seen[config.run_id] = Stage(config, epochs, None if per_epoch is None else per_epoch * epochs,
                                _training_flops(config))


def project(stages: Sequence[Stage], runtime: Runtime, timed: bool = True) -> Projection:
    """Time the stages' networks on this device when that can matter (CPU, not clearly small, ``timed``: not
    when --yes has answered already)."""
    device = runtime.torch_device()
    projection = Projection([dataclasses.replace(s) for s in stages], device.type, runtime.cpu_threads(), timed=timed)
    if not timed or device.type != "cpu" or projection.unknown or projection.clearly_small:
        return projection
    timed: dict[str, tuple[float, int]] = {}
    for stage in projection.stages:
        if not stage.epochs:
            continue
        key = _network_text(stage.config.hparams)
        if key not in timed:
            timed[key] = _probe(stage, device, projection.threads)
        stage.seconds_per_image = timed[key][0]
    projection.probed = {key: images for key, (_, images) in timed.items()}
    return projection


def check_length(projection: Projection, yes: bool, ask: Callable[[str], bool] | None, what: str) -> None:
    """Refuse (or ask about) a CPU run projected past the limit, before anything is written. ``ask`` is None when
    nobody can answer (stdin is not a terminal)."""
    hours = projection.hours
    if yes or projection.device != "cpu" or hours is None or hours <= CPU_LIMIT_HOURS:
        return
    training = [s.config for s in projection.stages if s.epochs]
    tiny = all("tiny" in METHODS.get(c.method).presets and not c.preset.startswith("tiny") for c in training)
    smaller = "--preset tiny (the CPU-sized recipe) or fewer --epochs" if tiny else "fewer --epochs"
    question = (f"{what} is projected to take at least {duration(hours)} on this CPU, past the {CPU_LIMIT_HOURS:g} h a "
                f"CPU run starts without asking.")
    if ask is not None and ask(f"{question} Train anyway?"):
        return
    raise UserError(f"{question} Pass --yes to train it anyway, or choose a smaller recipe: {smaller}. Nothing was "
                    f"written.")


# ----------------------------------------------------------------------------------------------
# The network alone


def _network(hparams: dict[str, Any], num_classes: int) -> Any:
    """The run's network as its method builds it, or None for a network ltbench does not know."""
    if hparams.get("arch"):
        return Classifier(hparams["arch"], num_classes, hparams.get("classifier", "linear"))
    if all(k in hparams for k in ("embed_dim", "depth", "num_heads", "patch_size", "img_size")):
        return vit(num_classes=num_classes, img_size=hparams["img_size"], patch_size=hparams["patch_size"],
                   embed_dim=hparams["embed_dim"], depth=hparams["depth"], num_heads=hparams["num_heads"])
    return None


def _training_flops(config: RunConfig) -> float | None:
    """FLOPs of one training image: forward x 3 (the backward pass costs two forwards), x 2 with SAM. Counted on
    the meta device: shapes only, nothing computed."""
    counts = train_counts(config)
    size = config.hparams.get("img_size")
    if counts is None or size is None:
        return None
    try:  # a plugin's arch that ltbench's factory does not know: no projection, never a failed command
        with torch.device("meta"):
            net = _network(dict(config.hparams), len(counts))
    except (UserError, KeyError, ValueError, TypeError):
        return None
    if net is None:
        return None
    try:
        with FlopCounterMode(display=False) as counter:
            net(torch.empty(1, 3, size, size, device="meta"))
    except RuntimeError:  # an op meta tensors do not support (autocast in a cosine classifier): count one real image
        net = _constant(net, torch.device("cpu"))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(torch.full((1, 3, size, size), 0.5))
    return 3.0 * counter.get_total_flops() * _sam_passes(config)


def _constant(net: Any, device: Any) -> Any:
    """A meta-device network materialised on ``device`` with constant weights: what a step costs does not depend
    on them, and no initialisation is paid for."""
    net = net.to_empty(device=device).train()
    with torch.no_grad():
        for tensor in (*net.parameters(), *net.buffers()):
            if tensor.is_floating_point():
                tensor.fill_(0.01)
    return net


def _sam_passes(config: RunConfig) -> int:
    """Forward and backward passes a step makes: two with SAM (its ascent step), else one."""
    return 2 if uses_sam(config.hparams.get("sam_rho") or 0.0, config.hparams.get("sam_rho_steps") or ()) else 1


def _probe(stage: Stage, device: Any, threads: int) -> tuple[float, int]:
    """Seconds per image of a forward and backward pass of the stage's network, and the images of a timed step.

    A step holds about PROBE_FLOPS (at most the run's batch): a smaller one would time per-call overheads that a real
    batch spreads over many images. The first step is a warm-up (on two busy cores it took 10 x the next); then up to
    PROBE_STEPS more while they take less than PROBE_SECONDS in all, and the fastest counts."""
    config = stage.config
    size, counts = config.hparams["img_size"], train_counts(config) or [1, 1]
    with torch.device("meta"):
        net = _constant(_network(dict(config.hparams), len(counts)), device)
    cap = max(1, min(PROBE_MAX_IMAGES, int(config.hparams.get("batch_size") or 1)))
    images = max(1, min(cap, math.ceil(PROBE_FLOPS / (stage.flops_per_image or PROBE_FLOPS))))
    x = torch.full((images, 3, size, size), 0.5, device=device)
    times: list[float] = []
    with _threads(threads):
        net(x).float().sum().backward()
        while len(times) < PROBE_STEPS and sum(times) < PROBE_SECONDS:
            start = time.perf_counter()
            net(x).float().sum().backward()
            times.append(time.perf_counter() - start)
    return min(times) / images, images


@contextlib.contextmanager
def _threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
