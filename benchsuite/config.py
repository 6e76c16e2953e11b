"""Frozen, versioned method and task configurations.

A method's config is a frozen dataclass whose defaults are its paper's settings. The whole config
is serialized into every result, so a leaderboard row says exactly what ran; ``CONFIG_VERSION``
is bumped when a field's meaning changes so old results are not silently compared with new ones.
Command-line overrides (``--config repq_vit.calib_size=64``) are parsed against the field types.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from benchsuite.errors import ConfigError

if typing.TYPE_CHECKING:
    from benchsuite.bits import BitSpec

C = TypeVar("C", bound="FrozenConfig")
M = TypeVar("M", bound="MethodConfig")


@dataclass(frozen=True)
class FrozenConfig:
    """Base of every config a result records: frozen, versioned, serializable, overridable as text.

    Subclasses add fields with their defaults and may raise ``CONFIG_VERSION`` when a field's
    meaning changes.
    """

    CONFIG_VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: the class name, its version and every field."""
        fields = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"type": type(self).__name__, "version": self.CONFIG_VERSION, "fields": fields}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Rebuild a config written by :meth:`to_dict`; refuses another type or version."""
        if data.get("type") != cls.__name__ or data.get("version") != cls.CONFIG_VERSION:
            raise ConfigError(
                f"config {data.get('type')} v{data.get('version')} is not "
                f"{cls.__name__} v{cls.CONFIG_VERSION}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {k: _from_json(v, hints[k]) for k, v in data["fields"].items()}
        return cls(**kwargs)

    def with_overrides(self: C, overrides: dict[str, str]) -> C:
        """A copy with fields replaced by values given as text, parsed by the field's type."""
        hints = typing.get_type_hints(type(self))
        names = {f.name for f in dataclasses.fields(self)}
        values: dict[str, Any] = {}
        for key, text in overrides.items():
            if key not in names:
                from benchsuite.registry import suggestion

                listed = ", ".join(sorted(names)) or "none"
                raise ConfigError(
                    f"{type(self).__name__} has no field {key!r}{suggestion(key, sorted(names))}; fields: {listed}"
                )
            values[key] = parse_field_value(text, hints[key], key)
        return dataclasses.replace(self, **values)

    def describe(self) -> str:
        """One line ``name=value, ...`` for listings."""
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))


@dataclass(frozen=True)
class MethodConfig(FrozenConfig):
    """Base of every method's config; its defaults are the paper's settings.

    ``calib_size`` is the number of calibration samples the method asks for; ``None`` lets the
    task choose its own default.
    """

    calib_size: int | None = None

    def resolve(self: M, bits: BitSpec) -> M:
        """The config with every field that depends on the cell's bit widths filled in.

        The runner calls this before running a cell and stores the result, so a record names the
        iteration count (say) that actually ran, not "by budget". The base has nothing to fill.
        """
        return self


@dataclass(frozen=True)
class TaskConfig(FrozenConfig):
    """Base of a task's options that change its results (``--task-option TASK.FIELD=VALUE``).

    Where data and weights live is a run setting (:class:`benchsuite.api.TaskOptions`); what a
    task's config holds changes the numbers (the calibration source, what is quantized), so a
    cell's task overrides are part of its key and its leaderboard label. ``FLOAT_FIELDS`` names
    the fields that also change the float model or its evaluation: only those give the float
    baseline its own variant.
    """

    FLOAT_FIELDS: ClassVar[frozenset[str]] = frozenset()


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _from_json(value: Any, hint: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    return value


def parse_field_value(text: str, hint: Any, key: str) -> Any:
    """Parse ``text`` as a value of type ``hint`` (bool, int, float, str, Optional, tuple)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if text.strip().lower() in ("none", "null") and len(options) < len(typing.get_args(hint)):
            return None
        for option in options:
            try:
                return parse_field_value(text, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"cannot read {text!r} for {key}")
    if origin is tuple:
        if text.strip().startswith("["):
            try:
                return tuple(json.loads(text))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"cannot read {text!r} for {key} as a list: {exc.msg}") from None
        # Comma-separated, each item read as the tuple's element type (``qkv,fc1`` or ``0.9,0.99``).
        args = typing.get_args(hint)
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            types_ = [args[0] if args else str] * len(items)
        elif len(args) == len(items):
            types_ = list(args)
        else:
            raise ConfigError(f"{key} takes {len(args)} comma-separated values, got {len(items)}")
        return tuple(parse_field_value(item, kind, key) for item, kind in zip(items, types_))
    if hint is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} takes true or false, not {text!r}")
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            kind = "an integer" if hint is int else "a number"
            raise ConfigError(f"{key} takes {kind}, not {text!r}") from None
    if hint is str:
        return text
    if typing.get_origin(hint) is typing.Literal:
        if text in typing.get_args(hint):
            return text
        raise ConfigError(f"{key} takes one of {', '.join(map(str, typing.get_args(hint)))}, not {text!r}")
    raise ConfigError(f"{key} cannot be set from the command line")
