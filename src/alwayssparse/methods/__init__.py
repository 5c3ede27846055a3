"""Sparse-training methods, registered by name (see :mod:`alwayssparse.methods.base`)."""

from alwayssparse.methods.base import METHODS, Method, get_method_class, register
from alwayssparse.sparse_tensor import SparseTensor

# Registration order is the order of the config sections: keep static and topkast first.
from alwayssparse.methods.static import Static  # isort: skip
from alwayssparse.methods.topkast import TopKAST  # isort: skip
from alwayssparse.methods.prune_regrow import SET, DynSparse, PruneRegrow  # isort: skip
from alwayssparse.methods.rigl import RigL  # isort: skip
from alwayssparse.methods.gmp import GMP  # isort: skip
from alwayssparse.methods.dense import DENSE, Dense  # isort: skip

__all__ = [
    "DENSE",
    "GMP",
    "Dense",
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
