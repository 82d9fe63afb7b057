"""Typed configs from YAML files and dotted command-line overrides (`train.lr=1e-4`)."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


def load_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set `a.b.c=value` entries (value parsed as YAML) into a nested dict, returning a copy."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return out


def merge(base: dict, top: dict) -> dict:
    """A deep copy of `base` with `top` laid over it, section by section (config defaults, then overrides)."""
    out = _deep_copy(base)
    for key, value in top.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else _deep_copy(value) if isinstance(value, dict) else value
    return out


def _deep_copy(data: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def build(cls: type, data: dict | None, where: str = "") -> Any:
    """Instantiate dataclass `cls` from a dict, coercing scalars and naming any unknown key."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {path!r}{hint}")
        values[key] = _coerce(hints[key], value, path)
        _check_value(cls, key, values[key], path)
    return cls(**values)


def _check_value(cls: type, key: str, value: Any, path: str) -> None:
    """Finite numbers everywhere; a class's `RANGES` (inclusive bounds) and `CHOICES` (a tuple, or a function
    giving one: a registry's names) for its own fields."""
    if _has_non_finite(value):
        raise ConfigError(f"{path} must hold finite numbers, got {value!r}")
    low, high = getattr(cls, "RANGES", {}).get(key, (None, None))
    if isinstance(value, int | float) and not isinstance(value, bool):
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = " and ".join(part for part in (f">= {low}" if low is not None else "",
                                                    f"<= {high}" if high is not None else "") if part)
            raise ConfigError(f"{path} must be {bounds}, got {value!r}")
    choices = getattr(cls, "CHOICES", {}).get(key)
    if choices is not None and value is not None:
        allowed = tuple(choices() if callable(choices) else choices)
        if value not in allowed:
            raise ConfigError(f"{path} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _has_non_finite(value: Any, in_options: bool = False) -> bool:
    """NaN or infinity; inside free-form options (a loss's `beta`) also the strings YAML leaves them as."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str) and in_options:
        try:
            return not math.isfinite(float(value))
        except ValueError:
            return False
    if isinstance(value, dict):
        return any(_has_non_finite(v, True) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_non_finite(v, in_options) for v in value)
    return False


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    options = _union_members(hint)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{path} may not be null")
    for option in options:
        if option in (int, float, bool, str):
            try:
                return _scalar(option, value)
            except (TypeError, ValueError):
                continue
        elif option is list:
            if isinstance(value, str):   # one stop string, not its characters
                return [value]
            if isinstance(value, list | tuple):
                return list(value)
        elif option is not type(None):
            return value
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{path} must be {expected}, got {value!r}")


def _union_members(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (typing.get_origin(hint) or hint,)


def _scalar(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if isinstance(value, bool):
        raise TypeError
    if kind is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError
    return kind(value)


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, one line) for every configuration key of dataclass `cls`, nested ones dotted.

    The line is the comment on the field's line in the class's source, where it has one."""
    hints, notes = typing.get_type_hints(cls), _field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, f"{key}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((key, _type_name(hint), _yaml_scalar(default), notes.get(f.name) or _limits(cls, f.name)))
    return rows


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _limits(cls: type, name: str) -> str:
    """A line from the field's declared choices or range, for a field without a comment."""
    choices = getattr(cls, "CHOICES", {}).get(name)
    if choices is not None:
        return "one of " + ", ".join(map(str, choices() if callable(choices) else choices))
    low, high = getattr(cls, "RANGES", {}).get(name, (None, None))
    return " and ".join(p for p in (f">= {low}" if low is not None else "", f"<= {high}" if high is not None
                                    else "") if p)


def _type_name(hint: Any) -> str:
    return " | ".join(getattr(o, "__name__", str(o)).replace("NoneType", "null") for o in _union_members(hint))


def _field_comments(cls: type) -> dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.*)$", source, re.MULTILINE)}
