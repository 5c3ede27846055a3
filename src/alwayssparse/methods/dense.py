"""Dense training: the method that makes nothing sparse.

An ordinary dense run is ``Sparsity(model, method="dense")``: every parameter is classified
dense, no backend is attached, the regulariser is zero and ``step`` changes nothing. The training
loop, the FLOP ledger and the reports therefore treat dense and sparse runs alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from alwayssparse.methods.base import Method, register
from alwayssparse.sparse_tensor import SparseTensor

DENSE = "dense"


@register
@dataclass
class Dense(Method):
    """No sparsity: the dense baseline of every comparison (topkast.md Figure 2, Table 5)."""

    name = DENSE
    sparse: ClassVar[bool] = False

    def validate(self, sparsity: float) -> None:
        """Dense training has no sparsity level; any value given is ignored."""

    def init_masks(self, tensors: Sequence[SparseTensor], generator: torch.Generator) -> None:
        """Nothing to choose: there are no sparse tensors."""
