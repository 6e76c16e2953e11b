"""Plugin discovery through entry points: one lazy registry per plugin kind.

Entry points are the only door: the built-in methods and tasks register through the very groups
(``benchsuite.methods``, ``benchsuite.tasks``) a third-party package uses. Discovery reads only
metadata; a plugin's module is imported the first time it is asked for, so a plugin whose optional
dependencies are missing is reported as unavailable (with the reason) instead of breaking
``import benchsuite`` or ``benchsuite list``. A name claimed by two distributions is an error that
names both, because silently picking one would make results depend on install order.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, TypeVar

from benchsuite.errors import PluginConflictError, PluginUnavailableError, UnknownNameError

T = TypeVar("T")

METHODS_GROUP = "benchsuite.methods"
TASKS_GROUP = "benchsuite.tasks"

#: Extras that provide an optional dependency, so "unavailable" can say how to fix it.
EXTRA_FOR_MODULE = {
    "mmdet": "coco",
    "mmcv": "coco",
    "mmengine": "coco",
    "pycocotools": "coco",
    "torch_cluster": "pointcloud",
    "h5py": "pointcloud",
    "ray": "ray",
}
#: Extras with a compiled dependency that PyPI has only as source: the project's build script
#: installs it against the installed torch first (a plain pip install of the extra fails).
BUILD_SCRIPT_FOR_EXTRA = {
    "coco": "scripts/build_mmcv.sh",
    "pointcloud": "scripts/build_torch_cluster.sh",
}


def normalize(name: str) -> str:
    """Names compare case-insensitively with '-' and '_' equal (``repq-vit`` == ``repq_vit``)."""
    return name.strip().lower().replace("-", "_")


def suggestion(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    pool = list(candidates)
    by_norm = {normalize(c): c for c in pool}
    close = difflib.get_close_matches(normalize(name), list(by_norm), n=1, cutoff=0.6)
    return f" (did you mean {by_norm[close[0]]!r}?)" if close else ""


@dataclass
class PluginEntry:
    """One registered plugin: where it comes from and, once loaded, the class itself."""

    name: str
    value: str
    distribution: str
    entry_point: EntryPoint | None = None
    loaded: Any = None
    error: str | None = None

    def load(self) -> Any:
        if self.loaded is None and self.error is None:
            try:
                assert self.entry_point is not None
                self.loaded = self.entry_point.load()
            except ImportError as exc:
                self.error = _missing_dependency_reason(exc, self.value)
        if self.error is not None:
            raise PluginUnavailableError(f"{self.name} is unavailable: {self.error}")
        return self.loaded


def _missing_dependency_reason(exc: ImportError, value: str) -> str:
    module = (getattr(exc, "name", None) or "").split(".")[0]
    if module == value.split(":")[0].split(".")[0]:
        return f"cannot import {value} ({exc})"  # the plugin itself is broken, not a dependency
    extra = EXTRA_FOR_MODULE.get(module)
    if module and extra:
        script = BUILD_SCRIPT_FOR_EXTRA.get(extra)
        steps = f"{script}, then pip install 'benchsuite[{extra}]'" if script else f"pip install 'benchsuite[{extra}]'"
        return f"needs {module} ({steps})"
    if module:
        return f"needs {module}, which is not importable ({exc})"
    return str(exc)


@dataclass
class Registry(Generic[T]):
    """Plugins of one kind, discovered from one entry-point group."""

    group: str
    kind: str
    _entries: dict[str, PluginEntry] | None = field(default=None, init=False, repr=False)
    _extra: dict[str, PluginEntry] = field(default_factory=dict, init=False, repr=False)

    def _discover(self) -> dict[str, PluginEntry]:
        if self._entries is None:
            entries: dict[str, PluginEntry] = {}
            for ep in entry_points(group=self.group):
                dist = ep.dist.name if ep.dist is not None else "<unknown distribution>"
                key = normalize(ep.name)
                if key in entries:
                    other = entries[key]
                    if other.distribution == dist and other.value == ep.value:
                        continue  # the same distribution seen twice on sys.path
                    raise PluginConflictError(
                        f"{self.kind} name {ep.name!r} is claimed by two distributions: "
                        f"{other.distribution} ({other.value}) and {dist} ({ep.value}); "
                        "uninstall one of them"
                    )
                entries[key] = PluginEntry(ep.name, ep.value, dist, ep)
            self._entries = entries
        return {**self._entries, **self._extra}

    def register(self, name: str, obj: Any, distribution: str = "<runtime>") -> None:
        """Register an object directly (tests, notebooks); collisions are errors as for entry points."""
        key = normalize(name)
        existing = self._discover().get(key)
        if existing is not None:
            raise PluginConflictError(
                f"{self.kind} name {name!r} is already registered by {existing.distribution}"
            )
        self._extra[key] = PluginEntry(name, f"{obj!r}", distribution, loaded=obj)

    def unregister(self, name: str) -> None:
        self._extra.pop(normalize(name), None)

    def reset(self) -> None:
        """Forget discovered entry points (after installing a plugin in the same process)."""
        self._entries = None

    def names(self) -> list[str]:
        """All registered names, sorted, available or not."""
        return sorted(e.name for e in self._discover().values())

    def entry(self, name: str) -> PluginEntry:
        entries = self._discover()
        found = entries.get(normalize(name))
        if found is None:
            known = [e.name for e in entries.values()]
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{suggestion(name, known)}; "
                f"known {self.kind}s: {', '.join(sorted(known)) or 'none'}"
            )
        return found

    def get(self, name: str) -> T:
        """The plugin class for ``name``; raises a clear error when unknown or unavailable."""
        entry = self.entry(name)
        loaded = entry.load()
        reason = _class_unavailable_reason(loaded)
        if reason:
            raise PluginUnavailableError(f"{entry.name} is unavailable: {reason}")
        return loaded

    def availability(self) -> dict[str, str | None]:
        """name -> None when usable, else the reason it is not (imports each plugin once)."""
        status: dict[str, str | None] = {}
        for entry in sorted(self._discover().values(), key=lambda e: e.name):
            try:
                status[entry.name] = _class_unavailable_reason(entry.load())
            except PluginUnavailableError:
                status[entry.name] = entry.error
        return status

    def available(self) -> list[str]:
        return [name for name, reason in self.availability().items() if reason is None]


def _class_unavailable_reason(obj: Any) -> str | None:
    check = getattr(obj, "unavailable_reason", None)
    return check() if callable(check) else None


methods: Registry[Any] = Registry(METHODS_GROUP, "method")
tasks: Registry[Any] = Registry(TASKS_GROUP, "task")
