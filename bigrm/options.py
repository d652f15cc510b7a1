"""YAML recipes and `--key value` arguments → a checked Config, parsed by jsonargparse over bigrm.config's types.

    launch/train.py [--config FILE.yaml] [--section.key VALUE | --section.key=VALUE | --key VALUE ...]
The recipe (without --config the built-in tiny one) is read first wherever --config stands, then the other options;
a bare `--key` is `--section.key` when the name is unique among the sections parsed; the deepspeed launcher's
`--local_rank` is accepted and ignored; `--help` lists every option with its type, default and field docstring.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser, Namespace, set_parsing_settings

from bigrm.config import Config
from bigrm.errors import ConfigError

RECIPES = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = RECIPES / "tiny.yaml"
SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
HINTS = typing.get_type_hints(Config)  # section name → its dataclass

# each option's help is its field's docstring; an explicit YAML null is checked against the type, not taken as unset
set_parsing_settings(docstring_parse_attribute_docstrings=True, unset_sentinel=True)


def _leaves(cls: type, prefix: str = "") -> list[str]:
    """The dotted name of every option under `cls`."""
    out: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        nested = dataclasses.is_dataclass(hints[f.name])
        out += _leaves(hints[f.name], f"{prefix}{f.name}.") if nested else [prefix + f.name]
    return out


LEAVES = tuple(_leaves(Config))


def resolve_key(key: str, sections: tuple[str, ...] = SECTIONS) -> str | None:
    """`train.lr` for the bare `lr` when the name is unique among `sections`' options; None when it names none."""
    matches = [k for k in LEAVES if k.rsplit(".", 1)[-1] == key and k.split(".", 1)[0] in sections]
    if len(matches) > 1:
        raise ConfigError(f"--{key} is ambiguous: use one of {', '.join(matches)}")
    return matches[0] if matches else None


def _dotted(arg: str, sections: tuple[str, ...]) -> str | None:
    """The `section.key` that the argument `--key[=VALUE]` sets, when it is one of `sections`' options."""
    if not arg.startswith("--"):
        return None
    key = arg[2:].split("=", 1)[0]
    if "." in key:
        return key if key.split(".", 1)[0] in sections else None
    return resolve_key(key, sections)


def split_sections(argv: list[str], sections: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(the other arguments, `sections`' options with their values, each spelt `--section.key`)."""
    rest: list[str] = []
    picked: list[str] = []
    i = 0
    while i < len(argv):
        dotted = _dotted(argv[i], sections)
        if dotted is None:
            rest.append(argv[i])
            i += 1
        elif "=" in argv[i]:
            picked.append(f"--{dotted}={argv[i].split('=', 1)[1]}")
            i += 1
        else:  # every section option takes a value
            picked += [f"--{dotted}", *argv[i + 1 : i + 2]]
            i += 2
    return rest, picked


def parser(sections: tuple[str, ...] = SECTIONS, **kwargs: Any) -> ArgumentParser:
    """`--section.key` options of Config's `sections`, typed and documented by bigrm.config; errors raise."""
    p = ArgumentParser(exit_on_error=False, allow_abbrev=False, **kwargs)
    for name in sections:
        # a plain argument group: jsonargparse's class group would add `--data FILE.yaml`, and score's --data is rows
        group = p.add_argument_group((HINTS[name].__doc__ or name).rstrip("."))
        group.add_class_arguments(HINTS[name], name, as_group=False)
    return p


def train_parser(prog: str = "launch/train.py") -> ArgumentParser:
    p = parser(prog=prog, usage=f"{prog} [--config FILE.yaml] [--section.key VALUE | --key VALUE ...]")
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        default=None,
        help=f"YAML recipe of sections, read before the other options wherever it stands. Default: the built-in "
        f"{DEFAULT_RECIPE.name}.",
    )
    p.add_argument("--local_rank", type=int | None, default=None, help="Set by the deepspeed launcher; ignored.")
    return p


def _one_line(err: Exception, where: str | None) -> str:
    """jsonargparse's message on one line, naming the option (`--key` on the command line, `FILE: key` in a recipe)."""
    text = " ".join(str(err).split()).replace("Expected a ", "expected ").replace("typing.", "")
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)
    keyed = re.match(r'Parser key "([^"]+)": (.*)', text)
    if keyed:
        key, what = keyed.groups()
        union = re.search(r"Subtypes: \[(.*)\] Errors: .* Given value: (.*)$", what)
        if union:  # its report on each type of the union, folded
            what = f"Got value: {union[2]}, expected one of {union[1]}"
        text = f"{'--' if where is None else ''}{key}: {what}"
    return f"{where}: {text}" if where else text


def _call(fn: typing.Callable, where: str | None, *args: Any, **kwargs: Any) -> Any:
    """fn's result; its ArgumentError as a one-line ConfigError (`where`: the recipe read, None: the command line,
    "": values given in code)."""
    try:
        return fn(*args, **kwargs)
    except argparse.ArgumentError as err:
        raise ConfigError(_one_line(err, where)) from None


def parse_args(p: ArgumentParser, argv: list[str], **kwargs: Any) -> Namespace:
    """p's options from argv; a bad one is a one-line ConfigError naming it."""
    return _call(p.parse_args, None, argv, **kwargs)


def _config(p: ArgumentParser, ns: Namespace, sections: tuple[str, ...]) -> Config:
    """The dataclasses, built (and checked by their __post_init__) from parsed values; other sections default."""
    made = p.instantiate(ns)  # builds the nested data.synthetic; the sections are plain groups, built here
    return Config(**{name: HINTS[name](**vars(made[name])) for name in sections})


def parse(argv: list[str], sections: tuple[str, ...], defaults: dict[str, Any]) -> Config:
    """`sections`' options from argv (`--section.key VALUE`, or bare keys), over `defaults` (dotted keys)."""
    p = parser(sections)
    p.set_defaults(defaults)
    rest, picked = split_sections(argv, sections)
    return _config(p, parse_args(p, [*picked, *rest]), sections)


def _recipe(p: ArgumentParser, path: Path) -> Namespace:
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {' '.join(str(err).split())}") from err
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return _call(p.parse_object, str(path), tree)  # YAML 1.1 reads `3e-3` as a string: a float option takes it


def from_argv(argv: list[str] | None = None) -> Config:
    """The training options: the recipe (or the built-in tiny one) updated by the other arguments."""
    p = train_parser()
    rest, picked = split_sections(sys.argv[1:] if argv is None else argv, SECTIONS)
    args = [*rest, *picked]
    recipe = parse_args(p, args).config  # every argument checked before the recipe is read
    ns = _recipe(p, Path(recipe) if recipe else DEFAULT_RECIPE)
    return _config(p, parse_args(p, args, namespace=ns), SECTIONS)


def load(config_path: str | Path | None, overrides: list[str]) -> Config:
    return from_argv([*(["--config", str(config_path)] if config_path else []), *overrides])


def build(values: dict[str, Any]) -> Config:
    """Config from dotted keys (`{"data.max_length": 64}`), checked as options are; the rest keep their defaults."""
    p = parser()
    return _config(p, _call(p.parse_object, "", values), SECTIONS)


def help_text(prog: str = "launch/train.py") -> str:
    return train_parser(prog).format_help()


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
