"""alwayssparse: neural networks that stay sparse from the first training step to the last."""

from alwayssparse.inference import load
from alwayssparse.layout import LayoutConfig
from alwayssparse.methods import METHODS, Method, Static, TopKAST
from alwayssparse.sparsity import Sparsity, SparsityConfig

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "LayoutConfig",
    "Method",
    "Sparsity",
    "SparsityConfig",
    "Static",
    "TopKAST",
    "__version__",
    "load",
]
