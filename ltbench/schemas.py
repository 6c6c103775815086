"""What each file ltbench reads must hold, and the one-line error when a file breaks it.

Every run file (``result.json``, ``metrics.jsonl`` rows, ``DONE``, ``posthoc_la.json``, ``env.json``, saved
logits), every sweep grid and every suite's runtime block passes through :func:`validated` (pydantic, strict
types) or :func:`parse_json` before anything uses it. Unknown extra keys are accepted, so a newer ltbench
can add fields; the keys named here are checked for type, range and presence. YAML goes through
:func:`load_yaml`, which refuses a file whose aliases expand past :data:`MAX_YAML_VALUES` values (a 1 KB
"billion laughs" file otherwise expands to gigabytes wherever its values are walked).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic import ValidationError as ValidationError  # re-exported for the readers that catch it

from ltbench.errors import UserError

MAX_YAML_VALUES = 100_000  # values after expanding aliases; a grid or a suite has a few hundred
MAX_YAML_BYTES = 1 << 20  # a grid or a suite is a few KB

Percent = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]
M = TypeVar("M", bound=BaseModel)


class _Open(BaseModel):
    """Known keys are checked; unknown ones are kept (a newer ltbench may add fields)."""

    model_config = ConfigDict(extra="allow", strict=True)


class HeadMetrics(_Open):
    top1: Percent
    ece: Finite | None = None
    counts: dict[str, Percent | None] | None = None  # many / medium / few by training counts
    paper: dict[str, Percent | None] | None = None  # many / medium / few by DeiT-LT's index ranges
    per_class: list[Percent | None] | None = None


class EvaluatedEpoch(_Open):
    """``final`` or ``best`` of result.json, an eval.json, a block of posthoc_la.json."""

    epoch: Count
    heads: Annotated[dict[str, HeadMetrics], Field(min_length=1)]


class ResultFile(_Open):
    """result.json. A stand-in upstream run of the bench has only ``class_counts`` and its method's fields."""

    run_id: str | None = None
    final: EvaluatedEpoch | None = None
    best: EvaluatedEpoch | None = None
    class_counts: list[Count]
    class_names: list[str] | None = None  # since 2026-12; [] when the dataset names none
    eval_every: Count | None = None
    device: str | None = None
    wall_time_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    images_per_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


class DataOptions(_Open):
    rho: Finite | None = None


class ConfigFile(_Open):
    """config.json: what a report's footnote shows even of a folder whose config no longer hashes to its name."""

    method: str
    dataset: str
    data: DataOptions
    hparams: dict[str, Any]
    seed: int
    preset: str = "default"
    versions: dict[str, Any] = Field(default_factory=dict)


class DatasetInfoBlock(_Open):
    """result.json's ``dataset_info`` (:meth:`ltbench.data.DatasetInfo.portable`): the facts a method is built from."""

    name: str
    num_classes: Annotated[int, Field(ge=1)]
    train_counts: list[Count]
    image_size: Annotated[int, Field(ge=1)]
    mean: Annotated[list[Finite], Field(min_length=3, max_length=3)]
    std: Annotated[list[Finite], Field(min_length=3, max_length=3)]
    class_names: list[str] = []
    paper_split: Annotated[list[Count], Field(min_length=2, max_length=2)] | None = None
    variable_size: bool = False
    extras: dict[str, list[int]] = {}

    @model_validator(mode="after")
    def _one_count_per_class(self) -> DatasetInfoBlock:
        if len(self.train_counts) != self.num_classes or len(self.class_names) not in (0, self.num_classes):
            raise ValueError(f"{self.num_classes} classes but {len(self.train_counts)} train counts and "
                             f"{len(self.class_names)} class names")
        return self


class TrainedResult(ResultFile):
    """result.json of a trained run: what ``run``, ``eval`` and a report show of it."""

    run_id: str
    method: str
    dataset: str
    config: ConfigFile
    final: EvaluatedEpoch


class MetricsRow(_Open):
    epoch: Count


class DoneFile(_Open):
    """DONE: the sha256 of each file the finished run's result summarises (empty before 2026-12: no digests)."""

    sha256: dict[str, Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]]


class PosthocFile(_Open):
    run_id: str
    rule: str
    taus: dict[str, EvaluatedEpoch]


class VerdictRow(_Open):
    verdict: Literal["PASS", "FAIL", "MISSING"]


class VerdictFile(_Open):
    """verdict.json of ``ltbench reproduce``: what ``reproduce --list`` shows of a suite's last call."""

    suite: str
    date: str
    verdicts: list[VerdictRow]


class CheckpointOrigin(_Open):
    """What every checkpoint and saved-logits file says about the run that wrote it."""

    run_id: Annotated[str, Field(pattern=r"^[0-9a-f]{12}$")]
    config_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ExportArchitecture(_Open):
    factory: str  # one of ltbench.exported.build_network's, nothing else is ever called
    name: str | None = None  # the timm entry point, for timm.create_model
    kwargs: dict[str, Any]


class ExportCard(_Open):
    """model_card.json of an export folder (ltbench.export): what ltbench.load_model rebuilds the network from."""

    format: Literal["ltbench-export"]
    format_version: Literal[1]
    run_id: str
    architecture: ExportArchitecture
    input_size: Annotated[int, Field(ge=1)]
    preprocessing: Annotated[list[dict[str, Any]], Field(min_length=1)]
    class_names: list[str]
    heads: Annotated[dict[str, str], Field(min_length=1)]
    default_head: str
    outputs: Literal["logits", "distilled"]
    logit_scale: Finite | list[Finite] | None = None
    logit_offset: list[Finite] | None = None
    weights_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def validated(model: type[M], payload: Any, file: Path | str, fix: str) -> M:
    """``payload`` as ``model``, or a one-line UserError naming the file, the first bad key and ``fix``."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise UserError(f"{file} is damaged: {describe(exc)}. {fix}") from exc


def describe(exc: ValidationError) -> str:
    """The first problem of a ValidationError as ``key a.b.c: message (got value)``."""
    first = exc.errors()[0]
    key = ".".join(_key_text(part) for part in first["loc"]) or "(top level)"
    got = repr(first.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return f"key {key}: {first['msg'].lower()} (got {got})"


def _key_text(part: Any) -> str:
    """A key as text for a one-line message: quoted when it holds spaces, dots or control characters."""
    text = str(part)
    return text if text.isidentifier() or text.isdigit() else repr(text)[:40]


def parse_json(data: bytes, file: Path | str, fix: str) -> Any:
    """The JSON value of ``data`` (UTF-8), or a one-line UserError naming the file and ``fix``."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{file} is damaged: it is not UTF-8 text (byte {exc.start} is invalid). {fix}") from exc
    except (ValueError, RecursionError) as exc:
        reason = getattr(exc, "msg", None) or type(exc).__name__
        raise UserError(f"{file} is damaged: it is not valid JSON ({reason}). {fix}") from exc


def read_json(path: Path, fix: str, label: str | None = None) -> Any:
    """:func:`parse_json` of a file (named ``label`` in errors, default its path); a file that cannot be read is
    the same one-line error."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"Cannot read {path} ({exc.strerror or exc}). {fix}") from exc
    return parse_json(data, label or path, fix)


def logits_arrays(path: Path) -> tuple[dict[str, Any], str | None]:
    """(arrays, None) of a saved-logits file, or ({}, why not): ``labels`` a 1-D integer array, each head a 2-D
    finite float array with a row per label, ``origin.*`` text; no object arrays (loaded without pickle)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in saved.files}
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, OSError, BadZipFile, EOFError, ... for a bad file
        return {}, f"not a readable .npz file: {type(exc).__name__}: {str(exc)[:100]}"
    labels = arrays.get("labels")
    if labels is None or labels.ndim != 1 or labels.dtype.kind not in "iu":
        return {}, "its labels are missing or not a 1-D integer array"
    for name, values in arrays.items():
        if name.startswith("origin.") and values.dtype.kind == "U" and values.ndim == 0:
            continue
        if name != "labels" and not (values.dtype.kind == "f" and values.shape[:1] == labels.shape
                                     and values.ndim == 2 and np.isfinite(values).all()):
            return {}, f"{name} is not a finite {len(labels)} x classes array of logits (got {values.dtype} " \
                       f"{values.shape})"
    if len(arrays) < 2 + sum(n.startswith("origin.") for n in arrays):
        return {}, "it holds no head's logits"
    return arrays, None


# ----------------------------------------------------------------------------------------------
# YAML: grids and suites


def load_yaml(path: Path, what: str) -> Any:
    """A YAML file's value (safe tags only), refusing alias bombs and files far larger than a grid or a suite."""
    import yaml

    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise UserError(f"The {what} {path} is {path.stat().st_size:,} bytes, more than a {what} ever needs "
                            f"({MAX_YAML_BYTES:,}); is it the right file?")
        text = path.read_text(encoding="utf-8-sig")
        return yaml.load(text, Loader=_loader_with_alias_limit(yaml, path, what))  # noqa: S506 - a SafeLoader
    except OSError as exc:
        raise UserError(f"Cannot read the {what} {path} ({exc.strerror or exc}).") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"The {what} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8.") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"The {what} {path} is not valid YAML: {' '.join(str(exc).split())}") from exc


def _loader_with_alias_limit(yaml: Any, path: Path, what: str) -> type:
    class Loader(yaml.SafeLoader):
        def compose_document(self) -> Any:
            node = super().compose_document()
            if _expanded_size(node, {}) > MAX_YAML_VALUES:
                raise UserError(f"The {what} {path} expands, through its YAML aliases (*name), to more than "
                                f"{MAX_YAML_VALUES:,} values, far more than a {what} needs; such a file can exhaust "
                                f"memory. Write the values out.")
            return node

    return Loader


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """The values ``node`` stands for with every alias expanded (each shared node counted once per use)."""
    if id(node) not in memo:
        memo[id(node)] = 0  # a recursive alias counts as nothing more
        children = node.value if isinstance(node.value, list) else []
        items = [part for child in children for part in (child if isinstance(child, tuple) else (child,))]
        memo[id(node)] = min(1 + sum(_expanded_size(item, memo) for item in items), MAX_YAML_VALUES + 1)
    return memo[id(node)]


class GridValues(_Open):
    """The values of a sweep grid (a YAML grid file, a suite's ``runs`` entry) before they are expanded."""

    model_config = ConfigDict(extra="forbid", strict=True)

    methods: str | list[str | int | float] | None = None
    datasets: str | list[str | int | float] | None = None
    rho: Finite | str | list[Finite | str] | None = None
    seeds: int | str | list[int | str] | None = None
    subsample_seeds: int | str | list[int | str] | None = None
    preset: str | None = None
    epochs: Annotated[int, Field(ge=0)] | None = None
    set: str | list[str | int | float | bool] | dict[str, Any] | None = None


def grid_values(payload: Any, file: Path | str, key: str = "") -> dict[str, Any]:
    """A grid's keys with their types checked: a UserError names the file, the key and what it takes."""
    if not isinstance(payload, Mapping):
        raise UserError(f"{file}{' key ' + key if key else ''} must be a mapping with keys "
                        f"{', '.join(GridValues.model_fields)}, not {type(payload).__name__}.")
    try:
        values = GridValues.model_validate(dict(payload))
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "(top level)"
        where = f"{key}.{name}" if key else name
        if first["type"] == "extra_forbidden":
            raise UserError(f"Unknown key {where} in {file}. Valid keys: {', '.join(GridValues.model_fields)}.") \
                from exc
        raise UserError(f"{file}, key {where}: {GRID_HELP.get(name, 'wrong type')}, not "
                        f"{payload[name]!r:.60}.") from exc
    return {k: v for k, v in values.model_dump().items() if k in payload}


GRID_HELP = {
    "methods": "a method name or a list of them", "datasets": "a dataset name or a list of them",
    "rho": "a number, a list of numbers or text such as 50,100", "seeds": "an integer, a list of integers or a "
    "range such as 0-4", "preset": "a preset name", "epochs": "a whole number of epochs >= 0",
    "set": "KEY=VALUE text, a list of them or a mapping of keys to values",
}
