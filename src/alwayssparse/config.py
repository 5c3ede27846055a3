"""Typed dataclass configs: dotted overrides, dict round trips, strict key checking.

Every component defines its defaults once, in its own dataclass; a run's config nests them.
Overrides are ``"section.field=value"`` strings; an unknown key is an error that lists the valid
keys, and a value is parsed by the field's declared type (``int``, ``float``, ``bool``, ``str``,
``list[str]``, and ``X | None``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def field_paths(config: Any, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a nested dataclass config."""
    paths: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if _is_config(value):
            paths.extend(field_paths(value, f"{prefix}{f.name}."))
        else:
            paths.append(prefix + f.name)
    return paths


def parse_value(text: str, hint: Any, key: str) -> Any:
    """Parse ``text`` as a value of type ``hint`` (raising ``ValueError`` naming ``key``)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if text.strip().lower() in _NONE and len(args) < len(typing.get_args(hint)):
            return None
        if len(args) == 1:
            return parse_value(text, args[0], key)
        raise ValueError(f"{key}: unsupported type {hint}")
    if origin is list:
        (item,) = typing.get_args(hint)
        body = text.strip().removeprefix("[").removesuffix("]")
        return [parse_value(p.strip(), item, key) for p in body.split(",") if p.strip()]
    try:
        if hint is bool:
            low = text.strip().lower()
            if low in _TRUE | _FALSE:
                return low in _TRUE
            raise ValueError
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        if hint is str:
            return text
    except ValueError:
        raise ValueError(f"{key}: cannot parse {text!r} as {hint.__name__}") from None
    raise ValueError(f"{key}: unsupported type {hint}")


def _locate(config: Any, key: str) -> tuple[Any, str]:
    """The (dataclass, field name) that a dotted key addresses; error lists valid keys."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        child = getattr(node, part, None) if _is_config(node) else None
        if not _is_config(child):
            node = None
            break
        node = child
    names = {f.name for f in dataclasses.fields(node)} if node is not None else set()
    if node is None or leaf not in names or _is_config(getattr(node, leaf)):
        valid = ", ".join(field_paths(config))
        raise ValueError(f"unknown config key {key!r}; valid keys: {valid}")
    return node, leaf


def apply_overrides(config: T, overrides: Iterable[str]) -> T:
    """Apply ``"a.b=value"`` overrides in order, in place; return ``config``."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        key = key.strip().removeprefix("--")
        node, leaf = _locate(config, key)
        setattr(node, leaf, parse_value(text, _hints(type(node))[leaf], key))
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a dataclass config (JSON-serialisable for the supported types)."""
    return dataclasses.asdict(config)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a nested dict, rejecting unknown keys."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown config keys {sorted(prefix + k for k in unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, dict):
            kwargs[name] = from_dict(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)
