"""Backends: how sparse tensors are stored and multiplied.

``masked``: dense theta times bool masks, any layer type and device, no savings.
``sparse``: only the stored entries, multiplied by sparse kernels (nn.Linear, CPU).
"""

from alwayssparse.backends.masked import MaskedBackend
from alwayssparse.backends.sparse import SparseBackend, SparseLinear

Backend = MaskedBackend | SparseBackend
BACKENDS: dict[str, type[MaskedBackend] | type[SparseBackend]] = {
    MaskedBackend.name: MaskedBackend,
    SparseBackend.name: SparseBackend,
}


def make_backend(name: str) -> Backend:
    """A new backend instance by name."""
    try:
        return BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; available: {sorted(BACKENDS)}") from None


__all__ = ["BACKENDS", "Backend", "MaskedBackend", "SparseBackend", "SparseLinear", "make_backend"]
