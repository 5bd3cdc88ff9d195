"""Typed configuration: dataclasses with documented defaults, validated once at the boundary.

Each concept declares its own dataclass next to its code (``FeatureConfig`` in
features.py, ``MapBuildConfig`` in maps.py, ...). This module holds the one mechanism
that turns a plain dict (from YAML, ROS parameters or the command line) into such a
dataclass, rejecting unknown keys and wrong types with a message that names the key.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping, Type, TypeVar

import yaml

C = TypeVar("C")


def from_dict(cls: Type[C], data: Mapping[str, Any] | None, where: str = "") -> C:
    """Build dataclass ``cls`` from ``data``; nested dataclass fields take nested dicts.

    Raises ValueError naming the offending key for unknown keys or uncoercible values,
    then calls the instance's ``validate()`` when it has one.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {where or cls.__name__} option(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where or cls.__name__}.{key}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if tp is Any:
        return value
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str) or not hasattr(value, "__iter__"):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return (tuple if (origin is tuple or tp is tuple) else list)(value)
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{key}: expected a bool, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and float(value) != out:
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, Path)):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping (empty file -> {})."""
    with open(path, "r", encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at top level")
    return data


def parse_kv(items: list | None) -> dict:
    """Parse command-line ``key=value`` items; values are read as YAML scalars (1, 0.5, true)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def nest_dotted(flat: Mapping[str, Any]) -> dict:
    """{'a.b': 1} -> {'a': {'b': 1}}: dotted command-line keys for nested dataclasses."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"option {key!r} conflicts with a non-nested value of {part!r}")
        node[parts[-1]] = value
    return out


def to_dict(obj: Any) -> dict:
    """Dataclass -> plain dict (for manifests and logs)."""
    return dataclasses.asdict(obj)
