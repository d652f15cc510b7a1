"""The range check every section's __post_init__ shares (what a type cannot say), and the checks of options against
the launch and the model, made before any work."""

from __future__ import annotations

from bigrm.errors import ConfigError


def bounds(section: object, prefix: str, positive: tuple[str, ...], non_negative: tuple[str, ...] = ()) -> None:
    for key in (*positive, *non_negative):
        value, zero = getattr(section, key), key in non_negative
        if value < 0 or (value == 0 and not zero):
            raise ConfigError(f"{prefix}.{key}: must be {'>= 0' if zero else '> 0'}, got {value}")


def sequence_parallel(n: int, world: int, heads: int, kv_heads: int) -> None:
    """train.sequence_parallel against the launch and the model: Ulysses splits every layer's heads over the group."""
    if world % n:
        raise ConfigError(f"train.sequence_parallel: {n} does not divide the {world} ranks launched; launch a multiple")
    for what, count in (("attention", heads), ("key/value", kv_heads)):
        if count % n:
            raise ConfigError(
                f"train.sequence_parallel: {n} does not divide the model's {count} {what} heads (Ulysses gives each "
                "rank of a group an equal share of every layer's heads); choose a divisor of it"
            )
