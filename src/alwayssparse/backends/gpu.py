"""The GPU backend ``"gpu"``: block-sparse ``nn.Linear`` layers multiplied by Triton kernels.

Each sparse ``nn.Linear`` is replaced by a :class:`BlockSparseLinear`, the CPU sparse backend's
storage (:class:`~alwayssparse.backends.sparse.CompactLinear`: ``values`` with a ``b x b`` slot
per block of the gradient set B, capacity fixed from the spec's ``capacity_density``; sorted
``units``; ``in_a`` flags; an optional reservoir) with the product of
:mod:`alwayssparse.kernels.triton_bsr` instead of the CPU kernels:

    forward         y  = x @ W_A^T             dense x block-sparse over A's layout
    input gradient  gx = grad_y @ W_A          through A's transposed index
    weight gradient gv = (grad_y^T @ x)[B]     sampled product at B's blocks (SDDMM)

Mask updates, optimizer state carried through topology changes (state exists only for the stored
slots, and follows a surviving block to its new slot), initial compaction and export are those of
the CPU backend: the same :class:`~alwayssparse.backends.sparse.CompactStorage` and
:class:`~alwayssparse.backends.sparse.CompactBackend`, running on the layer's device. The kernel
layouts (:class:`~alwayssparse.kernels.triton_bsr.BsrLayout`, int32 index arrays on the layer's
device) are built once per topology, at the first forward after a mask update, ``.to()`` or
checkpoint load.

Block sizes 16, 32, 64; values and activations float32, bfloat16 or float16. Under
``torch.autocast`` the layer casts its input to the autocast dtype, so float32 master values train
with bf16/fp16 activations (the kernels cast the values to the activations' dtype, accumulate in
float32 and return the values' gradient in the values' dtype).

Top-KAST's reservoir (theta of the whole tensor, for the refresh's top-k) lives in host memory by
default, as the paper suggests (section 2.4: the top-k can run off the accelerator); it stays there
through ``model.to("cuda")`` (only its dtype follows). Set ``GpuBackend.reservoir_on_host = False``
(class or instance, before ``Sparsity(...)``) or call :meth:`BlockSparseLinear.place_reservoir`
to keep it in device memory instead (faster refreshes, a dense weight's worth of GPU memory).

Devices: ``devices = ("cuda",)``. Triton is imported lazily: this module (and so
``alwayssparse.backends``) imports without it, and :meth:`GpuBackend.attach` raises a clear error
when Triton is missing or a weight is not on a CUDA device. The one exception, for tests and CI:
when the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` set before they are first
imported, see :mod:`alwayssparse.kernels.triton_bsr`), CPU tensors are accepted too (slowly). The
registry-wide ``tests/test_backends.py`` therefore skips this backend (its ``devices`` exclude the
CPU), and ``tests/test_gpu_backend.py`` runs it in the interpreter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from alwayssparse.backends.base import register_backend
from alwayssparse.backends.sparse import CompactBackend, CompactLinear
from alwayssparse.kernels import triton_bsr
from alwayssparse.layout import ParamInfo

SUPPORTED_BLOCKS: tuple[int, ...] = triton_bsr.BLOCK_SIZES
DTYPES: tuple[torch.dtype, ...] = triton_bsr.DTYPES


def kernels_interpreted() -> bool:
    """Whether the Triton kernels run in Triton's CPU interpreter (then CPU tensors work).

    Imports the kernels (and Triton) if that has not happened yet; raises ``ImportError``
    naming the fix when Triton is not installed.
    """
    return bool(triton_bsr._jit().INTERPRETED)


class BlockSparseLinear(CompactLinear):
    """A Linear layer stored as ``b x b`` blocks, multiplied by the Triton kernels.

    Args:
        linear: The dense layer it replaces (its bias parameter object is kept).
        block: Block edge b: 16, 32 or 64.
        capacity: Number of stored blocks (slots), fixed for the run.
        reservoir: Keep theta of the whole tensor (Top-KAST's set C).
        reservoir_on_host: Keep that reservoir in host memory (else on the layer's device).
    """

    def __init__(
        self,
        linear: nn.Linear,
        block: int,
        capacity: int,
        reservoir: bool,
        reservoir_on_host: bool = True,
    ) -> None:
        if block not in SUPPORTED_BLOCKS:
            raise ValueError(f"block must be one of {SUPPORTED_BLOCKS}, got {block}")
        device = "cpu" if reservoir_on_host else linear.weight.device
        super().__init__(linear, block, capacity, reservoir, reservoir_device=device)
        self.reservoir_on_host = reservoir_on_host
        self._layouts: tuple[triton_bsr.BsrLayout, triton_bsr.BsrLayout] | None = None

    def invalidate(self) -> None:
        super().invalidate()
        self._layouts = None

    def layouts(self) -> tuple[triton_bsr.BsrLayout, triton_bsr.BsrLayout]:
        """(A's layout, B's layout) on the layer's device, built once per topology."""
        if self._layouts is None:
            self._layouts = triton_bsr.layouts_from_storage(
                self.units, self.in_a, self.grid, self.block
            )
        return self._layouts

    def product(self, x: Tensor) -> Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        layout_a, layout_b = self.layouts()
        return triton_bsr.BlockSparseLinearFunction.apply(x, self.values, layout_a, layout_b)

    def place_reservoir(self, on_host: bool) -> None:
        """Move the reservoir to host memory (``True``) or to the layer's device (``False``)."""
        self.reservoir_on_host = on_host
        if self.reservoir is not None:
            self.reservoir = self.reservoir.to("cpu" if on_host else self.values.device)

    def _apply(self, fn: Any, recurse: bool = True) -> BlockSparseLinear:
        # A host reservoir stays on the host through .to()/.cuda(): only its dtype follows.
        reservoir = self.reservoir if self.reservoir_on_host else None
        if reservoir is None:
            super()._apply(fn, recurse)
            return self
        self._buffers["reservoir"] = None
        try:
            super()._apply(fn, recurse)
        finally:
            probe = fn(torch.empty(0, dtype=reservoir.dtype, device=reservoir.device))
            self._buffers["reservoir"] = reservoir.to(probe.dtype)
        return self

    def extra_repr(self) -> str:
        where = "host" if self.reservoir_on_host else "device"
        reservoir = f", reservoir on {where}" if self.reservoir is not None else ""
        return super().extra_repr() + reservoir


@register_backend
class GpuBackend(CompactBackend):
    """Stored blocks only, Triton block-sparse kernels; ``nn.Linear`` layers on CUDA.

    Attributes:
        reservoir_on_host: Where new layers keep Top-KAST's reservoir (default: host memory).
    """

    name = "gpu"
    supported_blocks = SUPPORTED_BLOCKS
    devices = ("cuda",)
    reservoir_on_host: bool = True

    def make_layer(
        self, linear: nn.Linear, block: int, capacity: int, reservoir: bool
    ) -> CompactLinear:
        return BlockSparseLinear(linear, block, capacity, reservoir, self.reservoir_on_host)

    def check_block(self, block: int) -> None:
        super().check_block(block)
        if not triton_bsr.triton_available():
            raise ImportError(
                "backend 'gpu' needs Triton for its kernels; install it with `pip install "
                "triton` (CUDA builds of PyTorch ship it), or use backend 'masked' or 'sparse'"
            )

    def check_layer(self, model: nn.Module, info: ParamInfo) -> nn.Linear:
        linear = super().check_layer(model, info)
        weight = linear.weight
        if weight.dtype not in DTYPES:
            raise ValueError(
                f"backend 'gpu' kernels take float32, bfloat16 or float16 weights; {info.name} "
                f"is {weight.dtype}. Use backend 'masked'"
            )
        device = weight.device.type
        if device == "cuda" or (device == "cpu" and kernels_interpreted()):
            return linear
        raise ValueError(
            f"backend 'gpu' runs on CUDA tensors; {info.name} is on {weight.device}. Move the "
            "model to the GPU before Sparsity(...), or use backend 'masked' (any device) or "
            "'sparse' (CPU). CPU tensors are accepted only when the Triton kernels run in "
            "Triton's interpreter (TRITON_INTERPRET=1 set before they are first imported; tests)"
        )
