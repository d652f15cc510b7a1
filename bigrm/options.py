"""YAML recipes and `--key value` arguments → a checked Config (the schema is bigrm.config).

    launch/train.py [--config FILE.yaml] [--section.key VALUE | --key VALUE | --key=VALUE ...]
A bare key works when its name is unique across sections; the deepspeed launcher's `--local_rank` is accepted and
ignored; `--help` lists every option with its default and documentation.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from bigrm.config import Config
from bigrm.errors import ConfigError

RECIPES = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = RECIPES / "tiny.yaml"


def _leaves(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    out: dict[str, dataclasses.Field] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_leaves(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = f
    return out


def _field_type(dotted: str) -> type:
    cls: type = Config
    *parents, name = dotted.split(".")
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    return typing.get_type_hints(cls)[name]


LEAVES = _leaves(Config)


def resolve_key(key: str) -> str:
    """`train.lr` or the bare `lr` when the bare name is unique."""
    if key in LEAVES:
        return key
    matches = [k for k in LEAVES if k.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"--{key} is ambiguous: use one of {', '.join(matches)}")
    raise ConfigError(f"unknown option {key!r} (see --help for the list)")


def _coerce(dotted: str, value: Any, where: str) -> Any:
    kind = _field_type(dotted)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads `3e-3` (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, list),
    }[kind]
    if kind is str and value is None:
        return ""
    if kind is list and isinstance(value, str):  # `--report_to wandb`: one item
        return [value]
    if not ok:
        raise ConfigError(f"{where}{dotted}: expected {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


def _flatten(tree: dict, where: str, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = prefix + str(key)
        if isinstance(value, dict) and dotted not in LEAVES:
            flat.update(_flatten(value, where, dotted + "."))
        elif dotted in LEAVES:
            flat[dotted] = value
        else:
            raise ConfigError(f"{where}unknown option {dotted!r}")
    return flat


def build(values: dict[str, Any]) -> Config:
    """Config from dotted keys; each section is constructed once so its __post_init__ checks run."""

    def make(cls: type, prefix: str) -> Any:
        kwargs = {}
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                kwargs[f.name] = make(hint, f"{prefix}{f.name}.")
            elif prefix + f.name in values:
                kwargs[f.name] = values[prefix + f.name]
        return cls(**kwargs)

    return make(Config, "")


def load(config_path: str | Path | None, overrides: list[str]) -> Config:
    """YAML file (or the built-in tiny recipe) updated by `--key value` / `--key=value` pairs."""
    path = Path(config_path) if config_path else DEFAULT_RECIPE
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    values = {k: _coerce(k, v, f"{path}: ") for k, v in _flatten(tree, f"{path}: ").items()}
    values.update(parse_overrides(overrides))
    return build(values)


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key value, got {arg!r}")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value")
            key, raw = arg[2:], argv[i + 1]
            i += 2
        dotted = resolve_key(key)
        value = raw if _field_type(dotted) is str else yaml.safe_load(raw)
        out[dotted] = _coerce(dotted, value, "command line: --")
    return out


def split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """Pull out --config and the launcher's --local_rank (the deepspeed launcher appends it)."""
    config, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank"):
            i += 1 if "=" in arg else 2
        elif arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path")
            config, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            config, i = arg.split("=", 1)[1], i + 1
        else:
            rest.append(arg)
            i += 1
    return config, rest


def help_text() -> str:
    lines = [
        "usage: launch/train.py [--config FILE.yaml] [--section.key VALUE | --key VALUE ...]",
        f"With no --config the built-in recipe {DEFAULT_RECIPE.name} is used. Options:",
    ]
    defaults = dataclasses.asdict(Config())
    for dotted, f in LEAVES.items():
        value = defaults
        for part in dotted.split("."):
            value = value[part]
        lines.append(f"  --{dotted} (default {value!r})\n      {f.metadata['help']}")
    return "\n".join(lines)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def from_argv(argv: list[str] | None = None) -> Config:
    config, rest = split_argv(sys.argv[1:] if argv is None else argv)
    return load(config, rest)
