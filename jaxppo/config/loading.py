"""YAML load/save and dotted overrides through OmegaConf structured configs (defaults <- YAML <-
overrides, type conversion, `${...}` interpolation); every failure becomes a one-line ConfigError
naming the source (`file:line` or the override), the dotted key, what is allowed and what was given."""

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

from jaxppo.config.fields import _fields_of, _split_optional, _type_name
from jaxppo.config.sections import PPOConfig, describe_fields
from jaxppo.errors import ConfigError


def _schema_at(path: Sequence[str]) -> Any:
    """The annotation of the dotted path (list indices allowed), or None if no such key."""
    tp: Any = PPOConfig
    for part in path:
        _, tp = _split_optional(tp)
        if re.fullmatch(r"\d+", part) and typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        elif dataclasses.is_dataclass(tp) and part in _fields_of(tp):
            tp = _fields_of(tp)[part][0]
        else:
            return None
    return tp


def _split_key(full_key: str) -> list[str]:
    return [p for p in re.split(r"[.\[\]]", full_key) if p]


def _suggest(path: Sequence[str]) -> str:
    """' (did you mean 'ppo.kl_coef'?)' for an unknown dotted key, or the list of valid keys."""
    parent = _split_optional(_schema_at(path[:-1]))[1]
    siblings = list(_fields_of(parent)) if dataclasses.is_dataclass(parent) else []
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
        fields = _fields_of(cls)
        if name not in fields:
            raise ConfigError(f"unknown config key '{key}'{_suggest(here)}", keys=(key,))
        optional, inner = _split_optional(fields[name][0])
        if dataclasses.is_dataclass(inner):
            if value is None and optional:
                continue
            if not isinstance(value, Mapping):
                what = "null" if value is None else repr(value)
                raise ConfigError(f"{key}: expected a mapping of {key}.* fields, got {what}", keys=(key,))
            _check_keys(value, inner, here)
        elif typing.get_origin(inner) is list and value is not None and not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(fields[name][0])}, got {value!r}", keys=(key,))


# ----------------------------------------------------------------------------- load / save

class _Layer:
    """One source of values (the YAML file or one override): its plain dict and where each key sits."""

    def __init__(self, values: dict, origins: dict[str, str]):
        self.values = values
        self.origins = origins

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


def _yaml_lines(node: yaml.Node, prefix: str, out: dict[str, str], where: str) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = f"{where}:{key_node.start_mark.line + 1}"
            _yaml_lines(value_node, key + ".", out, where)


def _keep_text(value: Any, node: yaml.Node | None, tp: Any) -> Any:
    """The source text for str fields that YAML read as another type (`output_dir: yes` stays 'yes', not 'True')."""
    inner = _split_optional(tp)[1]
    if inner is str and isinstance(node, yaml.ScalarNode) and isinstance(value, (bool, int, float)):
        return node.value
    if typing.get_origin(inner) is list and isinstance(node, yaml.SequenceNode) and isinstance(value, list):
        item_type = typing.get_args(inner)[0]
        return [_keep_text(v, n, item_type) for v, n in zip(value, node.value)]
    if dataclasses.is_dataclass(inner) and isinstance(node, yaml.MappingNode) and isinstance(value, dict):
        fields = _fields_of(inner)
        for key_node, value_node in node.value:
            name = key_node.value
            if name in fields and name in value:
                value[name] = _keep_text(value[name], value_node, fields[name][0])
    return value


def _read_yaml(path: str) -> _Layer:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None and not isinstance(root, yaml.MappingNode):
            kind = {yaml.SequenceNode: "a list"}.get(type(root), "a scalar")
            raise ConfigError(f"{path}:{root.start_mark.line + 1}: the top level must be a mapping of sections "
                              f"({', '.join(f.name for f in dataclasses.fields(PPOConfig))}), got {kind}")
        # OmegaConf's own loader: floats like 1e-6, duplicate keys rejected
        values = OmegaConf.to_container(OmegaConf.create(text), resolve=False) if root is not None else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        loc = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{loc}: invalid YAML: {' '.join(str(problem).split())}") from None
    origins: dict[str, str] = {}
    if root is not None:
        _yaml_lines(root, "", origins, path)
        _keep_text(values, root, PPOConfig)
    return _Layer(values, origins)


_KEY_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _parse_override(item: str) -> _Layer:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r} has no '=': expected key.sub=value, e.g. ppo.kl_coef=0.1")
    key, text = (part.strip() for part in item.split("=", 1))
    if not _KEY_RE.fullmatch(key):
        raise ConfigError(f"override {item!r}: {key!r} is not a dotted config key like ppo.kl_coef")
    try:
        values = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={text}"]), resolve=False)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as e:
        problem = getattr(e, "problem", None) or _first_line(e)
        raise ConfigError(f"override {item!r}: cannot parse the value: {problem}") from None
    where = f"override '{item}'"
    parts = key.split(".")
    leaf = values
    for part in parts[:-1]:
        leaf = leaf[part]
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        node = None
    if _schema_at(parts) is not None:
        leaf[parts[-1]] = _keep_text(leaf[parts[-1]], node, _schema_at(parts))
    return _Layer(values, {".".join(parts[:i]): where for i in range(1, len(parts) + 1)})


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
        return ConfigError(f"{where}{key}: expected {_type_name(tp)}, got {shown}", keys=(key,))
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
