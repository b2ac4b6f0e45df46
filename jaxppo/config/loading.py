"""YAML load/save and dotted overrides through OmegaConf structured configs (defaults <- YAML <-
overrides, type conversion, `${...}` interpolation); every failure becomes a one-line ConfigError
naming the source (`file:line` or the override), the dotted key, what is allowed and what was given.

The YAML file and each override's value go through one parse, `_parse_yaml`: PyYAML's safe loader
with YAML 1.2 floats, read against the schema so that str fields keep their source text, giving
plain values and the line of every key. OmegaConf then merges those values into the schema."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    InterpolationResolutionError,
    OmegaConfBaseException,
)

from jaxppo.config.fields import fields_of, split_optional, type_name
from jaxppo.config.sections import PPOConfig, describe_fields
from jaxppo.errors import ConfigError


def _schema_at(path: Sequence[str]) -> Any:
    """The annotation of the dotted path (list indices allowed), or None if no such key."""
    tp: Any = PPOConfig
    for part in path:
        _, tp = split_optional(tp)
        if re.fullmatch(r"\d+", part) and typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        elif dataclasses.is_dataclass(tp) and part in fields_of(tp):
            tp = fields_of(tp)[part][0]
        else:
            return None
    return tp


def _split_key(full_key: str) -> list[str]:
    return [p for p in re.split(r"[.\[\]]", full_key) if p]


def _suggest(path: Sequence[str]) -> str:
    """' (did you mean 'ppo.kl_coef'?)' for an unknown dotted key, or the list of valid keys."""
    parent = split_optional(_schema_at(path[:-1]))[1]
    siblings = list(fields_of(parent)) if dataclasses.is_dataclass(parent) else []
    prefix = ".".join(path[:-1]) + "." if len(path) > 1 else ""
    close = difflib.get_close_matches(path[-1], siblings, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    # the right name in another section: `train.kl_coef` -> `ppo.kl_coef`
    leaves = {key.rsplit(".", 1)[-1]: key for key, _, _ in reversed(describe_fields())}
    close = difflib.get_close_matches(path[-1], list(leaves), n=1, cutoff=0.8)
    if close:
        return f" (did you mean '{leaves[close[0]]}'?)"
    where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
    return f" (valid keys {where}: {', '.join(siblings)})"


def _check_keys(raw: Any, cls: type, path: list[str]) -> None:
    """Unknown keys and mappings where a section is expected, before OmegaConf sees the values."""
    for name, value in raw.items():
        here = path + [str(name)]
        key = ".".join(here)
        fields = fields_of(cls)
        if name not in fields:
            raise ConfigError(f"unknown config key '{key}'{_suggest(here)}", keys=(key,))
        optional, inner = split_optional(fields[name][0])
        if dataclasses.is_dataclass(inner):
            if value is None and optional:
                continue
            if not isinstance(value, Mapping):
                what = "null" if value is None else repr(value)
                raise ConfigError(f"{key}: expected a mapping of {key}.* fields, got {what}", keys=(key,))
            _check_keys(value, inner, here)
        elif typing.get_origin(inner) is list and value is not None and not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {type_name(fields[name][0])}, got {value!r}", keys=(key,))


# ----------------------------------------------------------------------------- parsing

class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats (`1e-6` is a float, where YAML 1.1 reads a string)
    and without timestamps (a date stays a string), as OmegaConf reads YAML."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"""^(?:
     [-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
    |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
    |[-+]?[0-9]+(?:_[0-9]+)*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def _parse_yaml(text: str, schema: Any) -> tuple[yaml.Node | None, Any, dict[str, int]]:
    """The one YAML parse (of a file, or of an override's value): `(root node or None when empty,
    plain value, {dotted key: 1-based line})`, the value read against the annotation `schema`.
    Raises yaml.YAMLError (syntax, duplicate keys) with its mark."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        lines: dict[str, int] = {}
        value = None if root is None else _build(loader, root, schema, "", lines)
    finally:
        loader.dispose()
    return root, value, lines


def _build(loader: _Loader, node: yaml.Node, tp: Any, prefix: str, lines: dict[str, int]) -> Any:
    """The plain value (dicts, lists, scalars) of `node`, whose schema annotation is `tp` (None where
    the schema has no such key: `_check_keys` reports it); records the line of each key in `lines`."""
    inner = split_optional(tp)[1]
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag != "tag:yaml.org,2002:merge" and key_node.value in seen:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"found duplicate key {key_node.value}", key_node.start_mark)
            seen.add(key_node.value)
        loader.flatten_mapping(node)  # `<<: *anchor` merge keys
        fields = fields_of(inner) if dataclasses.is_dataclass(inner) else {}
        out = {}
        for key_node, value_node in node.value:
            name = loader.construct_object(key_node)
            key = f"{prefix}{name}"
            lines[key] = key_node.start_mark.line + 1
            out[name] = _build(loader, value_node, fields[name][0] if name in fields else None, key + ".", lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        item = typing.get_args(inner)[0] if typing.get_origin(inner) is list else None
        return [_build(loader, n, item, f"{prefix}{i}.", lines) for i, n in enumerate(node.value)]
    value = loader.construct_object(node, deep=True)
    if inner is str and isinstance(value, (bool, int, float)):
        return node.value  # the source text: `output_dir: yes` stays 'yes', not 'True'
    return value


def _yaml_problem(e: yaml.YAMLError) -> str:
    return " ".join(str(getattr(e, "problem", None) or e).split())


# ----------------------------------------------------------------------------- layers

@dataclasses.dataclass(frozen=True)
class _Layer:
    """One source of values (the YAML file or one override): its plain dict and where each dotted
    key was set ('file.yaml:12' or "override 'k=v'")."""

    values: dict
    origins: dict[str, str]

    def lookup(self, path: Sequence[str]) -> tuple[bool, Any]:
        node: Any = self.values
        for part in path:
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return False, None
        return True, node


def _read_yaml(path: str) -> _Layer:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        root, values, lines = _parse_yaml(text, PPOConfig)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        loc = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        raise ConfigError(f"{loc}: invalid YAML: {_yaml_problem(e)}") from None
    if root is not None and not isinstance(root, yaml.MappingNode):
        kind = "a list" if isinstance(root, yaml.SequenceNode) else "a scalar"
        raise ConfigError(f"{path}:{root.start_mark.line + 1}: the top level must be a mapping of sections "
                          f"({', '.join(f.name for f in dataclasses.fields(PPOConfig))}), got {kind}")
    return _Layer(values or {}, {key: f"{path}:{line}" for key, line in lines.items()})


_KEY_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _parse_override(item: str) -> _Layer:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r} has no '=': expected key.sub=value, e.g. ppo.kl_coef=0.1")
    key, text = (part.strip() for part in item.split("=", 1))
    if not _KEY_RE.fullmatch(key):
        raise ConfigError(f"override {item!r}: {key!r} is not a dotted config key like ppo.kl_coef")
    parts = key.split(".")
    try:
        _, value, _ = _parse_yaml(text, _schema_at(parts))
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse the value: {_yaml_problem(e)}") from None
    for part in reversed(parts):
        value = {part: value}
    where = f"override '{item}'"
    return _Layer(value, {".".join(parts[:i]): where for i in range(1, len(parts) + 1)})


def _first_line(e: BaseException) -> str:
    msg = getattr(e, "msg", None) or str(e)
    return str(msg).strip().splitlines()[0] if str(msg).strip() else type(e).__name__


def _locate(layers: Sequence[_Layer], keys: Iterable[str]) -> str:
    """'file.yaml:12: ' or "override 'k=v': " for the last layer that set one of `keys`."""
    for key in keys:
        for layer in reversed(layers):
            if key in layer.origins:
                return layer.origins[key] + ": "
    return ""


def _convert(e: OmegaConfBaseException, layers: Sequence[_Layer]) -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    path = _split_key(key)
    if isinstance(e, ConfigKeyError) and path:
        return ConfigError(f"{_locate(layers, [key])}unknown config key '{key}'{_suggest(path)}", keys=(key,))
    if isinstance(e, InterpolationResolutionError):
        where = _locate(layers, [key])
        return ConfigError(f"{where}{key}: cannot resolve interpolation: {_first_line(e)}", keys=(key,))
    tp = _schema_at(path) if path else None
    found, value = False, None
    for layer in reversed(layers):
        found, value = layer.lookup(path)
        if found:
            break
    where = _locate(layers, [".".join(path[:i]) for i in range(len(path), 0, -1)])
    if path and tp is not None and found:
        shown = "null" if value is None else repr(value)
        return ConfigError(f"{where}{key}: expected {type_name(tp)}, got {shown}", keys=(key,))
    return ConfigError(f"{where}{key + ': ' if key else ''}{_first_line(e)}", keys=(key,) if key else ())


def _merge_into(target: dict, values: Mapping) -> None:
    """Deep merge of plain mappings: values of `values` replace those of `target` (lists whole)."""
    for key, value in values.items():
        if isinstance(value, Mapping):
            if not isinstance(target.get(key), dict):
                target[key] = {}          # a fresh dict: the layers' own values are never modified
            _merge_into(target[key], value)
        else:
            target[key] = value


def _writable(node: DictConfig) -> DictConfig:
    """`node` with the read-only flag cleared on it and every mapping below it: OmegaConf marks the
    nodes of frozen dataclasses (the sections) read-only, and omegaconf 2.3.0 then refuses to merge
    values into them (2.4 merges anyway). The result is still built by the frozen dataclasses."""
    OmegaConf.set_readonly(node, False)
    if not node._is_none():  # an optional section left null (ppo.adaptive_kl)
        for _, child in node.items_ex(resolve=False):
            if isinstance(child, DictConfig):
                _writable(child)
    return node


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> PPOConfig:
    """Defaults <- YAML file at `path` <- dotted `overrides` (`["ppo.kl_coef=0.1", ...]`, YAML values).

    Raises ConfigError (one line, naming file:line or the override, the key, expected vs got).
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    layers: list[_Layer] = []
    if path is not None:
        layers.append(_read_yaml(os.fspath(path)))
    layers.extend(_parse_override(item) for item in overrides)
    for layer in layers:
        try:
            _check_keys(layer.values, PPOConfig, [])
        except ConfigError as e:
            raise ConfigError(f"{_locate([layer], e.keys)}{e}", keys=e.keys) from None
    try:
        # the layers are merged as plain values first, so a later layer replaces a bad earlier value
        # (an override fixes the YAML) and an error names the layer whose value is in effect
        combined: dict = {}
        for layer in layers:
            _merge_into(combined, layer.values)
        merged = OmegaConf.merge(_writable(OmegaConf.structured(PPOConfig)), OmegaConf.create(combined))
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _convert(e, layers) from None
    except ConfigError as e:  # raised by a __post_init__: say where the offending value came from
        raise ConfigError(f"{_locate(layers, e.keys)}{e}", keys=e.keys) from None
    assert isinstance(config, PPOConfig)
    return config


def config_to_dict(config: PPOConfig) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-able) of a config."""
    return dataclasses.asdict(config)


def config_to_yaml(config: PPOConfig) -> str:
    """The fully resolved config as YAML text (every field, defaults included)."""
    return OmegaConf.to_yaml(OmegaConf.create(config_to_dict(config)), sort_keys=False)


def save_config(config: PPOConfig, path: str | os.PathLike) -> None:
    """Writes the fully resolved YAML atomically; `load_config(path) == config`."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("# jaxppo config (fully resolved): python -m jaxppo.train --config this.yaml\n")
        fh.write(config_to_yaml(config))
    os.replace(tmp, path)
