"""Errors a user can cause.

Every mistake a user can make (an unknown name, a bad bit spec, missing data, a corrupt file)
raises a subclass of :class:`BenchsuiteError`. The CLI turns exactly these into one line on
stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BenchsuiteError(Exception):
    """Base class of all user-facing errors."""


class UnknownNameError(BenchsuiteError, KeyError):
    """A method, task or model name that nothing provides."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class PluginConflictError(BenchsuiteError):
    """Two distributions claim the same plugin name."""


class PluginUnavailableError(BenchsuiteError):
    """A plugin exists but its optional dependencies are missing."""


class BitSpecError(BenchsuiteError, ValueError):
    """A bit-width specification that benchsuite does not accept."""


class ConfigError(BenchsuiteError, ValueError):
    """A method config override that does not fit the config's fields."""


class DataError(BenchsuiteError):
    """Missing, misplaced or corrupt data or weights."""


class ResultStoreError(BenchsuiteError):
    """A result file that cannot be read or belongs to another schema."""
