"""The field machinery of the config sections: `option` declares a field's default, its help and its
allowed values; `Section.__post_init__` checks every field's type and range, so a config built in
Python is validated exactly like one read from YAML. `fields_of`, `split_optional` and `type_name`
read the annotations back (for the loader's errors and `describe_fields`)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from jaxppo.errors import ConfigError


def option(default: Any, help: str, *, choices: Sequence[Any] | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with its one-line help and the allowed values (checked in `__post_init__`)."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=type(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- type checks

def split_optional(tp: Any) -> tuple[bool, Any]:
    """`X | None` -> (True, X); any other annotation -> (False, tp)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def type_name(tp: Any) -> str:
    """The annotation `tp` as the errors name it: "float", "a list of str", "int or null", "a mapping"."""
    optional, tp = split_optional(tp)
    if typing.get_origin(tp) is list:
        name = f"a list of {type_name(typing.get_args(tp)[0])}"
    elif dataclasses.is_dataclass(tp):
        name = "a mapping"
    else:
        name = getattr(tp, "__name__", str(tp))
    return f"{name} or null" if optional else name


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Returns `value` checked against the annotation `tp` (ints become floats for float fields)."""
    optional, inner = split_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: expected {type_name(tp)}, got null", keys=(key,))

    def bad() -> ConfigError:
        return ConfigError(f"{key}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})", keys=(key,))

    if inner is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise bad()
        return int(value)
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise bad()
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}", keys=(key,))
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if typing.get_origin(inner) is list:
        if not isinstance(value, (list, tuple)):
            raise bad()
        (item_type,) = typing.get_args(inner)
        return [_check_type(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, inner):
            raise ConfigError(f"{key}: expected {inner.__name__}, got {type(value).__name__}", keys=(key,))
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in this file


def _check_range(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        allowed = "|".join(str(c) for c in choices)
        raise ConfigError(f"{key}={value!r} is not allowed: expected one of {allowed}", keys=(key,))
    for name, op, ok in (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
                         ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)):
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{key}={value!r} is out of range: expected {op} {bound}", keys=(key,))


class Section:
    """Base of the config sections: `__post_init__` checks every field's type and range, then calls
    the section's own `_validate`. `_prefix` is the section's dotted key, used in the messages."""

    _prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self._prefix}.{f.name}" if self._prefix else f.name
            value = _check_type(key, getattr(self, f.name), hints[f.name])
            _check_range(key, value, f.metadata)
            object.__setattr__(self, f.name, value)  # frozen: normalized value (int -> float, tuple -> list)
        self._validate()

    def _validate(self) -> None:
        """Checks that involve several fields of the section."""

    def field_hash(self) -> int:
        """Hash with lists as tuples, so a whole PPOConfig can be a jit static argument or a dict key."""
        return hash(tuple(tuple(v) if isinstance(v, list) else v
                          for v in (getattr(self, f.name) for f in dataclasses.fields(self))))

    def _key(self, name: str) -> str:
        return f"{self._prefix}.{name}" if self._prefix else name


def fields_of(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """{name: (resolved annotation, dataclasses.Field)} of a dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def default_of(f: dataclasses.Field) -> Any:
    """The default value of a field declared with `option` (a fresh copy for lists and sections)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def help_of(f: dataclasses.Field) -> str:
    """The field's one-line help, with its allowed values: "per-token KL estimator (k1|k2|k3|abs)"."""
    choices = f.metadata.get("choices")
    return f.metadata["help"] + (f" ({'|'.join(map(str, choices))})" if choices else "")
