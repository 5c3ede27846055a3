"""The backend contract: what :class:`alwayssparse.Sparsity` knows of a backend.

A backend decides how the sparse parameters of a model live in memory and are multiplied. It
implements :class:`Backend` and is registered by name with :func:`register_backend`; nothing
outside ``alwayssparse.backends`` names a concrete backend class. Methods see only the other half
of the contract, one :class:`~alwayssparse.sparse_tensor.SparseTensor` per sparse parameter with
the backend's :class:`~alwayssparse.sparse_tensor.UnitStorage`.

Life of a backend inside ``Sparsity``::

    tensors = backend.attach(model, specs, block=..., block_norm=..., reservoir=...)
    method.init_masks(tensors, generator)      # dense views of the initial masks
    backend.finish_init(tensors)               # e.g. compact them into stored slots
    backend.after_update(tensors)
    # every training step, after optimizer.step():
    backend.before_update(tensors, optimizer)  # undo what the optimizer did outside B
    changes = method.update(step, tensors, generator)
    for t in changed tensors: t.storage.carry_state(optimizer, changes[t.name])
    backend.after_update(tensors)

Besides the storage, the contract answers what the rest of the package asks: per tensor the
trainable tensor (``t.weight``), the counts of A and B for the FLOP ledger
(``t.storage.counts()``), the layer and its operation for RigL's gradient capture (``t.module``,
``t.op``); and per model the parameters weight decay treats as weight matrices
(:meth:`Backend.weight_parameters`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from alwayssparse.layout import ParamInfo, is_hf_conv1d
from alwayssparse.sparse_tensor import SparseTensor

_CONV_OPS = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}


@dataclass(frozen=True)
class TensorSpec:
    """What a backend needs to store one sparse parameter.

    Attributes:
        info: The layout's classification (name, owning module, shape).
        density: Target density of A.
        backward_density: Target density of B.
        capacity_density: The largest density B ever has (storage that is sized once uses it).
    """

    info: ParamInfo
    density: float
    backward_density: float
    capacity_density: float


class Backend(ABC):
    """Base class of backends: storage of A and B, and the products of a training step.

    Attributes:
        name: Registry name (``--backend NAME``, ``SparsityConfig.backend``).
        fixed_capacity: Whether each tensor's storage holds a number of units fixed at attach
            time (then methods must keep |B| per tensor within it: no global selection).
        supported_blocks: Block sizes it stores (``None``: any that tiles the tensor).
        devices: Device types it runs on (``None``: any).
    """

    name: ClassVar[str] = ""
    fixed_capacity: ClassVar[bool] = False
    supported_blocks: ClassVar[tuple[int, ...] | None] = None
    devices: ClassVar[tuple[str, ...] | None] = None

    @abstractmethod
    def attach(
        self,
        model: nn.Module,
        specs: Sequence[TensorSpec],
        *,
        block: int,
        block_norm: str,
        reservoir: bool,
    ) -> list[SparseTensor]:
        """Take over the sparse parameters of ``model``; one tensor per spec, in order.

        ``reservoir``: theta outside B must survive (Top-KAST's set C). Raise ``ValueError``
        naming the parameter for anything unsupported, before changing the model.
        """

    def finish_init(self, tensors: Sequence[SparseTensor]) -> None:  # noqa: B027 (optional hook)
        """After the method wrote the initial masks (the dense views ``attach`` handed out)."""

    def before_update(  # noqa: B027 (optional hook)
        self, tensors: Sequence[SparseTensor], optimizer: torch.optim.Optimizer
    ) -> None:
        """After ``optimizer.step()``: undo whatever it did outside B (values and state)."""

    def after_update(self, tensors: Sequence[SparseTensor]) -> None:  # noqa: B027 (optional hook)
        """After the masks may have changed (and after loading a checkpoint)."""

    def check_optimizer(  # noqa: B027 (optional hook)
        self, tensors: Sequence[SparseTensor], optimizer: torch.optim.Optimizer
    ) -> None:
        """Raise ``ValueError`` if ``optimizer`` cannot train ``tensors`` (default: anything)."""

    def weight_parameters(self, model: nn.Module) -> list[Tensor]:
        """Parameters of ``model`` that are weight matrices even if not 2-D (stored values)."""
        return []

    @abstractmethod
    def export(self, model: nn.Module) -> None:
        """Remove the machinery: plain layers with weight = theta on A, zero elsewhere."""

    @abstractmethod
    def detach(self, model: nn.Module) -> None:
        """Undo :meth:`attach` exactly: the model's own modules and parameters, as they were
        (used when ``Sparsity(...)`` fails half-way, so that it is all or nothing)."""


def layer_op(module: nn.Module) -> str | None:
    """What a layer computes with its weight: ``"linear"`` (y = x W^T, W stored (out, in)),
    ``"linear_t"`` (y = x W, W stored (in, out): Hugging Face ``Conv1D``), ``"conv1d/2d/3d"``
    (any ``groups``) or ``None``."""
    # isinstance, not type(): parametrize turns a layer into a generated subclass.
    if isinstance(module, nn.Linear):
        return "linear"
    if is_hf_conv1d(module):
        return "linear_t"
    return next((op for cls, op in _CONV_OPS.items() if isinstance(module, cls)), None)


def register_parametrization(module: nn.Module, attr: str, parametrization: nn.Module) -> None:
    """``parametrize.register_parametrization`` (unsafe), remembering the module's parameter
    order so that :func:`remove_parametrization` can put it back."""
    if not hasattr(module, _ORDER):
        object.__setattr__(module, _ORDER, [*module._parameters])
    parametrize.register_parametrization(module, attr, parametrization, unsafe=True)


def remove_parametrization(module: nn.Module, attr: str, leave_parametrized: bool) -> None:
    """Remove the parametrization of ``module.attr``; the parameter takes back its place in the
    module's registration order (``parameters()`` and ``state_dict()`` order as before)."""
    parametrize.remove_parametrizations(module, attr, leave_parametrized=leave_parametrized)
    order = module.__dict__.get(_ORDER, [])
    params = module._parameters
    module._parameters = type(params)((k, params[k]) for k in [*order, *params] if k in params)
    if not parametrize.is_parametrized(module):
        module.__dict__.pop(_ORDER, None)


_ORDER = "_alwayssparse_parameter_order"


def require_held(tensors: Sequence[SparseTensor], optimizer: torch.optim.Optimizer) -> None:
    """Raise unless the optimizer holds every tensor's trainable tensor."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for t in tensors:
        if id(t.weight) not in held:
            raise ValueError(
                f"the optimizer does not hold the trainable tensor of {t.name}: this backend "
                "replaces it, so build the optimizer after Sparsity(model, ...)"
            )


BACKENDS: dict[str, type[Backend]] = {}
B = TypeVar("B", bound=type[Backend])


def register_backend(cls: B) -> B:
    """Class decorator adding a backend to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in BACKENDS:
        raise ValueError(f"backend {cls.name!r} is registered twice")
    BACKENDS[cls.name] = cls
    return cls


def make_backend(name: str) -> Backend:
    """A new backend instance by name."""
    try:
        return BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; available: {sorted(BACKENDS)}") from None
