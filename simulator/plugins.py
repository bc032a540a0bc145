"""Strategies and dataset sources from other installed packages, through Python entry points.

Scenario files never name code (they are read with ``yaml.safe_load``, and a name is looked up
in a registry, never imported). New merging strategies and dataset sources come from installed
packages that declare entry points::

    [project.entry-points."protofed.strategies"]
    myavg = "my_package.strategy:MyAvg"        # a FederatedStrategy subclass with name = "myavg"

    [project.entry-points."protofed.datasets"]
    blobs = "my_package.data:BLOBS"             # a SourceSpec named "blobs" (or a function returning one)

    [project.entry-points."protofed.backbones"]
    tiny = "my_package.nets:TINY"               # a BackboneSpec named "tiny" (or a function returning one)

A :class:`Registry` is a ``dict`` of the built-in entries that adds the installed plugins the first
time it is read (so that importing protofed stays cheap and a plugin may import protofed itself).
A plugin that cannot be imported, has the wrong type, a name that is not a safe path component or
a name already taken is left out and recorded in :attr:`Registry.problems`; ``protofed list``
shows these, and a scenario that names such a plugin gets an error naming the entry point.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

STRATEGY_GROUP = "protofed.strategies"
SOURCE_GROUP = "protofed.datasets"
BACKBONE_GROUP = "protofed.backbones"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"  # the scenario's name pattern: one safe path component

V = TypeVar("V")


class PluginError(Exception):
    """Raised by a registry's check when a loaded object is not what the group expects."""


@dataclass(frozen=True)
class PluginProblem:
    """A plugin entry point that could not be used."""

    group: str
    name: str
    value: str  # "module:attribute"
    package: str  # "dist-name version", or "" when unknown
    message: str

    def describe(self) -> str:
        pkg = f" from package {self.package}" if self.package else ""
        return f"plugin entry point {self.name!r} = {self.value!r} (group {self.group}{pkg}) {self.message}"


def _package(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ""
    try:
        return f"{dist.metadata['Name']} {dist.version}"
    except Exception:  # noqa: BLE001 - broken metadata only costs the package name in a message
        return ""


class Registry(dict):
    """Built-in entries plus the plugins of one entry-point group, loaded once on first read.

    ``check(name, obj)`` turns what an entry point loads into a registry value or raises
    :class:`PluginError` with the reason.
    """

    def __init__(self, builtins: dict[str, V], group: str, kind: str, check: Callable[[str, Any], V]) -> None:
        super().__init__(builtins)
        self.group = group
        self.kind = kind  # "strategy" / "dataset source", for messages
        self._check = check
        self._state = "new"  # new -> loading -> loaded
        self._lock = threading.RLock()  # other threads wait; the loading thread (a plugin's import) re-enters
        self._problems: dict[str, PluginProblem] = {}
        self.plugins: dict[str, str] = {}  # registry name -> package that provides it

    # ------------------------------------------------------------------ loading
    def load_plugins(self) -> Registry:
        """Add the installed plugins (once; re-entrant calls from a plugin's import see the built-ins)."""
        if self._state == "loaded":
            return self
        with self._lock:
            if self._state != "new":
                return self
            self._state = "loading"
            try:
                for ep in sorted(entry_points(group=self.group), key=lambda e: (e.name, e.value)):
                    self._add(ep)
            finally:
                self._state = "loaded"
        return self

    def _add(self, ep: EntryPoint) -> None:
        def problem(message: str) -> None:
            self._problems.setdefault(ep.name, PluginProblem(self.group, ep.name, ep.value, _package(ep), message))

        if not re.fullmatch(NAME_PATTERN, ep.name):
            return problem(
                "has an invalid name: a name must start with a letter or digit and use only letters, "
                "digits, '.', '_', '-' (it becomes a folder of the results path)"
            )
        if ep.name in self:
            owner = self.plugins.get(ep.name)
            return problem(f"is ignored: the name is already taken by {f'plugin package {owner}' if owner else f'the built-in {self.kind}'}")
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001 - third-party code: any failure is reported, not raised
            return problem(f"failed to load: {type(exc).__name__}: {exc}")
        try:
            value = self._check(ep.name, obj)
        except PluginError as exc:
            return problem(f"is not a valid {self.kind}: {exc}")
        except Exception as exc:  # noqa: BLE001 - e.g. a factory function that raises
            return problem(f"failed to load: {type(exc).__name__}: {exc}")
        dict.__setitem__(self, ep.name, value)
        self.plugins[ep.name] = _package(ep) or ep.value

    @property
    def problems(self) -> dict[str, PluginProblem]:
        """Entry points of this group that could not be used, by name."""
        self.load_plugins()
        return dict(self._problems)

    def unknown(self, name: str) -> str:
        """The error message for a name that is not in the registry."""
        self.load_plugins()
        if name in self._problems:
            return f"{self.kind} {name!r} is not available: {self._problems[name].describe()}"
        from .scenario import did_you_mean

        hint = did_you_mean(str(name), sorted(self))
        return f"unknown {self.kind} {name!r}{hint}; allowed: {', '.join(sorted(self))}"

    # ------------------------------------------------------------------ reading loads the plugins
    def __getitem__(self, key: str) -> V:
        self.load_plugins()
        return dict.__getitem__(self, key)

    def __contains__(self, key: object) -> bool:
        self.load_plugins()
        return dict.__contains__(self, key)

    def __iter__(self) -> Iterator[str]:
        self.load_plugins()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self.load_plugins()
        return dict.__len__(self)

    def __repr__(self) -> str:
        self.load_plugins()
        return dict.__repr__(self)

    def __eq__(self, other: object) -> bool:
        self.load_plugins()
        return dict.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]

    def get(self, key: str, default: Any = None) -> Any:
        self.load_plugins()
        return dict.get(self, key, default)

    def keys(self):  # type: ignore[override]
        self.load_plugins()
        return dict.keys(self)

    def values(self):  # type: ignore[override]
        self.load_plugins()
        return dict.values(self)

    def items(self):  # type: ignore[override]
        self.load_plugins()
        return dict.items(self)

    def copy(self) -> dict[str, V]:  # type: ignore[override]
        self.load_plugins()
        return dict(dict.items(self))

    def __or__(self, other: Any) -> dict[str, V]:
        return self.copy() | dict(other)

    def __reduce__(self) -> tuple:
        return (dict, (self.copy(),))  # pickles (and deep-copies) as a plain dict of what it holds

