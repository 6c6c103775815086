"""How a run is executed, never what it computes: :class:`Runtime`, the one source of truth for runtime options.

Every runtime option is a field of :class:`Runtime`. The CLI builds its ``--options`` from the fields' ``cli``
metadata (:func:`cli_fields`), the run id leaves them out (:data:`RUNTIME_OPTIONS`, derived here), a reproduction
suite's ``runtime:`` block may set the ones marked ``suite``, and a sweep trial or a spawned process rebuilds the
Runtime from :meth:`Runtime.portable`. Values are validated in ``__post_init__``, before any run folder exists.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ltbench.data import default_data_root
from ltbench.errors import UserError

if TYPE_CHECKING:
    import torch

# torch.compile modes -> whether the mode replays compiled graphs as CUDA graphs (cudagraph trees)
COMPILE_MODES = {"default": False, "max-autotune-no-cudagraphs": False, "reduce-overhead": True, "max-autotune": True}
AUGMENT_ON = ("auto", "device", "cpu")
TRACKERS = ("tensorboard", "csv", "wandb", "mlflow")  # ltbench.tracking has one adapter per name


def _option(default: Any, help: str, *, cli: str | None = "", suite: bool = False, **extra: Any) -> Any:
    """A Runtime field. ``cli``: its declaration ("" = ``--field-name``; None = no option of the shared set);
    ``suite``: a reproduction suite's ``runtime:`` block may set it; ``extra``: choices, minimum, flag settings."""
    return field(default=default, metadata={"help": help, "cli": cli, "suite": suite, **extra})


@dataclass
class Runtime:
    """How to run, as opposed to what to run: none of this changes the run id."""

    data_root: Path = _option(None, "Folder with the datasets (default: $LTBENCH_DATA or ./data).")
    results: Path = _option(Path("results"), "Results folder; runs go to RESULTS/runs/<run_id>/.", show_default=True)
    device: str = _option("auto", "auto, cpu, cuda or cuda:N.", suite=True, show_default=True)
    compile: bool = _option(False, "torch.compile the trained model.", cli="--compile/--no-compile", suite=True)
    compile_mode: str = _option("default", "torch.compile mode (implies --compile); reduce-overhead and max-autotune "
                                "replay each training step's kernels as CUDA graphs (small models are launch-bound).",
                                suite=True, choices=tuple(COMPILE_MODES), show_default=True)
    micro_batch: int = _option(0, "Per-device forward batch; gradients accumulate to the preset's batch (refused for "
                                  "BatchNorm models, whose statistics it would change).", suite=True, minimum=0)
    workers: int | None = _option(None, "Data-loader worker processes.", suite=True, minimum=0)
    download: bool = _option(False, "Download the dataset first if it is missing (needs internet).", flag=True)
    augment_on: str = _option("auto", "Where per-image augmentation runs; auto = on the GPU for in-memory datasets.",
                              suite=True, choices=AUGMENT_ON, show_default=True)
    threads: int | None = _option(None, "Torch CPU threads (default: the CPUs this process may use; in a sweep, each "
                                  "run's CPUs).", minimum=1)
    progress: bool = _option(True, "No live progress bar: one line per epoch instead, as in a log.", cli="--quiet",
                             flag=True)
    # options of the commands that train (run, sweep), declared there; the library takes them here
    save_logits: bool = _option(False, "Also save the final test logits (test_logits.npz).", cli=None)
    stop_after_epochs: int | None = _option(None, "Stop after N epochs, resumable (time-boxed jobs).", cli=None,
                                            minimum=1)
    log: tuple[str, ...] = _option((), "Experiment trackers, names from ltbench.runtime.TRACKERS.", cli=None)
    echo: Callable[[str], Any] = field(default=print, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Refuse impossible values here, before a run folder exists (a sweep's grid or a suite can set them too)."""
        self.data_root = default_data_root() if self.data_root is None else self.data_root
        for f in cli_fields(all_fields=True):
            value, least = getattr(self, f.name), f.metadata.get("minimum")
            if least is not None and value is not None and value < least:
                raise UserError(f"{f.name} must be >= {least}, got {value}.")
        _refuse_choice("--compile-mode", self.compile_mode, tuple(COMPILE_MODES))
        _refuse_choice("--augment-on", self.augment_on, AUGMENT_ON)
        unknown = [name for name in self.log if name not in TRACKERS]
        if unknown:
            raise UserError(f"--log {unknown[0]!r} is not a tracker; choose from {', '.join(TRACKERS)}.")
        self.log = tuple(self.log)
        self.compile = bool(self.compile or self.compile_mode != "default")  # a mode implies compiling

    def cpu_threads(self) -> int:
        """``threads``, else torch's default (all cores) capped by the CPUs this process may run on (its CPU
        affinity: a taskset, SLURM or container allocation), so concurrent runs do not oversubscribe."""
        if self.threads:
            return self.threads
        import torch  # deferred on purpose: config imports this module, and reports must not need torch

        allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(torch.get_num_threads(), allowed))

    def torch_device(self) -> torch.device:
        import torch  # deferred on purpose (see cpu_threads)

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def portable(self) -> dict[str, Any]:
        """A picklable copy for another process (a sweep trial, a spawned rank): absolute paths, no callables,
        no live bar."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "echo"}
        values["results"] = Path(values["results"]).resolve()
        values["data_root"] = Path(values["data_root"]).resolve()
        values["progress"] = False
        return values

    @classmethod
    def from_portable(cls, values: Mapping[str, Any], echo: Callable[[str], Any] = print) -> Runtime:
        return cls(**values, echo=echo)

    def describe(self) -> dict[str, str]:
        """The options as text, for env.json."""
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "echo"}


def _refuse_choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{option} must be one of {', '.join(allowed)}, not {value!r}.")


def cli_fields(all_fields: bool = False) -> list[dataclasses.Field]:
    """The fields the shared runtime options of the CLI declare (with ``all_fields``: every option field)."""
    fields = [f for f in dataclasses.fields(Runtime) if f.name != "echo"]
    return fields if all_fields else [f for f in fields if f.metadata["cli"] is not None]


def option_name(name: str) -> str:
    """The command-line spelling of a runtime option (``progress`` is ``--quiet``, ``compile`` ``--compile``)."""
    f = next(f for f in cli_fields(all_fields=True) if f.name == name)
    declared = f.metadata["cli"] or "--" + name.replace("_", "-")
    return declared.split("/")[0]


def suite_keys() -> tuple[str, ...]:
    """Runtime options a reproduction suite's ``runtime:`` block may set."""
    return tuple(f.name for f in cli_fields() if f.metadata["suite"])


# Never part of a run id, however they are given (a CLI option, --set, a sweep grid, teacher_overrides): changing
# them reuses or resumes the same run. A hyperparameter field of one of these names (workers: the preset's loader
# processes) is recorded in config.json but not hashed.
RUNTIME_OPTIONS = frozenset(f.name for f in cli_fields(all_fields=True))
