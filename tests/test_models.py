"""Tests for alwayssparse.models (the byte-level Transformer LM)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from alwayssparse.models import TransformerLM, TransformerLMConfig, lm_loss
from alwayssparse.models.transformer import Block


def _tiny(**overrides: object) -> TransformerLMConfig:
    base = TransformerLMConfig(n_layer=2, n_head=2, d_model=32, d_ff=64, context=16)
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def test_default_config() -> None:
    config = TransformerLMConfig()
    assert (config.vocab_size, config.n_layer, config.n_head) == (256, 2, 4)
    assert (config.d_model, config.d_ff, config.context) == (128, 512, 128)
    assert config.dropout == 0.0 and config.tie_embeddings
    config.validate()


def test_output_shape() -> None:
    torch.manual_seed(0)
    model = TransformerLM(_tiny())
    idx = torch.randint(0, 256, (3, 16))
    assert model(idx).shape == (3, 16, 256)
    assert model(idx[:, :5]).shape == (3, 5, 256)


def test_causality() -> None:
    torch.manual_seed(0)
    model = TransformerLM(_tiny()).eval()
    idx = torch.randint(0, 256, (2, 12))
    changed = idx.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 256
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_tied_head_is_embedding_parameter() -> None:
    model = TransformerLM(_tiny())
    assert model.head.weight is model.tok_emb.weight
    untied = TransformerLM(_tiny(tie_embeddings=False))
    assert untied.head.weight is not untied.tok_emb.weight


def test_num_parameters_counts_tied_weight_once() -> None:
    tied = TransformerLM(_tiny())
    untied = TransformerLM(_tiny(tie_embeddings=False))
    assert untied.num_parameters() - tied.num_parameters() == 256 * 32
    unique = {id(p): p.numel() for p in tied.parameters()}
    assert tied.num_parameters() == sum(unique.values())


def test_init_scaled_residual_projections() -> None:
    torch.manual_seed(0)
    model = TransformerLM(_tiny(n_layer=8, d_model=128, d_ff=512))
    block = model.blocks[0]
    assert isinstance(block, Block)
    # .detach(): float() of a tensor that requires grad warns.
    assert float(block.attn.qkv.weight.detach().std()) == pytest.approx(0.02, rel=0.1)
    assert float(block.attn.proj.weight.detach().std()) == pytest.approx(0.02 / 4, rel=0.1)
    assert float(block.mlp.out.weight.detach().std()) == pytest.approx(0.02 / 4, rel=0.1)
    assert torch.count_nonzero(block.mlp.fc.bias) == 0


def test_context_too_long() -> None:
    model = TransformerLM(_tiny())
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"d_model": 30, "n_head": 4}, "d_model"),
        ({"n_layer": 0}, "n_layer"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"d_ff": 0}, "d_ff"),
        ({"context": 0}, "context"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
    ],
)
def test_config_validation(overrides: dict[str, object], field: str) -> None:
    config = _tiny(**overrides)
    with pytest.raises(ValueError, match=field):
        config.validate()
    with pytest.raises(ValueError, match=field):
        TransformerLM(config)


def test_lm_loss_uniform_is_ln256() -> None:
    logits = torch.zeros(2, 5, 256)
    targets = torch.randint(0, 256, (2, 5))
    assert float(lm_loss(logits, targets)) == pytest.approx(torch.log(torch.tensor(256.0)).item())


def test_training_lowers_loss() -> None:
    torch.manual_seed(0)
    model = TransformerLM(_tiny())
    data = torch.tensor(list(b"abcdefgh" * 4), dtype=torch.long)  # 32 bytes, period 8
    x, y = data[None, :16], data[None, 1:17]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.no_grad():
        initial = float(lm_loss(model(x), y))
    for _ in range(30):
        loss = lm_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float(lm_loss(model(x), y))
    assert final < 0.5 * initial


def test_forward_reads_weights_through_modules() -> None:
    """Weights replaced by a parametrization (as the sparsity library does) must be used."""
    from torch.nn.utils import parametrize

    class Zero(torch.nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(w)

    torch.manual_seed(0)
    model = TransformerLM(_tiny(n_layer=1)).eval()
    idx = torch.randint(0, 256, (1, 8))
    before = model(idx)
    block = model.blocks[0]
    assert isinstance(block, Block)
    parametrize.register_parametrization(block.mlp.fc, "weight", Zero())
    after = model(idx)
    assert not torch.allclose(before, after)
