"""Multi-process training: ``torchrun`` + DistributedDataParallel, identical masks on every rank.

Launch the ordinary command under ``torchrun``; :func:`session` reads the environment torchrun
sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), starts the
process group (gloo on CPU, NCCL on CUDA with one GPU per process, ``cuda:LOCAL_RANK``) with a
timeout, and tears it down at the end. Nothing else about a run changes:

- ``train.batch_size`` is the *global* batch. Every rank draws the same global batch from the
  identically seeded batch generator and keeps its own rows ``[rank * b, (rank + 1) * b)``
  (``b = batch_size / world_size``); each task's loss is normalised so that the average over
  ranks, which is what DDP's gradient averaging computes, is the loss of the global batch. A run
  on 2 processes therefore follows the 1-process run to float rounding, and a checkpoint (which
  holds the unwrapped model, the batch generator and the data position) resumes on any number of
  processes.
- Masks are never communicated: every rank computes them from bit-identical inputs. Parameters
  are identical (DDP averages gradients, and every rank applies the same update); top-k breaks
  ties by index (:mod:`alwayssparse.masks`); random choices come from ``Sparsity.generator``,
  seeded with ``train.seed`` on every rank; RigL ranks the dense gradient summed over ranks
  (:mod:`alwayssparse.capture`). :func:`assert_same_across_ranks` checks it.
- Only rank 0 writes files and logs; evaluation is sharded over ranks and its sums all-reduced.

A rank that dies or stops answering makes the next collective on the other ranks fail after at
most ``train.dist_timeout`` seconds (torchrun's agent also stops the whole job as soon as one
worker exits with an error), so a job never hangs forever.

FSDP is not supported. FSDP2's ``fully_shard`` turns theta (``parametrizations.weight.original``,
or a sparse layer's ``values``) into row shards (DTensor) and leaves the masks as whole,
replicated buffers: forward and backward still work (the parametrization sees the gathered theta)
but every in-place mask operation of ``Sparsity.step`` mixes shards with whole tensors, so
``Sparsity`` refuses DTensor parameters. Supporting it would mean sharding A and B like theta
(row shards) and selecting top-k across shards (an all-reduced count search for the k-th score,
ties split by global index).
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

DEFAULT_TIMEOUT = 1800.0  # seconds; long enough for a checkpoint write or a slow evaluation


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job.

    Attributes:
        rank: Global rank of this process (0 writes files and logs).
        world_size: Number of processes.
        local_rank: Rank on this node (selects the GPU, ``cuda:local_rank``).
        device: The device this process trains on.
        owns_group: Whether :func:`session` started the process group (and will end it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and logs (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there are several processes."""
        return self.world_size > 1


def launch_environment() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from the variables torchrun sets, or ``None``.

    Raises:
        ValueError: If only some of the variables are set, or they are inconsistent.
    """
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    present = [name for name in names if name in os.environ]
    if not present:
        return None
    if "RANK" not in present or "WORLD_SIZE" not in present:
        raise ValueError(
            f"found {present} in the environment but not both RANK and WORLD_SIZE: launch with "
            "torchrun, or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT yourself"
        )
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {present}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"invalid launch environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


def process_device(name: str, local_rank: int, world_size: int) -> torch.device:
    """The device of one process: ``"auto"`` is CUDA when available, else CPU; under several
    processes, ``"auto"`` and ``"cuda"`` mean ``cuda:LOCAL_RANK`` (one GPU per process)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda" or world_size == 1:
        return device
    if device.index is not None:
        raise ValueError(
            f"train.device={name!r} names one GPU, but {world_size} processes are running: use "
            "'cuda' or 'auto' (each process takes cuda:LOCAL_RANK), or CUDA_VISIBLE_DEVICES"
        )
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
            "start at most one process per GPU (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


@contextmanager
def session(device: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> Iterator[DistContext]:
    """The process group for the duration of a run.

    Uses the group when one is already initialized (the caller owns it); otherwise starts one
    when the launch environment names several processes, and destroys it on exit. A single
    process (no torchrun, or ``--nproc_per_node=1``) starts nothing.

    Args:
        device: ``train.device`` (``"auto"``, ``"cpu"``, ``"cuda"``).
        timeout: Seconds a collective may wait for the other ranks before it raises.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        if dist.get_backend() == "nccl":
            yield DistContext(rank, world, local, torch.device("cuda", torch.cuda.current_device()))
        else:
            yield DistContext(rank, world, local, process_device(device, local, world))
        return
    launch = launch_environment()
    if launch is None or launch[1] == 1:
        yield DistContext(device=process_device(device, 0, 1))
        return
    rank, world, local = launch
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; cannot run on ranks")
    target = process_device(device, local, world)
    backend = "nccl" if target.type == "cuda" else "gloo"
    if target.type == "cuda":
        torch.cuda.set_device(target)
    dist.init_process_group(
        backend,
        timeout=timedelta(seconds=timeout),
        device_id=target if target.type == "cuda" else None,
    )
    try:
        yield DistContext(rank, world, local, target, owns_group=True)
    finally:
        dist.destroy_process_group()


def failure_note(context: DistContext, timeout: float) -> str:
    """What to tell the user when a rank's run fails."""
    return (
        f"[alwayssparse] rank {context.rank} of {context.world_size} failed. A collective that "
        f"timed out (train.dist_timeout={timeout:g} s) or lost its connection means another "
        "rank died or stopped responding first: its own log says why."
    )


# -- the model ---------------------------------------------------------------------------------


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds BatchNorm layers (whose statistics depend on the batch)."""
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def prepare_batchnorm(model: nn.Module, context: DistContext, sync: bool) -> nn.Module:
    """Under several processes, turn BatchNorm into SyncBatchNorm (statistics of the global
    batch, as on one process) when ``sync``; call before ``Sparsity`` attaches.

    Raises:
        ValueError: If ``sync`` is asked on CPU, where PyTorch's SyncBatchNorm does not run.
    """
    if not context.distributed or not sync or not has_batchnorm(model):
        return model
    if context.device.type != "cuda":
        raise ValueError(
            "train.sync_batchnorm: SyncBatchNorm runs on CUDA only; on CPU set "
            "train.sync_batchnorm=false (each process normalises with the statistics of its own "
            "shard, so runs differ from one process; running statistics follow rank 0)"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap_model(model: nn.Module, context: DistContext) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several processes, else itself.

    Give ``Sparsity`` the unwrapped model, before wrapping: the parametrizations (or the sparse
    layers) must be in place when DDP registers its gradient hooks. Buffers (masks, snapshots,
    the sparse layers' indices, BatchNorm statistics) are not broadcast on every forward (recent
    PyTorch still copies them from rank 0 once, here): the masks are identical by construction
    (:func:`assert_same_across_ranks` checks it, before wrapping) and broadcasting them would
    only hide a bug; BatchNorm statistics are synchronised by :func:`broadcast_batchnorm_stats`
    when they are read.
    """
    if not context.distributed:
        return model
    # Buffers that live on another device than the parameters (Top-KAST's host reservoir of
    # the sparse backend) cannot go through the NCCL broadcast that DDP runs at start-up.
    off_device = [name for name, b in model.named_buffers() if b.device.type != context.device.type]
    if off_device:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, off_device)
    options: dict[str, Any] = {}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        options["forward_sync_buffers"] = False
    else:  # PyTorch before forward_sync_buffers
        options["broadcast_buffers"] = False
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **options)


def broadcast_batchnorm_stats(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm running statistics (DDP's convention for BatchNorm);
    call before evaluating or saving. Nothing to do on one process."""
    if not _active():
        return
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)


# -- reductions --------------------------------------------------------------------------------


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over all ranks (a new tensor on ``tensor``'s device); ``tensor``
    itself on one process."""
    if not _active():
        return tensor
    total = tensor.detach().to(_collective_device(), copy=True)
    dist.all_reduce(total)
    return total.to(tensor.device)


def all_reduce_mean(values: Mapping[str, float]) -> dict[str, float]:
    """The mean of each value over all ranks (in float64)."""
    if not values:
        return {}
    mean = all_reduce_sum(torch.tensor(list(values.values()), dtype=torch.float64))
    world = dist.get_world_size() if _active() else 1
    return {key: float(v) / world for key, v in zip(values, mean.tolist(), strict=True)}


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (any picklable value) on every rank; ``obj`` on one process."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` on one process.
    Tensors in it are moved to the CPU first."""
    obj = _to_cpu(obj)
    if not _active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# -- consistency -------------------------------------------------------------------------------


def tensor_digest(tensor: Tensor) -> str:
    """A digest of the tensor's dtype, shape and exact bytes (equal digests: equal tensors)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{data.dtype}{tuple(tensor.shape)}".encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def assert_same_across_ranks(tensors: Mapping[str, Tensor], what: str = "state") -> None:
    """Raise on every rank unless all ranks hold bit-identical ``tensors`` (same names too).

    One all-gather of small digests; every rank must call it at the same point. Nothing to do
    on one process.

    Raises:
        RuntimeError: Naming (up to five of) the tensors that differ and the ranks holding them.
    """
    if not _active():
        return
    mine = {name: tensor_digest(t) for name, t in tensors.items()}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    reference = gathered[0]
    differing: dict[str, list[int]] = {}
    for rank, digests in enumerate(gathered):
        for name in sorted(set(reference) | set(digests)):
            if reference.get(name) != digests.get(name):
                differing.setdefault(name, []).append(rank)
    if differing:
        shown = ", ".join(f"{n} (ranks {r})" for n, r in list(differing.items())[:5])
        raise RuntimeError(
            f"{what} differs across ranks in {len(differing)} tensors, e.g. {shown}: they must "
            "be bit-identical (same seed, same data, deterministic mask selection)"
        )


def training_state(model: nn.Module, sparsity: Any | None = None) -> dict[str, Tensor]:
    """What every rank must hold identically: the model's parameters and buffers (masks
    included) and, given a ``Sparsity``, every tensor of its state (generator, explored
    positions)."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    if sparsity is not None:
        state.update(_tensors(sparsity.state_dict(), "sparsity"))
    return state


def _tensors(state: Any, prefix: str) -> dict[str, Tensor]:
    """The tensors of a nested state dict, keyed by their dotted path."""
    if isinstance(state, Tensor):
        return {prefix: state}
    if isinstance(state, dict):
        found: dict[str, Tensor] = {}
        for key, value in state.items():
            found.update(_tensors(value, f"{prefix}.{key}"))
        return found
    return {}
