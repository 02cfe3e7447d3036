"""Flags from a run config's dataclass fields: `--key value` for every field, help from its comment.

A recipe's config (`TrainConfig` or a subclass) is the one list of what a run takes;
this module turns it into argparse flags and back, so a new field is a new flag with
no CLI code. Values come in order: defaults, then the TOML file, then the flags given.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import typing
from typing import Any

from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.fields import check_fields
from lmforge.train.config import TrainConfig, read_config_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def field_comments(cls: type) -> dict[str, str]:
    """Each field's trailing `# comment` in the class source (and its bases'), with the
    default: the flags' help comes from the same line that defines the field."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for name, comment in re.findall(r"^\s+(\w+): [^#\n]*#\s*(.+)$", inspect.getsource(klass), re.MULTILINE):
            helps[name] = comment.replace("%", "%%")
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    return {k: f"{v} (default: {defaults[k]!r})" if defaults.get(k) not in (None, "") else v for k, v in helps.items()}


def add_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), cls: type[TrainConfig] | None = None) -> None:
    """One flag per field of `cls` (TrainConfig or a recipe's subclass), defaulting to
    None so that only flags actually given override."""
    cls = cls or TrainConfig
    types = typing.get_type_hints(cls)
    helps = field_comments(cls)
    aliases = getattr(cls, "flag_aliases", {})
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name == "model":
            continue
        flags = ["--" + f.name.replace("_", "-"), *aliases.get(f.name, ())]
        flag, dest = flags[0], {"dest": f.name}
        kind = types[f.name]
        if f.name == "resume":
            parser.add_argument(flag, nargs="?", const="latest", default=None, metavar="PATH",
                                help="continue from the newest intact checkpoint in --out, or from PATH")
        elif kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=helps.get(f.name), **dest)
        elif typing.get_origin(kind) is list:
            parser.add_argument(*flags, nargs="+", default=None, metavar="TEXT", help=helps.get(f.name), **dest)
        else:
            parser.add_argument(*flags, type=kind, default=None, metavar=f.name.split("_")[-1].upper(), help=helps.get(f.name), **dest)
    if "model" not in skip:
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a model field of the preset, e.g. --set n_layer=4 (repeatable)")


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def config_from_args(args: argparse.Namespace, config_file: str | None = None, cls: type[TrainConfig] | None = None) -> TrainConfig:
    """Defaults, then the TOML file, then the flags that were given."""
    cls = cls or TrainConfig
    has_file = config_file is not None  # `--config ''` is a mistake, not "no file"
    values: dict[str, Any] = read_config_file(config_file) if has_file else {}
    source = str(config_file) if has_file else "flags"
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is not None and f.name != "model":
            values[f.name] = given
    model = values.get("model", {})
    if not isinstance(model, dict):  # `model = 3` in the file: the type error, naming the file
        check_fields(cls, {"model": model}, source)
    model = dict(model)
    for item in getattr(args, "set", []) or []:
        key, eq, text = item.partition("=")
        if not eq:
            raise LmforgeError(f"--set takes KEY=VALUE (e.g. n_layer=4), got {item!r}")
        key, value = key.strip(), _parse_value(text.strip())
        model.update(check_fields(Config, {key: value}, f"--set {item}", key="model field"))
    values["model"] = model
    return cls.from_dict(values, source)
