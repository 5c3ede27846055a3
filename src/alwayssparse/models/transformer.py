"""A small decoder-only, byte-level Transformer language model (GPT-style, pre-LayerNorm).

The model is deliberately plain so that it is a good test bed for sparse training:
every dense weight matrix lives in an ``nn.Linear`` (or ``nn.Embedding``) and is read
*through its module* on every forward pass. That matters because the sparsity library
replaces ``module.weight`` with a ``torch.nn.utils.parametrize`` parametrization; code
that cached ``module.weight`` in an attribute, or stored the weight anywhere else,
would silently bypass the mask.

Shapes use ``B`` = batch, ``T`` = sequence length, ``D`` = ``d_model``, ``H`` =
``n_head``, ``Dh`` = ``D // H``, ``F`` = ``d_ff`` and ``V`` = ``vocab_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Block", "CausalSelfAttention", "MLP", "TransformerLM", "TransformerLMConfig", "lm_loss"]


@dataclass
class TransformerLMConfig:
    """Hyper-parameters of :class:`TransformerLM`.

    Attributes:
        vocab_size: Number of token ids; 256 for byte-level modelling.
        n_layer: Number of Transformer blocks.
        n_head: Number of attention heads; must divide ``d_model``.
        d_model: Width of the residual stream.
        d_ff: Hidden width of the feed-forward (MLP) sub-layer.
        context: Maximum sequence length (size of the positional embedding table).
        dropout: Dropout probability on embeddings, attention and residual branches.
        tie_embeddings: If true, the output head shares its weight with the token
            embedding (the same ``nn.Parameter`` object).
    """

    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512
    context: int = 128
    dropout: float = 0.0
    tie_embeddings: bool = True

    def validate(self) -> None:
        """Checks that the configuration describes a buildable model.

        Raises:
            ValueError: If a size is not a positive integer, ``d_model`` is not
                divisible by ``n_head``, or ``dropout`` is outside ``[0, 1)``. The
                message names the offending field.
        """
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "context"):
            value = getattr(self, name)
            # bool is a subclass of int; reject it so that e.g. n_layer=True is an error.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection.

    Attributes:
        qkv: ``nn.Linear(D, 3D)`` producing queries, keys and values in one matmul.
        proj: ``nn.Linear(D, D)`` output projection back into the residual stream.
    """

    def __init__(self, config: TransformerLMConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Applies causal self-attention.

        Args:
            x: Input of shape ``[B, T, D]``.

        Returns:
            Output of shape ``[B, T, D]``.
        """
        b, t, d = x.shape
        # Calling the module (not caching .weight) keeps parametrized sparse weights live.
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 x [B, T, D]
        q = self._split_heads(q)  # [B, H, T, Dh]
        k = self._split_heads(k)  # [B, H, T, Dh]
        v = self._split_heads(v)  # [B, H, T, Dh]
        # Attention dropout only while training; SDPA has no notion of train/eval mode.
        attn_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=attn_p, is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, d)  # [B, H, T, Dh] -> [B, T, D]
        return self.resid_drop(self.proj(y))  # [B, T, D]

    def _split_heads(self, x: Tensor) -> Tensor:
        """Reshapes ``[B, T, D]`` into ``[B, H, T, Dh]``."""
        b, t, d = x.shape
        return x.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)


class MLP(nn.Module):
    """Position-wise feed-forward sub-layer: ``out(GELU(fc(x)))``.

    Attributes:
        fc: ``nn.Linear(D, F)`` expansion.
        out: ``nn.Linear(F, D)`` projection back into the residual stream.
    """

    def __init__(self, config: TransformerLMConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff)
        self.act = nn.GELU()
        self.out = nn.Linear(config.d_ff, config.d_model)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Applies the MLP to ``x`` of shape ``[B, T, D]``; returns ``[B, T, D]``."""
        h = self.act(self.fc(x))  # [B, T, F]
        return self.drop(self.out(h))  # [B, T, D]


class Block(nn.Module):
    """One pre-LayerNorm Transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, config: TransformerLMConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        """Applies the block to ``x`` of shape ``[B, T, D]``; returns ``[B, T, D]``."""
        x = x + self.attn(self.ln1(x))  # [B, T, D]
        x = x + self.mlp(self.ln2(x))  # [B, T, D]
        return x


class TransformerLM(nn.Module):
    """Decoder-only byte-level language model.

    Attributes:
        config: The (validated) configuration.
        tok_emb: Token embedding ``nn.Embedding(V, D)``.
        pos_emb: Learned positional embedding ``nn.Embedding(context, D)``.
        blocks: ``nn.ModuleList`` of :class:`Block`.
        ln_f: Final LayerNorm applied before the head.
        head: ``nn.Linear(D, V, bias=False)``; its weight *is* ``tok_emb.weight`` when
            ``config.tie_embeddings`` is true.
    """

    def __init__(self, config: TransformerLMConfig) -> None:
        """Builds and initialises the model.

        Args:
            config: Model hyper-parameters; validated here.

        Raises:
            ValueError: If ``config`` is invalid (see :meth:`TransformerLMConfig.validate`).
        """
        super().__init__()
        config.validate()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            # Share the Parameter object itself (not a copy) so that both uses see one tensor
            # and optimisers / parameter counts treat it as a single parameter.
            self.head.weight = self.tok_emb.weight

    def _init_weights(self) -> None:
        """GPT-2 initialisation.

        Linear and Embedding weights get N(0, 0.02), biases zero, LayerNorms the PyTorch
        default (weight 1, bias 0). The residual-branch output projections (``attn.proj``
        and ``mlp.out``) use std ``0.02 / sqrt(2 * n_layer)``: each block adds two such
        branches to the residual stream, so scaling keeps its variance roughly independent
        of depth at initialisation.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            assert isinstance(block, Block)
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=resid_std)
            nn.init.normal_(block.mlp.out.weight, mean=0.0, std=resid_std)

    def forward(self, idx: Tensor) -> Tensor:
        """Computes next-token logits.

        Args:
            idx: Integer token ids of shape ``[B, T]`` with ``T <= config.context``.

        Returns:
            Logits of shape ``[B, T, V]``; position ``t`` predicts token ``t + 1``.

        Raises:
            ValueError: If ``idx`` is not 2-D or ``T`` exceeds ``config.context``.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape [B, T], got {tuple(idx.shape)}")
        t = idx.shape[1]
        if t > self.config.context:
            raise ValueError(
                f"sequence length {t} exceeds the model context of {self.config.context}"
            )
        pos = torch.arange(t, device=idx.device)  # [T]
        x = self.tok_emb(idx) + self.pos_emb(pos)  # [B, T, D] + [T, D] -> [B, T, D]
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)  # [B, T, D]
        x = self.ln_f(x)  # [B, T, D]
        return self.head(x)  # [B, T, V]

    def num_parameters(self) -> int:
        """Returns the number of scalar parameters, counting shared parameters once.

        ``nn.Module.parameters()`` already de-duplicates by identity, so the tied
        head/embedding weight is counted once.
        """
        return sum(p.numel() for p in self.parameters())


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy in nats.

    Args:
        logits: Shape ``[B, T, V]`` (any leading shape works; the last dim is the vocab).
        targets: Integer ids of shape ``[B, T]`` (matching ``logits.shape[:-1]``).

    Returns:
        A scalar tensor: the cross-entropy averaged over all ``B * T`` positions.
    """
    v = logits.shape[-1]
    # Flatten to [B*T, V] / [B*T]; cross_entropy wants the class dim second.
    return F.cross_entropy(logits.reshape(-1, v), targets.reshape(-1).long())
