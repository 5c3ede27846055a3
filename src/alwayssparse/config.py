"""Typed dataclass configs: dotted overrides, dict round trips, strict key checking.

Every component defines its defaults once, in its own dataclass; a run's config nests them.
A config can also take one section per entry of a registry (:func:`registry_sections`): each
registered method or task brings its own options dataclass, and the config that holds them needs
no edit when a new one is registered. Overrides are ``"section.field=value"`` strings; an
unknown key is an error that names the nearest valid keys, and a value is parsed by the field's
declared type (``int``, ``float``, ``bool``, ``str``,
``list[str]``, and ``X | None``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


_SECTIONS = "__config_sections__"


def registry_sections(
    registry: Mapping[str, Any], section_class: Callable[[Any], type]
) -> Callable[[type[T]], type[T]]:
    """Class decorator: give a dataclass config one section per entry of ``registry``.

    Each instance gets an attribute per name registered *when it is built*, holding a default
    ``section_class(registry[name])()`` unless the constructor is given one by keyword. The
    sections behave like dataclass fields everywhere in this module (dotted overrides, dict
    round trips, key listings) and in ``==``; an entry registered later appears in configs
    built after it.

    Args:
        registry: Name -> registered object (e.g. method classes, task classes).
        section_class: The options dataclass of one registered object.

    Type checkers cannot see the sections: a decorated class declares
    ``def __getattr__(self, name: str) -> Any`` under ``if TYPE_CHECKING:``.
    """

    def decorate(cls: type[T]) -> type[T]:
        init = cls.__init__

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            given = {name: kwargs.pop(name) for name in list(kwargs) if name in registry}
            init(self, *args, **kwargs)
            for name, entry in registry.items():
                value = given.get(name)
                object.__setattr__(self, name, section_class(entry)() if value is None else value)

        def __eq__(self: Any, other: object) -> bool:
            return type(other) is type(self) and to_dict(self) == to_dict(other)

        setattr(cls, _SECTIONS, (registry, section_class))
        cls.__init__ = __init__  # type: ignore[method-assign]
        cls.__eq__ = __eq__  # type: ignore[method-assign]
        return cls

    return decorate


def section_names(config: Any) -> list[str]:
    """Names of the registry sections an instance of ``config`` holds (registration order)."""
    sections = getattr(type(config) if _is_config(config) else config, _SECTIONS, None)
    if sections is None:
        return []
    if isinstance(config, type):
        return list(sections[0])
    return [name for name in sections[0] if name in vars(config)]


def _names(config: Any) -> list[str]:
    """Field names of a dataclass config, then its registry sections."""
    return [f.name for f in dataclasses.fields(config)] + section_names(config)


def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    sections = getattr(cls, _SECTIONS, None)
    if sections is not None:
        registry, section_class = sections
        hints.update({name: section_class(entry) for name, entry in registry.items()})
    return hints


def _is_config(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def field_paths(config: Any, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a nested dataclass config."""
    paths: list[str] = []
    for name in _names(config):
        value = getattr(config, name)
        if _is_config(value):
            paths.extend(field_paths(value, f"{prefix}{name}."))
        else:
            paths.append(prefix + name)
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
    names = set(_names(node)) if node is not None else set()
    if node is None or leaf not in names or _is_config(getattr(node, leaf)):
        raise ValueError(f"unknown config key {key!r}; {_nearest_keys(config, key)}")
    return node, leaf


def _nearest_keys(config: Any, key: str) -> str:
    """The few valid keys nearest to a mistyped ``key`` (never the whole list of hundreds)."""
    valid = field_paths(config)
    leaf = key.rpartition(".")[2]
    near = difflib.get_close_matches(key, valid, n=5, cutoff=0.5)
    near += [k for k in valid if k.rpartition(".")[2] == leaf and k not in near]
    if not near:
        prefix = key.partition(".")[0] + "."
        near = [k for k in valid if k.startswith(prefix)][:5]
    hint = f"did you mean {', '.join(near[:5])}? " if near else ""
    return f"{hint}({len(valid)} valid keys in all; `alwayssparse config` prints them)"


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
    result: dict[str, Any] = {}
    for name in _names(config):
        value = getattr(config, name)
        result[name] = to_dict(value) if _is_config(value) else copy.deepcopy(value)
    return result


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a nested dict, rejecting unknown keys.

    A config with registry sections skips (with a warning) sections of entries that are not
    registered in this process, e.g. a plugin method's options saved by a run that imported it:
    they configure nothing here. Selecting such an entry fails when the config is validated.
    """
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} | set(section_names(cls))  # type: ignore[arg-type]
    unknown = set(data) - names
    if hasattr(cls, _SECTIONS):
        skipped = sorted(k for k in unknown if isinstance(data[k], dict))
        if skipped:
            warnings.warn(
                f"config sections {[prefix + k for k in skipped]} belong to nothing registered "
                "in this process; they are ignored",
                stacklevel=2,
            )
        unknown -= set(skipped)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(prefix + k for k in unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in names:
            continue
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, dict):
            kwargs[name] = from_dict(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)
