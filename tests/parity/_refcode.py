"""Loading the authors' released code for the parity checks, without copying any of it.

``LTBENCH_REFERENCE_CODE`` names a folder with one checkout per released repository (``scripts/parity/
fetch_reference.md`` says how to build it). Each test module calls :func:`repo` at import: without the variable
or the checkout the whole module is skipped with one line naming what is missing.

The released repositories share top-level module names (``models``, ``utils``, ``losses``, ``datasets``), so
:func:`import_released` imports a module with that repository first on ``sys.path`` and afterwards removes what it
imported from ``sys.modules`` (the returned module keeps its own references), so the next repository gets its own
``models``. Packages a released module imports but never needs for the compared function (wandb, sklearn, tqdm,
xformers, ...) are given as in-memory stubs, only while it is imported, and only if they are not installed.

Scripts that run their whole program at import (``tau_norm.py``) or keep the compared lines inline in ``main()``
(the DRW weights of ``cifar_train.py``) are read with :mod:`ast`: :func:`released_functions` compiles the named
functions of the released file unchanged, :func:`released_block` the statements of one ``if`` branch, both in
a namespace the test supplies (the names the released file imported).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import json
import os
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

ENV = "LTBENCH_REFERENCE_CODE"
REPORT_ENV = "LTBENCH_PARITY_REPORT"  # optional: a JSON file that receives every measured difference

# What each test module compares against: folder name -> GitHub repository (commits: scripts/parity/).
REPOS = {
    "LDAM-DRW": "kaidic/LDAM-DRW",
    "Saddle-LongTail": "val-iisc/Saddle-LongTail",
    "Parametric-Contrastive-Learning": "dvlab-research/Parametric-Contrastive-Learning",
    "DeiT-LT": "val-iisc/DeiT-LT",
    "classifier-balancing": "facebookresearch/classifier-balancing",
    "BalancedMetaSoftmax-Classification": "jiawei-ren/BalancedMetaSoftmax-Classification",
    "Class-balanced-loss-pytorch": "vandit15/Class-balanced-loss-pytorch",
    "LiVT": "XuZhengzhuo/LiVT",
}

MEASURED: list[dict[str, Any]] = []


def repo(name: str) -> Path:
    """The checkout of a released repository; skips the calling module (one line) when it is not there."""
    root = os.environ.get(ENV)
    if not root:
        pytest.skip(f"{ENV} is not set: no checkout of {REPOS[name]} to compare with (scripts/parity/"
                    f"fetch_reference.md)", allow_module_level=True)
    path = Path(root) / name
    if not path.is_dir():
        pytest.skip(f"{path} is missing: {ENV} has no checkout of {REPOS[name]}", allow_module_level=True)
    return path


def record(component: str, max_abs_diff: float, note: str = "") -> float:
    """Keep a measured difference for the summary (printed at the end of the run, and written to the JSON file
    named by LTBENCH_PARITY_REPORT); returns it so a test can assert on it."""
    entry = {"component": component, "max_abs_diff": float(max_abs_diff), "note": note}
    MEASURED.append(entry)
    path = os.environ.get(REPORT_ENV)
    if path:
        existing = json.loads(Path(path).read_text()) if Path(path).is_file() else []
        existing = [e for e in existing if e["component"] != component] + [entry]
        Path(path).write_text(json.dumps(existing, indent=1))
    return float(max_abs_diff)


def max_abs(a: Any, b: Any) -> float:
    """max |a - b| over tensors / arrays / sequences of them, in float64."""
    import numpy as np
    import torch

    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), (len(a), len(b))
        return max((max_abs(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    if isinstance(b, torch.Tensor):
        b = b.detach().cpu().double().numpy()
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def stub(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _top_level_names(path: Path) -> set[str]:
    names = {p.stem for p in path.glob("*.py")}
    names |= {p.name for p in path.iterdir() if p.is_dir() and any(p.glob("*.py"))}  # namespace packages too
    return names


@contextlib.contextmanager
def released_path(path: Path, stubs: Mapping[str, types.ModuleType] = ()) -> Iterator[None]:
    """``path`` first on sys.path, its module names free in sys.modules, the stubs of packages that are not
    installed present; everything restored afterwards (modules imported from ``path`` are dropped)."""
    path = Path(path).resolve()
    shadowed = {}
    for key in list(sys.modules):
        if key.split(".")[0] in _top_level_names(path):
            shadowed[key] = sys.modules.pop(key)
    added_stubs = []
    for name, module in dict(stubs).items():
        if name not in sys.modules and not _importable(name):
            sys.modules[name] = module
            added_stubs.append(name)
    # a folder without __init__.py (Saddle's ``datasets/``) is a namespace package, which loses to a regular package
    # of that name anywhere on sys.path (this repository's own ``datasets/``): hide those entries meanwhile
    namespaces = {p.name for p in path.iterdir() if p.is_dir() and not (p / "__init__.py").is_file()}
    saved_path = list(sys.path)
    def hides(entry: str) -> bool:
        return any((Path(entry or ".") / name / "__init__.py").is_file() for name in namespaces)

    sys.path[:] = [str(path)] + [entry for entry in sys.path if not hides(entry)]
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for key in list(sys.modules):
            file = getattr(sys.modules[key], "__file__", None) or ""
            if file and Path(file).resolve().is_relative_to(path):
                del sys.modules[key]
        for name in added_stubs:
            sys.modules.pop(name, None)
        sys.modules.update(shadowed)


def import_released(path: Path, module: str, stubs: Mapping[str, types.ModuleType] = ()) -> types.ModuleType:
    """Import ``module`` of the released checkout at ``path`` (see :func:`released_path`)."""
    with released_path(path, stubs):
        return importlib.import_module(module)


def _parse(file: Path) -> ast.Module:
    return ast.parse(Path(file).read_text(), filename=str(file))


def released_functions(file: Path, names: tuple[str, ...], namespace: dict[str, Any]) -> dict[str, Callable]:
    """The named top-level functions of a released file, compiled from its own source in ``namespace`` (for
    scripts whose import would run their program)."""
    tree = _parse(file)
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    missing = set(names) - {n.name for n in nodes}
    assert not missing, f"{file} has no function {sorted(missing)}"
    code = compile(ast.Module(body=nodes, type_ignores=[]), str(file), "exec")
    exec(code, namespace)  # noqa: S102 - the released source, unchanged
    return {name: namespace[name] for name in names}


def released_block(file: Path, function: str, condition: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """Run the body of the ``if``/``elif`` branch whose test reads ``condition`` (e.g. ``args.train_rule ==
    'DRW'``) inside ``function`` of a released file, in ``namespace``; returns the namespace afterwards."""
    tree = _parse(file)
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    branch = next((n for n in ast.walk(func) if isinstance(n, ast.If)
                   and ast.unparse(n.test).replace('"', "'") == condition), None)
    assert branch is not None, f"{file}:{function} has no branch `if {condition}`"
    code = compile(ast.Module(body=branch.body, type_ignores=[]), str(file), "exec")
    exec(code, namespace)  # noqa: S102 - the released source, unchanged
    return namespace


def released_assignment(file: Path, function: str, target: str, namespace: dict[str, Any]) -> Any:
    """Run the (first) assignment ``target = ...`` inside ``function`` of a released file, in ``namespace``; returns
    the value assigned (e.g. the inline ``transform_train`` of a training script)."""
    tree = _parse(file)
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    node = next((n for n in ast.walk(func) if isinstance(n, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == target for t in n.targets)), None)
    assert node is not None, f"{file}:{function} assigns no {target}"
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(file), "exec"), namespace)  # noqa: S102
    return namespace[target]


def find_line(file: Path, text: str) -> int:
    """1-based line number of the first line of a released file that contains ``text``."""
    for number, line in enumerate(Path(file).read_text().splitlines(), start=1):
        if text in line:
            return number
    raise AssertionError(f"{file} has no line containing {text!r}")
