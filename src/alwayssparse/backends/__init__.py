"""Backends: how sparse tensors are stored and multiplied (the contract: :mod:`.base`).

``masked``: dense theta times bool masks, any layer type and device, no savings.
``sparse``: only the stored entries, multiplied by sparse kernels (nn.Linear, CPU).
``gpu``: only the stored blocks, multiplied by Triton block-sparse kernels (nn.Linear, CUDA;
Triton is imported lazily, on attach).

A new backend is one module with a :class:`~alwayssparse.backends.base.Backend` subclass
decorated with :func:`~alwayssparse.backends.base.register_backend`; importing it registers it.
"""

from alwayssparse.backends import gpu as gpu
from alwayssparse.backends import masked as masked
from alwayssparse.backends import sparse as sparse
from alwayssparse.backends.base import (
    BACKENDS,
    Backend,
    TensorSpec,
    layer_op,
    make_backend,
    register_backend,
)

__all__ = ["BACKENDS", "Backend", "TensorSpec", "layer_op", "make_backend", "register_backend"]
