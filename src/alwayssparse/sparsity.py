"""The user-facing object: sparse training in three lines of your own loop.

    sparsity = Sparsity(model, method="topkast", sparsity=0.9, backward_sparsity=0.8)
    for step, (x, y) in enumerate(batches):
        loss = loss_fn(model(x), y) + sparsity.regularizer()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsity.step(step, optimizer)   # refresh masks, keep entries outside B untouched

:class:`Sparsity` ties the three concerns together: the layout (which tensors, what density), the
method (when and how masks change) and the backend (how sparse tensors are stored). It never wraps
or patches the optimizer; the step is passed in explicitly.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from alwayssparse.backends import BACKENDS, make_backend
from alwayssparse.layout import LayoutConfig, classify, layer_densities, summary_table
from alwayssparse.methods import METHODS, Method, Static, TopKAST
from alwayssparse.optim_state import check_optimizer, zero_state


@dataclass
class SparsityConfig:
    """Everything that defines a sparse-training setup.

    Attributes:
        method: Registered method name (``"static"``, ``"topkast"``).
        sparsity: Forward sparsity S = 1 - D over the sparse tensors, in [0, 1).
        backend: Storage backend (``"masked"``).
        layout: Which parameters are sparse and how density is spread.
        static: Options of the ``static`` method.
        topkast: Options of the ``topkast`` method.
    """

    method: str = "topkast"
    sparsity: float = 0.9
    backend: str = "masked"
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    static: Static = field(default_factory=Static)
    topkast: TopKAST = field(default_factory=TopKAST)

    def method_options(self) -> Method:
        """The options object of the selected method."""
        self._check_method()
        options = getattr(self, self.method)
        assert isinstance(options, Method)
        return options

    def _check_method(self) -> None:
        configured = {f.name for f in dataclasses.fields(self)} & set(METHODS)
        if self.method not in configured:
            raise ValueError(f"method must be one of {sorted(configured)}, got {self.method!r}")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the allowed values if anything is invalid."""
        self._check_method()
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1) (density in (0, 1]), got {self.sparsity}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {self.backend!r}")
        self.layout.validate()
        self.method_options().validate(self.sparsity)


def _apply_options(config: SparsityConfig, options: dict[str, Any]) -> None:
    """Route keyword options to the config, its layout, or the selected method's options."""
    options = dict(options)
    if "density" in options:
        if "sparsity" in options:
            raise TypeError("give either sparsity or density, not both")
        options["sparsity"] = 1.0 - options.pop("density")
    if "method" in options:
        config.method = options.pop("method")
    top = {f.name for f in dataclasses.fields(config) if f.name not in METHODS}
    layout = {f.name for f in dataclasses.fields(config.layout)}
    method = config.method_options()
    method_fields = {f.name for f in dataclasses.fields(method)}
    for key, value in options.items():
        if key in top - {"layout"}:
            setattr(config, key, value)
        elif key in layout:
            setattr(config.layout, key, value)
        elif key in method_fields:
            setattr(method, key, value)
        else:
            valid = sorted((top - {"layout"}) | layout | method_fields | {"density"})
            raise TypeError(f"unknown option {key!r} for method {config.method!r}; valid: {valid}")


class Sparsity:
    """Sparse training state for one model: masks, method, backend.

    Args:
        model: The model to sparsify. Its sparse parameters are parametrized in place; build the
            optimizer from ``model.parameters()`` before or after, the parameter objects are kept.
        config: A :class:`SparsityConfig` (copied); defaults to Top-KAST at sparsity 0.9.
        seed: Seed of the generator behind every random choice of the method.
        **options: Shorthands overriding ``config``: ``method``, ``sparsity`` or ``density``,
            ``backend``, any layout field, and any option of the selected method.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SparsityConfig | None = None,
        *,
        seed: int = 0,
        **options: Any,
    ) -> None:
        config = copy.deepcopy(config) if config is not None else SparsityConfig()
        _apply_options(config, options)
        config.validate()
        self.config = config
        self.method = config.method_options()
        self.infos = classify(model, config.layout)
        density = 1.0 - config.sparsity
        backward_density = 1.0 - self.method.backward_sparsity_for(config.sparsity)
        distribution = config.layout.distribution
        self.target_densities = layer_densities(self.infos, density, distribution)
        backward = layer_densities(self.infos, backward_density, distribution)
        self.target_backward_densities = {
            name: max(d, backward[name]) for name, d in self.target_densities.items()
        }
        self.generator = torch.Generator().manual_seed(seed)
        self._backend = make_backend(config.backend)
        self.tensors = self._backend.attach(
            model, self.infos, self.target_densities, self.target_backward_densities
        )
        self._model = model
        self.method.init_masks(self.tensors, self.generator)
        self._backend.after_update(self.tensors)

    # -- the training loop ----------------------------------------------------------------

    def regularizer(self) -> Tensor:
        """The method's extra loss term (Top-KAST's exploration loss), or a zero scalar."""
        self._backend.refresh_views(self.tensors)
        value = self.method.regularizer(self.tensors)
        if value is None:
            return torch.zeros((), device=self.tensors[0].weight.device)
        return value

    def step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Call once after ``optimizer.step()`` of training step ``step`` (0-based).

        Restores every entry outside the gradient set B to its value before the optimizer step
        (weight decay and momentum would otherwise move it) and zeroes its optimizer state, then
        lets the method update the masks for step ``step + 1``, resetting the optimizer state of
        entries that entered or left B.
        """
        check_optimizer(optimizer)
        self._backend.refresh_views(self.tensors)
        self._backend.before_update(self.tensors, optimizer)
        entered = self.method.update(step, self.tensors, self.generator)
        for t in self.tensors:
            if t.name in entered:
                # Entries that left B keep no stale history; entries that entered start afresh.
                zero_state(optimizer, t.weight, ~t.grad_mask | entered[t.name])
        self._backend.after_update(self.tensors)

    # -- inspection -------------------------------------------------------------------------

    def masks(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per sparse parameter name, the current (forward mask A, gradient mask B)."""
        self._backend.refresh_views(self.tensors)
        return {t.name: (t.forward_mask, t.grad_mask) for t in self.tensors}

    def densities(self) -> dict[str, tuple[float, float]]:
        """Per sparse parameter, the (forward, backward) density the masks hold right now."""
        return {name: (_fraction(a), _fraction(b)) for name, (a, b) in self.masks().items()}

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts: total, dense, sparse, and those used forward and backward."""
        total = sum(i.numel for i in self.infos)
        dense = sum(i.numel for i in self.infos if not i.sparse)
        masks = self.masks().values()
        return {
            "total": total,
            "dense": dense,
            "sparse": total - dense,
            "forward": dense + sum(int(torch.count_nonzero(a)) for a, _ in masks),
            "backward": dense + sum(int(torch.count_nonzero(b)) for _, b in masks),
        }

    def summary(self) -> str:
        """The layout table: every parameter, sparse or dense, why, and its target density."""
        return summary_table(self.infos, self.target_densities)

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """State not held by the model: the config and the generator.

        The masks are buffers of the model (``model.state_dict()`` holds them with the weights).
        """
        return {
            "config": dataclasses.asdict(self.config),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator after ``model.load_state_dict``; the configs must agree."""
        saved = state["config"]
        current = dataclasses.asdict(self.config)
        if saved != current:
            diff = sorted(k for k in current if saved.get(k) != current[k])
            raise ValueError(f"checkpoint sparsity config differs in {diff}")
        self.generator.set_state(state["generator"])
        self._backend.refresh_views(self.tensors)
        self._backend.after_update(self.tensors)

    def export(self) -> None:
        """Remove the sparsity machinery, leaving plain weights equal to theta * A."""
        self._backend.export(self._model)


def _fraction(mask: Tensor) -> float:
    return int(torch.count_nonzero(mask)) / mask.numel()
