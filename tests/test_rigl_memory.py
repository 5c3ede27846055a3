"""RigL's dense gradient is computed chunk by chunk and never held whole (topkast.md appendix C).

The memory test runs in a subprocess so that the measurement is not polluted by the test
session. ``ru_maxrss`` is a high-water mark, and the forward/backward pass and the magnitude
pruning before the selection already allocate several dense-size tensors; a plain before/after
reading would therefore see nothing. The measured selection is wrapped so that, just before it
runs, a ballast tensor lifts the current resident set above every earlier peak: the high-water
mark then equals the current resident set, and its growth during the selection is what the
selection itself allocates. A second, unchunked selection on the same captured data shows that
the measurement does see a dense gradient when there is one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from alwayssparse import Sparsity
from alwayssparse.capture import GradientCapture

MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource
    import torch
    from torch import nn
    from alwayssparse import Sparsity

    torch.set_num_threads(1)
    MiB = 1 << 20
    PAGE = resource.getpagesize()

    def peak():  # high-water mark of the resident set, bytes (ru_maxrss is KiB on Linux)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def current():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def measured(fn, *args):
        # A touched ballast lifts the RSS just above every earlier peak.
        ballast = torch.ones((peak() - current() + 16 * MiB) // 4)
        before, now = peak(), current()
        out = fn(*args)
        growth = peak() - before
        del ballast
        return out, growth / MiB, (before - now) / MiB

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8192, 4096, bias=False))  # dense gradient: 128 MiB
    sp = Sparsity(model, method="rigl", sparsity=0.99, update_interval=1, total_steps=10,
                  drop_fraction=0.01, drop_schedule="constant",
                  gradient_chunk_elements=1 << 18)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)  # no momentum: no dense optimizer state
    result = {}
    select = sp.method.select_grown

    def wrapped(t, active, count, generator):
        chunked, result["chunked"], result["slack"] = measured(
            select, t, active, count, generator)
        sp.method.gradient_chunk_elements = 1 << 40  # the whole gradient as one chunk
        dense, result["dense"], result["dense_slack"] = measured(
            select, t, active, count, generator)
        sp.method.gradient_chunk_elements = 1 << 18
        result["same"] = bool(torch.equal(chunked, dense))
        result["count"] = int(torch.unique(chunked).numel())  # distinct grown unit indices
        return chunked

    sp.method.select_grown = wrapped
    x = torch.randn(8, 8192)
    model(x).square().sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sp.step(0, opt)
    result["expected_count"] = round(0.01 * round(0.01 * 8192 * 4096))
    print(json.dumps(result))
    """
)


def test_rigl_selection_never_holds_a_dense_gradient() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # The ballast made the high-water mark tight (it equals the current RSS).
    assert result["slack"] < 8 and result["dense_slack"] < 8, result
    # Both selections grow the same units, the exact number RigL asked for.
    assert result["same"], result
    assert result["count"] == result["expected_count"], result
    # Control: computing the gradient as one chunk holds at least one dense gradient (128 MiB).
    assert result["dense"] > 128, result
    # Chunked: one 1 MiB chunk at a time plus the grown units as indices; far below the
    # 128 MiB one dense gradient (or one dense copy of the weight) would take.
    assert result["chunked"] < 64, result


# -- counting dense materialisations ------------------------------------------------------------


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_selection_never_evaluates_the_dense_masked_weight(layer: str) -> None:
    """Reading ``module.weight`` of a parametrized layer builds theta * A densely: the chunked
    selection must get the layer's shape without it (once per chunk would also be slow)."""
    torch.manual_seed(0)
    if layer == "linear":
        model: nn.Module = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        x = torch.randn(4, 16)
    else:
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3))
        x = torch.randn(2, 3, 8, 8)
    sp = Sparsity(model, method="rigl", sparsity=0.5, update_interval=1, total_steps=10,
                  drop_schedule="constant", gradient_chunk_elements=64)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    evaluations = {"count": 0}

    def count(*_: object) -> None:
        evaluations["count"] += 1

    for module in model.modules():
        if hasattr(module, "parametrizations"):
            module.parametrizations.weight[0].register_forward_hook(count)
    before = [t.forward_mask.clone() for t in sp.tensors]
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    forward_evaluations = evaluations["count"]
    assert forward_evaluations == 2  # one per sparse layer in the forward pass
    sp.step(0, opt)
    assert any(not torch.equal(b, t.forward_mask) for b, t in zip(before, sp.tensors, strict=True))
    assert evaluations["count"] == forward_evaluations


# -- GradientCapture.row_chunks against autograd ------------------------------------------------


def captured_chunks(
    capture: GradientCapture, name: str, rows: int
) -> list[tuple[int, torch.Tensor]]:
    return [(first, chunk.clone()) for first, chunk in capture.row_chunks(name, rows)]


def test_row_chunks_linear_equal_autograd_gradient() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 10).double()
    capture = GradientCapture({"layer": (layer, "linear", tuple(layer.weight.shape))})
    capture.active = True
    x = torch.randn(2, 3, 6, dtype=torch.float64)  # a leading sequence dimension, too
    (layer(x).sin().sum()).backward()
    assert capture.has_gradient("layer")
    chunks = captured_chunks(capture, "layer", 4)
    assert [first for first, _ in chunks] == [0, 4, 8]
    assert [tuple(c.shape) for _, c in chunks] == [(4, 6), (4, 6), (2, 6)]
    assert layer.weight.grad is not None
    torch.testing.assert_close(torch.cat([c for _, c in chunks]), layer.weight.grad)


def test_row_chunks_sum_over_two_uses_in_one_forward() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(5, 5, bias=False).double()
    capture = GradientCapture({"layer": (layer, "linear", tuple(layer.weight.shape))})
    capture.active = True
    x = torch.randn(4, 5, dtype=torch.float64)
    layer(torch.tanh(layer(x))).pow(2).sum().backward()
    chunks = captured_chunks(capture, "layer", 2)
    assert [first for first, _ in chunks] == [0, 2, 4]
    assert layer.weight.grad is not None
    torch.testing.assert_close(torch.cat([c for _, c in chunks]), layer.weight.grad)


@pytest.mark.parametrize("twice", [False, True])
def test_row_chunks_conv2d_equal_autograd_gradient(twice: bool) -> None:
    torch.manual_seed(2)
    if twice:
        conv = nn.Conv2d(4, 4, 3, padding=1).double()
    else:
        conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1).double()
    capture = GradientCapture({"conv": (conv, "conv2d", tuple(conv.weight.shape))})
    capture.active = True
    x = torch.randn(2, conv.in_channels, 7, 7, dtype=torch.float64)
    out = conv(torch.relu(conv(x))) if twice else conv(x)
    out.square().sum().backward()
    chunks = captured_chunks(capture, "conv", 2)
    out_channels = conv.out_channels
    assert [first for first, _ in chunks] == list(range(0, out_channels, 2))
    assert all(c.shape[1] == conv.in_channels * 9 for _, c in chunks)
    assert conv.weight.grad is not None
    torch.testing.assert_close(
        torch.cat([c for _, c in chunks]), conv.weight.grad.reshape(out_channels, -1)
    )


def test_row_chunks_without_capture_raises_and_inactive_records_nothing() -> None:
    layer = nn.Linear(3, 4)
    capture = GradientCapture({"layer": (layer, "linear", tuple(layer.weight.shape))})
    layer(torch.randn(2, 3)).sum().backward()  # capture.active is False
    assert not capture.has_gradient("layer")
    with pytest.raises(RuntimeError, match="layer"):
        next(iter(capture.row_chunks("layer", 2)))
    capture.active = True
    layer(torch.randn(2, 3)).sum()  # forward only: no output gradient yet
    assert not capture.has_gradient("layer")
    capture.clear()
    capture.remove()
