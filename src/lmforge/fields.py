"""Settings dataclasses from plain dicts (JSON, TOML), strictly: an unknown key is an error.

A misspelt key (`learning_rate` for `lr`) silently ignored would train with the default,
so every `from_dict` refuses keys its dataclass does not have, naming them and the
keys it knows. Bottom layer: imports only `lmforge.errors` and the standard library.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from lmforge.errors import LmforgeError

T = TypeVar("T")


def field_names(cls: type) -> tuple[str, ...]:
    """The keys a dataclass is built from: its fields that `__init__` takes, in order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def dataclass_from_dict(cls: type[T], values: Mapping[str, Any], what: str, key: str = "key") -> T:
    """`cls(**values)`, refusing any key `cls` has no field for.

    `what` names what is being read (a file, or "model config"), `key` what one entry is
    called in the error: "lr.toml: unknown key(s) learning_rate; known keys: ...".
    """
    if not isinstance(values, Mapping):
        raise LmforgeError(f"{what}: expected a mapping of {key}s to values, got {type(values).__name__}")
    known = field_names(cls)
    unknown = [k for k in values if k not in known]
    if unknown:
        raise LmforgeError(
            f"{what}: unknown {key}(s) {', '.join(sorted(map(str, unknown)))}; known {key}s: {', '.join(sorted(known))}"
        )
    return cls(**values)
