"""Dense weight gradients, one chunk of rows at a time, without ever holding the whole gradient.

RigL grows connections where the dense gradient dL/dW is largest, but a sparse model should never
hold a dense gradient (topkast.md appendix C). For a Linear layer y = x W^T the gradient is
dL/dW = g^T x with g = dL/dy, so rows r0:r1 of it are g[:, r0:r1]^T x: computing them needs only
the layer's input x and output gradient g, which a forward hook keeps for the one step on which
the method asks (``Method.needs_dense_gradient``). Conv layers use
``torch.nn.grad.convNd_weight`` on a slice of output channels in the same way.

Under ``torch.distributed`` (data parallel, topkast.md appendix C), each chunk is all-reduced as
soon as it is computed, before it is scored: every rank holds the gradient chunk of its own
shard's loss, and their mean over ranks is the chunk of the global batch's gradient (each
shard's loss is scaled so that DDP's average of gradients is the global gradient). Every rank
then ranks the same numbers and keeps the same running top-k, with no dense gradient held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import grad as nn_grad

_CONV_WEIGHT_GRAD: dict[type[nn.Module], Callable[..., Tensor]] = {
    nn.Conv1d: nn_grad.conv1d_weight,
    nn.Conv2d: nn_grad.conv2d_weight,
    nn.Conv3d: nn_grad.conv3d_weight,
}


def _conv_weight_grad(module: nn.Module) -> Callable[..., Tensor] | None:
    # isinstance, not type(): parametrize turns a Conv2d into a generated subclass.
    return next((fn for cls, fn in _CONV_WEIGHT_GRAD.items() if isinstance(module, cls)), None)


class GradientCapture:
    """Keeps the inputs and output gradients of some layers during steps marked ``active``.

    Args:
        layers: Per sparse parameter name, (the layer, its operation, its weight's dense
            shape); the operation is ``"linear"`` (y = x W^T, whatever stores W) or
            ``"conv1d/2d/3d"`` (with ``groups == 1``), as the backend reports it.
    """

    def __init__(self, layers: dict[str, tuple[nn.Module, str | None, tuple[int, ...]]]) -> None:
        self.active = False
        self._records: dict[str, list[list[Tensor]]] = {name: [] for name in layers}
        self._layers = layers
        self._handles = []
        for name, (module, op, _) in layers.items():
            _check_supported(name, module, op)
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Tensor], None]:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if not (self.active and module.training and output.requires_grad):
                return
            record = [inputs[0].detach()]
            self._records[name].append(record)

            def keep_gradient(grad: Tensor) -> None:
                record.append(grad.detach())

            output.register_hook(keep_gradient)

        return hook

    def has_gradient(self, name: str) -> bool:
        """Whether a complete (input, output gradient) pair was captured for ``name``."""
        records = self._records[name]
        return bool(records) and all(len(r) == 2 for r in records)

    def row_chunks(self, name: str, rows_per_chunk: int) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(first_row, rows)``: consecutive rows of dL/dW as a (rows, cols) matrix."""
        if not self.has_gradient(name):
            raise RuntimeError(
                f"no dense-gradient data was captured for {name}: call sparsity.step(step, ...) "
                "once per training step, with consecutive steps, after loss.backward()"
            )
        module, op, shape = self._layers[name]
        out_features = shape[0]
        for start in range(0, out_features, rows_per_chunk):
            stop = min(start + rows_per_chunk, out_features)
            chunk = sum(
                (_weight_grad_rows(module, op, x, g, start, stop) for x, g in self._records[name]),
                start=torch.zeros(()),
            )
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(chunk)
                chunk /= dist.get_world_size()  # the mean over ranks, as DDP averages
            yield start, chunk.reshape(stop - start, -1)

    def clear(self) -> None:
        """Drop everything captured (frees the kept activations)."""
        for records in self._records.values():
            records.clear()

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _check_supported(name: str, module: nn.Module, op: str | None) -> None:
    if op == "linear":
        return
    if op is not None and _conv_weight_grad(module) is not None and module.groups == 1:
        return
    kind = type(module)
    if kind.__name__.startswith("Parametrized"):  # torch.nn.utils.parametrize's subclass
        kind = kind.__bases__[0]
    groups = getattr(module, "groups", 1)
    what = f"{kind.__name__} with groups={groups}" if groups != 1 else kind.__name__
    raise ValueError(
        f"{name}: dense-gradient methods (rigl) support nn.Linear and nn.Conv1d/2d/3d with "
        f"groups=1, not {what}; keep it dense with layout.dense_patterns"
    )


def _weight_grad_rows(
    module: nn.Module, op: str | None, x: Tensor, g: Tensor, start: int, stop: int
) -> Tensor:
    """Rows start:stop of dL/dW for one (input, output-gradient) pair."""
    if op == "linear":
        x2 = x.reshape(-1, x.shape[-1])  # [N, in]
        g2 = g.reshape(-1, g.shape[-1])[:, start:stop]  # [N, rows]
        # Under autocast the layer's input may be float32 and its output gradient bf16/fp16.
        dtype = torch.promote_types(x2.dtype, g2.dtype)
        return g2.transpose(0, 1).to(dtype) @ x2.to(dtype)  # [rows, in]
    conv_grad = _conv_weight_grad(module)
    assert conv_grad is not None
    kernel_size = module.kernel_size
    assert isinstance(kernel_size, tuple)
    shape = (stop - start, module.in_channels, *kernel_size)
    padding = module.padding
    if isinstance(padding, str):
        raise ValueError(f"string padding {padding!r} is not supported by the dense-gradient path")
    return conv_grad(
        x, shape, g[:, start:stop], stride=module.stride, padding=padding,
        dilation=module.dilation, groups=1,
    )  # fmt: skip
