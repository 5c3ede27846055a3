"""Presets: named run configurations, in code, registered by the tasks that own them.

A task module registers its presets with the :func:`register_preset` decorator::

    @register_preset("xl-tiny")
    def xl_tiny() -> RunConfig:
        \"\"\"A tiny Transformer-XL on the default corpus; ~1 min here.\"\"\"
        ...

The first line of the docstring is the preset's one-line description (``alwayssparse
presets``), unless ``description`` is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from alwayssparse.runconfig import RunConfig

Build = TypeVar("Build", bound="Callable[[], RunConfig]")


@dataclass(frozen=True)
class Preset:
    """A registered preset.

    Attributes:
        name: The registry name (``--preset NAME``).
        build: Returns a fresh configuration.
        description: One line for ``alwayssparse presets``.
    """

    name: str
    build: Callable[[], RunConfig]
    description: str

    def __call__(self) -> RunConfig:
        """A fresh copy of the preset's configuration."""
        return self.build()


PRESETS: dict[str, Preset] = {}


def register_preset(name: str, description: str | None = None) -> Callable[[Build], Build]:
    """Decorator registering a function that builds a run configuration as preset ``name``.

    Args:
        name: The preset's name; registering a name twice is an error.
        description: One line for ``alwayssparse presets`` (default: the first line of the
            function's docstring).

    The function is returned unchanged, so that presets can build on each other.
    """

    def decorate(build: Build) -> Build:
        text = description or (build.__doc__ or "").strip().partition("\n")[0].strip()
        if not text:
            raise ValueError(f"preset {name!r} needs a description (or a docstring)")
        if name in PRESETS:
            raise ValueError(f"preset {name!r} is already registered")
        PRESETS[name] = Preset(name, build, text)
        return build

    return decorate


def preset(name: str) -> RunConfig:
    """A fresh copy of the named preset's configuration."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}") from None
