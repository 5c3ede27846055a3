"""Sparse export and inference: trained models as ``safetensors``, stored and run sparsely.

:func:`save` writes a model (under :class:`~alwayssparse.Sparsity`, or plain) as one
``.safetensors`` file, either

- ``"dense"``: every tensor as the exported model holds it (zeros outside A), or
- ``"compressed"``: every sparse weight as compressed rows of its matrix view (the weight's first
  dim are the rows: (out, in) for ``nn.Linear``, (in, out) for a Hugging Face ``Conv1D``,
  (out, in / groups * kernel) for a convolution), unstructured (CSR) or in b x b blocks (BSR)::

      NAME.values        float32 (nnz,) for CSR, (nblocks, b, b) for BSR
      NAME.col_indices   int32 column (block column) of each value (block)
      NAME.crow_indices  int32 (int64 beyond 2^31 entries) row (block row) pointers, rows + 1

  and every other tensor as it is.

The file's JSON header (safetensors metadata, key ``"alwayssparse"``) describes the layout::

    {"format": "alwayssparse", "version": 1, "storage": "compressed" | "dense",
     "tensors": {NAME: {"layout": "csr" | "bsr" | "dense", "shape": [...], "matrix": [rows, cols],
                        "block": b, "nnz": stored values, "density": nnz / numel,
                        "op": "linear" | "linear_t" | "conv2d" | ... | null}},
     "aliases": {NAME: NAME it shares memory with (tied weights)},
     "model": {"kind": "transformers", "class": ..., "config": {...}}
            | {"kind": "run", "config": {...}} | null}

:func:`load` rebuilds the model (from the header's model description, or into a ``model`` you
pass) with every compressed ``nn.Linear`` / ``Conv1D`` weight as a :class:`SparseInferenceLinear`,
which multiplies with the CPU kernels of :mod:`alwayssparse.kernels` (CSR, or BSR for blocks);
compressed convolution and other weights are expanded to dense (there is no sparse convolution
kernel). Inference only: the sparse layers compute no gradient.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from alwayssparse import kernels
from alwayssparse.backends.base import layer_op
from alwayssparse.state_dicts import STATE_PREFIX, plain_state_dict

if TYPE_CHECKING:
    from alwayssparse.sparsity import Sparsity

__all__ = ["SparseInferenceLinear", "export_run", "load", "read_header", "save"]

HEADER_KEY = "alwayssparse"
VERSION = 1
STORAGES = ("compressed", "dense")
_FORMAT = "alwayssparse"


# -- the inference layer -------------------------------------------------------------------------


class SparseInferenceLinear(nn.Module):
    """y = x W^T + b with only W's nonzero entries (or b x b blocks) stored, CPU float32.

    Stands in for an ``nn.Linear`` or a Hugging Face ``Conv1D`` and answers what code reads from
    them: ``in_features``, ``out_features``, ``bias``, ``weight`` (a dense copy built on every
    access, of the replaced layer's shape: (out, in), or (in, out) with ``nx``/``nf`` for a
    Conv1D). Its ``state_dict`` holds that dense ``weight`` and ``bias`` (the plain layer's keys);
    loading a dense ``weight`` compresses its nonzeros again.

    Args:
        row_ptr, cols, values: W (out, in) in CSR (``values`` (nnz,)) or BSR (``values``
            (nblocks, b, b), ``cols`` block columns, ``row_ptr`` over block rows).
        in_features, out_features: W's shape.
        bias: The bias, or ``None``.
        transposed: The replaced layer stored W^T (a Hugging Face ``Conv1D``).
    """

    row_ptr: Tensor
    cols: Tensor
    values: Tensor

    def __init__(
        self,
        row_ptr: Tensor,
        cols: Tensor,
        values: Tensor,
        in_features: int,
        out_features: int,
        bias: Tensor | None = None,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.transposed = transposed
        if transposed:
            self.nx, self.nf = in_features, out_features
        self.block = 1 if values.dim() == 1 else int(values.shape[-1])
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), False)
        self._set(row_ptr, cols, values)
        self.register_state_dict_post_hook(_save_weight)
        self.register_load_state_dict_pre_hook(_load_weight)

    def _set(self, row_ptr: Tensor, cols: Tensor, values: Tensor) -> None:
        values = values.detach().float().contiguous()
        row_ptr, cols = row_ptr.to(torch.int64).contiguous(), cols.contiguous()
        if cols.dtype not in kernels.INDEX_DTYPES:
            cols = cols.to(torch.int32)
        # Validate once here (the kernels' checks are O(nnz) per call, as much as a product).
        probe = torch.zeros(1, self.in_features)
        if self.block == 1:
            kernels.csr_matmul(row_ptr, cols, values, probe, self.out_features)
        else:
            kernels.bsr_matmul(row_ptr, cols, values, probe, self.out_features)
        self.register_buffer("row_ptr", row_ptr, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.register_buffer("values", values, persistent=False)
        # The compiled BSR kernel takes transposed blocks: prepared once.
        kernel_values = values if self.block == 1 else values.transpose(1, 2).contiguous()
        self.register_buffer("kernel_values", kernel_values, persistent=False)

    @classmethod
    def from_dense(
        cls, weight: Tensor, bias: Tensor | None = None, block: int = 1, transposed: bool = False
    ) -> SparseInferenceLinear:
        """Compress the nonzeros (nonzero b x b blocks) of a dense weight of the replaced
        layer's shape ((out, in); (in, out) when ``transposed``)."""
        matrix = weight.detach().float()
        matrix = matrix.t() if transposed else matrix
        row_ptr, cols, values = compress(matrix, block)
        out_features, in_features = matrix.shape
        return cls(row_ptr, cols, values, in_features, out_features, bias, transposed)

    @property
    def nnz(self) -> int:
        """Stored weights (b*b per block)."""
        return self.values.numel()

    @property
    def weight(self) -> Tensor:
        """A dense copy of W, built on every access (shape of the replaced layer's weight)."""
        dense = expand(self.row_ptr, self.cols, self.values, (self.out_features, self.in_features))
        return dense.t().contiguous() if self.transposed else dense

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        ext = kernels._ext()
        if ext is None:  # the pure-PyTorch kernels (ALWAYSSPARSE_KERNELS=torch)
            product = kernels.csr_matmul if self.block == 1 else kernels.bsr_matmul
            y = product(self.row_ptr, self.cols, self.values, x2, self.out_features)
        elif self.block == 1:
            y = ext.csr_spmm(self.row_ptr, self.cols, self.values, x2, self.out_features, 0)
        else:
            y = ext.bsr_spmm(self.row_ptr, self.cols, self.kernel_values, x2, self.out_features)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        density = self.nnz / (self.in_features * self.out_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"block={self.block}, density={density:.4f}"
            + (", transposed=True" if self.transposed else "")
        )


def _save_weight(module: nn.Module, state: dict[str, Any], prefix: str, _metadata: Any) -> None:
    assert isinstance(module, SparseInferenceLinear)
    state[prefix + "weight"] = module.weight


def _load_weight(module: nn.Module, state: dict[str, Any], prefix: str, *_args: Any) -> None:
    assert isinstance(module, SparseInferenceLinear)
    weight = state.pop(prefix + "weight", None)
    if weight is not None:
        matrix = weight.detach().float()
        module._set(*compress(matrix.t() if module.transposed else matrix, module.block))


def compress(
    matrix: Tensor, block: int = 1, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(row pointers int64, int32 column indices, values) of a 2-D ``matrix`` at ``mask`` (bool,
    ``matrix``'s shape; default: its nonzeros), entry by entry (``block == 1``) or by b x b
    blocks holding any entry of the mask ((nblocks, b, b) values)."""
    rows, cols = matrix.shape
    keep = matrix != 0 if mask is None else mask.reshape(rows, cols).bool()
    if block > 1:
        if rows % block or cols % block:
            raise ValueError(f"a {rows}x{cols} matrix does not tile into {block}x{block} blocks")
        tiles = matrix.reshape(rows // block, block, cols // block, block)
        keep = keep.reshape(rows // block, block, cols // block, block).any(dim=3).any(dim=1)
    counts = keep.sum(dim=1)
    row_ptr = torch.zeros(keep.shape[0] + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(counts, 0)
    index_dtype = torch.int32 if keep.shape[1] < 2**31 else torch.int64
    row_index, col_index = keep.nonzero(as_tuple=True)  # row-major order
    if block == 1:
        values = matrix[row_index, col_index]
    else:
        values = tiles.permute(0, 2, 1, 3)[row_index, col_index]  # (nblocks, b, b)
    return row_ptr, col_index.to(index_dtype), values.contiguous()


def expand(row_ptr: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """The dense 2-D matrix of a CSR (``values`` 1-D) or BSR (``values`` (n, b, b)) structure."""
    rows, n_cols = shape
    block = 1 if values.dim() == 1 else int(values.shape[-1])
    counts = row_ptr[1:] - row_ptr[:-1]
    row_index = torch.repeat_interleave(torch.arange(counts.numel()), counts.long())
    if block == 1:
        dense = values.new_zeros(rows, n_cols)
        dense[row_index, cols.long()] = values
        return dense
    tiles = values.new_zeros(rows // block, n_cols // block, block, block)
    tiles[row_index, cols.long()] = values
    return tiles.permute(0, 2, 1, 3).reshape(rows, n_cols)


# -- saving --------------------------------------------------------------------------------------


def save(
    model: nn.Module,
    path: str | Path,
    *,
    sparsity: Sparsity | None = None,
    storage: str = "compressed",
    sparse: Mapping[str, int] | None = None,
    model_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model`` to ``path`` as safetensors; return the JSON header written.

    Args:
        model: The model, under ``sparsity`` or plain (e.g. after ``sparsity.export()``).
        path: The ``.safetensors`` file to write.
        sparsity: The model's :class:`~alwayssparse.Sparsity`: its sparse weights (and block
            size) are the ones compressed, each at exactly its forward set A.
        storage: ``"compressed"`` (CSR/BSR) or ``"dense"`` (zeros outside A).
        sparse: Without ``sparsity``: the weights to compress, by name, with their block size
            (default: every Linear, Conv1D and convolution weight with at most half its entries
            nonzero, unstructured).
        model_info: How to rebuild the model (the header's ``"model"``); default: a Hugging Face
            ``transformers`` model's class and config, else nothing (:func:`load` then needs a
            ``model``).
    """
    from safetensors.torch import save_file

    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {list(STORAGES)}, got {storage!r}")
    # The exported model's keys: weight = theta on A, no masks, no sparsity state.
    state = {k: v for k, v in plain_state_dict(model).items() if STATE_PREFIX not in k}
    ops = _weight_ops(model)
    masks: dict[str, Tensor] = {}
    if sparsity is not None:
        chosen = {t.name: sparsity.config.block_size for t in sparsity.tensors}
        # Stored: exactly the forward set A (a weight of A that is zero is kept).
        masks = {name: a for name, (a, _) in sparsity.masks().items()}
    elif sparse is not None:
        chosen = dict(sparse)
    else:
        chosen = {n: 1 for n in ops if n in state and _fraction(state[n]) <= 0.5}
    for name in chosen:
        if name not in state:
            raise ValueError(f"{name} is not a tensor of the model's state dict")
    tensors: dict[str, Tensor] = {}
    described: dict[str, Any] = {}
    aliases = _aliases(state)
    for name, value in state.items():
        if name in aliases:
            continue
        value = value.detach().cpu()
        if name not in chosen:
            tensors[name] = value.contiguous()
            continue
        block = chosen[name]
        matrix = value.float().reshape(value.shape[0], -1)
        dtype = str(value.dtype).removeprefix("torch.")
        entry = {
            "shape": list(value.shape), "matrix": list(matrix.shape), "block": block,
            "op": ops.get(name), "layout": "dense", "dtype": dtype,
        }  # fmt: skip
        mask = masks.get(name)
        if storage == "dense":
            tensors[name] = value.contiguous()
            nnz = int(torch.count_nonzero(value if mask is None else mask))
        else:
            row_ptr, cols, values = compress(matrix, block, None if mask is None else mask.cpu())
            if int(row_ptr[-1]) < 2**31:
                row_ptr = row_ptr.to(torch.int32)
            tensors[name + ".values"] = values
            tensors[name + ".col_indices"] = cols
            tensors[name + ".crow_indices"] = row_ptr
            entry["layout"] = "csr" if block == 1 else "bsr"
            nnz = values.numel()
        entry["nnz"], entry["density"] = nnz, nnz / max(1, value.numel())
        described[name] = entry
    if model_info is None:
        model_info = _transformers_info(model)
    header = {
        "format": _FORMAT, "version": VERSION, "storage": storage, "tensors": described,
        "aliases": aliases, "model": model_info,
    }  # fmt: skip
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(header)})
    return header


def _fraction(t: Tensor) -> float:
    return int(torch.count_nonzero(t)) / max(1, t.numel())


def _weight_ops(model: nn.Module) -> dict[str, str]:
    """Per weight name in the state dict, the operation of its layer (plain model's keys)."""
    ops = {}
    for name, module in model.named_modules():
        op = layer_op(module)
        if op is None and hasattr(module, "transposed"):  # the sparse layers of this package
            op = "linear_t" if module.transposed else "linear"
        if op is not None:
            ops[f"{name}.weight" if name else "weight"] = op
    return ops


def _aliases(state: dict[str, Tensor]) -> dict[str, str]:
    """Tensors that share memory with an earlier one (tied weights): name -> the first name."""
    seen: dict[tuple[Any, ...], str] = {}
    aliases = {}
    for name, value in state.items():
        if value.device.type == "meta" or value.numel() == 0:
            continue
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
               value.stride(), value.dtype)  # fmt: skip
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def _transformers_info(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if not type(model).__module__.startswith("transformers.") or config is None:
        return None
    to_json = getattr(config, "to_json_string", None)
    if to_json is None:
        return None
    return {"kind": "transformers", "class": type(model).__name__,
            "config": json.loads(to_json(use_diff=False))}  # fmt: skip


# -- loading -------------------------------------------------------------------------------------


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a file written by :func:`save`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if HEADER_KEY not in metadata:
        raise ValueError(f"{path} was not written by alwayssparse (no {HEADER_KEY!r} header)")
    header: dict[str, Any] = json.loads(metadata[HEADER_KEY])
    if header.get("format") != _FORMAT or header.get("version") != VERSION:
        raise ValueError(
            f"{path}: unsupported format {header.get('format')} {header.get('version')}"
        )
    return header


def load(
    path: str | Path, model: nn.Module | None = None, *, sparse_layers: bool = True
) -> nn.Module:
    """Rebuild a model written by :func:`save` (or ``alwayssparse export``) for inference.

    Args:
        path: The ``.safetensors`` file.
        model: A plain model of the same architecture to load into (its sparse layers are
            replaced); default: built from the header (a ``transformers`` class and config, or a
            run's config).
        sparse_layers: Replace compressed ``nn.Linear`` / ``Conv1D`` layers by
            :class:`SparseInferenceLinear` (``False``: load every weight dense).

    Returns:
        The model in eval mode.
    """
    from safetensors.torch import load_file

    header = read_header(path)
    tensors = load_file(str(path))
    if model is None:
        model = build_model(header.get("model"))
    state: dict[str, Tensor] = {}
    replaced: dict[str, SparseInferenceLinear] = {}
    described = header["tensors"]
    for name, value in tensors.items():
        owner = next((n for n in described if name in (n + ".values", n + ".col_indices",
                                                        n + ".crow_indices")), None)  # fmt: skip
        if owner is None:
            state[name] = value
    for name, entry in described.items():
        if entry["layout"] == "dense":
            continue
        row_ptr = tensors[name + ".crow_indices"].to(torch.int64)
        cols, values = tensors[name + ".col_indices"], tensors[name + ".values"]
        rows, n_cols = entry["matrix"]
        module_name = name.removesuffix(".weight")
        module = model.get_submodule(module_name) if name.endswith(".weight") else None
        op = entry.get("op")
        if sparse_layers and module is not None and op in ("linear", "linear_t"):
            bias = state.pop(module_name + ".bias", None)
            if op == "linear":
                layer = SparseInferenceLinear(row_ptr, cols, values, n_cols, rows, bias)
            else:  # stored (in, out): the kernels want (out, in)
                dense = expand(row_ptr, cols, values, (rows, n_cols)).t()
                block = 1 if values.dim() == 1 else int(values.shape[-1])
                layer = SparseInferenceLinear(*compress(dense, block), rows, n_cols, bias, True)
            replaced[module_name] = layer
        else:
            dense = expand(row_ptr, cols, values, (rows, n_cols)).reshape(entry["shape"])
            state[name] = dense.to(getattr(torch, entry.get("dtype", "float32")))
    for alias, target in header.get("aliases", {}).items():
        if target in state:
            state[alias] = state[target]
    for module_name, layer in replaced.items():
        parent_name, _, attr = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, layer)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.removesuffix(".bias") not in replaced]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    return model.eval()


def build_model(info: dict[str, Any] | None) -> nn.Module:
    """A freshly initialised model from a header's ``"model"`` description."""
    if info is None:
        raise ValueError(
            "the file does not say how to build its model: pass model=... (a plain model of the "
            "same architecture)"
        )
    if info["kind"] == "transformers":
        transformers = importlib.import_module("transformers")
        config = dict(info["config"])
        config_class = transformers.AutoConfig.for_model(config.pop("model_type")).__class__
        model: nn.Module = getattr(transformers, info["class"])(config_class.from_dict(config))
        return model
    if info["kind"] == "run":
        return _run_model(info["config"])
    raise ValueError(f"unknown model kind {info['kind']!r}")


def _run_model(config_dict: dict[str, Any]) -> nn.Module:
    """The model of a training run's resolved config (``config.json``)."""
    from alwayssparse.config import from_dict
    from alwayssparse.tasks import TASKS
    from alwayssparse.train import RunConfig

    config = from_dict(RunConfig, config_dict)
    # A task's build_model reads only its config: no data is loaded.
    task = SimpleNamespace(config=config.task_config())
    model: nn.Module = TASKS[config.task].build_model(task)  # type: ignore[arg-type]
    return model


def export_run(
    run_dir: str | Path, out: str | Path, *, storage: str = "compressed"
) -> dict[str, Any]:
    """Write the trained model of a run directory (``config.json``, ``checkpoint.pt``) with
    :func:`save`; :func:`load` rebuilds it from the file alone. Returns the header."""
    from alwayssparse.sparsity import Sparsity

    run_dir = Path(run_dir)
    config_path, checkpoint_path = run_dir / "config.json", run_dir / "checkpoint.pt"
    for p in (config_path, checkpoint_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: not a finished or checkpointed run directory")
    config_dict = json.loads(config_path.read_text())
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    config_dict = checkpoint.get("config", config_dict)
    model = _run_model(config_dict)
    sparsity = None
    sparsity_config = config_dict["sparsity"]
    if sparsity_config["method"] != "dense":
        from alwayssparse.config import from_dict
        from alwayssparse.sparsity import SparsityConfig

        train = config_dict["train"]
        sparsity = Sparsity(model, from_dict(SparsityConfig, sparsity_config),
                            seed=train["seed"], total_steps=train["steps"])  # fmt: skip
    model.load_state_dict(checkpoint["model"])
    info = {"kind": "run", "config": config_dict, "step": int(checkpoint.get("step", 0))}
    return save(model, out, sparsity=sparsity, storage=storage, model_info=info)
