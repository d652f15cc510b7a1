"""The range check every section's __post_init__ shares (what a type cannot say)."""

from __future__ import annotations

from bigrm.errors import ConfigError


def bounds(section: object, prefix: str, positive: tuple[str, ...], non_negative: tuple[str, ...] = ()) -> None:
    for key in (*positive, *non_negative):
        value, zero = getattr(section, key), key in non_negative
        if value < 0 or (value == 0 and not zero):
            raise ConfigError(f"{prefix}.{key}: must be {'>= 0' if zero else '> 0'}, got {value}")
