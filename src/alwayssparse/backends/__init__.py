"""Backends: how sparse tensors are stored and multiplied."""

from alwayssparse.backends.masked import MaskedBackend

BACKENDS = {MaskedBackend.name: MaskedBackend}


def make_backend(name: str) -> MaskedBackend:
    """A new backend instance by name."""
    try:
        return BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; available: {sorted(BACKENDS)}") from None


__all__ = ["BACKENDS", "MaskedBackend", "make_backend"]
