"""Bit-width specifications such as ``w4a4`` or ``fp``.

Only the settings the PTQ literature reports are accepted, so a typo such as ``w4a44`` or an
untested ``w2a2`` fails loudly instead of producing a leaderboard column nobody can compare.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from benchsuite.errors import BitSpecError

#: The settings benchsuite accepts, in leaderboard order (float first, then by bits descending).
SUPPORTED_BITS: tuple[str, ...] = ("fp", "w8a8", "w6a6", "w4a8", "w4a4", "w3a3")

_PATTERN = re.compile(r"^w(\d+)a(\d+)$")


@dataclass(frozen=True, order=False)
class BitSpec:
    """Weight and activation bit widths of one quantized setting; ``None`` means float."""

    w_bits: int | None
    a_bits: int | None

    @classmethod
    def parse(cls, text: str) -> BitSpec:
        """Parse ``w4a4``-style text (case-insensitive) or ``fp``; reject anything else."""
        cleaned = text.strip().lower()
        if cleaned in ("fp", "fp32", "float"):
            return cls(None, None)
        match = _PATTERN.match(cleaned)
        if match is None or cleaned not in SUPPORTED_BITS:
            raise BitSpecError(
                f"unsupported bit setting {text!r}; choose from {', '.join(SUPPORTED_BITS)}"
            )
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def is_float(self) -> bool:
        return self.w_bits is None

    @property
    def name(self) -> str:
        return "fp" if self.is_float else f"w{self.w_bits}a{self.a_bits}"

    @property
    def sort_key(self) -> int:
        """Position in :data:`SUPPORTED_BITS`, so tables list settings from float to lowest."""
        return SUPPORTED_BITS.index(self.name)

    def __str__(self) -> str:
        return self.name


def parse_bits_list(text: str) -> list[BitSpec]:
    """Parse a comma-separated list (``w4a4,w6a6``), keeping order and dropping repeats."""
    specs: list[BitSpec] = []
    for part in text.split(","):
        if part.strip():
            spec = BitSpec.parse(part)
            if spec not in specs:
                specs.append(spec)
    if not specs:
        raise BitSpecError("no bit setting given; use e.g. --bits w4a4,w6a6")
    return specs
