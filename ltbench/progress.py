"""What a person or a batch job sees while a run trains.

On a terminal a live bar shows the epoch in progress and the ETA of the whole run, and every evaluated
epoch leaves a line on screen. Anywhere else (a pipe, nohup, SLURM, CI, a sweep trial's log) or with
``--quiet`` there is no bar: every epoch prints one line (epoch, loss, lr, img/s, elapsed, ETA of the
run) and evaluations print their results. The same rows go to the experiment trackers (``--log``), and every
line a run prints also goes to its folder's ``log.txt`` (:class:`RunLog`), so a sweep trial's lines are found
beside its results rather than in Ray's worker logs.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ltbench import tracking
from ltbench.records import LOG

if TYPE_CHECKING:
    import torch

    from ltbench.config import RunConfig
    from ltbench.records import RunRecord

# Where the bar draws and how a terminal is recognised; status lines go to stderr too (runtime.echo).
stderr_console = Console(stderr=True)


class RunLog:
    """An ``echo`` that also appends to the run folder's ``log.txt``: lines said before the folder exists wait in
    memory until :meth:`open`; each training session starts with a dated header line. Use as a context manager."""

    def __init__(self, echo: Callable[[str], Any]) -> None:
        self.echo = echo
        self.pending: list[str] = []
        self.file: Any = None

    def __call__(self, line: str) -> None:
        self.echo(line)
        self._write(str(line))

    def open(self, folder: Path, header: str) -> None:
        """Start appending to ``folder/log.txt`` (the folder exists by now), with the lines said so far."""
        self.file = (folder / LOG).open("a", encoding="utf-8")
        self._write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {header}")
        for line in self.pending:
            self._write(line)
        self.pending.clear()

    def failed(self) -> None:
        """Append the exception being handled, so a failed trial's log shows why it stopped."""
        self._write(traceback.format_exc().rstrip())

    def _write(self, line: str) -> None:
        if self.file is None:
            self.pending.append(line)
            return
        self.file.write(line + "\n")
        self.file.flush()  # a killed run keeps every line it printed

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.file is not None:
            self.file.close()


def clock(seconds: float) -> str:
    """``h:mm:ss``."""
    return str(timedelta(seconds=round(max(0.0, seconds))))


def run_eta(elapsed_s: float, epochs_done: int, epochs_left: int) -> float:
    """Seconds left for the whole run at the mean wall time of the epochs done so far (evaluations included)."""
    return elapsed_s / max(1, epochs_done) * epochs_left


def epoch_line(row: dict[str, Any], epochs: int, elapsed_s: float, eta_s: float) -> str:
    return (f"epoch {row['epoch']}/{epochs}  loss {row['train'].get('loss', float('nan')):.4f}  "
            f"lr {row['lr']:.2e}  {row.get('images_per_s', 0.0):,.0f} img/s  "
            f"elapsed {clock(elapsed_s)}  ETA {clock(eta_s)}")


def eval_line(row: dict[str, Any]) -> str:
    """The main head's top-1 and many/medium/few (training-count groups), then every other head's top-1."""
    heads = dict(row["eval"])
    main = heads.pop("main")
    groups = "  ".join(f"{g} {_pct(v)}" for g, v in (main.get("counts") or {}).items())
    others = "  ".join(f"{head} {_pct(m['top1'])}" for head, m in heads.items())
    val = f"  |  val top-1 {_pct(row['val']['main']['top1'])}" if "val" in row else ""
    return (f"  test after epoch {row['epoch']}: top-1 {_pct(main['top1'])}  {groups}"
            + (f"  |  top-1 by head: {others}" if others else "") + val)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


class RunMonitor:
    """Reports one run's epochs to the screen or log and to the trackers; use as a context manager."""

    def __init__(self, history: list[dict[str, Any]], *, epochs: int, steps_per_epoch: int,
                 lr: Callable[[], float], record: RunRecord, config: RunConfig, main: bool = True,
                 progress: bool = True, echo: Callable[[str], Any] = print, log: Sequence[str] = ()) -> None:
        """``history``: the metrics rows already on disk; ``lr``: reads the optimizer's current lr (for the bar);
        ``main``: this process reports (rank 0); ``progress``: a live bar on a terminal; ``log``: trackers."""
        self.history = list(history)
        self.epochs, self.steps_per_epoch, self.lr = epochs, steps_per_epoch, lr
        self.record, self.config, self.log = record, config, tuple(log)
        self.main = main
        self.live = progress and self.main and stderr_console.is_terminal
        self.echo = echo
        self.trackers: list[tracking.Tracker] = []
        self.start, self.epochs_done = time.perf_counter(), 0

    def __enter__(self) -> RunMonitor:
        if self.main:
            self.trackers = tracking.open_trackers(self.log, self.record, self.config, self.history)
        self.start = time.perf_counter()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for tracker in self.trackers:
            tracker.close(failed=exc_type is not None)

    def mean_epoch_s(self) -> float | None:
        return (time.perf_counter() - self.start) / self.epochs_done if self.epochs_done else None

    def epoch_done(self, row: dict[str, Any]) -> None:
        """After an epoch's training, evaluation (if due) and checkpoint."""
        self.epochs_done += 1
        if not self.main:
            return
        elapsed = time.perf_counter() - self.start
        evaluated = "eval" in row
        if not self.live or evaluated:  # the live bar is transient: evaluated epochs stay on screen
            eta = run_eta(elapsed, self.epochs_done, self.epochs - row["epoch"])
            self.echo(epoch_line(row, self.epochs, elapsed, eta))
        if evaluated:
            self.echo(eval_line(row))
        for tracker in self.trackers:
            tracker.log_epoch(row)

    def epoch_bar(self, epoch: int) -> EpochBar:
        return EpochBar(self, epoch)


class EpochBar:
    """The live bar of one epoch; reads device values (a host sync) at most every ``every_s`` seconds, so fast
    small-model steps keep the GPU queue full."""

    every_s = 2.0

    def __init__(self, monitor: RunMonitor, epoch: int) -> None:
        self.monitor, self.epoch = monitor, epoch
        self.steps = monitor.steps_per_epoch
        self.last_read = -float("inf")

    def __enter__(self):
        if not self.monitor.live:
            return lambda *args: None
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[stats]}"),
                            TimeElapsedColumn(), console=stderr_console, transient=True)
        self.bar.__enter__()
        self.task = self.bar.add_task(f"epoch {self.epoch + 1}/{self.monitor.epochs}", total=self.steps, stats="")
        return self.update

    def update(self, step: int, sums: dict[str, torch.Tensor], images: int, elapsed: float) -> None:
        stats = None
        if elapsed - self.last_read >= self.every_s or step + 1 == self.steps:
            self.last_read = elapsed
            loss = float(sums.get("loss", 0.0)) / (step + 1)
            lr = self.monitor.lr()
            stats = (f"loss {loss:.4f}  lr {lr:.2e}  {images / max(elapsed, 1e-9):,.0f} img/s  "
                     f"run ETA {clock(self._run_eta(step, elapsed))}")
        self.bar.update(self.task, completed=step + 1, **({"stats": stats} if stats else {}))

    def _run_eta(self, step: int, elapsed: float) -> float:
        this_epoch = elapsed / (step + 1) * self.steps
        per_epoch = self.monitor.mean_epoch_s() or this_epoch
        return max(0.0, this_epoch - elapsed) + per_epoch * (self.monitor.epochs - self.epoch - 1)

    def __exit__(self, *exc) -> None:
        if self.monitor.live:
            self.bar.__exit__(*exc)
