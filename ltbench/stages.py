"""From user intent to finished run folders: resolve a config, then train it and its upstream runs once.

``ensure`` is the single entry point used by ``ltbench run``, by every sweep trial and by methods
that need a teacher: a finished run (``DONE``) is reused, an interrupted one resumes from its
checkpoint, a missing one is trained, and upstream runs (teachers) are ensured first, recursively.
A file lock per run folder makes concurrent trials that share a teacher train it only once.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import secrets
import subprocess
from pathlib import Path
from typing import Any

import numpy
import timm
import torch
import torchvision

import ltbench
from ltbench import config as cfgmod
from ltbench import distributed
from ltbench.config import RunConfig
from ltbench.data import LTData
from ltbench.engine import Trainer
from ltbench.errors import UserError
from ltbench.evaluate import DEFAULT_EVALUATOR
from ltbench.method import Upstream
from ltbench.progress import RunLog
from ltbench.records import RunRecord, atomic_write_json, epochs_logged, find_run, run_record, run_state, runs_dir
from ltbench.registry import DATASETS, EVALUATORS, METHODS
from ltbench.resolve import hparams_of
from ltbench.runtime import Runtime


def load_data(config: RunConfig, runtime: Runtime) -> LTData:
    dataset_cls = DATASETS.get(config.dataset)
    options = cfgmod.apply_overrides(dataset_cls.Options(), dict(config.data), "dataset option")
    if runtime.download and hasattr(dataset_cls, "download"):
        dataset_cls.download(runtime.data_root)
    return dataset_cls(options, runtime.data_root).load()


def ensure(config: RunConfig, runtime: Runtime) -> RunRecord:
    """Make sure ``config`` has a finished run folder; train what is missing (upstream first)."""
    record = run_record(runtime.results, config)
    if record.done:
        record.config()  # a finished run is reused only while its config.json still hashes to its id
        return record
    upstream = resolve_upstream(config, runtime, train=True)
    if runtime.stop_after_epochs is not None and any(not u.record.done for u in upstream.values()):
        return record  # an upstream run was time-boxed: the student waits for the next call
    ctx = distributed.context()
    if not ctx.enabled:
        _check_writable(runtime)
        with record.lock(on_wait=runtime.echo):
            if not record.done:  # another process may have finished it while we waited for the lock
                train(config, record, runtime, upstream)
            else:
                runtime.echo(f"Run {record.run_id} was finished by the process we waited for, nothing trained.")
        return record
    # torchrun: all ranks train together; rank 0 alone checks, writes and marks the run done.
    if ctx.is_main:
        _check_writable(runtime)
    distributed.barrier()
    train(config, record, runtime, upstream)
    distributed.barrier()
    return record


def ensure_or_retry_eagerly(config: RunConfig, runtime: Runtime) -> RunRecord:
    """:func:`ensure`; when a compiled run on CUDA fails before finishing its first epoch (a compiler or
    CUDA-graph failure rather than a bad recipe), train it again without compiling and leave
    :data:`ltbench.records.EAGER_RETRY` in its folder, so the verdict of ``ltbench reproduce`` can say so."""
    try:
        return ensure(config, runtime)
    except UserError:
        raise
    except Exception as exc:
        status, epochs = run_state(runtime.results, config.run_id)
        if not (_compiled_on_cuda(runtime) and status != "done" and epochs == 0):
            raise
        error = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        runtime.echo(f"Compiled training of {config.run_id} failed in its first epoch ({error}); retrying eagerly.")
        torch._dynamo.reset()  # drop the failed graphs before the eager attempt
        run_record(runtime.results, config).mark_eager_retry(error, runtime.compile_mode)
        return ensure(config, dataclasses.replace(runtime, compile=False, compile_mode="default"))


def _compiled_on_cuda(runtime: Runtime) -> bool:
    return runtime.compile and runtime.torch_device().type == "cuda"


def resolve_upstream(config: RunConfig, runtime: Runtime, train: bool) -> dict[str, Upstream]:
    """The finished runs ``config`` depends on; with ``train`` missing ones are trained first."""
    upstream = {}
    for role, ref in METHODS.get(config.method).requires(config).items():
        if isinstance(ref, RunConfig):
            _check_standalone(config, role, ref)
            record = ensure(ref, runtime) if train else run_record(runtime.results, ref)
            upstream[role] = Upstream(ref, record)
            continue
        record = find_run(runtime.results, ref)
        _check_standalone(config, role, record.config())
        if not record.done:
            raise UserError(f"The {role} run {record.path} is not finished (no DONE marker); finish it first.")
        upstream[role] = Upstream(record.config(), record)
    return upstream


def _check_standalone(config: RunConfig, role: str, upstream: RunConfig) -> None:
    """An upstream run is rebuilt from its folder alone (its method with no upstream runs of its own, e.g. as a
    :class:`~ltbench.teacher.FrozenTeacher`): refuse one whose method needs upstream runs itself (a ``crt`` run as
    the stage 1 of ``lws`` or the teacher of ``deit``), before any run folder is made."""
    what = f"The {role} run {upstream.run_id} (method {upstream.method})"
    try:
        needs = METHODS.get(upstream.method).requires(upstream)
    except UserError as exc:
        raise UserError(f"{what} cannot be rebuilt from its config.json: {exc}") from exc
    if not needs:
        return
    theirs = {r: ref if isinstance(ref, str) else ref.run_id for r, ref in needs.items()}
    listed = ", ".join(f"its {r} run {ref}" for r, ref in theirs.items())
    option = f"{role}_run"
    hint = (f" (--set {option}={next(iter(theirs.values()))})" if option in config.hparams and len(theirs) == 1
            else "")
    unset = f", or leave {option} unset to have one trained" if option in config.hparams else ""
    raise UserError(f"{what} is itself built on an upstream run ({listed}), so it cannot be rebuilt on its own as "
                    f"the {role} of a {config.method} run. Give a run that stands alone instead, e.g. "
                    f"{'that run' if len(theirs) == 1 else 'one of those'}{hint}{unset}.")


def train(config: RunConfig, record: RunRecord, runtime: Runtime, upstream: dict[str, Upstream]) -> None:
    main = distributed.context().is_main
    with RunLog(runtime.echo) as log:  # rank 0 alone writes the run's log.txt
        runtime = dataclasses.replace(runtime, echo=log if main else runtime.echo)
        data = load_data(config, runtime)
        trainer = build_trainer(config, runtime, upstream, data=data, record=record)
        _refuse_micro_batches_under_batchnorm(trainer)  # before anything is written
        if main:
            _write_metadata(config, record, runtime)
            log.open(record.path, f"training session of run {record.run_id} ({config.method} on {config.dataset})")
            runtime.echo(f"Training {config.method} on {config.dataset} {dict(config.data)} seed {config.seed} "
                         f"-> {record.path}")
        try:
            result = trainer.fit()
        except BaseException:
            log.failed()
            raise
        if result and main:
            record.mark_done()


def _refuse_micro_batches_under_batchnorm(trainer: Trainer) -> None:
    """BatchNorm normalises over what one forward pass sees, so micro-batches would change a CNN's numbers
    under the same run id (--micro-batch is a runtime option, outside it): refused for models that have it."""
    per_process = trainer.hp.batch_size // trainer.dist.world
    if trainer.micro >= per_process:
        return
    norms = [name for name, m in trainer.method.trainable().named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if norms:
        raise UserError(f"--micro-batch {trainer.runtime.micro_batch} splits each batch of {per_process} images, "
                        f"but {trainer.config.method}'s model has BatchNorm ({norms[0]}), whose statistics would then "
                        f"come from {trainer.micro} images and change the run's numbers under the same run id. Drop "
                        f"--micro-batch (or use 0), or lower the batch itself with --set batch_size=N (a new run).")


def build_trainer(config: RunConfig, runtime: Runtime, upstream: dict[str, Upstream] | None = None, *,
                  data: LTData | None = None, record: RunRecord | None = None, hp: Any = None) -> Trainer:
    """The :class:`~ltbench.engine.Trainer` of ``config``: its method, typed hyperparameters (or ``hp``), data
    (loaded unless given), the default evaluator, its run folder (or ``record``) and its upstream runs (resolved
    from the results folder, never trained, unless given)."""
    return Trainer(config, hp if hp is not None else hparams_of(config), METHODS.get(config.method),
                   data if data is not None else load_data(config, runtime), EVALUATORS.get(DEFAULT_EVALUATOR)(),
                   record if record is not None else run_record(runtime.results, config), runtime,
                   upstream if upstream is not None else resolve_upstream(config, runtime, train=False))


def _write_metadata(config: RunConfig, record: RunRecord, runtime: Runtime) -> None:
    if (record.path / "config.json").exists():
        record.config()  # a partial run resumes only while its config.json hashes to its run id
    else:
        atomic_write_json(record.path / "config.json", config.to_dict())
    # metrics lines, not the checkpoint (loading that twice would cost seconds for a large model)
    record.write_env({**environment(runtime), "epochs_logged_at_start": epochs_logged(record.path)})


def environment(runtime: Runtime) -> dict[str, Any]:
    device = runtime.torch_device()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=str(Path(__file__).resolve().parent)).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "ltbench": ltbench.__version__, "git_sha": sha, "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
        "numpy": numpy.__version__, "platform": platform.platform(), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(), "torch_threads": runtime.cpu_threads(), "runtime": runtime.describe(),
    }


def _check_writable(runtime: Runtime) -> None:
    if runtime.results.exists() and not runtime.results.is_dir():
        raise UserError(f"The results folder {runtime.results} is a file, not a folder. Choose another with "
                        f"--results DIR.")
    try:
        runtime.results.mkdir(parents=True, exist_ok=True)
        # a probe of its own: two processes starting at once must not remove each other's
        probe = runtime.results / f".write-probe.{os.getpid()}.{secrets.token_hex(6)}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"The results folder {runtime.results} is not writable ({exc.strerror}). "
                        f"Choose another with --results DIR.") from exc
    runs = runs_dir(runtime.results)
    if runs.exists() and not runs.is_dir():
        raise UserError(f"{runs} exists but is not a folder; run folders go there. Move it away or choose another "
                        f"results folder with --results DIR.")
