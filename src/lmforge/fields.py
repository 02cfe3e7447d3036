"""Settings dataclasses from plain dicts (JSON, TOML), strictly: an unknown key, or a value
of the wrong type, is an error.

A misspelt key (`learning_rate` for `lr`) silently ignored would train with the default,
so every `from_dict` refuses keys its dataclass does not have, naming them and the
keys it knows. A value is checked against its field's annotation (`"n_layer": "four"`
is refused here, naming the key, the value and where it came from, instead of failing
somewhere deep with a TypeError). Bottom layer: imports only `lmforge.errors` and the
standard library.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from lmforge.errors import LmforgeError

T = TypeVar("T")
_BAD = object()  # a value that does not fit its annotation


def field_names(cls: type) -> tuple[str, ...]:
    """The keys a dataclass is built from: its fields that `__init__` takes, in order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def dataclass_from_dict(cls: type[T], values: Mapping[str, Any], what: str, key: str = "key") -> T:
    """`cls(**values)`, refusing any key `cls` has no field for and any value that does not
    fit its field's annotation (`check_fields`).

    `what` names what is being read (a file, or "model config"), `key` what one entry is
    called in the error: "lr.toml: unknown key(s) learning_rate; known keys: ...".
    """
    return cls(**check_fields(cls, values, what, key))


def check_fields(cls: type, values: Mapping[str, Any], what: str, key: str = "key") -> dict[str, Any]:
    """`values` checked against the fields of the dataclass `cls`: every key is a field,
    every value fits the field's annotation (an int is a float: TOML and JSON write
    `lr = 1` for 1.0). Returns them as a new dict.

    Annotations understood: int (a bool is not one), float (an int is one), bool, str,
    None, `X | None` / Optional, Literal, list / tuple / dict (and Mapping, Sequence) of
    those, Any; any other class by isinstance. A partial dict (some fields only) is fine.
    """
    if not isinstance(values, Mapping):
        raise LmforgeError(f"{what}: expected a mapping of {key}s to values, got {type(values).__name__}")
    known = field_names(cls)
    unknown = [k for k in values if k not in known]
    if unknown:
        raise LmforgeError(
            f"{what}: unknown {key}(s) {', '.join(sorted(map(str, unknown)))}; known {key}s: {', '.join(sorted(known))}"
        )
    hints = _type_hints(cls)
    out = {}
    for name, value in values.items():
        annotation = hints.get(name, Any)
        checked = _conform(value, annotation)
        if checked is _BAD:
            kind = "" if value is None else f" ({_kind(value)})"
            raise LmforgeError(f"{what}: {name} must be {describe(annotation)}, got {_show(value)}{kind}")
        out[name] = checked
    return out


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that cannot be resolved here: such fields go unchecked
        return {}


def _conform(value: Any, tp: Any) -> Any:
    """`value` if it fits the annotation `tp`, else `_BAD`."""
    if tp is Any or tp is object:
        return value
    if tp is None or tp is type(None):
        return value if value is None else _BAD
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        for arg in args:
            checked = _conform(value, arg)
            if checked is not _BAD:
                return checked
        return _BAD
    if origin is typing.Literal:
        return value if any(type(value) is type(a) and value == a for a in args) else _BAD
    if tp is bool:
        return value if isinstance(value, bool) else _BAD
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if tp is float:
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else _BAD
    if tp is str:
        return value if isinstance(value, str) else _BAD
    container = origin or tp
    if container in (list, tuple, set, frozenset) or _is_abc(container, "Sequence"):
        if not isinstance(value, (list, tuple)):
            return _BAD
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            items = args  # a fixed-length tuple
            if len(value) != len(items):
                return _BAD
            return value if all(_conform(v, a) is not _BAD for v, a in zip(value, items)) else _BAD
        item = args[0] if args else Any
        return value if all(_conform(v, item) is not _BAD for v in value) else _BAD
    if container is dict or _is_abc(container, "Mapping"):
        if not isinstance(value, Mapping):
            return _BAD
        k_tp, v_tp = args if len(args) == 2 else (Any, Any)
        ok = all(_conform(k, k_tp) is not _BAD and _conform(v, v_tp) is not _BAD for k, v in value.items())
        return value if ok else _BAD
    if isinstance(tp, type):
        return value if isinstance(value, tp) else _BAD
    return value  # an annotation this does not understand: not checked


def _is_abc(container: Any, name: str) -> bool:
    abc = getattr(collections.abc, name)
    return isinstance(container, type) and issubclass(container, abc) and container not in (str, bytes)


_NAMES = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), type(None): ("null", "nulls")}


def describe(tp: Any, plural: bool = False) -> str:
    """What an annotation asks for, in words: "an integer", "a list of strings", "a number or null"."""
    if tp is None:
        tp = type(None)
    if tp in _NAMES:
        return _NAMES[tp][plural]
    if tp is Any or tp is object:
        return "values" if plural else "any value"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(describe(a, plural) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(_show(a) for a in args)
    container = origin or tp
    if container in (list, tuple, set, frozenset) or _is_abc(container, "Sequence"):
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
        item = args[0] if args else Any
        return ("lists" if plural else "a list") + (f" of {describe(item, True)}" if item is not Any else "")
    if container is dict or _is_abc(container, "Mapping"):
        v_tp = args[1] if len(args) == 2 else Any
        of = f" of names to {describe(v_tp, True)}" if v_tp is not Any else " of names to values"
        return ("tables" if plural else "a table") + of
    return f"{getattr(tp, '__name__', str(tp))}s" if plural else f"a {getattr(tp, '__name__', str(tp))}"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    for t in (int, float, str):
        if isinstance(value, t):
            return _NAMES[t][0]
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return f"a {type(value).__name__}"


def _show(value: Any, limit: int = 60) -> str:
    """A value as JSON would write it (TOML and JSON users see their own spelling), cut short."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
