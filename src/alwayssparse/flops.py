"""The FLOP ledger: FLOPs a training run actually spends, per layer and per step.

Convention of dynsparse-bert.md appendix A.2: a (B x I) by (I x O) product with a weight of
density f costs 2 * B * I * O * f FLOPs (a multiply-add is 2), and a training step is a forward
pass, an input-gradient pass and a weight-gradient pass. The ledger applies that convention to the
shapes it *measures* on the model and the densities the masks *hold* at each forward pass.

What is counted, per call of a weight layer (``nn.Linear``, Hugging Face ``Conv1D``,
``nn.Conv1d/2d/3d``, the sparse backend's ``SparseLinear``), with R the rows (Linear and Conv1D:
``output.numel() / out_features``) or output
positions (Conv: ``output.numel() / out_channels``, read from the actual output, so stride,
padding, dilation and groups are accounted for) and M the multiply-adds per row at density 1
(``in * out``, or ``(C_in / groups) * prod(kernel) * C_out``):

    forward         2 R M f_A    A.2 item 1: sparse multiplication, "O(2 I x B x O x f)".
    input gradient  2 R M f_A    A.2 item 2: "multiplication of the dense error with the transposed
                                 sparse matrix". The error flows through the forward weights
                                 alpha = theta * A (topkast.md section 2.1), so Top-KAST's input
                                 gradient has the forward density too. Counted only when the
                                 layer's input requires gradient (autograd computes none for raw
                                 data such as image pixels).
    weight gradient 2 R M f_B    A.2 item 3: "only the sparse components need to be updated".
                                 Top-KAST computes the gradient on B only (topkast.md section 2.2:
                                 the update is 0 outside B; section 2.4: "the compute and memory
                                 requirements ... in the forward and backward passes scale with
                                 the forward and backward sparsities, respectively"); SET, RigL,
                                 DynSparse, static and GMP have B = A. RigL, on the steps whose
                                 update ranks regrowth by the dense gradient
                                 (``method.needs_dense_gradient(step)``), "occasionally requires
                                 calculating the Top-K values and locations of the full dense
                                 gradient" (topkast.md appendix C): 2 R M on those steps (RigL's
                                 own accounting: a dense gradient every Delta T steps). Counted
                                 only when the weight requires gradient.

f_A and f_B are the exact fractions of entries in A and B of the masks in effect during that
forward pass (so 2 R M f_A = 2 R nnz(A), an integer); dense layers have f_A = f_B = 1. The counts
are those of the sparse algorithm and are the same on both backends: the masked backend executes
dense products but spends no FLOP that a sparse kernel needs to spend.

Products of two activations outside those layers (attention scores Q K^T and softmax(S) V,
``einsum``/``matmul``/``bmm``, functional ``linear``/``conv`` on weights that are not a layer's)
are dense, measured on their operands at the ATen level while the model runs forward:

    matmul          2 * batch * m * k * n      (mm, addmm, bmm, baddbmm, addbmm, mv, addmv, dot)
    attention       2 * B * H * S_q * S_k * (d + d_v)   fused scaled-dot-product attention: the
                                               two products Q K^T and P V, all heads summed
    conv            2 * outputs * (C_in / groups) * prod(kernel)
    backward        one product of the forward's size per operand that requires gradient
                    (C = A B: dA = dC B^T, dB = A^T dC), i.e. 2x forward as in the BERT paper's
                    "3 x" rule; fused attention: dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q.

Attention products are counted dense even with a causal mask (the papers count them dense).

Not counted: embedding lookups, biases, normalisations, softmax, activations, dropout, residual
additions, losses, optimizer updates, mask updates (top-k, prune and regrow: "much fewer than those
needed by the actual training", topkast.md section 2.4), regularisers, and work done with gradient
recording off (evaluation passes, ``torch.no_grad()`` blocks). The BERT paper's figures count
non-embedding matmul FLOPs of the encoder: pass ``scope=["layers"]`` to count only the encoder of
:class:`~alwayssparse.models.bert.BertForPreTraining`.

Paper check (:func:`bert_training_flops`; dynsparse-bert.md Table 1 and Table A.8, FLOPs per
training sequence of length S = 128): an encoder layer of width H has 12 H^2 weights (Q, K, V, O:
4 H^2; FFN: 2 * 4 H^2), a forward of 2 * 12 H^2 * f * S plus attention products 2 * 2 * S^2 * H,
and training is 3x forward: BERT-Small (L=4, H=512) dense 10.07e9, BERT-Base (L=12, H=768) at
s = 0.9 8.33e9, BERT-Mini (L=4, H=256) dense 2.617e9, BERT-Medium (L=8, H=512) at s = 0.9
2.738e9.

Usage in a training loop (the densities are captured during the forward pass, so ``record`` may
come before or after ``sparsity.step``)::

    sparsity = Sparsity(model, method="topkast", sparsity=0.9, backward_sparsity=0.8)
    ledger = FlopLedger(model, sparsity)       # after Sparsity: the sparse backend swaps layers
    for step, (x, y) in enumerate(batches):
        loss = loss_fn(model(x), y) + sparsity.regularizer()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsity.step(step, optimizer)
        ledger.record(step)
    ledger.metrics()   # {"train_flops": ..., "step_flops": ..., "inference_flops": ...}
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

from alwayssparse.backends import layer_op

if TYPE_CHECKING:
    from alwayssparse.sparse_tensor import SparseTensor
    from alwayssparse.sparsity import Sparsity

__all__ = [
    "FlopLedger",
    "LayerFlops",
    "StepFlops",
    "attention_flops",
    "bert_inference_flops",
    "bert_training_flops",
    "conv_flops",
    "format_table",
    "linear_flops",
]

STATE_VERSION = 1
PRODUCT_KINDS = ("matmul", "attention", "conv")

# -- the formulas ------------------------------------------------------------------------------


def _check_density(density: float, name: str = "density") -> None:
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {density}")


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def linear_flops(rows: int, in_features: int, out_features: int, density: float = 1.0) -> float:
    """Forward FLOPs of ``y = x W^T`` over ``rows`` rows: ``2 * rows * in * out * density``.

    dynsparse-bert.md appendix A.2 item 1, with B = ``rows``, I = ``in_features``,
    O = ``out_features`` and f = ``density``.
    """
    _check_sizes(rows=rows, in_features=in_features, out_features=out_features)
    _check_density(density)
    return 2.0 * rows * in_features * out_features * density


def conv_flops(
    output_positions: int,
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int],
    groups: int = 1,
    density: float = 1.0,
) -> float:
    """Forward FLOPs of a convolution: ``2 * positions * (C_in / groups) * prod(k) * C_out * f``.

    A.2's rule per output position: each of the ``output_positions`` (batch times output
    spatial size, e.g. ``N * H_out * W_out``) is a (C_in / groups * prod(k)) by C_out product.
    ``kernel_size`` is the whole kernel shape, e.g. ``(3, 3)`` for a 3x3 Conv2d.
    """
    if isinstance(kernel_size, int):
        raise TypeError(f"kernel_size must be the kernel shape, e.g. (3, 3), got {kernel_size}")
    kernel = list(kernel_size)
    _check_sizes(output_positions=output_positions, in_channels=in_channels,
                 out_channels=out_channels)  # fmt: skip
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(
            f"groups ({groups}) must be >= 1 and divide in_channels ({in_channels}) and "
            f"out_channels ({out_channels})"
        )
    if any(k < 1 for k in kernel):
        raise ValueError(f"kernel_size entries must be >= 1, got {kernel_size}")
    _check_density(density)
    per_position = (in_channels // groups) * math.prod(kernel) * out_channels
    return 2.0 * output_positions * per_position * density


def attention_flops(
    queries: int,
    keys: int,
    head_dim: int,
    heads: int = 1,
    batch: int = 1,
    value_dim: int | None = None,
) -> float:
    """Forward FLOPs of the two dense attention products, summed over heads and batch.

    Scores ``S = Q K^T`` cost ``2 * S_q * S_k * d`` and ``softmax(S) V`` costs
    ``2 * S_q * S_k * d_v`` per head and example; with ``d = d_v = H_model / heads`` both sum to
    ``2 * S_q * S_k * H_model`` per example. The backward pass costs twice the forward.
    """
    value_dim = head_dim if value_dim is None else value_dim
    _check_sizes(queries=queries, keys=keys, head_dim=head_dim, heads=heads, batch=batch,
                 value_dim=value_dim)  # fmt: skip
    return 2.0 * batch * heads * queries * keys * (head_dim + value_dim)


class BertShape(Protocol):
    """What :func:`bert_training_flops` reads of a config (e.g. :class:`BertConfig`)."""

    hidden_size: int
    num_layers: int
    intermediate_size: int


def bert_inference_flops(
    config: BertShape, *, sequence_length: int = 128, sparsity: float = 0.0
) -> float:
    """Non-embedding forward FLOPs of one sequence through the BERT encoder, as the paper counts.

    Per layer: weight products ``2 * (4 H^2 + 2 H F) * (1 - s) * S`` (Q, K, V, O and the two FFN
    matrices, F = ``intermediate_size`` = 4H in the BERT family, so 12 H^2 weights) plus the
    dense attention products ``2 * 2 * S^2 * H`` (dynsparse-bert.md appendix A.2). Embeddings,
    biases, norms and the MLM/NSP heads are not counted.
    """
    _check_sizes(sequence_length=sequence_length)
    _check_density(sparsity, "sparsity")
    h, s = config.hidden_size, sequence_length
    weights = 4 * h * h + 2 * h * config.intermediate_size
    per_layer = linear_flops(s, weights, 1, 1.0 - sparsity) + attention_flops(s, s, h)
    return config.num_layers * per_layer


def bert_training_flops(
    config: BertShape, *, sequence_length: int = 128, sparsity: float = 0.0
) -> float:
    """Training FLOPs per sequence of dynsparse-bert.md Table 1 / Table A.8: 3x the forward.

    Forward, input gradient and weight gradient each cost one forward (A.2, "3 x 2 x I x B x O x
    f"; DynSparse has B = A); the attention products' backward is two products per product.
    E.g. BERT-Base at s = 0.9: ``3 * (2 * 12 * 768^2 * 0.1 * 128 + 4 * 128^2 * 768) * 12``
    = 8.33e9.
    """
    return 3.0 * bert_inference_flops(config, sequence_length=sequence_length, sparsity=sparsity)


# -- records -----------------------------------------------------------------------------------


@dataclass
class LayerFlops:
    """FLOPs of one weight layer, or of one kind of activation product in one module.

    Attributes:
        name: Module name in the model (``""`` is the model itself).
        kind: ``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"conv3d"`` for weight layers;
            ``"matmul"``, ``"attention"``, ``"conv"`` for products outside them.
        rows: Rows (Linear) or output positions (Conv) processed; 0 for products.
        dense_forward: Forward FLOPs at density 1 (for products: equal to ``forward``).
        forward: Forward FLOPs.
        input_grad: Input-gradient FLOPs (for products: the gradients of all operands).
        weight_grad: Weight-gradient FLOPs.
    """

    name: str
    kind: str
    rows: int = 0
    dense_forward: int = 0
    forward: int = 0
    input_grad: int = 0
    weight_grad: int = 0

    @property
    def training(self) -> int:
        """Forward plus both gradients."""
        return self.forward + self.input_grad + self.weight_grad

    @property
    def forward_density(self) -> float:
        """The density f_A the forward used (averaged by FLOPs over calls and steps)."""
        return self.forward / self.dense_forward if self.dense_forward else 1.0

    @property
    def weight_grad_density(self) -> float:
        """The density the weight gradient used (f_B, 1.0 on dense-gradient steps, 0: frozen)."""
        return self.weight_grad / self.dense_forward if self.dense_forward else 0.0

    def add(self, other: LayerFlops) -> None:
        """Accumulate ``other`` (same layer) into this record."""
        self.rows += other.rows
        self.dense_forward += other.dense_forward
        self.forward += other.forward
        self.input_grad += other.input_grad
        self.weight_grad += other.weight_grad


@dataclass(frozen=True)
class StepFlops:
    """What one optimizer step spent.

    Attributes:
        step: The training step (as passed to :meth:`FlopLedger.record`).
        examples: Examples (sequences, images) the step processed.
        forward: Forward FLOPs.
        input_grad: Input-gradient FLOPs.
        weight_grad: Weight-gradient FLOPs.
        dense_gradient: Whether the step computed dense weight gradients (RigL update steps).
    """

    step: int
    examples: int
    forward: int
    input_grad: int
    weight_grad: int
    dense_gradient: bool

    @property
    def training(self) -> int:
        """Forward plus both gradients."""
        return self.forward + self.input_grad + self.weight_grad


def format_table(rows: Sequence[LayerFlops], *, title: str | None = None) -> str:
    """A plain-text table of ``rows`` (e.g. :meth:`FlopLedger.per_layer`) with a total line.

    Columns: layer, kind, rows (or output positions), the forward and weight-gradient densities,
    the forward, input-gradient, weight-gradient and training FLOPs, and the share of the total.
    The total line's densities are over the weight layers (products are dense and have no weight).
    """
    header = ("layer", "kind", "rows", "f_fwd", "f_wgrad", "forward", "input grad",
              "weight grad", "training", "share")  # fmt: skip
    total, weights = LayerFlops("total", ""), LayerFlops("weights", "")
    for row in rows:
        total.add(row)
        if row.kind not in PRODUCT_KINDS:
            weights.add(row)
    grand = max(total.training, 1)

    def cells(r: LayerFlops, name: str, kind: str, count: str, density: LayerFlops) -> list[str]:
        wgrad = "-" if kind in PRODUCT_KINDS else f"{density.weight_grad_density:.4f}"
        flops = [f"{v:.4g}" for v in (r.forward, r.input_grad, r.weight_grad, r.training)]
        share = f"{100.0 * r.training / grand:.1f}%"
        return [name, kind, count, f"{density.forward_density:.4f}", wgrad, *flops, share]

    body = [cells(r, r.name or "(model)", r.kind, f"{r.rows:,}" if r.rows else "-", r)
            for r in rows]  # fmt: skip
    last = cells(total, "total", "", "-", weights)
    widths = [max(len(line[i]) for line in (header, *body, last)) for i in range(len(header))]

    def render(line: Sequence[str]) -> str:
        left = [c.ljust(w) for c, w in zip(line[:2], widths[:2], strict=True)]
        right = [c.rjust(w) for c, w in zip(line[2:], widths[2:], strict=True)]
        return "  ".join(left + right).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [render(header), rule, *map(render, body), rule, render(last)]
    return "\n".join(([title] if title else []) + lines)


# -- weight layers -----------------------------------------------------------------------------


def _weight(module: nn.Module, tensor: SparseTensor | None) -> Tensor:
    """The trainable weight tensor (never a parametrized weight, which costs a dense pass)."""
    if tensor is not None:
        return tensor.weight
    if parametrize.is_parametrized(module, "weight"):
        original = module.parametrizations["weight"].original  # type: ignore[index,union-attr]
        assert isinstance(original, Tensor)
        return original
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight


class _Layer:
    """One weight layer: its geometry, its mask counts (from its sparse tensor's storage) and
    the FLOPs of the training forwards since the last record."""

    def __init__(
        self, name: str, module: nn.Module, kind: str, in_scope: bool,
        tensor: SparseTensor | None = None,
    ) -> None:  # fmt: skip
        self.name, self.module, self.kind, self.in_scope = name, module, kind, in_scope
        self.tensor = tensor
        if tensor is not None:
            # Outputs per row: the weight's first dim, its second for W stored (in, out).
            self.out_size = tensor.shape[1] if kind == "linear_t" else tensor.shape[0]
            self.numel = math.prod(tensor.shape)
        elif kind == "linear_t":  # Hugging Face Conv1D: y = x W, W (nx, nf)
            self.out_size = int(module.nf)  # type: ignore[arg-type]
            self.numel = int(module.nx) * self.out_size  # type: ignore[arg-type]
        elif kind == "linear":
            self.out_size = int(module.out_features)  # type: ignore[arg-type]
            self.numel = int(module.in_features) * self.out_size  # type: ignore[arg-type]
        else:
            self.out_size = int(module.out_channels)  # type: ignore[arg-type]
            kernel = math.prod(module.kernel_size)  # type: ignore[arg-type]
            fan_in = module.in_channels // module.groups  # type: ignore[operator]
            self.numel = self.out_size * int(fan_in) * kernel
        self.reset()

    def reset(self) -> None:
        self.pending = LayerFlops(self.name, self.kind)
        self.pending_dense_weight_grad = 0

    def counts(self) -> tuple[int, int]:
        """(entries in A, entries in B) of the masks now in effect (all entries when dense)."""
        return (self.numel, self.numel) if self.tensor is None else self.tensor.storage.counts()

    def add_call(self, inputs: tuple[Any, ...], output: Tensor) -> None:
        """Count one training forward call (A.2 rule with the masks in effect now)."""
        rows = output.numel() // self.out_size
        in_a, in_b = self.counts()
        forward = 2 * rows * in_a
        x = inputs[0] if inputs else None
        weight_grad = _weight(self.module, self.tensor).requires_grad
        p = self.pending
        p.rows += rows
        p.dense_forward += 2 * rows * self.numel
        p.forward += forward
        p.input_grad += forward if isinstance(x, Tensor) and x.requires_grad else 0
        p.weight_grad += 2 * rows * in_b if weight_grad else 0
        self.pending_dense_weight_grad += 2 * rows * self.numel if weight_grad else 0


# -- products of activations -------------------------------------------------------------------

aten = torch.ops.aten
# matmul-like op -> positions of its two operands (the rest are bias-like addends)
_MATMULS = {
    aten.mm: (0, 1), aten.bmm: (0, 1), aten.mv: (0, 1), aten.dot: (0, 1), aten.vdot: (0, 1),
    aten.addmm: (1, 2), aten.baddbmm: (1, 2), aten.addbmm: (1, 2), aten.addmv: (1, 2),
}  # fmt: skip
_ATTENTIONS = {
    getattr(aten, name)
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
    )
    if hasattr(aten, name)
}


def _grad(x: Any) -> int:
    return int(isinstance(x, Tensor) and x.requires_grad)


def _product_flops(
    packet: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> tuple[str, int, int] | None:
    """(kind, forward FLOPs, backward FLOPs) of one ATen call, or ``None`` if it is no product."""
    if packet in _MATMULS:
        i, j = _MATMULS[packet]
        a, b = args[i], args[j]
        forward = 2 * a.numel() * (b.shape[-1] if b.dim() >= 2 else 1)  # 2 batch m k n
        return "matmul", forward, forward * (_grad(a) + _grad(b))
    if packet is aten.convolution:
        x, w = args[0], args[1]
        transposed = args[6] if len(args) > 6 else kwargs["transposed"]
        # Each output (input, if transposed) element meets one slice w[0] of the weight.
        forward = 2 * (x.numel() if transposed else out.numel()) * (w.numel() // w.shape[0])
        return "conv", forward, forward * (_grad(x) + _grad(w))
    if packet in _ATTENTIONS:
        q, k, v = args[:3]
        dim, keys, value_dim = q.shape[-1], k.shape[-2], v.shape[-1]
        unit = 2 * (q.numel() // dim) * keys  # 2 * batch * heads * S_q * S_k
        backward = value_dim * (_grad(v) + max(_grad(q), _grad(k))) + dim * (_grad(q) + _grad(k))
        return "attention", unit * (dim + value_dim), unit * backward
    return None


class _ProductCounter(TorchDispatchMode):
    """Counts the dense products that run outside weight layers during a training forward."""

    def __init__(self, ledger: FlopLedger) -> None:
        super().__init__()
        self.ledger = ledger

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Inside a weight layer its hooks count; without gradient recording it is no training.
        if self.ledger._inside_layer == 0 and torch.is_grad_enabled():
            packet = getattr(func, "overloadpacket", None)
            counted = _product_flops(packet, args, kwargs, out)
            if counted is not None:
                self.ledger._add_product(*counted)
        return out


# -- the ledger --------------------------------------------------------------------------------


def _in_scope(name: str, patterns: Sequence[str] | None) -> bool:
    """Whether module ``name`` or one of its ancestors matches a scope pattern."""
    if patterns is None:
        return True
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(p, pattern) for p in prefixes for pattern in patterns)


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Size of dim 0 of the first tensor argument (1 for a scalar, 0 without tensors)."""
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
    if first is None:
        return 0
    return int(first.shape[0]) if first.dim() else 1


class FlopLedger:
    """Counts the training FLOPs of a model, per layer and per step (dynsparse-bert.md A.2).

    Forward hooks measure every weight layer's rows (or output positions) and read the densities
    of its masks at each training forward (a forward with gradient recording on); while the
    model runs such a forward, a dispatch mode measures the dense products of activations outside
    the weight layers (attention). :meth:`record` turns what was measured since the last call
    into the step's FLOPs, using the method's dense-gradient schedule (RigL), and adds them to
    the run's totals. See the module docstring for exactly what is counted.

    Args:
        model: The model, as trained (build the ledger after ``Sparsity(model, ...)``: the sparse
            backend replaces layers).
        sparsity: The model's :class:`~alwayssparse.Sparsity`, or ``None`` for a dense model. Its
            method says on which steps weight gradients are dense (RigL).
        scope: ``fnmatch`` patterns over module names; only layers and products inside a module
            whose name (or an ancestor's) matches are counted. ``None`` counts the whole model;
            ``["layers"]`` counts BERT's encoder, the scope of the BERT paper's FLOP figures.
        count_products: Measure products of activations (attention). ``False`` counts the weight
            layers only and installs no dispatch mode.

    Raises:
        ValueError: If a scope pattern matches no module, ``sparsity`` belongs to another model,
            or one of its sparse tensors is used by a module the ledger cannot count sparse.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: Sparsity | None = None,
        *,
        scope: Sequence[str] | None = None,
        count_products: bool = True,
    ) -> None:
        self.model = model
        self.sparsity = sparsity
        self.scope = None if scope is None else [str(p) for p in scope]
        self.count_products = count_products
        names = [name for name, _ in model.named_modules()]
        for pattern in self.scope or []:
            if not any(_in_scope(name, [pattern]) for name in names):
                children = [name for name, _ in model.named_children()]
                raise ValueError(
                    f"scope pattern {pattern!r} matches no module; top-level modules: {children}"
                )
        self._scope_of = {name: _in_scope(name, self.scope) for name in names}
        self.layers: list[_Layer] = []
        self._handles: list[Any] = []
        self._register(model)
        self._check_sparsity()
        self._stack: list[str] = []
        self._inside_layer = 0
        self._mode: _ProductCounter | None = None
        self._reset_pending()
        self._totals: dict[tuple[str, str], LayerFlops] = {}
        self._sums = [0, 0, 0]  # forward, input gradient, weight gradient over the run
        self._last: StepFlops | None = None
        self._last_rows: list[LayerFlops] = []

    # -- hooks --------------------------------------------------------------------------------

    def _register(self, model: nn.Module) -> None:
        layer_names: list[str] = []
        sparse = {} if self.sparsity is None else {id(t.module): t for t in self.sparsity.tensors}
        for name, module in model.named_modules():
            if any(not p or name.startswith(p + ".") for p in layer_names):
                continue  # inside a weight layer (its parametrizations): counted with the layer
            tensor = sparse.get(id(module))
            kind = tensor.op if tensor is not None else layer_op(module)
            layer = None
            if kind is not None:
                layer = _Layer(name, module, kind, self._scope_of[name], tensor)
                self.layers.append(layer)
                layer_names.append(name)
            root = module is model
            self._handles.append(module.register_forward_pre_hook(
                self._pre_hook(name, layer, root), with_kwargs=True))  # fmt: skip
            self._handles.append(module.register_forward_hook(
                self._post_hook(layer), always_call=True))  # fmt: skip

    def _pre_hook(self, name: str, layer: _Layer | None, root: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            training = torch.is_grad_enabled()
            if not self._stack and training:
                self._forwards += 1
                if self.count_products:
                    self._mode = _ProductCounter(self)
                    self._mode.__enter__()
            if root and training:
                self._examples += _batch_size(args, kwargs)
            self._stack.append(name)
            if layer is not None:
                self._inside_layer += 1

        return hook

    def _post_hook(self, layer: _Layer | None) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if layer is not None:
                self._inside_layer -= 1
                if layer.in_scope and torch.is_grad_enabled() and isinstance(output, Tensor):
                    layer.add_call(args, output)
            self._stack.pop()
            if not self._stack and self._mode is not None:
                mode, self._mode = self._mode, None
                mode.__exit__(None, None, None)

        return hook

    def _add_product(self, kind: str, forward: int, backward: int) -> None:
        name = self._stack[-1] if self._stack else ""
        if not self._scope_of.get(name, False):
            return
        row = self._products.setdefault((name, kind), LayerFlops(name, kind))
        row.dense_forward += forward
        row.forward += forward
        row.input_grad += backward

    def _reset_pending(self) -> None:
        self._products: dict[tuple[str, str], LayerFlops] = {}
        self._examples = 0
        self._forwards = 0
        for layer in self.layers:
            layer.reset()

    def _check_sparsity(self) -> None:
        if self.sparsity is None:
            return
        modules = {id(m) for m in self.model.modules()}
        layers = {id(layer.module) for layer in self.layers}
        for t in self.sparsity.tensors:
            if t.module is None:
                continue
            if id(t.module) not in modules:
                raise ValueError(f"sparse tensor {t.name} does not belong to this model")
            if id(t.module) not in layers and not isinstance(
                t.module, nn.Embedding | nn.EmbeddingBag
            ):
                raise ValueError(
                    f"sparse tensor {t.name} belongs to a {type(t.module).__name__}, whose "
                    "products the ledger cannot count at its density; supported: nn.Linear, "
                    "Hugging Face Conv1D, nn.Conv1d/2d/3d (and embedding lookups, which cost no "
                    "FLOPs)"
                )

    def remove(self) -> None:
        """Remove the hooks; the ledger keeps its totals but measures nothing more."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- recording -----------------------------------------------------------------------------

    def record(self, step: int, examples: int | None = None) -> StepFlops:
        """Book the training forwards since the last call as optimizer step ``step``.

        Call once per step after ``loss.backward()``; before or after ``sparsity.step`` alike
        (the densities were read during the forward pass).

        Args:
            step: The step index (0-based, as passed to ``sparsity.step``); must increase.
            examples: Examples in the step; default: the size of dim 0 of the first tensor
                argument of each training call of the model, summed.

        Returns:
            The step's :class:`StepFlops`.

        Raises:
            ValueError: If ``step`` does not increase or ``examples`` is not positive.
            RuntimeError: If no training forward ran since the last record, or a layer was
                replaced after the ledger was built.
        """
        if self._last is not None and step <= self._last.step:
            raise ValueError(
                f"step {step} does not follow the last recorded step {self._last.step}"
            )
        for layer in self.layers:
            if self.model.get_submodule(layer.name) is not layer.module:
                raise RuntimeError(
                    f"{layer.name or 'the model'} was replaced after the FlopLedger was built; "
                    "build the ledger after Sparsity(model, ...)"
                )
        if self._forwards == 0:
            raise RuntimeError(
                f"no training forward pass (with gradients enabled) since the last record(); "
                f"call record({step}) once per step, after the step's backward"
            )
        examples = self._examples if examples is None else examples
        if examples < 1:
            raise ValueError(f"examples must be >= 1, got {examples}; pass record(examples=...)")
        dense = self.sparsity is not None and self.sparsity.method.needs_dense_gradient(step)
        rows = []
        for layer in self.layers:
            if layer.in_scope:
                row = dataclasses.replace(layer.pending)
                if dense:
                    row.weight_grad = layer.pending_dense_weight_grad
                rows.append(row)
        rows.extend(self._products.values())
        for row in rows:
            self._totals.setdefault((row.name, row.kind), LayerFlops(row.name, row.kind)).add(row)
        sums = [sum(getattr(r, k) for r in rows) for k in ("forward", "input_grad", "weight_grad")]
        self._sums = [a + b for a, b in zip(self._sums, sums, strict=True)]
        forward, input_grad, weight_grad = sums
        self._last = StepFlops(step, examples, forward, input_grad, weight_grad, dense)
        self._last_rows = rows
        self._reset_pending()
        return self._last

    # -- reading -------------------------------------------------------------------------------

    @property
    def last_step(self) -> StepFlops | None:
        """The last recorded step, or ``None``."""
        return self._last

    @property
    def total_training_flops(self) -> int:
        """FLOPs of every recorded step: forward, input and weight gradients."""
        return sum(self._sums)

    @property
    def inference_flops(self) -> float:
        """Forward FLOPs of one example with the forward masks in effect now.

        The shapes are those of the last recorded step (rows per example); the weight layers'
        densities are read from the current masks, so after training this is the cost of
        serving the final sparse model.
        """
        if self._last is None:
            raise RuntimeError("no step recorded yet: inference FLOPs come from a training step")
        layers = {layer.name: layer for layer in self.layers}
        total = 0
        for row in self._last_rows:
            if row.kind in PRODUCT_KINDS:
                total += row.forward
            else:
                total += 2 * row.rows * layers[row.name].counts()[0]
        return total / self._last.examples

    def per_layer(self, cumulative: bool = False) -> list[LayerFlops]:
        """Rows of the last recorded step (or, with ``cumulative``, totals over the run)."""
        rows = self._totals.values() if cumulative else self._last_rows
        return [dataclasses.replace(row) for row in rows]

    def table(self, cumulative: bool = False) -> str:
        """:func:`format_table` of :meth:`per_layer`."""
        if self._last is None:
            return format_table([], title="FLOPs: no step recorded yet")
        last = self._last
        title = (f"FLOPs of the run up to step {last.step}" if cumulative
                 else f"FLOPs of step {last.step} ({last.examples} examples)")  # fmt: skip
        return format_table(self.per_layer(cumulative), title=title)

    def metrics(self) -> dict[str, float]:
        """For the metrics log and the run summary: total training FLOPs so far, the last
        step's training FLOPs, and inference FLOPs per example."""
        if self._last is None:
            return {"train_flops": 0}
        return {
            "train_flops": self.total_training_flops,
            "step_flops": self._last.training,
            "inference_flops": self.inference_flops,
        }

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Totals, the last step and its rows: plain Python values (``weights_only`` loads)."""
        return {
            "version": STATE_VERSION,
            "scope": self.scope,
            "sums": list(self._sums),
            "last": None if self._last is None else dataclasses.asdict(self._last),
            "last_rows": [dataclasses.asdict(r) for r in self._last_rows],
            "totals": [dataclasses.asdict(r) for r in self._totals.values()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the totals of a saved ledger; the model's layers and scope must agree."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported FlopLedger state version {state.get('version')}")
        if state["scope"] != self.scope:
            raise ValueError(f"saved ledger has scope {state['scope']}, this one {self.scope}")
        totals = [LayerFlops(**row) for row in state["totals"]]
        layers = {layer.name for layer in self.layers if layer.in_scope}
        unknown = {r.name for r in totals if r.kind not in PRODUCT_KINDS} - layers
        if unknown:
            raise ValueError(f"saved ledger counts layers this model lacks: {sorted(unknown)}")
        self._totals = {(r.name, r.kind): r for r in totals}
        self._sums = [int(v) for v in state["sums"]]
        self._last = None if state["last"] is None else StepFlops(**state["last"])
        self._last_rows = [LayerFlops(**row) for row in state["last_rows"]]
        self._reset_pending()
