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
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from alwayssparse.backends import BACKENDS, TensorSpec, make_backend
from alwayssparse.capture import GradientCapture
from alwayssparse.config import registry_sections, section_names, to_dict
from alwayssparse.layout import (
    LayoutConfig,
    classify,
    dense_layout,
    layer_densities,
    summary_table,
)
from alwayssparse.masks import BLOCK_NORMS, check_block_shape
from alwayssparse.methods import METHODS, Method
from alwayssparse.optim_state import check_optimizer
from alwayssparse.regularizers import apply_group_lasso
from alwayssparse.state_dicts import plain_state_dict, register_sparsity_state_hooks


@registry_sections(METHODS, lambda method: method)
@dataclass
class SparsityConfig:
    """Everything that defines a sparse-training setup.

    Attributes:
        method: Registered method name: ``static``, ``topkast``, ``set``, ``rigl``,
            ``dynsparse`` or ``gmp``.
        sparsity: Forward sparsity S = 1 - D over the sparse tensors, in [0, 1) (for ``gmp``
            the final sparsity).
        backend: Storage backend (``"masked"``).
        block_size: Edge b of the square b x b blocks kept or dropped together (1: unstructured;
            the BERT paper uses 4, 8, 16). Sparse tensors must tile exactly.
        block_norm: Block importance for magnitude selection: ``"l1"``, ``"l2"``, ``"linf"``
            (dynsparse-bert.md eq. 1; all equal |theta| for 1x1).
        group_lasso: lambda_group of the decoupled group-lasso update (dynsparse-bert.md eq. 2),
            0 disables it. Works with every method; groups are the b x b blocks.
        group_lasso_std: w_std of eq. 2 (the initialisation std, 0.02 in the paper).
        layout: Which parameters are sparse and how density is spread.

    Besides these fields, the config holds one section per registered method, named by it
    (``config.topkast``, ``config.rigl``...): that method's options dataclass. A new method adds
    its section by registering (:func:`alwayssparse.methods.register`), with no edit here.
    """

    method: str = "topkast"
    sparsity: float = 0.9
    backend: str = "masked"
    block_size: int = 1
    block_norm: str = "l1"
    group_lasso: float = 0.0
    group_lasso_std: float = 0.02
    layout: LayoutConfig = field(default_factory=LayoutConfig)

    if TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any: ...  # the method sections

    def method_options(self) -> Method:
        """The options object of the selected method."""
        self._check_method()
        options = getattr(self, self.method)
        assert isinstance(options, Method)
        return options

    def _check_method(self) -> None:
        configured = section_names(self)
        if self.method not in configured:
            raise ValueError(f"method must be one of {sorted(configured)}, got {self.method!r}")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the allowed values if anything is invalid."""
        self._check_method()
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1) (density in (0, 1]), got {self.sparsity}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {self.backend!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.block_norm not in BLOCK_NORMS:
            raise ValueError(
                f"block_norm must be one of {list(BLOCK_NORMS)}, got {self.block_norm!r}"
            )
        if self.group_lasso < 0 or self.group_lasso_std <= 0:
            raise ValueError(
                "group_lasso must be >= 0 and group_lasso_std > 0, "
                f"got {self.group_lasso} and {self.group_lasso_std}"
            )
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
    top = {f.name for f in dataclasses.fields(config)}
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
        total_steps: Length of the run in optimizer steps; needed by methods with schedules
            (set, rigl, dynsparse, gmp) unless their stop step and interval are given.
        **options: Shorthands overriding ``config``: ``method``, ``sparsity`` or ``density``,
            ``backend``, ``block_size``..., any layout field, and any option of the method.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SparsityConfig | None = None,
        *,
        seed: int = 0,
        total_steps: int | None = None,
        **options: Any,
    ) -> None:
        config = copy.deepcopy(config) if config is not None else SparsityConfig()
        _apply_options(config, options)
        config.validate()
        self.config = config
        self.method = config.method_options()
        self.infos = classify(model, config.layout) if self.method.sparse else dense_layout(model)
        for info in self.infos:
            if info.sparse:
                check_block_shape(info.shape, config.block_size, info.name)
        self.method.setup(total_steps, config.block_size)
        specs = self._specs()
        self.target_densities = {spec.info.name: spec.density for spec in specs}
        self.target_backward_densities = {s.info.name: s.backward_density for s in specs}
        self.generator = torch.Generator().manual_seed(seed)
        self._backend = make_backend(config.backend)
        if self._backend.fixed_capacity and not self.method.fixed_layer_counts:
            raise ValueError(
                f"backend {config.backend!r} stores a fixed number of units per layer, but this "
                f"{config.method} configuration moves units between layers (global selection); "
                "use selection='layer' or backend 'masked'"
            )
        self._model = model
        self._capture: GradientCapture | None = None
        # All or nothing: on any error the model is left exactly as it was.
        originals = {s.info.name: model.get_parameter(s.info.name).detach().clone() for s in specs}
        try:
            self.tensors = self._backend.attach(
                model, specs, block=config.block_size, block_norm=config.block_norm,
                reservoir=self.method.keeps_reservoir,
            )  # fmt: skip
            self._capture = self._make_capture()
            self.method.init_masks(self.tensors, self.generator)
            self._backend.finish_init(self.tensors)
        except BaseException:
            self._roll_back(originals)
            raise
        # Positions ever in A: the explored degrees of freedom (dynsparse-bert.md Fig. 5/11).
        self.ever_active = {t.name: t.storage.dense_masks()[0].clone() for t in self.tensors}
        self._backend.after_update(self.tensors)
        self._prepare(0)
        # model.state_dict() carries this object's state too (alwayssparse.state_dicts).
        self._state_hooks = register_sparsity_state_hooks(
            model, self.state_dict, self.load_state_dict, [t.name for t in self.tensors]
        )

    def _specs(self) -> list[TensorSpec]:
        """Per sparse parameter, its target densities of A and B and the largest of B."""
        sparsity, distribution = self.config.sparsity, self.config.layout.distribution
        forward = layer_densities(self.infos, 1.0 - sparsity, distribution)
        backward = layer_densities(
            self.infos, 1.0 - self.method.backward_sparsity_for(sparsity), distribution
        )
        capacity = layer_densities(
            self.infos, 1.0 - self.method.capacity_sparsity_for(sparsity), distribution
        )
        specs = []
        for info in self.infos:
            if info.sparse:
                d, b = forward[info.name], max(forward[info.name], backward[info.name])
                specs.append(TensorSpec(info, d, b, max(b, capacity[info.name])))
        return specs

    def _roll_back(self, originals: dict[str, Tensor]) -> None:
        """Undo a half-done ``__init__``: hooks, the backend's changes, the initial values."""
        if self._capture is not None:
            self._capture.remove()
        self._backend.detach(self._model)
        with torch.no_grad():
            for name, value in originals.items():
                self._model.get_parameter(name).copy_(value)

    def _make_capture(self) -> GradientCapture | None:
        """The dense-gradient capture of a method that ranks by it (RigL), handed to each
        tensor as its source of gradient rows."""
        if not self.method.uses_dense_gradient:
            return None
        capture = GradientCapture(
            {t.name: (t.module, t.op, t.shape) for t in self.tensors if t.module is not None}
        )
        for t in self.tensors:
            t.gradient_rows = capture.row_chunks
        return capture

    # -- the training loop ----------------------------------------------------------------

    def regularizer(self) -> Tensor:
        """The method's extra loss term (Top-KAST's exploration loss), or a zero scalar."""
        self._check_unsharded()
        value = self.method.regularizer(self.tensors) if self.tensors else None
        if value is None:
            return torch.zeros((), device=self._device())
        return value

    def _device(self) -> torch.device:
        first = next(self._model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Call once after ``optimizer.step()`` of training step ``step`` (0-based).

        Restores every entry outside the gradient set B to its value before the optimizer step
        (weight decay would otherwise move it) and keeps its optimizer state at zero (the backend
        does only what the step can have undone), then lets the method update the masks for
        step ``step + 1``, resetting the optimizer state of entries that entered or left B.
        """
        _check_step_arguments(step, optimizer)
        self._backend.check_optimizer(self.tensors, optimizer)
        self._check_unsharded()
        learning_rates = self._learning_rates(optimizer)
        self._backend.before_update(self.tensors, optimizer)
        if self.config.group_lasso > 0:
            for t in self.tensors:
                apply_group_lasso(
                    t,
                    learning_rate=learning_rates[t.name],
                    coefficient=self.config.group_lasso,
                    weight_std=self.config.group_lasso_std,
                )
        updating = self.method.updates_at(step)
        changes = self.method.update(step, self.tensors, self.generator) if updating else {}
        for t in self.tensors:
            if t.name in changes:
                # Entries that left B keep no stale history; entries that entered start afresh.
                t.storage.carry_state(optimizer, changes[t.name])
                # In place, no dense temporary; only the units that entered A when known.
                t.storage.mark_forward(self.ever_active[t.name], changes[t.name])
        self._backend.after_update(self.tensors)
        self._prepare(step + 1)

    def _check_unsharded(self) -> None:
        """Refuse parameters sharded by FSDP (DTensors): masks are whole tensors on every rank
        and are applied to whole parameters; data parallelism goes through DDP."""
        for t in self.tensors:
            for tensor in (t.weight,):
                if isinstance(tensor, _SHARDED_TYPES):
                    raise NotImplementedError(
                        f"{t.name} is sharded ({type(tensor).__name__}, e.g. by FSDP's "
                        "fully_shard): alwayssparse holds whole masks and whole parameters on "
                        "every rank, so FSDP is not supported; train data parallel with "
                        "DistributedDataParallel (README: Multi-process training)"
                    )

    @property
    def upcoming_step(self) -> int:
        """The step the next ``sparsity.step(step, optimizer)`` expects: the number of optimizer
        steps taken (a trainer callback passes it; restored with a checkpoint)."""
        return self._upcoming

    def _prepare(self, upcoming: int) -> None:
        """Get ready for optimizer step ``upcoming`` (capture its gradient if the method asks)."""
        self._upcoming = upcoming
        if self._capture is not None:
            self._capture.clear()
            self._capture.active = self.method.needs_dense_gradient(upcoming)

    def _learning_rates(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """The current learning rate of each sparse tensor's trainable parameter."""
        by_id = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        return {t.name: by_id.get(id(t.weight), 0.0) for t in self.tensors}

    # -- inspection -------------------------------------------------------------------------

    def masks(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per sparse parameter name, the current (forward mask A, gradient mask B)."""
        return {t.name: t.storage.dense_masks() for t in self.tensors}

    def densities(self) -> dict[str, tuple[float, float]]:
        """Per sparse parameter, the (forward, backward) density the masks hold right now."""
        return {name: (_fraction(a), _fraction(b)) for name, (a, b) in self.masks().items()}

    def explored_dof(self) -> dict[str, float]:
        """Fraction of each sparse tensor's positions ever in A, and ``"total"`` over all (1.0
        when nothing is sparse: every position of a dense model is used)."""
        result = {name: _fraction(mask) for name, mask in self.ever_active.items()}
        ever = sum(int(torch.count_nonzero(m)) for m in self.ever_active.values())
        size = sum(m.numel() for m in self.ever_active.values())
        result["total"] = ever / size if size else 1.0
        return result

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
        """The config, the generator, the explored positions and the next step.

        The masks are buffers of the model (``model.state_dict()`` holds them with the weights);
        ``model.state_dict()`` also carries this state, under ``_alwayssparse.*`` keys, so that
        any trainer's checkpoint of the model resumes exactly (:mod:`alwayssparse.state_dicts`).
        """
        return {
            "config": to_dict(self.config),
            "generator": self.generator.get_state(),
            "ever_active": {name: m.clone() for name, m in self.ever_active.items()},
            "upcoming_step": self._upcoming,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator after ``model.load_state_dict``; the configs must agree (the
        sections of methods not registered in this process aside: they configure nothing)."""
        # Compared as JSON: a checkpoint may have carried the config as JSON text.
        saved = json.loads(json.dumps(state["config"], sort_keys=True))
        current = json.loads(json.dumps(to_dict(self.config), sort_keys=True))
        sections = set(section_names(self.config))
        # A section present on one side only belongs to a method registered there only.
        diff = sorted(
            k for k in current
            if (k in saved or k not in sections) and saved.get(k) != current[k]
        )  # fmt: skip
        if diff:
            raise ValueError(f"checkpoint sparsity config differs in {diff}")
        self.generator.set_state(state["generator"])
        for name, mask in state["ever_active"].items():
            self.ever_active[name].copy_(mask)
        self._backend.after_update(self.tensors)
        self._prepare(int(state["upcoming_step"]))

    def plain_state_dict(self) -> dict[str, Tensor]:
        """The model's state dict as the exported model would hold it (``weight`` = theta on A,
        no masks, stored values or sparsity state): for a plain model, e.g.
        ``model.save_pretrained(dir, state_dict=sparsity.plain_state_dict())``."""
        return plain_state_dict(self._model)

    def weight_parameters(self) -> list[Tensor]:
        """Parameters that are weight matrices whatever their shape (a sparse backend's stored
        values are 1-D); an optimizer applies weight decay to them as to every 2-D one."""
        return self._backend.weight_parameters(self._model)

    def export(self) -> None:
        """Remove the sparsity machinery, leaving plain weights equal to theta * A."""
        if self._capture is not None:
            self._capture.remove()
        for handle in self._state_hooks:
            handle.remove()
        self._state_hooks.clear()
        self._backend.export(self._model)


def _check_step_arguments(step: Any, optimizer: Any) -> None:
    """``sparsity.step(step, optimizer)``: say so when the arguments are swapped or wrong."""
    if isinstance(step, torch.optim.Optimizer):
        raise TypeError(
            "sparsity.step(step, optimizer) takes the step first: the arguments are swapped"
        )
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"sparsity.step: step must be an int, got {type(step).__name__}")
    check_optimizer(optimizer)


def _sharded_types() -> tuple[type, ...]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # PyTorch without torch.distributed, or before 2.4
        return ()
    return (DTensor,)


_SHARDED_TYPES = _sharded_types()


def _fraction(mask: Tensor) -> float:
    return int(torch.count_nonzero(mask)) / mask.numel()


_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(%?)\s*$")


def _parse_fraction(text: str) -> float:
    match = _PERCENT.match(text)
    if not match:
        raise ValueError(f"cannot read {text!r} as a sparsity (e.g. 0.9 or 90%)")
    value = float(match.group(1))
    return value / 100.0 if match.group(2) else value


def parse_sparsity(text: str) -> tuple[float, float | None]:
    """Read ``"0.9"``, ``"90%"``, ``"0.9/0.8"`` or the paper's ``"(90%, 80%)"`` form.

    Returns:
        (forward sparsity, backward sparsity or ``None`` when only one value is given).
    """
    parts = [p for p in re.split(r"[/,]", text.strip().strip("()")) if p.strip()]
    if len(parts) == 1:
        return _parse_fraction(parts[0]), None
    if len(parts) == 2:
        return _parse_fraction(parts[0]), _parse_fraction(parts[1])
    raise ValueError(f"a sparsity takes FORWARD or FORWARD/BACKWARD, got {text!r}")
