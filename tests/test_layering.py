"""The layers of ltbench, kept by a test: a module imports only modules of its own layer or lower ones.

Every import counts: top-level, function-local and ``TYPE_CHECKING`` ones. Every module of ``ltbench/``,
``methods/`` and ``datasets/`` must be placed in :data:`LAYERS`, so a new file has to be given a layer
(docs/architecture.md says which). There are no exceptions.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYERS: dict[int, tuple[str, ...]] = {
    0: ("errors", "seeding", "data", "runtime", "config", "registry", "schemas", "atomic", "run_lock", "records",
        "tune_records", "distributed", "models", "cnn", "losses", "sam", "analysis", "evaluate", "splits", "selection",
        "stats", "weights", "exported"),
    1: ("augment", "gpu_recipe", "gpu_kernels", "gpu_randaugment", "gpu_augment", "portable", "image_cache", "verify",
        "tracking", "datasets.*"),  # inputs
    2: ("method", "resolve", "progress"),  # contracts
    3: ("engine", "teacher"),  # training
    4: ("methods.*",),  # methods
    5: ("stages", "bench", "reevaluate", "posthoc", "datainfo", "export"),  # orchestration
    6: ("sweep", "launcher", "tuning", "runset", "render", "compare", "paper_numbers", "html_page",
        "report"),  # many runs
    7: ("projection", "preflight", "reproduce", "verdict_files", "plots", "terminal", "console"),  # presentation
    8: ("cli_options", "cli_data", "cli_runs", "cli_models", "cli", "__main__", "__init__"),  # the command line
}
PACKAGES = {"methods": "methods", "datasets": "datasets"}  # folders installed as ltbench.methods, ltbench.datasets


def modules() -> dict[str, Path]:
    found = {p.stem: p for p in (REPO / "ltbench").glob("*.py")}
    for folder in PACKAGES:
        found.update({f"{folder}.{p.stem}": p for p in (REPO / folder).glob("*.py")})
    return found


def layer_of(module: str) -> int | None:
    for layer, names in LAYERS.items():
        for name in names:
            if module == name or (name.endswith(".*") and module.startswith(name[:-1])):
                return layer
    return None


def imported(path: Path, known: set[str]) -> set[str]:
    """Every ltbench module ``path`` imports, anywhere in the file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ltbench"):
            base = node.module.removeprefix("ltbench").lstrip(".")
            for alias in node.names:
                candidate = f"{base}.{alias.name}" if base else alias.name
                out.add(candidate if candidate in known else base)
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("ltbench.") for a in node.names if a.name.startswith("ltbench.")}
    return {m for m in out if m and m != "__init__"}


def test_every_module_has_a_layer():
    assert not [m for m in modules() if layer_of(m) is None and not m.endswith("__init__")]


def test_no_module_imports_a_higher_layer():
    found = modules()
    upward = []
    for module, path in found.items():
        own = layer_of(module) if not module.endswith("__init__") else 0
        for target in imported(path, set(found)):
            assert target in found, f"{module} imports unknown ltbench module {target}"
            if layer_of(target) > own:
                upward.append(f"{module} (layer {own}) imports {target} (layer {layer_of(target)})")
    assert not upward, upward


def test_the_layer_test_sees_function_local_and_type_checking_imports(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ltbench.engine import Trainer\n"
                      "def f():\n    from ltbench import stages\n    import ltbench.cli\n")
    assert imported(source, set(modules())) == {"engine", "stages", "cli"}


def test_no_module_is_much_over_450_lines_and_each_says_its_job():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 470}  # "about 450"
    assert not long, long
    silent = [m for m, p in modules().items() if not m.endswith("__init__") and ast.get_docstring(ast.parse(
        p.read_text())) is None]
    assert not silent, silent


def test_no_import_cycle_even_within_a_layer():
    found = modules()
    graph = {m: imported(p, set(found)) & set(found) for m, p in found.items()}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif not state.get(target):
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(found):
        if not state.get(module):
            visit(module, [module])
    assert not cycles, cycles
