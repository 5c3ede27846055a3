"""Sparse-training methods, registered by name (see :mod:`alwayssparse.methods.base`)."""

from alwayssparse.methods.base import (
    METHODS,
    Method,
    SparseTensor,
    get_method_class,
    register,
)
from alwayssparse.methods.gmp import GMP
from alwayssparse.methods.prune_regrow import SET, DynSparse, PruneRegrow
from alwayssparse.methods.rigl import RigL
from alwayssparse.methods.static import Static
from alwayssparse.methods.topkast import TopKAST

__all__ = [
    "GMP",
    "METHODS",
    "SET",
    "DynSparse",
    "PruneRegrow",
    "RigL",
    "Method",
    "SparseTensor",
    "Static",
    "TopKAST",
    "get_method_class",
    "register",
]
