"""From what a user asks for to a validated, frozen run configuration: presets, ``--epochs``, ``--set``.

Precedence: the method's ``Hparams`` defaults < each table of the preset (``"*"``, then the dataset's own entry)
< ``--epochs`` < ``--set``. A table that changes ``epochs`` rescales the schedule's epoch points it does not set
itself. The result hashes to the run id (:class:`ltbench.config.RunConfig`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ltbench import config as cfgmod
from ltbench.config import RunConfig
from ltbench.errors import UserError
from ltbench.registry import DATASETS, METHODS
from ltbench.runtime import RUNTIME_OPTIONS, option_name
from ltbench.weights import weights_sha256

if TYPE_CHECKING:
    from ltbench.data import Dataset
    from ltbench.method import Method


def layered(*tables: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Merge preset tables key by key ("*" and per-dataset entries); later tables win."""
    merged: dict[str, dict[str, Any]] = {}
    for table in tables:
        for key, values in table.items():
            merged[key] = {**merged.get(key, {}), **values}
    return merged


def make_config(method: str, dataset: str, *, rho: float | None = None, seed: int = 0, preset: str | None = None,
                epochs: int | None = None, sets: Sequence[str] = (), hparams: Mapping[str, Any] | None = None,
                data_options: Mapping[str, Any] | None = None) -> RunConfig:
    """Resolve defaults < preset < ``epochs`` < ``--set`` into a validated, frozen :class:`RunConfig`."""
    method_cls: type[Method] = METHODS.get(method)
    dataset_cls: type[Dataset] = DATASETS.get(dataset)
    refuse_several_values(method, dataset, sets)
    set_hparams, set_data = cfgmod.parse_set_options(sets)
    reject_runtime_sets(method_cls, set_hparams)
    defaults = {k: v for k, v in method_cls.data_defaults.get(dataset, {}).items()
                if k in cfgmod.field_types(dataset_cls.Options)}
    given = {**(data_options or {}), **set_data}
    if rho is not None and "rho" in given and cfgmod.coerce(given["rho"], float, "data.rho") != rho:
        raise UserError(f"--rho {rho:g} and data.rho={given['rho']} disagree: give the imbalance ratio once.")
    options = dataset_options(dataset_cls, rho, {**defaults, **given})
    preset = preset or method_cls.default_preset
    if preset not in method_cls.presets:
        presets = ", ".join(sorted(method_cls.presets))
        raise UserError(f"Method {method!r} has no preset {preset!r}. Presets: {presets}.")
    hp = with_init_digest(resolve_hparams(method_cls, preset, dataset, epochs, {**(hparams or {}), **set_hparams}))
    versions = {"schema": cfgmod.SCHEMA_VERSION, "method": method_cls.VERSION, "dataset": dataset_cls.VERSION}
    return RunConfig(method=method, dataset=dataset, data=cfgmod.hparams_dict(options), hparams=cfgmod.hparams_dict(hp),
                     seed=int(seed), preset=preset, versions=versions)


def set_item_values(method: str, dataset: str, item: str) -> list[str]:
    """The ``KEY=VALUE`` items one ``--set`` item stands for, typed by the method's hyperparameter or the dataset's
    option it names (:data:`ltbench.config.SWEEP_RULE`); an unknown key is left whole for :func:`make_config`."""
    key, sep, text = item.partition("=")
    name = key.strip()
    owner = DATASETS.get(dataset).Options if name.startswith("data.") else METHODS.get(method).Hparams
    annotation = cfgmod.field_types(owner).get(name.removeprefix("data."))
    if not sep or annotation is None:
        return [item]
    return [f"{key}={value}" for value in cfgmod.set_values(text, annotation)]


def refuse_several_values(method: str, dataset: str, sets: Iterable[str]) -> None:
    """One run takes one value per key: a list is an axis of a sweep, never silently its first value."""
    for item in sets:
        values = set_item_values(method, dataset, item)
        if len(values) > 1:
            listed = ", ".join(v.partition("=")[2] for v in values)
            raise UserError(f"--set {item} gives {len(values)} values ({listed}), but one run takes one value per "
                            f"key: `ltbench sweep` makes such a list an axis of its grid (and `ltbench tune` "
                            f"searches one with --space KEY=choice(...)). {cfgmod.SWEEP_RULE}")


def reject_runtime_sets(method_cls: type[Method], keys: Iterable[str]) -> None:
    """``--set device=cpu`` and the like: say which option to use instead of "unknown key"."""
    fields = cfgmod.field_types(method_cls.Hparams)
    for key in keys:
        if key in RUNTIME_OPTIONS and key not in fields:
            raise UserError(f"{key} is a runtime option, not a hyperparameter (it never changes the run id): give "
                            f"it as {option_name(key)} instead of --set {key}=...")


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


def with_init_digest(hp: Any) -> Any:
    """``hp`` with ``init`` as an absolute path and ``init_sha256`` its file's digest, which the run id hashes
    instead of the path (config.LOCATIONS); the file is checked to exist and be readable here, before any run."""
    if not hp.init:
        return hp
    path = Path(hp.init).expanduser().resolve()
    return dataclasses.replace(hp, init=str(path), init_sha256=weights_sha256(path))


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


def dataset_options(dataset_cls: type[Dataset], rho: float | None, overrides: Mapping[str, Any]) -> Any:
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
