"""A backend in one file, to show (and test) that registering is all a new backend needs.

"where": dense theta with the masks applied by plain tensor arithmetic instead of the masked
backend's autograd function,

    alpha = theta * A + (theta - theta.detach()) * (B & ~A)

whose value is theta on A and whose gradient reaches theta on all of B. Theta outside B is kept
in a copy taken after every mask update and written back after every optimizer step, with its
optimizer state zeroed. ``tests/conftest.py`` imports this module, so every test parametrised
over ``BACKENDS`` runs on it too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from alwayssparse.backends.base import (
    Backend,
    TensorSpec,
    layer_op,
    register_backend,
    register_parametrization,
    remove_parametrization,
)
from alwayssparse.optim_state import zero_state
from alwayssparse.sparse_tensor import DenseStorage, SparseTensor


class _Where(nn.Module):
    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("a", torch.ones_like(weight, dtype=torch.bool))
        self.register_buffer("b", torch.ones_like(weight, dtype=torch.bool))
        self.kept: Tensor = weight.detach().clone()

    def forward(self, theta: Tensor) -> Tensor:
        return theta * self.a + (theta - theta.detach()) * (self.b & ~self.a)


class _WhereStorage(DenseStorage):
    def __init__(self, plist: nn.Module) -> None:
        super().__init__()
        self.plist = plist
        self.where: _Where = plist[0]  # type: ignore[index,assignment]

    @property
    def weight(self) -> Tensor:
        return self.plist.original  # type: ignore[return-value]

    @property
    def forward_mask(self) -> Tensor:
        return self.where.a

    @property
    def grad_mask(self) -> Tensor:
        return self.where.b


@register_backend
class WhereBackend(Backend):
    """Dense theta, masks by arithmetic (a test backend)."""

    name = "toy-where"

    def __init__(self) -> None:
        self._attached: list[tuple[nn.Module, str]] = []

    def attach(
        self,
        model: nn.Module,
        specs: Sequence[TensorSpec],
        *,
        block: int,
        block_norm: str,
        reservoir: bool,
    ) -> list[SparseTensor]:
        tensors = []
        for spec in specs:
            module = model.get_submodule(spec.info.module_name)
            where = _Where(getattr(module, spec.info.attr))
            register_parametrization(module, spec.info.attr, where)
            self._attached.append((module, spec.info.attr))
            plist = module.parametrizations[spec.info.attr]  # type: ignore[index]
            tensors.append(SparseTensor(
                name=spec.info.name, shape=spec.info.shape, density=spec.density,
                backward_density=spec.backward_density, storage=_WhereStorage(plist),
                block=block, block_norm=block_norm, module=module, op=layer_op(module),
            ))  # fmt: skip
        return tensors

    def before_update(
        self, tensors: Sequence[SparseTensor], optimizer: torch.optim.Optimizer
    ) -> None:
        for t in tensors:
            kept = t.storage.where.kept  # type: ignore[attr-defined]
            with torch.no_grad():
                t.weight.copy_(torch.where(t.grad_mask, t.weight, kept))
            zero_state(optimizer, t.weight, ~t.grad_mask)

    def after_update(self, tensors: Sequence[SparseTensor]) -> None:
        for t in tensors:
            t.storage.where.kept = t.weight.detach().clone()  # type: ignore[attr-defined]

    def export(self, model: nn.Module) -> None:
        self._remove(leave_parametrized=True)

    def detach(self, model: nn.Module) -> None:
        self._remove(leave_parametrized=False)

    def _remove(self, leave_parametrized: bool) -> None:
        for module, attr in reversed(self._attached):
            remove_parametrization(module, attr, leave_parametrized)
        self._attached.clear()
