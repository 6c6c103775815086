"""The command line's shared pieces: run and runtime options (built from ``Runtime``'s fields), the Runtime a
command gets, and the group that turns a UserError into a one-paragraph message and a non-zero exit."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ltbench.config import RunConfig
from ltbench.data import default_data_root
from ltbench.errors import UserError
from ltbench.runtime import Runtime, cli_fields
from ltbench.terminal import err_console, say
from ltbench.tracking import parse_backends

COMMON_RUN_OPTIONS = [
    click.option("--seed", type=int, default=0, show_default=True, help="Training seed (init, order, augmentation)."),
    click.option("--preset", default=None, help="Hyperparameter preset of the method (see `ltbench list presets`)."),
    click.option("--epochs", type=int, default=None, help="Override the preset's number of epochs."),
    click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                 help="Override a hyperparameter (repeatable); data.KEY=VALUE sets a dataset option."),
]


def runtime_options(func):
    """The shared runtime options, one per :class:`~ltbench.runtime.Runtime` field that declares one."""
    for f in reversed(cli_fields()):
        func = _runtime_option(f)(func)
    return func


def _runtime_option(f) -> Any:
    meta = f.metadata
    decl = meta["cli"] or "--" + f.name.replace("_", "-")
    kwargs: dict[str, Any] = {"help": meta["help"], "show_default": meta.get("show_default", False)}
    if meta.get("flag") and "/" not in decl:  # --download; --quiet sets progress to False
        return click.option(decl, f.name, is_flag=True, flag_value=not f.default, default=f.default, **kwargs)
    if "/" in decl:
        return click.option(decl, f.name, default=f.default, **kwargs)
    if "choices" in meta:
        kwargs["type"] = click.Choice(list(meta["choices"]))
    elif "minimum" in meta:
        kwargs["type"] = click.IntRange(min=meta["minimum"])
    elif f.name in ("results", "data_root"):
        kwargs["type"] = click.Path(path_type=Path)
    return click.option(decl, f.name, default=f.default, **kwargs)


def _log_backends(ctx, param, value) -> tuple[str, ...]:
    try:
        return parse_backends(value)
    except UserError as exc:
        raise click.BadParameter(str(exc)) from exc


LOG_OPTION = click.option(
    "--log", "log", multiple=True, callback=_log_backends, metavar="tensorboard|csv|wandb|mlflow",
    help="Also log each epoch to experiment trackers (repeatable or comma-separated); tensorboard and csv write "
         "into the run folder. Does not change the run id.")


YES_OPTION = click.option(
    "--yes", is_flag=True,
    help="Train even when a CPU run is projected past 1 h, without timing it (without --yes: a question on a "
         "terminal, else a refusal).")


def guard_long_run(configs: Sequence[RunConfig], runtime: Runtime, yes: bool, what: str) -> None:
    """Print the projected wall time of training ``configs`` (and their upstream runs) here; refuse or ask about a CPU
    run past the limit (ltbench.preflight), before anything is written. Not under torchrun: a multi-process launch
    is deliberate, and ranks timing on their own could disagree and leave the others waiting."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    from ltbench import preflight  # here: --help imports no torch

    stages = preflight.stages_to_train(configs, runtime.results, runtime.stop_after_epochs)
    projection = preflight.project(stages, runtime, timed=not yes)
    say(projection.text(), style="dim")
    ask = (lambda question: click.confirm(question, default=False, err=True)) if sys.stdin.isatty() else None
    preflight.check_length(projection, yes, ask, what)


def make_runtime(**options: Any) -> Runtime:
    """A Runtime from the runtime options (and a command's own, e.g. save_logits), paths made absolute."""
    check_device(options["device"])
    data_root = options.get("data_root")
    if data_root is not None and Path(data_root).is_file():
        raise UserError(f"--data-root {data_root} is a file; give the folder that holds the datasets.")
    options["results"] = Path(options["results"]).resolve()
    options["data_root"] = (data_root or default_data_root()).resolve()
    return Runtime(**options, echo=say)


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(device: str) -> None:
    """Refuse a --device torch cannot use here, before any data is loaded."""
    if not DEVICE.fullmatch(device):
        raise UserError(f"--device {device!r} is not a device name: use auto, cpu, cuda, cuda:N or mps.")
    import torch  # here, not at import: --help and listing need no torch
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise UserError(f"--device {device} was asked for, but PyTorch sees no CUDA GPU here. Use --device cpu.")
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise UserError(f"--device {device} was asked for, but PyTorch sees {count} CUDA GPU(s): "
                            f"cuda:0 to cuda:{count - 1}.")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for, but PyTorch sees no Apple-silicon GPU here. Use --device cpu.")


class LTGroup(click.Group):
    """Turns UserError and OSError into a one-paragraph message and a non-zero exit, Ctrl-C into a resume hint.

    ``--debug`` (or LTBENCH_DEBUG=1) shows the traceback instead. ``lazy`` names subcommands by
    ``"module:attribute"`` with their one-line help: the module is imported only when the command runs or shows
    its own help, so ``ltbench --help`` does not import what those commands need (Ray, pandas, torch).
    """

    lazy: dict[str, tuple[str, str]] = {}

    def list_commands(self, ctx) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx, name: str):
        if name not in self.lazy or name in self.commands:
            return super().get_command(ctx, name)
        import importlib

        module, _, attribute = self.lazy[name][0].partition(":")
        command = getattr(importlib.import_module(module), attribute)
        self.add_command(command, name)
        return command

    def format_commands(self, ctx, formatter) -> None:
        from click.utils import make_default_short_help

        names = [n for n in self.list_commands(ctx) if n in self.lazy or not self.commands[n].hidden]
        limit = formatter.width - 6 - max(map(len, names), default=0)
        rows = [(n, make_default_short_help(self.lazy[n][1], limit) if n in self.lazy and n not in self.commands
                 else self.commands[n].get_short_help_str(limit)) for n in names]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx):
        debug = ctx.params.get("debug") or os.environ.get("LTBENCH_DEBUG", "") not in ("", "0")
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # the reader went away (`ltbench list | head`): nothing left to say to it
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
            sys.exit(141)
        except (UserError, OSError) as exc:
            if debug:
                raise
            text = str(exc) if isinstance(exc, UserError) else os_error_text(exc)
            err_console.print(f"[bold red]error:[/] {text}", highlight=False, soft_wrap=True)
            sys.exit(2 if isinstance(exc, UserError) else 1)
        except KeyboardInterrupt:
            if debug:
                raise
            err_console.print("Interrupted. Finished epochs are kept: run the same command again to resume from the "
                              "last checkpoint.", highlight=False, soft_wrap=True)
            sys.exit(130)


def os_error_text(exc: OSError) -> str:
    """One line: the reason and the path(s), e.g. ``Permission denied: results/runs/ab12``."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    reason = exc.strerror or type(exc).__name__
    text = f"{reason}: {paths}" if paths else f"{reason} ({exc})"
    return text + " (--debug shows the traceback)"


