"""The FLOP ledger against hand calculations and the BERT paper's reported FLOPs."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from alwayssparse import Sparsity
from alwayssparse.flops import (
    FlopLedger,
    LayerFlops,
    attention_flops,
    bert_inference_flops,
    bert_training_flops,
    conv_flops,
    format_table,
    linear_flops,
)
from alwayssparse.models.bert import BertAttention, BertConfig, BertForPreTraining, bert_config

# -- formulas ------------------------------------------------------------------------------------


def test_formulas_by_hand() -> None:
    assert linear_flops(8, 64, 32) == 2 * 8 * 64 * 32 == 32768
    assert linear_flops(8, 64, 32, density=0.25) == 8192
    # 60 output positions, (8 / 4) * 3 * 5 inputs and 12 outputs each, half the weights.
    assert conv_flops(60, 8, 12, (3, 5), groups=4) == 2 * 60 * 2 * 15 * 12 == 43200
    assert conv_flops(60, 8, 12, (3, 5), groups=4, density=0.5) == 21600
    assert conv_flops(10, 3, 4, (3, 3)) == 2 * 10 * 3 * 9 * 4
    assert conv_flops(10, 3, 4, (3,)) == 2 * 10 * 3 * 3 * 4
    # Q K^T and P V: 2 * S^2 * d each per head; 12 heads of 64 sum to 4 * S^2 * 768.
    assert attention_flops(128, 128, 64, heads=12) == 4 * 128**2 * 768
    assert attention_flops(3, 5, 2, heads=2, batch=2, value_dim=4) == 2 * 2 * 2 * 3 * 5 * (2 + 4)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: linear_flops(1, 2, 3, density=1.5), "density must be in"),
        (lambda: linear_flops(-1, 2, 3), "rows must be >= 0"),
        (lambda: conv_flops(1, 6, 4, (3, 3), groups=4), "groups"),
        (lambda: conv_flops(1, 4, 4, (3, 0)), "kernel_size"),
        (lambda: bert_training_flops(bert_config("mini"), sparsity=1.2), "sparsity"),
    ],
)
def test_formula_errors_name_the_input(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# The BERT paper's FLOPs per training sequence (sequence length 128, non-embedding) as printed:
# (preset, sparsity, figure, significant digits printed); the comment says where.
PAPER = [
    ("small", 0.0, 10.07e9, 4),  # Table 1, dense BERT-Small
    ("base", 0.9, 8.33e9, 3),  # Table 1, DynSparse BERT-Base s = 0.9
    ("mini", 0.0, 2.617e9, 4),  # Table A.8, dense BERT-Mini
    ("medium", 0.9, 2.738e9, 4),  # Table A.8, DynSparse BERT-Medium s = 0.9
]


def _as_printed(value: float, digits: int) -> float:
    return float(f"{value:.{digits}g}")


@pytest.mark.parametrize("size, sparsity, figure, digits", PAPER)
def test_bert_formula_reproduces_paper(
    size: str, sparsity: float, figure: float, digits: int
) -> None:
    config = bert_config(size)
    flops = bert_training_flops(config, sparsity=sparsity)
    assert _as_printed(flops, digits) == figure
    assert bert_inference_flops(config, sparsity=sparsity) == pytest.approx(flops / 3)


def _uninitialised_bert(config: BertConfig) -> BertForPreTraining:
    """The model with zero weights: values do not change FLOPs, and skipping BERT's truncated
    normal initialisation of BERT-Base's 110M weights keeps the test fast."""
    with torch.device("meta"):
        model = BertForPreTraining(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    model.mlm_head.decoder.weight = model.embeddings.word_embeddings.weight  # re-tie
    return model


@pytest.mark.parametrize("size, sparsity, figure, digits", PAPER)
def test_ledger_on_bert_reproduces_paper(
    size: str, sparsity: float, figure: float, digits: int
) -> None:
    """The real model, the real DynSparse layout (embeddings dense), one training forward of one
    sequence of 128 tokens, counted over the encoder as the paper does."""
    torch.manual_seed(0)
    # The vocabulary only sizes the embeddings and the MLM decoder, which the paper excludes.
    config = bert_config(size, vocab_size=64)
    model = _uninitialised_bert(config)
    sparsity_state = None
    if sparsity:
        sparsity_state = Sparsity(model, method="dynsparse", sparsity=sparsity, total_steps=100)
    ledger = FlopLedger(model, sparsity_state, scope=["layers"])
    model(torch.randint(0, 64, (1, 128)))
    step = ledger.record(0)
    assert step.examples == 1
    assert _as_printed(ledger.total_training_flops, digits) == figure
    expected = bert_training_flops(config, sparsity=sparsity)
    assert ledger.total_training_flops == pytest.approx(expected, rel=1e-5)  # exact nnz rounding
    assert ledger.inference_flops == pytest.approx(expected / 3, rel=1e-5)
    rows = ledger.per_layer()
    assert {r.name.split(".")[0] for r in rows} == {"layers"}
    weights = [r for r in rows if r.kind == "linear"]
    assert len(weights) == 6 * config.num_layers
    assert all(r.forward_density == pytest.approx(1.0 - sparsity, abs=1e-5) for r in weights)


def test_whole_model_scope_counts_heads_but_not_embedding_lookups() -> None:
    torch.manual_seed(0)
    config = bert_config("tiny", vocab_size=100)
    model = BertForPreTraining(config)
    encoder, whole = FlopLedger(model, scope=["layers"]), FlopLedger(model)
    model(torch.randint(0, 100, (2, 16))).mlm_logits.sum().backward()
    encoder.record(0)
    whole.record(0)
    h, v, rows = config.hidden_size, config.vocab_size, 2 * 16
    heads = (
        linear_flops(rows, h, h)  # MLM transform
        + linear_flops(rows, h, v)  # MLM decoder (tied to the embedding, still a matmul)
        + linear_flops(2, h, h)  # pooler on [CLS]
        + linear_flops(2, h, 2)  # NSP head
    )
    assert whole.total_training_flops - encoder.total_training_flops == 3 * heads
    names = {r.name for r in whole.per_layer()}
    assert "mlm_head.decoder" in names and not any("embeddings" in n for n in names)


# -- weight layers by hand -----------------------------------------------------------------------


def _one(ledger: FlopLedger, name: str) -> LayerFlops:
    (row,) = [r for r in ledger.per_layer() if r.name == name]
    return row


def test_linear_by_hand() -> None:
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    ledger = FlopLedger(model)
    x = torch.randn(3, 5, 64)  # 15 rows; raw data: no input gradient for the first layer
    model(x).sum().backward()
    step = ledger.record(0)
    first, second = _one(ledger, "0"), _one(ledger, "2")
    assert (first.rows, first.forward, first.input_grad, first.weight_grad) == (
        15, 2 * 15 * 64 * 32, 0, 2 * 15 * 64 * 32)  # fmt: skip
    assert (second.forward, second.input_grad, second.weight_grad) == (2 * 15 * 32 * 16,) * 3
    assert step.training == 2 * 2 * 15 * 64 * 32 + 3 * 2 * 15 * 32 * 16
    assert step.examples == 3 and ledger.inference_flops == (first.forward + second.forward) / 3

    # A frozen weight gets no gradient; an input that requires gradient gets one.
    model[0].weight.requires_grad_(False)
    model(x.requires_grad_()).sum().backward()
    ledger.record(1)
    assert (_one(ledger, "0").input_grad, _one(ledger, "0").weight_grad) == (2 * 15 * 64 * 32, 0)


def test_conv2d_with_stride_padding_groups_by_hand() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 12, (3, 5), stride=2, padding=(1, 2), groups=4),
        nn.ReLU(),
        nn.Conv2d(12, 6, 3, padding=1),
    )
    sparsity = Sparsity(model, method="static", sparsity=0.5)
    ledger = FlopLedger(model, sparsity)
    x = torch.randn(2, 8, 11, 9)
    y = model(x)
    assert y.shape == (2, 6, 6, 5)  # H: (11 + 2 - 3) // 2 + 1 = 6, W: (9 + 4 - 5) // 2 + 1 = 5
    y.sum().backward()
    ledger.record(0)
    first, second = _one(ledger, "0"), _one(ledger, "2")
    # 2 * 6 * 5 = 60 output positions; half of the (8 / 4) * 3 * 5 * 12 = 360 weights.
    assert (first.kind, first.rows, first.dense_forward) == ("conv2d", 60, 2 * 60 * 360)
    assert first.forward == 2 * 60 * 180 == conv_flops(60, 8, 12, (3, 5), groups=4, density=0.5)
    assert (first.input_grad, first.weight_grad) == (0, first.forward)  # static: B = A
    assert second.forward == 2 * 60 * 324 == conv_flops(60, 12, 6, (3, 3), density=0.5)
    assert second.input_grad == second.weight_grad == second.forward


# -- attention and other products ----------------------------------------------------------------


@pytest.mark.parametrize(
    "backend, dropout, kind",
    [(SDPBackend.FLASH_ATTENTION, 0.0, "attention"), (SDPBackend.MATH, 0.1, "matmul")],
)
def test_attention_block_by_hand(backend: SDPBackend, dropout: float, kind: str) -> None:
    """Fused attention and its unfused (math) form count the same dense products."""
    config = BertConfig(vocab_size=10, hidden_size=32, num_layers=1, num_heads=4,
                        intermediate_size=64, dropout=dropout,
                        attention_dropout=dropout)  # fmt: skip
    block = BertAttention(config)
    ledger = FlopLedger(block)
    x = torch.randn(3, 10, 32, requires_grad=True)  # batch 3, sequence 10, 4 heads of 8
    with sdpa_kernel(backend):
        block(x, None).sum().backward()
    ledger.record(0)
    rows = {r.name or "(block)": r for r in ledger.per_layer()}
    projection = 2 * 30 * 32 * 32
    for name in ("query", "key", "value", "output"):
        assert (rows[name].forward, rows[name].input_grad) == (projection, projection)
    scores = rows["(block)"]
    assert scores.kind == kind
    # Q K^T and P V: 2 * 3 * 4 * 10 * 10 * (8 + 8); the backward is two products per product.
    assert scores.forward == attention_flops(10, 10, 8, heads=4, batch=3) == 38400
    assert (scores.input_grad, scores.weight_grad) == (2 * 38400, 0)


@pytest.mark.parametrize(
    "backend, value_dim", [(SDPBackend.FLASH_ATTENTION, 4), (SDPBackend.MATH, 6)]
)
def test_attention_backward_only_for_operands_that_need_it(
    backend: SDPBackend, value_dim: int
) -> None:
    class Scores(nn.Module):
        def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return F.scaled_dot_product_attention(q, k, v)

    model = Scores()
    ledger = FlopLedger(model)
    q = torch.randn(2, 3, 5, 4, requires_grad=True)
    k, v = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, value_dim)
    with sdpa_kernel(backend):
        model(q, k, v).sum().backward()
    ledger.record(0)
    (row,) = ledger.per_layer()
    unit = 2 * 2 * 3 * 5 * 7  # 2 * batch * heads * S_q * S_k
    assert row.kind == ("attention" if backend == SDPBackend.FLASH_ATTENTION else "matmul")
    assert row.forward == unit * (4 + value_dim)
    assert row.input_grad == unit * (value_dim + 4)  # dP = dO V^T and dQ = dS K; no dK, no dV


def test_products_outside_layers_by_hand() -> None:
    class Projected(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 4))
            self.register_buffer("keys", torch.randn(7, 4))

        def forward(self, x: Tensor) -> Tensor:
            h = x @ self.weight  # [2, 5, 4]: 2 * 10 * 6 * 4, gradient to both operands
            with torch.no_grad():
                h @ self.keys.T  # no gradient recording: not training, not counted
            return torch.einsum("bid,jd->bij", h, self.keys)  # 2 * 2 * 5 * 7 * 4, one gradient

    model = Projected()
    ledger = FlopLedger(model)
    model(torch.randn(2, 5, 6, requires_grad=True)).sum().backward()
    ledger.record(0)
    (row,) = ledger.per_layer()
    assert (row.name, row.kind) == ("", "matmul")
    assert row.forward == 480 + 560
    assert row.input_grad == 2 * 480 + 560


# -- sparse methods ------------------------------------------------------------------------------


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


def _train(
    model: nn.Module, sparsity: Sparsity, ledger: FlopLedger, steps: int, rows: int = 20
) -> list[dict[str, tuple[int, int]]]:
    """Train ``steps`` steps in the order of train.py; return the nnz of (A, B) per layer that
    each step's forward used, read from the masks before the step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1)
    used = []
    for step in range(steps):
        masks = sparsity.masks()
        used.append({n: (int(a.sum()), int(b.sum())) for n, (a, b) in masks.items()})
        x = torch.randn(rows, 64, generator=data, requires_grad=True)
        loss = model(x).square().mean() + sparsity.regularizer()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsity.step(step, optimizer)
        ledger.record(step)  # after sparsity.step: the forward's masks must still be counted
    return used


def test_topkast_forward_and_input_grad_at_d_weight_grad_at_d_plus_m() -> None:
    model = _mlp()
    sparsity = Sparsity(model, method="topkast", sparsity=0.9, backward_sparsity=0.8)
    ledger = FlopLedger(model, sparsity)
    (used,) = _train(model, sparsity, ledger, steps=1)
    for name, (fan_in, fan_out) in {"0": (64, 32), "2": (32, 16)}.items():
        row = _one(ledger, name)
        in_a, in_b = used[f"{name}.weight"]
        assert in_a / (fan_in * fan_out) == pytest.approx(0.1, abs=1e-3)
        assert in_b / (fan_in * fan_out) == pytest.approx(0.2, abs=1e-3)
        assert row.forward == row.input_grad == 2 * 20 * in_a
        assert row.weight_grad == 2 * 20 * in_b
        assert row.forward == pytest.approx(linear_flops(20, fan_in, fan_out, 0.1), rel=0.01)
        assert row.weight_grad == pytest.approx(linear_flops(20, fan_in, fan_out, 0.2), rel=0.01)


def test_sparse_backend_counts_like_masked_backend() -> None:
    results = {}
    for backend in ("masked", "sparse"):
        model = _mlp()
        sparsity = Sparsity(model, method="topkast", sparsity=0.9, backward_sparsity=0.8,
                            backend=backend, seed=3)  # fmt: skip
        ledger = FlopLedger(model, sparsity)
        _train(model, sparsity, ledger, steps=3)
        results[backend] = (ledger.per_layer(cumulative=True), ledger.total_training_flops,
                            ledger.inference_flops)  # fmt: skip
    assert results["sparse"] == results["masked"]
    rows = results["sparse"][0]
    assert [type(m).__name__ for m in model] == ["SparseLinear", "ReLU", "SparseLinear"]
    assert [r.forward_density for r in rows] == pytest.approx([0.1, 0.1], abs=1e-3)
    assert [r.weight_grad_density for r in rows] == pytest.approx([0.2, 0.2], abs=1e-3)


def test_rigl_weight_gradient_is_dense_on_its_update_steps() -> None:
    model = _mlp()
    sparsity = Sparsity(model, method="rigl", sparsity=0.75, update_interval=2, total_steps=8)
    ledger = FlopLedger(model, sparsity)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    flags = []
    for step in range(5):
        x = torch.randn(20, 64, requires_grad=True)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        in_b = {n: int(b.sum()) for n, (_, b) in sparsity.masks().items()}
        record = ledger.record(step)
        sparsity.step(step, optimizer)
        flags.append(record.dense_gradient)
        for name, numel in {"0": 64 * 32, "2": 32 * 16}.items():
            row = _one(ledger, name)
            dense = sparsity.method.needs_dense_gradient(step)
            assert row.weight_grad == 2 * 20 * (numel if dense else in_b[f"{name}.weight"])
            assert row.forward == row.input_grad < row.dense_forward  # sparse forward always
    # Updates at upcoming steps 2 and 4: the dense gradients of steps 1 and 3 rank regrowth.
    assert flags == [False, True, False, True, False]


def test_gmp_record_after_sparsity_step_counts_the_forward_masks() -> None:
    model = _mlp()
    sparsity = Sparsity(model, method="gmp", sparsity=0.75, update_interval=1, stop_step=4)
    ledger = FlopLedger(model, sparsity)
    used = _train(model, sparsity, ledger, steps=5)
    forwards = [sum(2 * 20 * a for a, _ in step.values()) for step in used]
    assert sum(r.forward for r in ledger.per_layer(cumulative=True)) == sum(forwards)
    assert forwards == sorted(forwards, reverse=True) and len(set(forwards)) == 5  # pruning
    # Inference uses the masks in effect now (after the last update: the final density).
    now = sum(int(a.sum()) for a, _ in sparsity.masks().values())
    assert ledger.inference_flops == 2 * now  # one example is one row
    assert now == pytest.approx(0.25 * (64 * 32 + 32 * 16), abs=1)


# -- bookkeeping ---------------------------------------------------------------------------------


def test_examples_accumulate_over_forwards_and_can_be_given() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    ledger = FlopLedger(model)
    (model(torch.randn(3, 4)).sum() + model(torch.randn(5, 4)).sum()).backward()
    step = ledger.record(0)
    assert (step.examples, step.forward, step.weight_grad) == (8, 2 * 8 * 12, 2 * 8 * 12)
    model(torch.randn(6, 4)).sum().backward()
    assert ledger.record(1, examples=2).examples == 2
    assert ledger.inference_flops == 2 * 6 * 12 / 2


def test_evaluation_is_not_training() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    ledger = FlopLedger(model)
    with torch.no_grad():
        model(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="no training forward"):
        ledger.record(0)
    assert ledger.metrics() == {"train_flops": 0}


def test_state_dict_round_trip_continues_the_totals() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    ledger = FlopLedger(model)
    for step in range(2):
        model(torch.randn(5, 4)).sum().backward()
        ledger.record(step)
    buffer = io.BytesIO()
    torch.save(ledger.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = FlopLedger(nn.Sequential(nn.Linear(4, 3)))
    resumed.load_state_dict(state)
    assert resumed.metrics() == ledger.metrics()
    assert resumed.per_layer(cumulative=True) == ledger.per_layer(cumulative=True)
    with pytest.raises(ValueError, match="does not follow"):
        resumed.record(1)
    resumed.model(torch.randn(5, 4)).sum().backward()
    resumed.record(2)
    assert resumed.total_training_flops == 3 * 2 * (2 * 5 * 12)  # forward + weight gradient

    with pytest.raises(ValueError, match="scope"):
        FlopLedger(model, scope=["0"]).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        FlopLedger(nn.Sequential(nn.ReLU(), nn.Linear(4, 3))).load_state_dict(state)


def test_construction_and_order_errors() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match="'encoder' matches no module"):
        FlopLedger(model, scope=["encoder"])
    with pytest.raises(ValueError, match="does not belong to this model"):
        FlopLedger(_mlp(), Sparsity(model, method="static", sparsity=0.5))

    # Built before the sparse backend swapped the layers: it would count dead modules.
    model = _mlp()
    early = FlopLedger(model)
    Sparsity(model, method="static", sparsity=0.5, backend="sparse")
    model(torch.randn(2, 64)).sum().backward()
    with pytest.raises(RuntimeError, match="build the ledger after Sparsity"):
        early.record(0)


def test_format_table() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    ledger = FlopLedger(model)
    model(torch.randn(10, 8)).sum().backward()
    ledger.record(0)
    text = ledger.table()
    lines = text.splitlines()
    assert lines[0] == "FLOPs of step 0 (10 examples)"
    assert lines[1].split()[:3] == ["layer", "kind", "rows"]
    assert [line.split()[0] for line in lines[3:5]] == ["0", "2"]
    forward, input_grad = 2 * 10 * (8 * 4 + 4 * 2), 2 * 10 * 4 * 2  # raw data: no input grad
    cells = [f"{v:.4g}" for v in (forward, input_grad, forward, 2 * forward + input_grad)]
    assert lines[-1].split() == ["total", "-", "1.0000", "1.0000", *cells, "100.0%"]
    assert format_table(ledger.per_layer(cumulative=True)).splitlines()[-1] == lines[-1]
