"""Layout: which parameters are sparse, and at what density.

Pure functions of a model and a :class:`LayoutConfig`. Every parameter of the model is classified
exactly once, as sparse or dense, with the reason; :func:`classify` checks that nothing was
missed. Densities over the sparse parameters are either uniform or Erdos-Renyi-Kernel (ERK).

ERK (Evci et al., 2020, "Rigging the Lottery", eq. in section 3; Mocanu et al. 2018 for the
Erdos-Renyi form) gives a tensor of shape (n_out, n_in, k_1, ..., k_r) a density proportional to

    rho_l = eps * (n_out + n_in + k_1 + ... + k_r) / (n_out * n_in * k_1 * ... * k_r)

with the single ``eps`` chosen so that the total number of kept weights equals ``density`` times
the number of sparse weights. A tensor whose density would exceed 1 is made fully dense and
``eps`` is solved again over the rest, until no tensor exceeds 1.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.nn.utils import parametrize

DISTRIBUTIONS = ("uniform", "erk")

# Module types whose ``weight`` is sparse by default.
_SPARSE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_MODULES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
_EMBEDDING_MODULES = (nn.Embedding, nn.EmbeddingBag)


@dataclass
class LayoutConfig:
    """Which parameters are sparse and how the density is spread over them.

    Attributes:
        distribution: ``"uniform"`` (every sparse tensor at the same density) or ``"erk"``.
        dense_first_last: Keep the first and the last sparse-eligible layer dense (the usual
            ResNet-50 setting of both papers' baselines, topkast.md appendix B). The patterns
            below are applied after it and win.
        sparse_embeddings: Make embedding tables sparse too (dense by default).
        dense_patterns: ``fnmatch`` patterns on full parameter names forced dense. Each must match
            at least one parameter.
        sparse_patterns: Patterns forced sparse (applied after ``dense_patterns``).
    """

    distribution: str = "uniform"
    dense_first_last: bool = False
    sparse_embeddings: bool = False
    dense_patterns: list[str] = field(default_factory=list)
    sparse_patterns: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field if the configuration is invalid."""
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"layout.distribution must be one of {list(DISTRIBUTIONS)}, "
                f"got {self.distribution!r}"
            )


@dataclass(frozen=True)
class ParamInfo:
    """Classification of one parameter.

    Attributes:
        name: Full parameter name as in ``model.named_parameters()``.
        module_name: Name of the module that owns it.
        attr: Attribute name on that module (``"weight"``, ``"bias"``...).
        shape: Parameter shape.
        sparse: Whether the parameter is trained sparse.
        reason: Why it was classified so (shown in the summary table).
    """

    name: str
    module_name: str
    attr: str
    shape: tuple[int, ...]
    sparse: bool
    reason: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``Conv1D`` (``transformers.pytorch_utils.Conv1D``,
    GPT-2's layers): a Linear whose weight is stored (in, out), y = x @ W + b.

    Duck-typed, so that the core never imports ``transformers``: a class named ``Conv1D`` (or a
    subclass of one, such as parametrize's generated class) with integer ``nx`` and ``nf`` whose
    ``weight`` has shape ``(nx, nf)``.
    """
    if not any(cls.__name__ == "Conv1D" for cls in type(module).__mro__):
        return False
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    if not (isinstance(nx, int) and isinstance(nf, int)):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and tuple(weight.shape) == (nx, nf)


def _default_class(module: nn.Module, attr: str) -> tuple[bool, str]:
    if isinstance(module, _EMBEDDING_MODULES):
        return False, "embedding"
    if isinstance(module, _NORM_MODULES):
        return False, "norm"
    if attr == "bias":
        return False, "bias"
    if isinstance(module, _SPARSE_MODULES) and attr == "weight":
        return True, type(module).__name__.lower()
    if attr == "weight" and is_hf_conv1d(module):
        return True, "conv1d (hf, in x out)"
    return False, "other"


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """Every (module name, module, attribute) that holds each parameter, keyed by ``id``."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module.named_parameters(recurse=False):
            entry = (module_name, module, attr)
            if entry not in owners.setdefault(id(param), []):
                owners[id(param)].append(entry)
    return owners


def _check_patterns(patterns: Sequence[str], names: Sequence[str], field_name: str) -> None:
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ValueError(
                f"layout.{field_name} pattern {pattern!r} matches no parameter; "
                f"parameters are: {', '.join(names)}"
            )


def classify(model: nn.Module, config: LayoutConfig) -> list[ParamInfo]:
    """Classify every parameter of ``model`` as sparse or dense.

    Linear and Conv weights (``nn.Linear``, ``nn.Conv1d/2d/3d`` grouped and depthwise included,
    Hugging Face ``Conv1D``) are sparse by default; biases, norm parameters, embeddings and any
    other parameter are dense. A parameter shared by several modules (tied weights) is dense if
    any owner is an embedding; sharing a sparse weight between modules is not supported.

    Returns:
        One :class:`ParamInfo` per distinct parameter, in ``named_parameters()`` order.

    Raises:
        ValueError: On an unmatched pattern, a tied sparse weight, or a model with nothing sparse.
    """
    config.validate()
    _check_not_parametrized(model)
    owners = _owners(model)
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    _check_patterns(config.dense_patterns, names, "dense_patterns")
    _check_patterns(config.sparse_patterns, names, "sparse_patterns")
    ends = _first_last(named, owners) if config.dense_first_last else set()
    infos: list[ParamInfo] = []
    for name, param in named:
        holders = owners[id(param)]
        module_name, module, attr = holders[0]
        classes = [_default_class(m, a) for _, m, a in holders]
        sparse, reason = classes[0]
        if any(r == "embedding" for _, r in classes):
            sparse, reason = False, "embedding"
        if reason == "embedding" and config.sparse_embeddings:
            sparse, reason = True, "embedding (sparse_embeddings)"
        if name in ends:
            sparse, reason = False, "first/last layer"
        if any(fnmatch.fnmatch(name, p) for p in config.dense_patterns):
            sparse, reason = False, "dense_patterns"
        if any(fnmatch.fnmatch(name, p) for p in config.sparse_patterns):
            sparse, reason = True, "sparse_patterns"
        if sparse and len(holders) > 1:
            users = ", ".join(f"{m}.{a}" for m, _, a in holders)
            raise ValueError(
                f"parameter {name!r} is shared by {users}; tied weights cannot be sparse. "
                "Add it to layout.dense_patterns."
            )
        infos.append(ParamInfo(name, module_name, attr, tuple(param.shape), sparse, reason))
    _check_complete(model, infos)
    if not any(i.sparse for i in infos):
        raise ValueError(_nothing_sparse_message(model, infos, owners))
    return infos


def _nothing_sparse_message(
    model: nn.Module,
    infos: Sequence[ParamInfo],
    owners: dict[int, list[tuple[str, nn.Module, str]]],
) -> str:
    """Why nothing is sparse, naming the module types whose weights were classed "other"."""
    message = "the layout makes no parameter sparse; nothing to train sparsely"
    params = dict(model.named_parameters())
    others: dict[str, list[str]] = {}
    for info in infos:
        if info.reason == "other" and len(info.shape) >= 2:
            module = owners[id(params[info.name])][0][1]
            others.setdefault(type(module).__name__, []).append(info.name)
    if others:
        kinds = "; ".join(f"{kind} ({names[0]}{', ...' if len(names) > 1 else ''})"
                          for kind, names in others.items())  # fmt: skip
        message += (
            f". Sparse by default are the weights of nn.Linear, nn.Conv1d/2d/3d and Hugging "
            f"Face Conv1D; these matrices belong to other module types: {kinds}. Make them "
            "sparse with layout.sparse_patterns (masked backend)"
        )
    return message


def dense_layout(model: nn.Module) -> list[ParamInfo]:
    """Every parameter dense (the ``dense`` method): one :class:`ParamInfo` per distinct one."""
    _check_not_parametrized(model)
    owners = _owners(model)
    infos = []
    for name, param in model.named_parameters():
        module_name, _, attr = owners[id(param)][0]
        infos.append(ParamInfo(name, module_name, attr, tuple(param.shape), False, "dense method"))
    return infos


def _first_last(
    named: Sequence[tuple[str, nn.Parameter]],
    owners: dict[int, list[tuple[str, nn.Module, str]]],
) -> set[str]:
    """Names of the first and last parameters that are sparse by default (Linear/Conv weights)."""
    eligible = [
        name
        for name, param in named
        if all(_default_class(m, a)[0] for _, m, a in owners[id(param)])
    ]
    return {eligible[0], eligible[-1]} if eligible else set()


def _check_not_parametrized(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            raise ValueError(
                f"module {name or type(module).__name__!r} is already parametrized "
                "(an earlier Sparsity, weight_norm, ...); alwayssparse needs plain parameters. "
                "Attach sparsity once, to a model without parametrizations."
            )


def _check_complete(model: nn.Module, infos: Sequence[ParamInfo]) -> None:
    """Every parameter classified exactly once (the invariant the summary table relies on)."""
    expected = [n for n, _ in model.named_parameters()]
    got = [i.name for i in infos]
    if sorted(expected) != sorted(got) or len(set(got)) != len(got):
        raise AssertionError(f"layout classified {got} but the model has {expected}")


def uniform_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """The same ``density`` for every tensor."""
    _check_density(density)
    return [density] * len(shapes)


def erk_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """Erdos-Renyi-Kernel densities whose weighted mean over ``shapes`` equals ``density``.

    See the module docstring for the formula. Tensors that would exceed density 1 are made dense
    and the scale is re-solved over the others.
    """
    _check_density(density)
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    budget = density * sum(sizes)
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(shapes)) if i not in dense]
        remaining = budget - sum(sizes[i] for i in dense)
        eps = remaining / sum(raw[i] * sizes[i] for i in free) if free else 0.0
        over = [i for i in free if eps * raw[i] > 1.0]
        if not over:
            break
        dense.update(over)
    return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")


def layer_densities(
    infos: Sequence[ParamInfo], density: float, distribution: str
) -> dict[str, float]:
    """Target density per sparse parameter name under the chosen distribution."""
    sparse = [i for i in infos if i.sparse]
    shapes = [i.shape for i in sparse]
    if distribution == "uniform":
        values = uniform_densities(shapes, density)
    elif distribution == "erk":
        values = erk_densities(shapes, density)
    else:
        raise ValueError(
            f"layout.distribution must be one of {list(DISTRIBUTIONS)}, got {distribution!r}"
        )
    return {i.name: d for i, d in zip(sparse, values, strict=True)}


def summary_table(infos: Sequence[ParamInfo], densities: dict[str, float]) -> str:
    """Plain-text table of every parameter: shape, class, reason and target density."""
    rows = [("parameter", "shape", "numel", "class", "reason", "density")]
    for i in infos:
        d = densities.get(i.name, 1.0)
        shape = "x".join(map(str, i.shape)) or "scalar"
        rows.append(
            (i.name, shape, str(i.numel), "sparse" if i.sparse else "dense", i.reason, f"{d:.4f}")
        )
    total = sum(i.numel for i in infos)
    kept = sum(i.numel * densities.get(i.name, 1.0) for i in infos)
    rows.append(("total", "", str(total), "", "", f"{kept / total:.4f}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
