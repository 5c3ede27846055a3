"""The masked backend: a dense tensor theta and two bool masks, applied by one autograd function.

Forward:  alpha = theta * A          (zeros outside the forward set A)
Backward: dL/dtheta = dL/dalpha * B  (gradient only on the backward set B ⊇ A)

The masks are installed with :mod:`torch.nn.utils.parametrize`, so ``module.weight`` is alpha for
every layer type, the masks are buffers of the parametrization (saved in ``state_dict`` and moved
by ``.to()``), and the user's optimizer keeps optimizing the original parameter object. The state
dict also holds ``layer.weight`` = alpha, the plain layer's key (:mod:`alwayssparse.state_dicts`).

Theta outside B is the reservoir C (Top-KAST ranks it; other methods regrow from it), and a zero
gradient is not always enough to keep it: weight decay moves it (AdamW's decoupled decay, L2 decay
through the gradient, which also gives SGD's momentum and Adam's moments nonzero values there).
The backend keeps a copy of theta outside B (``frozen_values``) and, after every optimizer step
(:meth:`MaskedBackend.before_update`), does only what that step can have undone
(:func:`alwayssparse.optim_state.zero_gradient_effects`, which reasons it out per optimizer):

- writes theta outside B back, bit for bit, when the step can move entries with a zero gradient
  (any weight decay; and always for SGD without momentum, whose gradients leave no trace);
- zeroes the optimizer state outside B when the step can create state there (L2 weight decay);
- both, when the optimizer's first-moment state shows that a gradient reached theta outside B
  anyway (a loss on the raw parameter, an edited ``.grad``): one pass over it and B's mask that
  stops at the first nonzero outside B (:func:`alwayssparse.kernels.any_nonzero_outside`,
  :func:`alwayssparse.optim_state.gradient_witness`).

With AdamW that is one in-place ``where`` and one check per step; with Adam or SGD with momentum
and no weight decay, one check. A mask update touches only the units that changed: the masks, the
copy (units leaving B join it) and the optimizer state (units entering or leaving B start at
zero; outside B it is zero already). This works on any device but saves no time or memory.

Theta outside B is written through the storage (``assign``, ``write``, checkpoint loads), never
directly: without weight decay a direct write there is no longer undone at the next step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from alwayssparse import kernels
from alwayssparse.backends.base import (
    Backend,
    TensorSpec,
    layer_op,
    register_backend,
    register_parametrization,
    remove_parametrization,
)
from alwayssparse.masks import gather_units, write_units
from alwayssparse.optim_state import (
    gradient_witness,
    keep_state_where,
    zero_gradient_effects,
    zero_state_at,
)
from alwayssparse.sparse_tensor import (
    DenseStorage,
    SparseTensor,
    TensorsKey,
    TopologyChange,
    UnitDelta,
)
from alwayssparse.state_dicts import register_weight_hooks


class _ApplyMasks(torch.autograd.Function):
    """alpha = where(A, theta, 0) forward; gradient where(B, g, 0) backward (each one pass of
    :func:`alwayssparse.kernels.masked_where`)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, forward_mask: Tensor, grad_mask: Tensor) -> Tensor:
        ctx.save_for_backward(grad_mask)
        return kernels.masked_where(forward_mask, weight.detach())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (grad_mask,) = ctx.saved_tensors
        return kernels.masked_where(grad_mask, grad), None, None


class MaskedWeight(nn.Module):
    """Parametrization holding A (``forward_mask``) and B (``grad_mask``) for one weight.

    ``frozen_values`` (not saved in checkpoints) holds theta outside B as of the last mask update
    (its entries inside B are stale and never read). ``frozen_key`` identifies the masks it was
    kept up to date for: any other write to the masks (a method's initial masks, a load) makes
    the next :meth:`MaskedBackend.after_update` copy theta whole again.
    """

    forward_mask: Tensor
    grad_mask: Tensor
    frozen_values: Tensor

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        ones = torch.ones_like(weight, dtype=torch.bool)
        self.register_buffer("forward_mask", ones)
        self.register_buffer("grad_mask", ones.clone())
        self.register_buffer("frozen_values", weight.new_empty(0), persistent=False)
        self.epoch = 0  # counts writes to theta outside B that training does not undo
        self.frozen_key: TensorsKey | None = None

    def forward(self, weight: Tensor) -> Tensor:
        return _ApplyMasks.apply(weight, self.forward_mask, self.grad_mask)

    def masks_key(self) -> TensorsKey:
        return TensorsKey((self.forward_mask, self.grad_mask))

    def snapshot(self, weight: Tensor) -> None:
        """Remember theta (the entries outside B are the ones that matter)."""
        if self.frozen_values.shape == weight.shape:
            self.frozen_values.copy_(weight.detach())
        else:
            self.frozen_values = weight.detach().clone()
        self.frozen_key = self.masks_key()

    def restore(self, weight: Tensor) -> None:
        """Write back theta outside B as of the last snapshot (in place, one pass)."""
        with torch.no_grad():
            kernels.masked_where(self.grad_mask, weight, self.frozen_values, out=weight)


def _resnapshot_after_load(plist: nn.Module, _incompatible: Any) -> None:
    # Loading a checkpoint replaces theta and the masks: the old snapshot would undo the load.
    masked = plist[0]  # type: ignore[index]
    masked.snapshot(plist.original)
    masked.epoch += 1  # theta outside B changed: rankings of the reservoir are stale


class _MaskedStorage(DenseStorage):
    """Dense storage read from the parametrization on every access (``.to()`` replaces its
    buffers and ``load_state_dict`` their contents; nothing needs re-pointing)."""

    def __init__(self, plist: nn.Module) -> None:
        super().__init__()
        self.plist = plist

    @property
    def masked(self) -> MaskedWeight:
        masked = self.plist[0]  # type: ignore[index]
        assert isinstance(masked, MaskedWeight)
        return masked

    @property
    def weight(self) -> Tensor:
        weight = self.plist.original
        assert isinstance(weight, Tensor)
        return weight

    @property
    def forward_mask(self) -> Tensor:
        return self.masked.forward_mask

    @property
    def grad_mask(self) -> Tensor:
        return self.masked.grad_mask

    def _apply(
        self, units: Tensor, in_a: Tensor, delta: UnitDelta, zeroed: Tensor | None
    ) -> TopologyChange:
        """Write the changed units into the masks; units leaving B join the frozen copy."""
        masked = self.masked
        current = masked.frozen_key is not None and masked.frozen_key == masked.masks_key()
        change = super()._apply(units, in_a, delta, zeroed)
        if current:
            if delta.left.numel():
                block = self.tensor.block
                values = gather_units(self.weight.detach(), delta.left, block)
                write_units(masked.frozen_values, delta.left, block, values)
            masked.frozen_key = masked.masks_key()
        return change

    def carry_state(self, optimizer: torch.optim.Optimizer, change: TopologyChange) -> None:
        """State outside B is zero already (``before_update``): zero it only where units entered
        or left B."""
        entered, left = change.entered_units, change.left_units
        if entered is None or left is None:
            super().carry_state(optimizer, change)
            return
        changed = torch.cat([entered, left])
        if changed.numel():
            block = self.tensor.block
            zero_state_at(optimizer, self.weight, lambda v: write_units(v, changed, block, 0.0))

    def left_b_moved(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the optimizer's step may have moved theta outside B although nothing decays
        it: its first-moment state (the witness) is nonzero somewhere outside B, or it keeps
        none."""
        weight = self.weight
        witness = gradient_witness(optimizer, weight)
        if witness is None:
            return True
        if witness.numel() == 0:
            return False
        return kernels.any_nonzero_outside(witness.detach(), self.grad_mask)

    def reservoir_token(self) -> object:
        """Theta outside B is written back after every optimizer step (``before_update``), so
        only mask writes and checkpoint loads (the epoch) change it."""
        masked = self.masked
        return (TensorsKey((masked.forward_mask, masked.grad_mask)), masked.epoch)


@register_backend
class MaskedBackend(Backend):
    """Dense storage plus masks; every method and layer type, no speed-up."""

    name = "masked"

    def __init__(self) -> None:
        self._attached: list[tuple[nn.Module, str]] = []
        self._hooks: list[RemovableHandle] = []

    def attach(
        self,
        model: nn.Module,
        specs: Sequence[TensorSpec],
        *,
        block: int,
        block_norm: str,
        reservoir: bool,
    ) -> list[SparseTensor]:
        """Install a :class:`MaskedWeight` on every sparse parameter of ``model``.

        ``reservoir`` needs nothing here: theta is dense, masks are per element.
        """
        for spec in specs:
            module = model.get_submodule(spec.info.module_name)
            if parametrize.is_parametrized(module, spec.info.attr):
                raise ValueError(f"{spec.info.name} is already parametrized; attach sparsity once")
        return [self._attach_one(model, spec, block, block_norm) for spec in specs]

    def _attach_one(
        self, model: nn.Module, spec: TensorSpec, block: int, block_norm: str
    ) -> SparseTensor:
        info = spec.info
        module = model.get_submodule(info.module_name)
        masked = MaskedWeight(getattr(module, info.attr))
        register_parametrization(module, info.attr, masked)
        plist: nn.Module = module.parametrizations[info.attr]  # type: ignore[index,assignment]
        plist.register_load_state_dict_post_hook(_resnapshot_after_load)
        self._attached.append((module, info.attr))
        # state_dict() also holds the plain key (weight = theta * A); see alwayssparse.state_dicts.
        self._hooks += register_weight_hooks(
            module, info.attr, lambda: getattr(module, info.attr),
            (f"parametrizations.{info.attr}.",), "masked backend: theta and masks",
        )  # fmt: skip
        return SparseTensor(
            name=info.name, shape=info.shape, density=spec.density,
            backward_density=spec.backward_density, storage=_MaskedStorage(plist), block=block,
            block_norm=block_norm, module=module, op=layer_op(module),
        )  # fmt: skip

    def before_update(
        self, tensors: Sequence[SparseTensor], optimizer: torch.optim.Optimizer
    ) -> None:
        """Undo whatever the optimizer step did outside B, values and optimizer state alike,
        doing only what the step can have done (see the module docstring)."""
        for t in tensors:
            storage = _storage(t)
            moves, creates_state = zero_gradient_effects(optimizer, t.weight)
            if storage.left_b_moved(optimizer):
                moves = creates_state = True
            if moves:
                storage.masked.restore(t.weight)
            if creates_state:
                keep_state_where(optimizer, t.weight, t.grad_mask)

    def after_update(self, tensors: Sequence[SparseTensor]) -> None:
        """Copy theta for the next :meth:`before_update`, unless the copy was kept up to date
        through the mask updates."""
        for t in tensors:
            masked = _storage(t).masked
            if masked.frozen_key is None or masked.frozen_key != masked.masks_key():
                masked.snapshot(t.weight)

    def export(self, model: nn.Module) -> None:
        """Remove the parametrizations, leaving plain parameters holding alpha = theta * A."""
        self._remove(leave_parametrized=True)

    def detach(self, model: nn.Module) -> None:
        """Remove the parametrizations, putting back the original parameter objects."""
        self._remove(leave_parametrized=False)

    def _remove(self, leave_parametrized: bool) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for module, attr in reversed(self._attached):
            remove_parametrization(module, attr, leave_parametrized)
        self._attached.clear()


def _storage(t: SparseTensor) -> _MaskedStorage:
    storage = t.storage
    assert isinstance(storage, _MaskedStorage)
    return storage
