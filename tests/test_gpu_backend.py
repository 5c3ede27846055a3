"""The GPU backend ``"gpu"`` (Triton block-sparse layers) against the masked backend.

Without a GPU the Triton kernels run in Triton's CPU interpreter: a module-scoped fixture sets
TRITON_INTERPRET=1 for this module's tests only (before the kernel module is first imported) and
restores it afterwards, as ``tests/test_triton_kernels.py`` does; the backend accepts CPU tensors
only then. With a GPU the same tests run on CUDA, and the tests marked ``cuda`` run too (bf16
autocast training, the masked backend on CUDA with checkpoints moved between devices).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alwayssparse import Sparsity
from alwayssparse.backends import BACKENDS, gpu
from alwayssparse.backends.gpu import BlockSparseLinear, GpuBackend
from alwayssparse.kernels import triton_bsr
from alwayssparse.methods import METHODS

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
ON_GPU = HAS_CUDA and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"

_loaded = sys.modules.get("alwayssparse.kernels._triton_bsr_jit")
if not HAS_TRITON:
    _SKIP = "triton is not installed (pip install -e '.[dev]' installs it)"
elif not ON_GPU and _loaded is not None and not _loaded.INTERPRETED:
    _SKIP = "the Triton kernels were imported for the GPU earlier in this process; no GPU here"
else:
    _SKIP = ""


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    """TRITON_INTERPRET=1 while this module's tests run (without a GPU), restored afterwards."""
    if ON_GPU or _SKIP:
        yield
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        assert gpu.kernels_interpreted()
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


needs_kernels = pytest.mark.skipif(bool(_SKIP), reason=_SKIP)
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (not the interpreter)")

BLOCK = 16
STEPS = 16
# Per method: options giving topology changes within STEPS (every method at least twice).
OPTIONS: dict[str, dict[str, Any]] = {
    "static": {},
    "topkast": {"backward_sparsity": 0.5, "exploration_coefficient": 1e-3, "refresh_interval": 3},
    "set": {"update_interval": 4},
    "rigl": {"update_interval": 4},
    "dynsparse": {"num_updates": 4},
    "gmp": {"stop_step": 12, "update_interval": 4},
}


def make_model(device: str = DEVICE) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).to(device)


def train(
    backend: str,
    method: str,
    steps: int = STEPS,
    device: str = DEVICE,
    autocast: torch.dtype | None = None,
    **extra: Any,
) -> dict[str, Any]:
    model = make_model(device)
    options = {**OPTIONS[method], **extra}
    sp = Sparsity(model, method=method, sparsity=0.75, block_size=BLOCK, backend=backend,
                  total_steps=steps, seed=1, **options)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    batches = torch.Generator().manual_seed(2)
    losses = []
    for step in range(steps):
        x, y = torch.randn(32, 64, generator=batches), torch.randn(32, 64, generator=batches)
        x, y = x.to(device), y.to(device)
        with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = model(x)
        loss = F.mse_loss(out.float(), y) + sp.regularizer()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sp.step(step, optimizer)
        losses.append(loss.item())
    return {"losses": losses, "sp": sp, "model": model, "optimizer": optimizer}


def effective_weights(run: dict[str, Any]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per sparse tensor: (theta on A, theta on B), dense, whatever the backend."""
    sp: Sparsity = run["sp"]
    out = {}
    for t in sp.tensors:
        a, b = sp.masks()[t.name]
        if isinstance(t.module, BlockSparseLinear):
            out[t.name] = (t.module.dense_weight(), t.module.dense_weight(only_a=False))
        else:
            theta = t.weight.detach()
            out[t.name] = (torch.where(a, theta, 0.0), torch.where(b, theta, 0.0))
    return out


def test_registered_and_importable_without_triton() -> None:
    assert BACKENDS["gpu"] is GpuBackend
    assert GpuBackend.devices == ("cuda",) and GpuBackend.supported_blocks == (16, 32, 64)
    assert GpuBackend.fixed_capacity
    # In a fresh process where triton cannot be imported: the package and its backends import,
    # and attaching the backend names the fix.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import alwayssparse.backends as backends\n"
        "from torch import nn\n"
        "from alwayssparse import Sparsity\n"
        "assert 'gpu' in backends.BACKENDS\n"
        "try:\n"
        "    Sparsity(nn.Sequential(nn.Linear(64, 64)), block_size=16, backend='gpu')\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120, check=True)  # fmt: skip
    assert "backend 'gpu' needs Triton" in result.stdout, result.stdout + result.stderr


@needs_kernels
@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_gpu_backend_matches_masked(method: str) -> None:
    masked, run = train("masked", method), train("gpu", method)
    # Tolerances: float32 rounding of different summation orders.
    torch.testing.assert_close(run["losses"], masked["losses"], rtol=1e-5, atol=1e-5)
    masks_m, masks_g = masked["sp"].masks(), run["sp"].masks()
    for name, (a, b) in masks_m.items():
        assert torch.equal(masks_g[name][0], a), f"{name}: A differs"
        assert torch.equal(masks_g[name][1], b), f"{name}: B differs"
    weights_m, weights_g = effective_weights(masked), effective_weights(run)
    for name, (a, b) in weights_m.items():
        torch.testing.assert_close(weights_g[name][0], a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(weights_g[name][1], b, rtol=1e-4, atol=1e-5)
    assert run["sp"].explored_dof() == masked["sp"].explored_dof()
    assert run["sp"].parameter_counts() == masked["sp"].parameter_counts()
    # export(): plain nn.Linear layers holding theta on A, as the masked backend's.
    x = torch.randn(5, 64, device=DEVICE)
    before = run["model"](x)
    masked["sp"].export()
    run["sp"].export()
    model = run["model"]
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.state_dict(), masked["model"].state_dict(),
                               rtol=1e-4, atol=1e-5)  # fmt: skip


@needs_kernels
def test_optimizer_state_only_for_stored_blocks() -> None:
    run = train("gpu", "set", steps=5)
    model, optimizer = run["model"], run["optimizer"]
    layers = [m for m in model if isinstance(m, BlockSparseLinear)]
    assert len(layers) == 2
    for layer in layers:
        # 4 of the 16 blocks of a 64 x 64 weight at sparsity 0.75.
        assert layer.capacity == 4 and layer.values.shape == (4 * BLOCK, BLOCK)
        state = optimizer.state[layer.values]
        assert state["exp_avg"].shape == layer.values.shape == state["exp_avg_sq"].shape
    # No parameter, buffer or optimizer state of the model has a dense weight's size.
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
    assert all(t.numel() < 64 * 64 // 2 for t in tensors)


@needs_kernels
def test_state_follows_topology_change() -> None:
    steps = 9
    model = make_model()
    sp = Sparsity(model, method="set", sparsity=0.75, block_size=BLOCK, backend="gpu",
                  total_steps=steps, seed=1, update_interval=4, drop_fraction=0.5)  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    layer = model[0]
    assert isinstance(layer, BlockSparseLinear)
    checked = 0
    for step in range(steps):
        model(torch.randn(8, 64, device=DEVICE)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        old_units = layer.units.clone()
        old_state = optimizer.state[layer.values]["exp_avg"].detach().view(-1, BLOCK, BLOCK)
        old_state = old_state.clone()
        sp.step(step, optimizer)
        if torch.equal(old_units, layer.units):
            continue
        checked += 1
        new_state = optimizer.state[layer.values]["exp_avg"].view(-1, BLOCK, BLOCK)
        old = {int(u): slot for slot, u in enumerate(old_units.tolist()) if u >= 0}
        for slot, unit in enumerate(layer.units.tolist()):
            if unit in old:  # a survivor: its state moved with it
                assert torch.equal(new_state[slot], old_state[old[unit]])
            else:  # entered B, or an unused slot: zero
                assert bool((new_state[slot] == 0).all())
        assert any(u in old for u in layer.units.tolist() if u >= 0)
        assert any(u not in old for u in layer.units.tolist() if u >= 0)
    assert checked >= 1


@needs_kernels
def test_checkpoint_round_trip_and_resume(tmp_path: Path) -> None:
    """A checkpoint (loaded onto the host, then into the layers) resumes the run exactly; the
    layouts are rebuilt after the load."""
    steps, half = 10, 5
    full = train("gpu", "topkast", steps=steps)
    first = train("gpu", "topkast", steps=half)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": first["model"].state_dict(), "sparsity": first["sp"].state_dict(),
                "optimizer": first["optimizer"].state_dict()}, path)  # fmt: skip
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = make_model()
    sp = Sparsity(model, method="topkast", sparsity=0.75, block_size=BLOCK, backend="gpu",
                  total_steps=steps, seed=1, **OPTIONS["topkast"])  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    model(torch.randn(2, 64, device=DEVICE))  # layouts of the initial masks, now stale
    model.load_state_dict(state["model"])
    sp.load_state_dict(state["sparsity"])
    optimizer.load_state_dict(state["optimizer"])
    batches = torch.Generator().manual_seed(2)
    for step in range(steps):
        x, y = torch.randn(32, 64, generator=batches), torch.randn(32, 64, generator=batches)
        if step < half:
            continue  # consumed before the checkpoint
        loss = F.mse_loss(model(x.to(DEVICE)), y.to(DEVICE)) + sp.regularizer()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sp.step(step, optimizer)
    for name, (a, b) in full["sp"].masks().items():
        assert torch.equal(sp.masks()[name][0], a) and torch.equal(sp.masks()[name][1], b)
    for (key, p), q in zip(model.state_dict().items(), full["model"].state_dict().values(),
                           strict=True):  # fmt: skip
        assert torch.equal(p, q), key


@needs_kernels
def test_reservoir_on_host_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    run = train("gpu", "topkast", steps=4)
    for t in run["sp"].tensors:
        layer = t.module
        assert isinstance(layer, BlockSparseLinear) and layer.reservoir is not None
        assert layer.reservoir.device.type == "cpu" and layer.reservoir.shape == (64, 64)
        # .to() moves the layer but keeps the reservoir on the host (its dtype follows).
        layer.to(torch.float64)
        assert layer.reservoir.dtype == torch.float64 and layer.reservoir.device.type == "cpu"
        layer.to(torch.float32)
        layer.place_reservoir(on_host=False)
        assert layer.reservoir.device == layer.values.device
    monkeypatch.setattr(GpuBackend, "reservoir_on_host", False)
    run = train("gpu", "topkast", steps=4)
    for t in run["sp"].tensors:
        layer = t.module
        assert isinstance(layer, BlockSparseLinear) and layer.reservoir is not None
        assert not layer.reservoir_on_host and layer.reservoir.device == layer.values.device


@needs_kernels
def test_bf16_autocast_with_fp32_master_values() -> None:
    """Autocast casts the layer's input; the values and their gradients stay float32."""
    model = make_model()
    sp = Sparsity(model, method="static", sparsity=0.75, block_size=BLOCK, backend="gpu")
    layer = model[0]
    assert isinstance(layer, BlockSparseLinear)
    x = torch.randn(8, 64, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert layer.values.dtype == torch.float32 and layer.values.grad is not None
    assert layer.values.grad.dtype == torch.float32
    reference = nn.functional.linear(x, layer.dense_weight(), layer.bias)
    torch.testing.assert_close(model[0](x), reference, rtol=1e-5, atol=1e-5)
    assert sp.tensors[0].module is layer


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model(dtype: torch.dtype) -> None:
    """16-bit weights and activations (no autocast): close to the masked backend."""
    losses = {}
    for backend in ("masked", "gpu"):
        model = make_model().to(dtype)
        sp = Sparsity(model, method="set", sparsity=0.75, block_size=BLOCK, backend=backend,
                      total_steps=6, seed=1, update_interval=2)  # fmt: skip
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        batches = torch.Generator().manual_seed(2)
        losses[backend] = []
        for step in range(3):
            x, y = torch.randn(32, 64, generator=batches), torch.randn(32, 64, generator=batches)
            loss = F.mse_loss(model(x.to(DEVICE, dtype)).float(), y.to(DEVICE))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            sp.step(step, optimizer)
            losses[backend].append(loss.item())
        assert all(t.weight.dtype == dtype for t in sp.tensors)
    torch.testing.assert_close(losses["gpu"], losses["masked"], rtol=2e-2, atol=2e-2)


def test_rigl_under_autocast() -> None:
    """RigL's dense-gradient rows from a float32 input and a bf16 output gradient (autocast);
    the masked backend on the CPU (the CUDA tests below run both backends)."""
    run = train("masked", "rigl", device="cpu", autocast=torch.bfloat16)
    assert run["sp"].explored_dof()["total"] > 0.25  # RigL did grow units


def test_errors_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    conv = nn.Sequential(nn.Conv2d(16, 16, 1), nn.Flatten(), nn.Linear(16, 16))
    with pytest.raises(ValueError, match="backend 'gpu' supports nn.Linear"):
        Sparsity(conv, method="static", block_size=16, backend="gpu")
    assert type(conv[0]) is nn.Conv2d and type(conv[2]) is nn.Linear  # unchanged
    with pytest.raises(ValueError, match=r"block_size in \[16, 32, 64\]"):
        Sparsity(make_model("cpu"), method="static", block_size=4, backend="gpu")
    with pytest.raises(ValueError, match="selection='layer'"):
        Sparsity(make_model("cpu"), method="topkast", block_size=16, backend="gpu",
                 selection="global")  # fmt: skip
    monkeypatch.setattr(triton_bsr, "triton_available", lambda: False)
    with pytest.raises(ImportError, match="backend 'gpu' needs Triton"):
        Sparsity(make_model("cpu"), method="static", block_size=16, backend="gpu")
    monkeypatch.undo()
    if HAS_TRITON:
        # Outside the interpreter, CPU weights are refused before the model changes.
        monkeypatch.setattr(gpu, "kernels_interpreted", lambda: False)
        model = make_model("cpu")
        with pytest.raises(ValueError, match="runs on CUDA tensors"):
            Sparsity(model, method="static", block_size=16, backend="gpu")
        assert all(type(m) is not BlockSparseLinear for m in model)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        Sparsity(make_model("cpu").double(), method="static", block_size=16, backend="gpu")


def test_every_sparse_method_is_covered() -> None:
    builtin = {"static", "topkast", "set", "rigl", "dynsparse", "gmp"}
    assert set(OPTIONS) == builtin
    assert builtin <= {name for name, cls in METHODS.items() if cls.sparse}


# -- CUDA only -------------------------------------------------------------------------------


@needs_cuda
@needs_kernels
@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_bf16_autocast_training_cuda(method: str) -> None:
    """fp32 master values, bf16 activations: close to the masked backend under autocast."""
    masked = train("masked", method, autocast=torch.bfloat16)
    run = train("gpu", method, autocast=torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(run["losses"])))
    for t in run["sp"].tensors:
        assert t.weight.dtype == torch.float32
    # bf16 rounding differs between cuBLAS and the kernels: losses agree to bf16 precision
    # (masks of dynamic methods may then diverge, so they are compared for static only).
    torch.testing.assert_close(run["losses"][:3], masked["losses"][:3], rtol=3e-2, atol=3e-2)
    if method == "static":
        torch.testing.assert_close(run["losses"], masked["losses"], rtol=3e-2, atol=3e-2)
        for name, (a, b) in masked["sp"].masks().items():
            assert torch.equal(run["sp"].masks()[name][0], a)
            assert torch.equal(run["sp"].masks()[name][1], b)


@needs_cuda
def test_bf16_model_trains_cuda() -> None:
    """bf16 values and activations (model.bfloat16()), without autocast."""
    model = make_model().bfloat16()
    sp = Sparsity(model, method="rigl", sparsity=0.75, block_size=BLOCK, backend="gpu",
                  total_steps=8, update_interval=2)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(8):
        x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
        loss = model(x).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sp.step(step, optimizer)
        assert torch.isfinite(loss)
    assert all(t.weight.dtype == torch.bfloat16 for t in sp.tensors)


@needs_cuda
@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_masked_backend_on_cuda_and_checkpoints_across_devices(method: str) -> None:
    """The masked backend on CUDA matches it on the CPU; a checkpoint moves both ways."""
    cpu, cuda = train("masked", method, device="cpu"), train("masked", method, device="cuda")
    torch.testing.assert_close(cuda["losses"][:3], cpu["losses"][:3], rtol=1e-4, atol=1e-5)
    if method == "static":  # dynamic methods may pick other units after rounding differences
        for name, (a, b) in cpu["sp"].masks().items():
            assert torch.equal(cuda["sp"].masks()[name][0].cpu(), a)
            assert torch.equal(cuda["sp"].masks()[name][1].cpu(), b)
    for source, target in (("cuda", "cpu"), ("cpu", "cuda")):
        run = cuda if source == "cuda" else cpu
        state = {k: v.to(target) for k, v in run["model"].state_dict().items()}
        model = make_model(target)
        sp = Sparsity(model, method=method, sparsity=0.75, block_size=BLOCK, backend="masked",
                      total_steps=STEPS, seed=1, **OPTIONS[method])  # fmt: skip
        model.load_state_dict(state)
        sp.load_state_dict(run["sp"].state_dict())
        for name, (a, b) in run["sp"].masks().items():
            assert torch.equal(sp.masks()[name][0].cpu(), a.cpu())
            assert torch.equal(sp.masks()[name][1].cpu(), b.cpu())
        x = torch.randn(4, 64)
        torch.testing.assert_close(model(x.to(target)).cpu(), run["model"](x.to(source)).cpu(),
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
        # Training continues on the target device.
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(x.to(target)).square().mean().backward()
        optimizer.step()
        sp.step(STEPS, optimizer)
