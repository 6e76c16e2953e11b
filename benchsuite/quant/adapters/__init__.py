"""Adapter registry: finds the adapter that turns a concrete model into a CanonicalModel.

An adapter is a predicate ("is this model of my family?") and a build function that rewrites the
model into canonical sites. Adapters are tried in registration order and the first whose predicate
accepts the model wins, so a plugin that handles a subclass more specifically than a built-in
should register with ``first=True``.

The built-in adapters are registered at the bottom of this module, after everything they import
from it (:class:`UnsupportedModelError`) is defined. Importing an adapter module always runs this
package first, so this order is safe whichever module a user imports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from benchsuite.errors import BenchsuiteError
from benchsuite.quant.canonical import CanonicalModel

__all__ = [
    "AdapterEntry",
    "UnsupportedModelError",
    "adapt",
    "register_adapter",
    "registered_adapters",
]

Predicate = Callable[[nn.Module], bool]
BuildFn = Callable[[nn.Module], CanonicalModel]


class UnsupportedModelError(BenchsuiteError, TypeError):
    """A model that no registered adapter (or the chosen adapter) can rewrite."""


@dataclass(frozen=True)
class AdapterEntry:
    """One registered adapter: ``build`` is called on models that ``predicate`` accepts."""

    name: str
    predicate: Predicate
    build: BuildFn


_ADAPTERS: list[AdapterEntry] = []


def register_adapter(predicate: Predicate, build_fn: BuildFn, name: str, *, first: bool = False) -> None:
    """Register an adapter for one backbone family under ``name`` (also the family's name).

    ``first=True`` puts it ahead of the adapters already registered. A name registered twice is
    a programming error: it would make which adapter runs depend on import order.
    """
    if any(entry.name == name for entry in _ADAPTERS):
        raise ValueError(f"an adapter named {name!r} is already registered")
    entry = AdapterEntry(name, predicate, build_fn)
    if first:
        _ADAPTERS.insert(0, entry)
    else:
        _ADAPTERS.append(entry)


def registered_adapters() -> list[AdapterEntry]:
    """The registered adapters, in the order :func:`adapt` tries them."""
    return list(_ADAPTERS)


def adapt(model: nn.Module) -> CanonicalModel:
    """Rewrite ``model`` into canonical form with the first adapter that accepts it.

    A model already in canonical form is returned as is. Raises :class:`UnsupportedModelError`
    (a :class:`~benchsuite.errors.BenchsuiteError`) when no adapter accepts the model.
    """
    if isinstance(model, CanonicalModel):
        return model
    for entry in _ADAPTERS:
        if entry.predicate(model):
            return entry.build(model)
    families = ", ".join(entry.name for entry in _ADAPTERS) or "none"
    raise UnsupportedModelError(
        f"no adapter for model class {type(model).__module__}.{type(model).__qualname__}; "
        f"supported families: {families}"
    )


def _register_builtins() -> None:
    from benchsuite.quant.adapters import mmdet_swin, point_mae, timm_swin, timm_vit

    register_adapter(timm_vit.is_timm_vit, timm_vit.adapt_timm_vit, timm_vit.FAMILY)
    register_adapter(timm_swin.is_timm_swin, timm_swin.adapt_timm_swin, timm_swin.FAMILY)
    register_adapter(point_mae.is_point_mae, point_mae.adapt_point_mae, point_mae.FAMILY)
    register_adapter(mmdet_swin.is_mmdet_swin, mmdet_swin.adapt_mmdet_swin, mmdet_swin.FAMILY)


_register_builtins()
