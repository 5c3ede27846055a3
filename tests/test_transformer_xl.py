"""Tests for alwayssparse.models.transformer_xl (Transformer-XL with adaptive softmax)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from alwayssparse.models.transformer_xl import (
    TRANSFORMER_XL_PRESETS,
    TransformerXL,
    TransformerXLConfig,
    count_parameters,
    enwik8_large,
    enwik8_small,
    enwik8_tiny,
    rel_shift,
    wikitext103_large,
    wikitext103_tiny,
)

# Parameter counts reported for the presets (see count_parameters).
EXPECTED_PARAMS = {
    "enwik8_large": 277_678_336,  # paper: 277M (Top-KAST Table 2 / Dai et al.)
    "enwik8_small": 69_436_672,  # paper: 69M (Top-KAST Table 5)
    "wikitext103_large": 285_170_506,  # paper: 285M (Top-KAST footnote 4)
}
PAPER_PARAMS = {"enwik8_large": 277e6, "enwik8_small": 69e6, "wikitext103_large": 285e6}


def _tiny(**overrides: Any) -> TransformerXLConfig:
    return dataclasses.replace(enwik8_tiny(), **overrides)


def _adaptive(**overrides: Any) -> TransformerXLConfig:
    return dataclasses.replace(wikitext103_tiny(40), **overrides)


def _model(config: TransformerXLConfig, seed: int = 0) -> TransformerXL:
    torch.manual_seed(seed)
    return TransformerXL(config).eval()


def _tokens(config: TransformerXLConfig, b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, config.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed)
    )


# --------------------------------------------------------------------------- shapes, causality


@pytest.mark.parametrize("make", [_tiny, _adaptive])
def test_output_shapes_and_memory_rows(make: Callable[[], TransformerXLConfig]) -> None:
    config = make()
    model = _model(config)
    x, y = _tokens(config, 3, 10), _tokens(config, 3, 10, seed=2)
    nll, mems = model(x, y)
    assert nll.shape == (3, 10) and nll.dtype == torch.float32 and (nll > 0).all()
    assert len(mems) == config.n_layer
    assert all(m.shape == (3, 10, config.d_model) for m in mems)  # min(M + T, mem_len) rows
    nll, mems = model(x, y, mems, mem_len=16)
    assert all(m.shape == (3, 16, config.d_model) for m in mems)
    assert all(not m.requires_grad for m in mems)
    logp, _ = model.log_prob(x)
    assert logp.shape == (3, 10, config.vocab_size)


def test_memory_keeps_last_mem_len_states() -> None:
    model = _model(_tiny(mem_len=4))
    x = _tokens(model.config, 2, 6)
    _, mems = model(x, x)
    hidden_inputs = [model.drop(model.word_emb(x))]  # the input of layer 0 (eval: no dropout)
    assert torch.allclose(mems[0], hidden_inputs[0][:, -4:])
    _, mems = model(x, x, mem_len=0)
    assert all(m.shape[1] == 0 for m in mems)


@pytest.mark.parametrize("use_memory", [False, True])
def test_causal_within_segment(use_memory: bool) -> None:
    config = _adaptive()
    model = _model(config)
    mems = model(_tokens(config, 2, 5, seed=3), _tokens(config, 2, 5, seed=4))[1]
    x, y = _tokens(config, 2, 12), _tokens(config, 2, 12, seed=2)
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % config.vocab_size
    with torch.no_grad():
        a = model(x, y, mems if use_memory else None)[0]
        b = model(changed, y, mems if use_memory else None)[0]
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_rel_shift_matches_definition() -> None:
    b, h, t, m = 2, 3, 4, 5
    k = m + t
    x = torch.randn(b, h, t, k)
    out = rel_shift(x)
    for i in range(t):
        for j in range(m + i + 1):  # the causal part; the rest is masked by the model
            assert torch.equal(out[:, :, i, j], x[:, :, i, j + t - 1 - i])


def test_memory_equals_processing_the_concatenation() -> None:
    # With mem_len >= T, segment 2 attending to cached segment-1 states must equal the second
    # half of one causal pass over both segments: checks recurrence, relative shift and mask.
    for config in (_tiny(), _adaptive(pre_lnorm=True)):
        model = _model(config)
        x, y = _tokens(config, 2, 16), _tokens(config, 2, 16, seed=2)
        with torch.no_grad():
            full, _ = model(x, y)
            first, mems = model(x[:, :8], y[:, :8], mem_len=8)
            second, _ = model(x[:, 8:], y[:, 8:], mems)
        assert torch.allclose(first, full[:, :8], atol=1e-5)
        assert torch.allclose(second, full[:, 8:], atol=1e-5)


def test_memory_changes_output() -> None:
    config = _adaptive()
    model = _model(config)
    prev = _tokens(config, 2, config.mem_len + 8, seed=5)
    x, y = _tokens(config, 2, 8), _tokens(config, 2, 8, seed=2)
    with torch.no_grad():
        _, mems = model(prev, prev)
        with_memory, _ = model(x, y, mems)
        without, _ = model(x, y)
    assert all(m.shape == (2, config.mem_len, config.d_model) for m in mems)
    assert not torch.allclose(with_memory, without, atol=1e-4)


def test_eval_memory_length_setting() -> None:
    config = _tiny(mem_len=4, eval_mem_len=12)
    model = _model(config)
    x = _tokens(config, 2, 8)
    _, mems = model(x, x)
    _, mems = model(x, x, mems)
    assert mems[0].shape[1] == 4
    model.mem_len = config.eval_mem_len
    _, mems = model(x, x)
    _, mems = model(x, x, mems)
    assert all(m.shape[1] == 12 for m in mems)
    assert model(x, x, mems, mem_len=3)[1][0].shape[1] == 3  # per-call override


def test_bad_mems_and_tokens_raise() -> None:
    model = _model(_adaptive())
    x = _tokens(model.config, 2, 4)
    _, mems = model(x, x)
    with pytest.raises(ValueError, match="mems"):
        model(x, x, mems[:1])
    with pytest.raises(ValueError, match="B=3"):
        model(torch.cat([x, x[:1]]), torch.cat([x, x[:1]]), mems)
    with pytest.raises(ValueError, match="targets"):
        model(x, x + model.config.vocab_size)
    with pytest.raises(ValueError, match="targets"):
        model(x, x[:, :3])


# --------------------------------------------------------------------------- adaptive softmax


def test_adaptive_softmax_is_normalised_and_consistent() -> None:
    config = _adaptive(vocab_size=20, cutoffs=[5, 10], div_val=2, tie_projs=[False, True, True])
    model = _model(config)
    crit = model.crit
    hidden = torch.randn(7, config.d_model)
    logp = crit.log_prob(hidden)  # [7, 20]
    assert logp.shape == (7, 20)
    assert torch.allclose(logp.logsumexp(-1), torch.zeros(7), atol=1e-5)
    target = torch.tensor([0, 4, 5, 9, 10, 19, 12])  # head, cluster 1 and cluster 2 words
    assert torch.allclose(crit(hidden, target), -logp.gather(1, target[:, None]).squeeze(1))


def test_plain_softmax_when_no_cutoffs() -> None:
    for config in (_tiny(), _tiny(d_embed=64, tie_projs=[])):
        model = _model(config)
        hidden = torch.randn(5, config.d_model)
        proj = hidden @ model.crit.out_projs[0] if config.has_projection else hidden
        out_layer = model.crit.out_layers[0]
        assert isinstance(out_layer, nn.Linear)
        expected = F.log_softmax(proj @ out_layer.weight.T + out_layer.bias, dim=-1)
        assert torch.allclose(model.crit.log_prob(hidden), expected, atol=1e-5)
        target = torch.randint(0, 256, (5,))
        assert torch.allclose(
            model.crit(hidden, target), F.nll_loss(expected, target, reduction="none")
        )


def test_tied_weights_are_the_same_parameter() -> None:
    config = _adaptive()
    model = _model(config)
    for i, tie_proj in enumerate(config.tie_projs):
        out_layer = model.crit.out_layers[i]
        embedding = model.word_emb.emb_layers[i]
        assert isinstance(out_layer, nn.Linear) and isinstance(embedding, nn.Embedding)
        assert out_layer.weight is embedding.weight
        assert (model.crit.out_projs[i] is model.word_emb.emb_projs[i]) == tie_proj
    untied = _model(_adaptive(tie_weight=False, tie_projs=[]))
    assert untied.crit.out_layers[0].weight is not untied.word_emb.emb_layers[0].weight
    assert untied.crit.out_projs[1] is not untied.word_emb.emb_projs[1]
    enwik = _model(_tiny())
    assert enwik.crit.out_projs[0] is enwik.word_emb.emb_projs[0]


def test_projections_are_modules_for_the_sparsity_library() -> None:
    model = _model(_tiny())
    names = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    for suffix in (
        "dec_attn.qkv_net",
        "dec_attn.r_net",
        "dec_attn.o_net",
        "pos_ff.ff1",
        "pos_ff.ff2",
    ):
        assert f"layers.0.{suffix}" in names
    params = dict(model.named_parameters())
    assert "word_emb.emb_layers.0.weight" in params and "crit.out_layers.0.bias" in params


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def test_parametrized_linear_weights_are_used() -> None:
    # The sparsity library masks module.weight through torch.nn.utils.parametrize; every
    # projection must read it through its module for the mask to take effect.
    model, reference = _model(_adaptive()), _model(_adaptive())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        pairs = list(zip(model.named_modules(), reference.modules(), strict=True))
        for (name, module), ref in pairs:
            if isinstance(module, nn.Linear) and name.startswith("layers."):
                assert isinstance(ref, nn.Linear)
                mask = (torch.rand(module.weight.shape, generator=generator) < 0.3).float()
                parametrize.register_parametrization(module, "weight", _Mask(mask))
                ref.weight.mul_(mask)
    x = _tokens(model.config, 2, 6)
    with torch.no_grad():
        assert torch.allclose(model(x, x)[0], reference(x, x)[0], atol=1e-5)
    nll, _ = model(x, x)
    nll.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


# --------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    "config",
    [
        enwik8_tiny(),
        wikitext103_tiny(40),
        wikitext103_tiny(1000),
        _tiny(tie_weight=False, tie_projs=[False]),
        _tiny(d_embed=64, tie_projs=[], n_head=3, d_head=16),
        _adaptive(div_val=1, d_embed=64, tie_projs=[]),
        _adaptive(div_val=1, d_embed=32, tie_projs=[True, False, True, False]),
    ],
)
def test_count_parameters_matches_built_model(config: TransformerXLConfig) -> None:
    assert count_parameters(config) == TransformerXL(config).num_parameters()


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_preset_parameter_counts(name: str) -> None:
    config = TRANSFORMER_XL_PRESETS[name]()
    with torch.device("meta"):  # no memory, no real initialisation: fast for 285M parameters
        built = TransformerXL(config).num_parameters()
    assert count_parameters(config) == built == EXPECTED_PARAMS[name]
    assert abs(built - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.01


def test_presets_match_top_kast_table_4() -> None:
    large, small, wt = enwik8_large(), enwik8_small(), wikitext103_large()
    assert (large.n_layer, large.d_model, large.d_ff, large.d_embed, large.n_head) == (
        24, 1024, 3072, 512, 8,
    )  # fmt: skip
    assert (large.tgt_len, large.mem_len, large.eval_mem_len, large.tie_weight) == (
        768, 2304, 5000, True,
    )  # fmt: skip
    assert (small.d_model, small.d_ff, small.n_head, small.n_layer) == (512, 1536, 8, 24)
    assert (wt.n_layer, wt.d_model, wt.d_ff, wt.n_head, wt.vocab_size) == (
        18, 1024, 4096, 16, 267_735,
    )  # fmt: skip
    assert (wt.tgt_len, wt.mem_len, wt.eval_mem_len) == (512, 768, 2000)
    assert (wt.cutoffs, wt.div_val) == ([20_000, 40_000, 200_000], 4)
    for make in TRANSFORMER_XL_PRESETS.values():
        make().validate()


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vocab_size", 0),
        ("n_layer", True),
        ("d_model", 63),
        ("n_head", -1),
        ("d_head", 0),
        ("d_ff", 1.5),
        ("d_embed", 0),
        ("tgt_len", 0),
        ("mem_len", -1),
        ("eval_mem_len", -2),
        ("dropout", 1.0),
        ("dropatt", -0.1),
        ("tie_weight", 1),
        ("cutoffs", [300]),
        ("cutoffs", [10, 5]),
        ("div_val", 0),
        ("div_val", 64),
        ("tie_projs", [True, False]),
        ("pre_lnorm", "yes"),
        ("clamp_len", 0),
    ],
)
def test_validate_names_the_field(field: str, value: object) -> None:
    config = _tiny(**{field: value})
    if field == "div_val":
        config = dataclasses.replace(config, cutoffs=[10, 20], tie_projs=[])
    with pytest.raises(ValueError, match=field):
        config.validate()
    with pytest.raises(ValueError, match=field):
        TransformerXL(config)


def test_validate_rejects_tying_a_missing_projection() -> None:
    with pytest.raises(ValueError, match="tie_projs"):
        _tiny(d_embed=64, tie_projs=[True]).validate()


# --------------------------------------------------------------------------- training


def test_adamw_steps_lower_the_loss_on_a_repetitive_corpus() -> None:
    config = _adaptive(vocab_size=40, tgt_len=8, mem_len=8)
    model = _model(config).train()
    stream = torch.arange(12).repeat(20)  # "0 1 2 ... 11 0 1 ..." : perfectly predictable
    x = stream[:-1].view(1, -1)[:, :64].reshape(4, 16)
    y = stream[1:].view(1, -1)[:, :64].reshape(4, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        mems = None
        for start in (0, 8):  # two consecutive segments with memory, as in training
            nll, mems = model(x[:, start : start + 8], y[:, start : start + 8], mems)
            loss = nll.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
