"""From user intent to finished run folders: resolve a config, then train it and its upstream runs once.

``ensure`` is the single entry point used by ``ltbench run``, by every sweep trial and by methods
that need a teacher: a finished run (``DONE``) is reused, an interrupted one resumes from its
checkpoint, a missing one is trained, and upstream runs (teachers) are ensured first, recursively.
A file lock per run folder makes concurrent trials that share a teacher train it only once.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ltbench import config as cfgmod
from ltbench import distributed
from ltbench.config import RunConfig
from ltbench.data import Dataset, LTData
from ltbench.engine import Runtime, Trainer
from ltbench.errors import UserError
from ltbench.method import Method, Upstream
from ltbench.records import RunRecord, atomic_write_json, find_run, run_record, runs_dir
from ltbench.registry import DATASETS, EVALUATORS, METHODS


def make_config(method: str, dataset: str, *, rho: float | None = None, seed: int = 0, preset: str | None = None,
                epochs: int | None = None, sets: Sequence[str] = (), hparams: Mapping[str, Any] | None = None,
                data_options: Mapping[str, Any] | None = None) -> RunConfig:
    """Resolve defaults < preset < ``epochs`` < ``--set`` into a validated, frozen :class:`RunConfig`."""
    method_cls: type[Method] = METHODS.get(method)
    dataset_cls: type[Dataset] = DATASETS.get(dataset)
    set_hparams, set_data = cfgmod.parse_set_options(sets)
    _reject_runtime_sets(method_cls, set_hparams)
    defaults = {k: v for k, v in method_cls.data_defaults.get(dataset, {}).items()
                if k in cfgmod.field_types(dataset_cls.Options)}
    given = {**(data_options or {}), **set_data}
    if rho is not None and "rho" in given and cfgmod.coerce(given["rho"], float, "data.rho") != rho:
        raise UserError(f"--rho {rho:g} and data.rho={given['rho']} disagree: give the imbalance ratio once.")
    options = _dataset_options(dataset_cls, rho, {**defaults, **given})
    preset = preset or method_cls.default_preset
    if preset not in method_cls.presets:
        presets = ", ".join(sorted(method_cls.presets))
        raise UserError(f"Method {method!r} has no preset {preset!r}. Presets: {presets}.")
    hp = resolve_hparams(method_cls, preset, dataset, epochs, {**(hparams or {}), **set_hparams})
    versions = {"schema": cfgmod.SCHEMA_VERSION, "method": method_cls.VERSION, "dataset": dataset_cls.VERSION}
    return RunConfig(method=method, dataset=dataset, data=cfgmod.to_jsonable(options), hparams=cfgmod.to_jsonable(hp),
                     seed=int(seed), preset=preset, versions=versions)


def _reject_runtime_sets(method_cls: type[Method], keys: Iterable[str]) -> None:
    """``--set device=cpu`` and the like: say which option to use instead of "unknown key"."""
    fields = cfgmod.field_types(method_cls.Hparams)
    for key in keys:
        if key in cfgmod.RUNTIME_OPTIONS and key not in fields:
            raise UserError(f"{key} is a runtime option, not a hyperparameter (it never changes the run id): give "
                            f"it as --{key.replace('_', '-')} instead of --set {key}=...")


def resolve_hparams(method_cls: type[Method], preset: str, dataset: str, epochs: int | None,
                    overrides: Mapping[str, Any]) -> Any:
    """Defaults, then each layer of the preset, then ``--epochs`` and ``--set`` as one layer (``--set`` wins).

    A layer that changes ``epochs`` rescales the schedule's epoch points it does not set itself
    (:func:`ltbench.config.rescale_epochs`), so ``--epochs N`` shortens a recipe without breaking it."""
    what = f"{method_cls.name} hyperparameter"
    hp = method_cls.Hparams()
    for layer in preset_layers(method_cls.presets[preset], dataset):
        hp = apply_layer(hp, layer, what)
    hp = apply_layer(hp, {**({"epochs": epochs} if epochs is not None else {}), **overrides}, what)
    hp.validate()
    return hp.without_inert()


def preset_layers(preset: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Mapping[str, Any]]],
                  dataset: str) -> list[dict[str, Any]]:
    """A preset is a table (``{"*": ..., "<dataset>": ...}``) or a list of tables applied in order, e.g. the paper
    recipe then a table that only shortens it; per table the dataset's entry overrides ``"*"``."""
    tables = [preset] if isinstance(preset, Mapping) else list(preset)
    return [{**table.get("*", {}), **table.get(dataset, {})} for table in tables]


def apply_layer(hp: Any, layer: Mapping[str, Any], what: str) -> Any:
    """Typed overrides; when they change ``epochs``, the epoch points not in ``layer`` are rescaled first."""
    updated = cfgmod.apply_overrides(hp, layer, what)
    if updated.epochs != hp.epochs and min(updated.epochs, hp.epochs) >= 1:  # (a training-free method has 0)
        updated = cfgmod.apply_overrides(cfgmod.rescale_epochs(hp, updated.epochs, keep=layer), layer, what)
    return updated


def _dataset_options(dataset_cls: type[Dataset], rho: float | None, overrides: Mapping[str, Any]) -> Any:
    options = dataset_cls.Options()
    if rho is not None:
        if not hasattr(options, "rho"):
            raise UserError(f"Dataset {dataset_cls.name!r} has a fixed imbalance; --rho does not apply to it.")
        overrides = {"rho": rho, **overrides}
    options = cfgmod.apply_overrides(options, overrides, f"{dataset_cls.name} option (--set data.KEY=VALUE)")
    dataset_cls.validate_options(options)
    return options


def hparams_of(config: RunConfig) -> Any:
    """The typed hyperparameters of a resolved config."""
    method_cls = METHODS.get(config.method)
    return cfgmod.apply_overrides(method_cls.Hparams(), dict(config.hparams), f"{config.method} hyperparameter")


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


EAGER_RETRY = "eager_retry.json"  # in a run folder: its compiled first epoch failed on CUDA, it trained eagerly


def ensure_or_retry_eagerly(config: RunConfig, runtime: Runtime) -> RunRecord:
    """:func:`ensure`; when a compiled run on CUDA fails before finishing its first epoch (a compiler or
    CUDA-graph failure rather than a bad recipe), train it again without compiling and leave
    :data:`EAGER_RETRY` in its folder, so the verdict of ``ltbench reproduce`` can say so."""
    try:
        return ensure(config, runtime)
    except UserError:
        raise
    except Exception as exc:
        from ltbench.sweep import run_state

        status, epochs = run_state(runtime.results, config.run_id)
        if not (_compiled_on_cuda(runtime) and status != "done" and epochs == 0):
            raise
        error = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        runtime.echo(f"Compiled training of {config.run_id} failed in its first epoch ({error}); retrying eagerly.")
        import torch

        torch._dynamo.reset()  # drop the failed graphs before the eager attempt
        atomic_write_json(run_record(runtime.results, config).path / EAGER_RETRY,
                          {"error": error, "compile_mode": runtime.compile_mode})
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
    data = load_data(config, runtime)
    main = distributed.context().is_main
    if main:
        _write_metadata(config, record, runtime)
    evaluator = EVALUATORS.get("longtail")()
    if main:
        runtime.echo(f"Training {config.method} on {config.dataset} {dict(config.data)} seed {config.seed} "
                 f"-> {record.path}")
    trainer = Trainer(config, hparams_of(config), METHODS.get(config.method), data, evaluator, record, runtime,
                      upstream)
    result = trainer.fit()
    if result and main:
        record.mark_done()


def _write_metadata(config: RunConfig, record: RunRecord, runtime: Runtime) -> None:
    path = record.path / "config.json"
    if path.exists():
        existing = RunConfig.from_dict(json.loads(path.read_text()))
        if existing.identity() != config.identity():  # runtime options (e.g. workers) may differ
            raise UserError(f"{path} holds a different configuration than run id {config.run_id}; refusing to "
                            f"mix runs. Move the folder away and run again.")
    else:
        atomic_write_json(path, config.to_dict())
    atomic_write_json(record.path / "env.json", environment(runtime))


def environment(runtime: Runtime) -> dict[str, Any]:
    import platform
    import subprocess

    import numpy
    import timm
    import torch
    import torchvision

    import ltbench

    device = runtime.torch_device()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=str(_package_root())).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "ltbench": ltbench.__version__, "git_sha": sha, "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
        "numpy": numpy.__version__, "platform": platform.platform(), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_count": __import__("os").cpu_count(), "torch_threads": runtime.cpu_threads(),
        "runtime": {k: str(v) for k, v in dataclasses.asdict(runtime).items() if k != "echo"},
    }


def _package_root():
    from pathlib import Path

    return Path(__file__).resolve().parent


def _check_writable(runtime: Runtime) -> None:
    try:
        runtime.results.mkdir(parents=True, exist_ok=True)
        probe = runtime.results / ".write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"The results folder {runtime.results} is not writable ({exc.strerror}). "
                        f"Choose another with --results DIR.") from exc
    runs = runs_dir(runtime.results)
    if runs.exists() and not runs.is_dir():
        raise UserError(f"{runs} exists but is not a folder; run folders go there. Move it away or choose another "
                        f"results folder with --results DIR.")
