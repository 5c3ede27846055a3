"""Sparse-training methods, registered by name (see :mod:`alwayssparse.methods.base`)."""

from alwayssparse.methods.base import (
    METHODS,
    Method,
    SparseTensor,
    get_method_class,
    register,
)
from alwayssparse.methods.static import Static
from alwayssparse.methods.topkast import TopKAST

__all__ = [
    "METHODS",
    "Method",
    "SparseTensor",
    "Static",
    "TopKAST",
    "get_method_class",
    "register",
]
