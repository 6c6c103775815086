"""Name -> plugin class registries, filled by decorators and by entry points of installed packages.

Built-in plugins are declared as entry points in ``pyproject.toml`` exactly like third-party ones,
so there is one discovery path. The decorator exists for plugins defined in scripts or tests.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from ltbench.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of plugin classes of one kind (methods, datasets or evaluators)."""

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, type[T]] = {}
        self._distributions: dict[str, str] = {}  # entry name -> the installed package that declared it
        self._discovered = False
        self._display: dict[str, str] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``@METHODS.register("ldam_drw")``."""

        def decorate(cls: type[T]) -> type[T]:
            self.add(name, cls)
            return cls

        return decorate

    def add(self, name: str, cls: type[T]) -> None:
        existing = self._entries.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(
                f"{self.kind} {name!r} is registered twice: by {_qualname(existing)} and by {_qualname(cls)}."
            )
        cls.name = name  # type: ignore[attr-defined]
        self._entries[name] = cls

    def get(self, name: str) -> type[T]:
        self._discover()
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UserError(
                f"Unknown {self.kind} {name!r}.{hint} Available: {', '.join(sorted(self._entries))}. "
                f"Plugins from other packages register through the entry-point group {self.group!r}."
            )
        return self._entries[name]

    def source(self, name: str) -> str:
        """Where an entry comes from: ``built-in``, ``plugin <package>`` or, for a decorator, ``<module>``."""
        self._discover()
        return self._label(name)

    def _label(self, name: str) -> str:
        distribution = self._distributions.get(name)
        return _source_label(distribution) if distribution else self._entries[name].__module__

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._entries)

    def __iter__(self) -> Iterator[tuple[str, type[T]]]:
        self._discover()
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for ep in entry_points(group=self.group):
            if ep.name in self._entries:
                continue
            try:
                cls = ep.load()
            except Exception as exc:  # a broken third-party plugin must not take the whole tool down
                raise UserError(f"The {self.kind} plugin {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
            self.add(ep.name, cls)
            self._distributions[ep.name] = ep.dist.name if ep.dist is not None else ""

    def listing(self) -> list[tuple[str, str, str]]:
        """(name, source, docstring) of every entry, read from the plugin modules' source where possible, so that
        ``ltbench list`` does not import the training stack (torch, timm) that the modules import. An entry whose
        source cannot be read (compiled, generated, or a class without its own docstring) is imported."""
        if not self._discovered:
            rows = {name: (self._label(name), cls.__doc__ or "") for name, cls in self._entries.items()}
            for ep in entry_points(group=self.group):
                doc = None if ep.name in rows else _source_docstring(ep)
                if doc is None and ep.name not in rows:
                    break  # unreadable: load them all below
                if doc is not None:
                    rows[ep.name] = (_source_label(ep.dist.name if ep.dist is not None else ""), doc)
            else:
                return [(name, source, doc) for name, (source, doc) in sorted(rows.items())]
        return [(name, self.source(name), cls.__doc__ or "") for name, cls in self]

    def display_name(self, name: str) -> str:
        """How papers write the entry (its class's ``display_name``, e.g. "LDAM-DRW"), or the name itself where the
        class sets none. Read from the plugin's source where possible, as ``listing`` does, so that reports and
        figures do not import the training stack."""
        if name not in self._display:
            self._display[name] = self._find_display_name(name) or name
        return self._display[name]

    def _find_display_name(self, name: str) -> str | None:
        if name in self._entries:
            return getattr(self._entries[name], "display_name", None)
        for ep in entry_points(group=self.group, name=name):
            node = _class_node(ep)
            if node is None:  # compiled or generated: import it
                return getattr(self.get(name), "display_name", None)
            return _string_attribute(node, "display_name")
        return None  # not installed (a report of runs from elsewhere): its name

    def refresh(self) -> None:
        """Re-read entry points (after installing a plugin package in the same process)."""
        self._discovered = False


def _source_label(distribution: str) -> str:
    return "built-in" if distribution == "ltbench" else f"plugin {distribution}"


def _source_docstring(ep: EntryPoint) -> str | None:
    """The docstring of the class an entry point names, from its module's source without running the module."""
    node = _class_node(ep)
    return None if node is None else ast.get_docstring(node, clean=False)


def _class_node(ep: EntryPoint) -> ast.ClassDef | None:
    """The class an entry point names, parsed from its module's source (None where the source cannot be read)."""
    try:
        spec = importlib.util.find_spec(ep.module)  # imports the parent packages only (light __init__ files)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return None
        with open(spec.origin, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
    except (ImportError, OSError, SyntaxError, ValueError):
        return None
    return next((node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == ep.attr), None)


def _string_attribute(node: ast.ClassDef, attribute: str) -> str | None:
    """A class attribute set to a string literal in the class body (``display_name = "LDAM-DRW"``), or None."""
    for statement in node.body:
        targets = statement.targets if isinstance(statement, ast.Assign) else \
            [statement.target] if isinstance(statement, ast.AnnAssign) else []
        value = getattr(statement, "value", None)
        if any(isinstance(t, ast.Name) and t.id == attribute for t in targets) and isinstance(value, ast.Constant) \
                and isinstance(value.value, str):
            return value.value
    return None


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


METHODS: Registry = Registry("method", "ltbench.methods")
DATASETS: Registry = Registry("dataset", "ltbench.datasets")
EVALUATORS: Registry = Registry("evaluator", "ltbench.evaluators")
