"""Dense weight gradients, one chunk of rows at a time, without ever holding the whole gradient.

RigL grows connections where the dense gradient dL/dW is largest, but a sparse model should never
hold a dense gradient (topkast.md appendix C). For a Linear layer y = x W^T the gradient is
dL/dW = g^T x with g = dL/dy, so rows r0:r1 of it are g[:, r0:r1]^T x: computing them needs only
the layer's input x and output gradient g, which a forward hook keeps for the one step on which
the method asks (``Method.needs_dense_gradient``). A Hugging Face ``Conv1D`` (op ``"linear_t"``)
stores W as (in, out) with y = x W, so dL/dW = x^T g and its rows r0:r1 (the weight's own rows,
the grid the masks live on) are x[:, r0:r1]^T g. Conv layers use ``torch.nn.grad.convNd_weight``
on a slice of output channels in the same way; grouped and depthwise convolutions split the
slice by groups: the groups it covers whole are computed by one grouped call (their inputs and
output gradients sliced by whole groups), a group it covers in part by an ungrouped call on that
group's input channels.

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
from torch.nn import functional as F
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
            shape); the operation is ``"linear"`` (y = x W^T, whatever stores W),
            ``"linear_t"`` (y = x W, W stored (in, out)) or ``"conv1d/2d/3d"`` (any ``groups``),
            as the backend reports it.
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
        rows = shape[0]
        for start in range(0, rows, rows_per_chunk):
            stop = min(start + rows_per_chunk, rows)
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
    if op in ("linear", "linear_t"):
        return
    if op is not None and _conv_weight_grad(module) is not None:
        return
    kind = type(module)
    if kind.__name__.startswith("Parametrized"):  # torch.nn.utils.parametrize's subclass
        kind = kind.__bases__[0]
    raise ValueError(
        f"{name}: dense-gradient methods (rigl) support nn.Linear, Hugging Face Conv1D and "
        f"nn.Conv1d/2d/3d, not {kind.__name__}; keep it dense with layout.dense_patterns"
    )


def _weight_grad_rows(
    module: nn.Module, op: str | None, x: Tensor, g: Tensor, start: int, stop: int
) -> Tensor:
    """Rows start:stop of dL/dW (as the weight is stored) for one (input, output-gradient)
    pair."""
    if op == "linear":
        x2 = x.reshape(-1, x.shape[-1])  # [N, in]
        g2 = g.reshape(-1, g.shape[-1])[:, start:stop]  # [N, rows]
        # Under autocast the layer's input may be float32 and its output gradient bf16/fp16.
        dtype = torch.promote_types(x2.dtype, g2.dtype)
        return g2.transpose(0, 1).to(dtype) @ x2.to(dtype)  # [rows, in]
    if op == "linear_t":  # W stored (in, out), y = x W: dL/dW = x^T g
        x2 = x.reshape(-1, x.shape[-1])[:, start:stop]  # [N, rows]
        g2 = g.reshape(-1, g.shape[-1])  # [N, out]
        dtype = torch.promote_types(x2.dtype, g2.dtype)
        return x2.transpose(0, 1).to(dtype) @ g2.to(dtype)  # [rows, out]
    return _conv_weight_grad_rows(module, x, g, start, stop)


def _conv_weight_grad_rows(
    module: nn.Module, x: Tensor, g: Tensor, start: int, stop: int
) -> Tensor:
    """Output channels start:stop of a (possibly grouped) convolution's weight gradient."""
    conv_grad = _conv_weight_grad(module)
    assert conv_grad is not None
    kernel_size = module.kernel_size
    assert isinstance(kernel_size, tuple)
    x, padding = _padded_input(module, x)
    groups = int(module.groups)  # type: ignore[arg-type]
    in_per_group = int(module.in_channels) // groups  # type: ignore[arg-type]
    out_per_group = int(module.out_channels) // groups  # type: ignore[arg-type]
    options = {"stride": module.stride, "padding": padding, "dilation": module.dilation}

    def grad(first_group: int, last_group: int, lo: int, hi: int) -> Tensor:
        """Rows lo:hi, which lie in groups first_group .. last_group - 1."""
        n = last_group - first_group
        xs = x[:, first_group * in_per_group : last_group * in_per_group]
        shape = (hi - lo, in_per_group, *kernel_size)
        return conv_grad(xs, shape, g[:, lo:hi], groups=n, **options)

    parts = []
    row = start
    while row < stop:
        group = row // out_per_group
        group_end = (group + 1) * out_per_group
        if row == group * out_per_group and group_end <= stop:
            # Whole groups from here: one grouped call.
            last = stop // out_per_group
            parts.append(grad(group, last, row, last * out_per_group))
            row = last * out_per_group
        else:  # part of one group
            hi = min(stop, group_end)
            parts.append(grad(group, group + 1, row, hi))
            row = hi
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _padded_input(module: nn.Module, x: Tensor) -> tuple[Tensor, Any]:
    """The layer's input as its convolution sees it, and the padding left to that call: padding
    modes other than zeros and ``padding="same"`` are applied to ``x`` here, as the layer does."""
    padding: Any = module.padding
    mode = getattr(module, "padding_mode", "zeros")
    if mode != "zeros":
        reversed_padding: Any = module._reversed_padding_repeated_twice
        return F.pad(x, list(reversed_padding), mode=mode), 0
    if padding == "valid":
        return x, 0
    if padding == "same":
        dilation: Any = module.dilation
        kernel: Any = module.kernel_size
        pad: list[int] = []
        for d, k in zip(reversed(dilation), reversed(kernel), strict=True):
            total = d * (k - 1)
            pad += [total // 2, total - total // 2]
        return F.pad(x, pad), 0
    return x, padding
