"""Models alwayssparse's authors did not write: Hugging Face GPT-2 (``Conv1D``), BERT, Llama and T5
built from tiny configs, and a ConvNeXt-style net with depthwise and grouped convolutions.

Each trains a few steps with Top-KAST and RigL on the masked backend (the Linear/Conv1D ones on
the sparse backend too), then goes through every way out: ``save_pretrained`` /
``from_pretrained`` into a plain model, ``model.state_dict()`` into a fresh sparse model, and the
compressed safetensors export read back by ``alwayssparse.load``; the outputs must agree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import alwayssparse
from alwayssparse import Sparsity
from alwayssparse.capture import GradientCapture
from alwayssparse.flops import FlopLedger
from alwayssparse.inference import SparseInferenceLinear, save

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

STEPS = 4
OPTIONS: dict[str, dict[str, Any]] = {
    "topkast": {"sparsity": 0.8, "backward_sparsity": 0.6, "exploration_coefficient": 1e-2},
    "rigl": {"sparsity": 0.8, "update_interval": 2},
}


@pytest.fixture(autouse=True, scope="module")
def _quiet() -> None:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


# -- the models ------------------------------------------------------------------------------------

TOKENS = torch.randint(1, 64, (4, 8), generator=torch.Generator().manual_seed(0))


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def bert() -> nn.Module:
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16)  # fmt: skip
    return transformers.BertForMaskedLM(config)


def llama() -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def t5() -> nn.Module:
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                   num_decoder_layers=1, num_heads=2, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1)  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


HF_MODELS: dict[str, Callable[[], nn.Module]] = {
    "gpt2": gpt2, "bert": bert, "llama": llama, "t5": t5,
}  # fmt: skip


def hf_loss(model: nn.Module) -> torch.Tensor:
    return model(input_ids=TOKENS, labels=TOKENS).loss


def hf_output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS, labels=TOKENS).logits


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, LayerNorm, inverted-bottleneck MLP, residual (ConvNeXt)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        return x + self.pwconv2(F.gelu(self.pwconv1(y))).permute(0, 3, 1, 2)


def convnext() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 2, stride=2), ConvNeXtBlock(16),
        nn.Conv2d(16, 32, 3, padding="same", groups=4, padding_mode="reflect"),  # grouped
        nn.Conv2d(32, 64, 3, padding=1, groups=32),  # depthwise with channel multiplier 2
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


IMAGES = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 3, 5, 9])


def conv_loss(model: nn.Module) -> torch.Tensor:
    return F.cross_entropy(model(IMAGES), LABELS)


def conv_output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IMAGES)


def train(
    make: Callable[[], nn.Module], loss_fn: Callable[[nn.Module], torch.Tensor], method: str,
    backend: str = "masked", seed: int = 0,
) -> tuple[nn.Module, Sparsity]:  # fmt: skip
    torch.manual_seed(seed)
    model = make()
    sp = Sparsity(model, method=method, backend=backend, total_steps=STEPS, **OPTIONS[method])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(STEPS):
        loss = loss_fn(model) + sp.regularizer()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sp.step(step, optimizer)
    return model.eval(), sp


# -- HF models: train, save, reload ----------------------------------------------------------------

CASES = [(name, method, backend) for name in HF_MODELS for method in OPTIONS
         for backend in ("masked", "sparse")]  # fmt: skip


@pytest.mark.parametrize(("name", "method", "backend"), CASES)
def test_hf_model_trains_saves_and_reloads(
    name: str, method: str, backend: str, tmp_path: Path
) -> None:
    model, sp = train(HF_MODELS[name], hf_loss, method, backend)
    assert len(sp.tensors) >= 4 and all(0.15 < d[0] < 0.25 for d in sp.densities().values())
    expected = hf_output(model)
    plain_class = type(model)

    # save_pretrained without export() -> from_pretrained into a plain model: same function.
    model.save_pretrained(tmp_path / "hf")
    plain = plain_class.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(hf_output(plain), expected, rtol=1e-4, atol=1e-5)
    # ... and a strict plain load refuses the extra keys instead of ignoring them silently.
    with pytest.raises(RuntimeError, match="Unexpected key"):
        plain.load_state_dict(model.state_dict())
    # The plain state dict loads strictly.
    plain.load_state_dict(sp.plain_state_dict())

    # model.state_dict() -> a fresh sparse model: theta, masks and the sparsity state.
    torch.manual_seed(1)
    fresh = HF_MODELS[name]()
    fresh_sp = Sparsity(fresh, method=method, backend=backend, total_steps=STEPS, seed=5,
                        **OPTIONS[method])  # fmt: skip
    fresh.load_state_dict(model.state_dict())
    assert fresh_sp.upcoming_step == STEPS
    assert torch.equal(fresh_sp.generator.get_state(), sp.generator.get_state())
    for key, (a, b) in sp.masks().items():
        assert torch.equal(fresh_sp.masks()[key][0], a) and torch.equal(fresh_sp.masks()[key][1], b)
    torch.testing.assert_close(hf_output(fresh.eval()), expected)

    # Compressed safetensors, rebuilt from the file alone (the transformers class and config).
    header = save(model, tmp_path / "model.safetensors", sparsity=sp)
    assert {e["layout"] for e in header["tensors"].values()} == {"csr"}
    loaded = alwayssparse.load(tmp_path / "model.safetensors")
    assert type(loaded) is plain_class
    assert sum(isinstance(m, SparseInferenceLinear) for m in loaded.modules()) == len(sp.tensors)
    torch.testing.assert_close(hf_output(loaded), expected, rtol=1e-4, atol=1e-5)


def test_gpt2_conv1d_is_sparse_by_default_and_ranks_its_own_layout() -> None:
    model = gpt2()
    sp = Sparsity(model, method="rigl", total_steps=10, block_size=4)
    conv1d = [t for t in sp.tensors if isinstance(t.module, Conv1D)]
    assert len(conv1d) == 8 and all(t.op == "linear_t" for t in conv1d)
    t = next(t for t in conv1d if t.name.endswith("mlp.c_fc.weight"))
    assert t.shape == (16, 64) and t.block_shape == (4, 16)  # (in, out) as stored
    assert "conv1d (hf, in x out)" in sp.summary()


def test_conv1d_sparse_backend_equals_masked_with_blocks() -> None:
    """The sparse backend stores a Conv1D's W as it is, so block masks are the masked backend's."""
    runs = {}
    for backend in ("masked", "sparse"):
        torch.manual_seed(0)
        model = gpt2()
        sp = Sparsity(model, method="rigl", backend=backend, block_size=4, total_steps=6,
                      sparsity=0.75, update_interval=2)  # fmt: skip
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for step in range(6):
            loss = hf_loss(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            sp.step(step, optimizer)
            losses.append(loss.item())
        runs[backend] = (losses, sp.masks())
    torch.testing.assert_close(runs["sparse"][0], runs["masked"][0], rtol=1e-5, atol=1e-5)
    for key, (a, b) in runs["masked"][1].items():
        assert torch.equal(runs["sparse"][1][key][0], a) and torch.equal(
            runs["sparse"][1][key][1], b
        )


def test_sparse_linear_answers_like_nn_linear() -> None:
    torch.manual_seed(0)
    model = t5()
    sp = Sparsity(model, method="static", backend="sparse", sparsity=0.5)
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert (wo.in_features, wo.out_features) == (32, 16) and wo.weight.shape == (16, 32)
    assert wo.weight.dtype == torch.float32 and wo.weight.device.type == "cpu"
    assert torch.equal(
        wo.weight != 0, sp.masks()["encoder.block.0.layer.1.DenseReluDense.wo.weight"][0]
    )
    assert wo.bias is None
    torch.manual_seed(0)
    gpt = gpt2()
    Sparsity(gpt, method="static", backend="sparse", sparsity=0.5)
    c_fc = gpt.transformer.h[0].mlp.c_fc
    assert (c_fc.nx, c_fc.nf) == (16, 64) and c_fc.weight.shape == (16, 64)


def test_plain_weights_into_a_sparse_model_are_refused() -> None:
    plain = bert().state_dict()
    model = bert()
    Sparsity(model, method="static", sparsity=0.5)
    with pytest.raises(RuntimeError, match="plain weight.*before Sparsity"):
        model.load_state_dict(plain)


def test_layout_names_module_types_it_does_not_know() -> None:
    class Bilinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

    with pytest.raises(ValueError, match=r"other module types: Bilinear \(0\.weight\)"):
        Sparsity(nn.Sequential(Bilinear()), method="static")


def test_flop_ledger_counts_conv1d_like_linear() -> None:
    torch.manual_seed(0)
    conv1d, linear = Conv1D(24, 8), nn.Linear(8, 24)
    counts = []
    for layer in (conv1d, linear):
        model = nn.Sequential(layer, nn.ReLU(), nn.Linear(24, 4))
        sp = Sparsity(model, method="static", sparsity=0.75)
        ledger = FlopLedger(model, sp)
        model(torch.randn(5, 8, requires_grad=True)).sum().backward()
        ledger.record(0)
        rows = [r for r in ledger.per_layer() if r.name == "0"]
        counts.append([(r.kind, r.forward, r.input_grad, r.weight_grad) for r in rows])
    assert counts[0][0][0] == "linear_t" and counts[1][0][0] == "linear"
    assert counts[0][0][1:] == counts[1][0][1:]
    assert counts[0][0][1] == 2 * 5 * 8 * 24 // 4  # 2 R M f_A


# -- convolutions: depthwise, grouped, RigL's gradient chunks --------------------------------------


@pytest.mark.parametrize("method", ["topkast", "rigl"])
def test_convnext_style_net_trains_and_exports(method: str, tmp_path: Path) -> None:
    model, sp = train(convnext, conv_loss, method)
    names = {t.name for t in sp.tensors}
    assert {"1.dwconv.weight", "2.weight", "3.weight"} <= names  # depthwise and grouped
    expected = conv_output(model)
    save(model, tmp_path / "net.safetensors", sparsity=sp)
    torch.manual_seed(3)
    loaded = alwayssparse.load(tmp_path / "net.safetensors", model=convnext())
    assert isinstance(loaded[1].pwconv1, SparseInferenceLinear)
    assert isinstance(loaded[3], nn.Conv2d)  # convolutions come back dense
    torch.testing.assert_close(conv_output(loaded), expected, rtol=1e-4, atol=1e-5)
    # A plain model loads the state dict (weight = theta * A) to the same function.
    torch.manual_seed(3)
    plain = convnext().eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(conv_output(plain), expected)


LAYERS = {
    "conv1d_hf": (lambda: Conv1D(12, 8), (3, 5, 8)),
    "grouped": (lambda: nn.Conv2d(8, 12, 3, padding=1, groups=4), (2, 8, 6, 6)),
    "depthwise": (lambda: nn.Conv2d(6, 12, 3, stride=2, groups=6), (2, 6, 7, 7)),
    "same_reflect": (
        lambda: nn.Conv1d(4, 6, 4, padding="same", groups=2, padding_mode="reflect"),
        (2, 4, 9),
    ),  # fmt: skip
    "same_dilated": (
        lambda: nn.Conv2d(4, 4, 2, padding="same", dilation=2, groups=4),
        (2, 4, 5, 5),
    ),  # fmt: skip
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("rows", [1, 3, 5, 100])
def test_gradient_chunks_equal_autograd(layer: str, rows: int) -> None:
    torch.manual_seed(0)
    make, shape = LAYERS[layer]
    module = make()
    weight = module.weight
    op = "linear_t" if isinstance(module, Conv1D) else f"conv{weight.dim() - 2}d"
    capture = GradientCapture({"w": (module, op, tuple(weight.shape))})
    capture.active = True
    module(torch.randn(*shape)).square().sum().backward()
    assert weight.grad is not None
    chunks = [chunk for _, chunk in capture.row_chunks("w", rows)]
    assert all(c.shape[0] <= rows for c in chunks)
    torch.testing.assert_close(torch.cat(chunks), weight.grad.reshape(weight.shape[0], -1))
