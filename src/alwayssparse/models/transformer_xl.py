"""Transformer-XL language model (Dai et al., 2019) with adaptive input and softmax.

This is the long-range model of the Top-KAST language-modelling experiments (topkast.md,
section 5 and supplementary A). It follows the reference implementation
(``kimiyoung/transformer-xl``, ``pytorch/mem_transformer.py``) closely, in batch-first
layout, so that its parameter counts and parameter names match the published models:

* **Segment-level recurrence.** The hidden states that entered each layer on earlier
  segments are cached (detached) and prepended as keys/values for the current segment:
  ``h~^{n-1}_tau = [SG(m^{n-1}_tau) ; h^{n-1}_tau]``.
* **Relative positional attention** with the learned global biases ``u`` (``r_w_bias``)
  and ``v`` (``r_r_bias``) of the paper's eq. (3)::

      A_ij = q_i^T k_j  +  q_i^T W_kR R_{i-j}  +  u^T k_j  +  v^T W_kR R_{i-j}
             \\_ (a) _/    \\____ (b) ______/    \\_ (c) _/    \\____ (d) _____/
           = (q_i + u)^T k_j  +  (q_i + v)^T W_kR R_{i-j}
           =        AC_ij     +          BD_ij

  where ``R`` is the sinusoidal embedding of a relative distance. ``BD`` is computed for
  every (query, distance) pair and re-indexed to (query, key) by the *relative shift*.
* **Adaptive input** (Baevski & Auli, 2019) and **adaptive softmax** (Grave et al., 2017):
  the vocabulary (sorted by frequency) is cut into clusters at ``cutoffs``; cluster ``i``
  has an embedding of width ``d_embed // div_val**i`` and a projection to ``d_model``.

Sparsity-library contract: every attention / feed-forward matrix is an ``nn.Linear`` that
is *called as a module* (so it can be parametrized or swapped), the vocabulary tables are
``nn.Embedding`` (``word_emb.emb_layers.{i}``) and the output layer lives under ``crit``
(``crit.out_layers.{i}`` are ``nn.Linear`` whose weights may be tied to the embeddings,
``crit.out_projs.{i}`` / ``word_emb.emb_projs.{i}`` are ``nn.Parameter`` projections), so
users can include or exclude them by name.

Shapes use ``B`` = batch, ``T`` = segment length (queries), ``M`` = memory length, ``K = M
+ T`` (keys), ``D`` = ``d_model``, ``H`` = ``n_head``, ``Dh`` = ``d_head``, ``F`` =
``d_ff``, ``V`` = ``vocab_size``, ``N`` = number of flattened positions and ``E_i`` =
the embedding width of cluster ``i``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TRANSFORMER_XL_PRESETS",
    "AdaptiveEmbedding",
    "PositionwiseFF",
    "ProjectedAdaptiveLogSoftmax",
    "RelDecoderLayer",
    "RelMultiHeadAttn",
    "TransformerXL",
    "TransformerXLConfig",
    "count_parameters",
    "enwik8_large",
    "enwik8_small",
    "enwik8_tiny",
    "rel_shift",
    "wikitext103_large",
    "wikitext103_tiny",
]

WIKITEXT103_VOCAB_SIZE = 267_735
"""Vocabulary of WikiText-103 train (267,734 word types including ``<unk>``, plus ``<eos>``)."""


# --------------------------------------------------------------------------- configuration


@dataclass
class TransformerXLConfig:
    """Hyper-parameters of :class:`TransformerXL` (names follow the reference code).

    Attributes:
        vocab_size: Number of token ids ``V`` (256 for bytes). For adaptive softmax the ids
            must be sorted by decreasing frequency (see ``data.wikitext.Vocab``).
        n_layer: Number of decoder layers.
        d_model: Width ``D`` of the residual stream (must be even: sinusoid pairs).
        n_head: Number of attention heads ``H``.
        d_head: Width ``Dh`` of one head (``H * Dh`` need not equal ``D``).
        d_ff: Hidden width ``F`` of the position-wise feed-forward sub-layer.
        d_embed: Width of the (head-cluster) token embedding. If it differs from
            ``d_model``, or ``div_val > 1``, embeddings are projected to ``d_model``.
        tgt_len: Segment (window) length used for training; carried for the data pipeline,
            the model itself accepts any length.
        mem_len: Number of cached hidden states per layer while training.
        eval_mem_len: Memory length for evaluation (assign it to ``model.mem_len`` or pass
            ``mem_len=`` to ``forward``).
        dropout: Dropout on embeddings, positional encodings, residual branches and output.
        dropatt: Dropout on attention probabilities.
        tie_weight: Share each output cluster's weight with the matching input embedding
            (the same ``nn.Parameter``).
        cutoffs: Cluster boundaries ``0 < c_1 < ... < V``; empty for a plain softmax.
        div_val: Cluster ``i`` has embedding width ``d_embed // div_val**i``.
        tie_projs: Per cluster, share the output projection with the input projection.
            Empty means no projection is tied; otherwise one flag per cluster
            (``len(cutoffs) + 1``), each ``True`` only where that cluster has a projection.
        pre_lnorm: Apply LayerNorm before (instead of after) each sub-layer.
        clamp_len: Clamp relative distances to at most this value (-1: no clamping).
    """

    vocab_size: int = 256
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 2
    d_head: int = 32
    d_ff: int = 128
    d_embed: int = 64
    tgt_len: int = 32
    mem_len: int = 32
    eval_mem_len: int = 64
    dropout: float = 0.0
    dropatt: float = 0.0
    tie_weight: bool = True
    cutoffs: list[int] = field(default_factory=list)
    div_val: int = 1
    tie_projs: list[bool] = field(default_factory=list)
    pre_lnorm: bool = False
    clamp_len: int = -1

    @property
    def n_clusters(self) -> int:
        """Number of vocabulary clusters (1 for a plain softmax)."""
        return len(self.cutoffs) + 1

    @property
    def has_projection(self) -> bool:
        """Whether embeddings are projected to ``d_model`` (the same for every cluster).

        As in the reference code, ``div_val > 1`` always projects (even the head cluster,
        whose width may equal ``d_model``), and ``div_val == 1`` projects only when
        ``d_embed != d_model``.
        """
        return self.div_val > 1 or self.d_embed != self.d_model

    def cluster_bounds(self) -> list[tuple[int, int]]:
        """Returns the half-open id range ``[l, r)`` of every cluster."""
        edges = [0, *self.cutoffs, self.vocab_size]
        return list(zip(edges[:-1], edges[1:], strict=True))

    def cluster_dims(self) -> list[int]:
        """Returns the embedding width ``E_i = d_embed // div_val**i`` of every cluster."""
        return [self.d_embed // self.div_val**i for i in range(self.n_clusters)]

    def projection_tied(self, i: int) -> bool:
        """Whether cluster ``i``'s output projection is the input projection."""
        return bool(self.tie_projs) and self.tie_projs[i]

    def validate(self) -> None:
        """Checks that the configuration describes a buildable model.

        Raises:
            ValueError: With a message naming the offending field.
        """
        _check_ints(self)
        for name in ("dropout", "dropatt"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.d_model % 2 != 0:
            raise ValueError(f"d_model must be even (sin/cos pairs), got {self.d_model}")
        for name in ("tie_weight", "pre_lnorm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _check_clusters(self)


def _is_int(value: object) -> bool:
    """True for a real int (bool is a subclass of int but never a valid size)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_ints(config: TransformerXLConfig) -> None:
    """Validates the integer fields of ``config``."""
    positive = ("vocab_size", "n_layer", "d_model", "n_head", "d_head", "d_ff", "d_embed")
    for name in (*positive, "tgt_len", "div_val"):
        value = getattr(config, name)
        if not _is_int(value) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in ("mem_len", "eval_mem_len"):
        value = getattr(config, name)
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if not _is_int(config.clamp_len) or (config.clamp_len <= 0 and config.clamp_len != -1):
        raise ValueError(f"clamp_len must be -1 (off) or positive, got {config.clamp_len!r}")


def _check_clusters(config: TransformerXLConfig) -> None:
    """Validates ``cutoffs``, ``div_val`` and ``tie_projs`` against each other."""
    edges = [0, *config.cutoffs, config.vocab_size]
    if not all(_is_int(c) for c in config.cutoffs) or any(
        a >= b for a, b in zip(edges[:-1], edges[1:], strict=True)
    ):
        raise ValueError(
            f"cutoffs must be strictly increasing integers in (0, vocab_size="
            f"{config.vocab_size}), got {config.cutoffs!r}"
        )
    if config.cluster_dims()[-1] < 1:
        raise ValueError(
            f"div_val={config.div_val} leaves the last of {config.n_clusters} clusters with "
            f"an empty embedding (d_embed={config.d_embed})"
        )
    if config.tie_projs and len(config.tie_projs) != config.n_clusters:
        raise ValueError(
            f"tie_projs must be empty or have one flag per cluster ({config.n_clusters}), "
            f"got {config.tie_projs!r}"
        )
    if not all(isinstance(t, bool) for t in config.tie_projs):
        raise ValueError(f"tie_projs must hold bools, got {config.tie_projs!r}")
    if any(config.tie_projs) and not config.has_projection:
        raise ValueError(
            "tie_projs has a True flag but there is no projection to tie "
            f"(div_val == 1 and d_embed == d_model == {config.d_model})"
        )


# --------------------------------------------------------------------------- presets


def enwik8_large() -> TransformerXLConfig:
    """The 24-layer enwik8 model of Top-KAST Table 4 (the 277M model of Dai et al.).

    d_embed 512 is projected to d_model 1024 by ``word_emb.emb_projs.0`` and, because the
    input/output embeddings are tied, the output uses the same projection (``tie_projs
    = [True]``): ``logits = (h P) E^T + b`` with ``x_emb = E[x] P^T``. The reference code
    would leave the output projection untied (+0.5M parameters). Dropout 0.15 is the
    reference enwik8 setting (Table 4 gives a 0.05-0.2 range).
    """
    return TransformerXLConfig(
        vocab_size=256,
        n_layer=24,
        d_model=1024,
        n_head=8,
        d_head=128,
        d_ff=3072,
        d_embed=512,
        tgt_len=768,
        mem_len=2304,
        eval_mem_len=5000,
        dropout=0.15,
        dropatt=0.15,
        tie_weight=True,
        tie_projs=[True],
    )


def enwik8_small() -> TransformerXLConfig:
    """The smaller enwik8 model of Top-KAST Table 5 (69M): d_model 512, d_ff 1536, 8 heads.

    With d_embed == d_model == 512 there is no embedding projection.
    """
    config = enwik8_large()
    return dataclasses.replace(config, d_model=512, d_ff=1536, n_head=8, d_head=64, tie_projs=[])


def wikitext103_large(vocab_size: int = WIKITEXT103_VOCAB_SIZE) -> TransformerXLConfig:
    """The 18-layer WikiText-103 model of Top-KAST Table 4 (285M, footnote 4).

    Adaptive input/softmax with cutoffs [20000, 40000, 200000] and div_val 4 (cluster
    widths 1024 / 256 / 64 / 16). Tying follows the reference WikiText-103 setup:
    every cluster's output weight is its input embedding, the tail clusters' output
    projections are their input projections, and the head cluster keeps a separate
    output projection (``tie_projs = [False, True, True, True]``). This is the
    configuration that gives 285.2M parameters; see :func:`count_parameters`.
    Dropout 0.2 is the reference WikiText-103 large setting.
    """
    return TransformerXLConfig(
        vocab_size=vocab_size,
        n_layer=18,
        d_model=1024,
        n_head=16,
        d_head=64,
        d_ff=4096,
        d_embed=1024,
        tgt_len=512,
        mem_len=768,
        eval_mem_len=2000,
        dropout=0.2,
        dropatt=0.2,
        tie_weight=True,
        cutoffs=[20_000, 40_000, 200_000],
        div_val=4,
        tie_projs=[False, True, True, True],
    )


def enwik8_tiny() -> TransformerXLConfig:
    """A 2-layer byte model that trains in seconds on a CPU (with a tied projection)."""
    return TransformerXLConfig(
        vocab_size=256,
        n_layer=2,
        d_model=64,
        n_head=2,
        d_head=32,
        d_ff=128,
        d_embed=32,
        tgt_len=32,
        mem_len=32,
        eval_mem_len=64,
        tie_projs=[True],
    )


def wikitext103_tiny(vocab_size: int = 10_000) -> TransformerXLConfig:
    """A 2-layer adaptive word model for a vocabulary of ``vocab_size`` words.

    The cutoffs keep WikiText-103's proportions (20000 / 40000 / 200000 of 267735 words),
    de-duplicated for small vocabularies, with div_val 2 and the same tying pattern as
    :func:`wikitext103_large`.
    """
    fractions = (20_000, 40_000, 200_000)
    candidates = {max(1, round(vocab_size * f / WIKITEXT103_VOCAB_SIZE)) for f in fractions}
    cutoffs = sorted(c for c in candidates if c < vocab_size)
    return TransformerXLConfig(
        vocab_size=vocab_size,
        n_layer=2,
        d_model=64,
        n_head=2,
        d_head=32,
        d_ff=128,
        d_embed=64,
        tgt_len=32,
        mem_len=32,
        eval_mem_len=64,
        cutoffs=cutoffs,
        div_val=2,
        tie_projs=[False] + [True] * len(cutoffs),
    )


TRANSFORMER_XL_PRESETS: dict[str, Callable[[], TransformerXLConfig]] = {
    "enwik8_large": enwik8_large,
    "enwik8_small": enwik8_small,
    "enwik8_tiny": enwik8_tiny,
    "wikitext103_large": wikitext103_large,
    "wikitext103_tiny": wikitext103_tiny,
}
"""Preset name -> zero-argument config factory (the WikiText ones take ``vocab_size``)."""


# --------------------------------------------------------------------------- parameter count


def count_parameters(config: TransformerXLConfig) -> int:
    """Counts the scalar parameters of ``TransformerXL(config)`` analytically.

    With ``P = H * Dh``, ``E_i`` / ``n_i`` the width / size of cluster ``i`` and ``C`` the
    number of clusters:

    ==========================  =====================================================
    per layer, attention        ``3 D P`` (qkv) + ``D P`` (r_net) + ``P D`` (o_net) + ``2D``
    per layer, feed-forward     ``D F + F + F D + D`` + ``2D`` (LayerNorm)
    global attention biases     ``2 P`` (u and v, shared by all layers)
    input embedding             ``sum_i n_i E_i`` + ``sum_i D E_i`` if projected
    output layer                ``V`` biases + ``(C - 1)(d_embed + 1)`` cluster logits
                                + ``sum_i n_i E_i`` unless ``tie_weight``
                                + ``D E_i`` per projected cluster not in ``tie_projs``
    ==========================  =====================================================

    Tied parameters are counted once, like ``sum(p.numel() for p in model.parameters())``.

    Args:
        config: A valid configuration.

    Returns:
        The number of parameters.
    """
    config.validate()
    d, p, f = config.d_model, config.n_head * config.d_head, config.d_ff
    attention = 3 * d * p + d * p + p * d + 2 * d
    feed_forward = d * f + f + f * d + d + 2 * d
    total = config.n_layer * (attention + feed_forward) + 2 * p
    sizes = [r - l for l, r in config.cluster_bounds()]
    dims = config.cluster_dims()
    tables = sum(n * e for n, e in zip(sizes, dims, strict=True))
    total += tables
    if config.has_projection:
        total += sum(d * e for e in dims)
        total += sum(d * e for i, e in enumerate(dims) if not config.projection_tied(i))
    total += config.vocab_size + (config.n_clusters - 1) * (config.d_embed + 1)
    if not config.tie_weight:
        total += tables
    return total


# --------------------------------------------------------------------------- attention


def rel_shift(x: Tensor) -> Tensor:
    """Re-indexes scores from (query, relative distance) to (query, key).

    ``x[..., i, idx]`` is the score of query ``i`` against the position embedding at row
    ``idx`` of ``R``, which encodes distance ``K - 1 - idx``. Query ``i`` sits at absolute
    position ``M + i`` (``M = K - T``), so key ``j`` is at distance ``M + i - j`` and the
    result is ``out[..., i, j] = x[..., i, j + T - 1 - i]``. The zero-pad / reshape trick
    of the reference code does this without a gather; it is exact for every ``j <= M + i``
    (the causal part) and leaves junk above it, which the attention mask removes.

    Args:
        x: Scores of shape ``[B, H, T, K]``.

    Returns:
        Shifted scores of shape ``[B, H, T, K]``.
    """
    b, h, t, k = x.shape
    padded = F.pad(x, (1, 0))  # [B, H, T, K + 1]: a zero column in front of each row
    padded = padded.view(b, h, k + 1, t)  # same memory, rows now wrap by one each
    return padded[:, :, 1:].view(b, h, t, k)  # drop the first T values -> shifted rows


def _sinusoid(k: int, d_model: int, clamp_len: int, like: Tensor) -> Tensor:
    """Sinusoidal embeddings ``R`` of the relative distances ``K - 1, ..., 0``.

    ``R[idx] = [sin(p w), cos(p w)]`` with ``p = K - 1 - idx`` (clamped to ``clamp_len``)
    and ``w_k = 10000^(-2k / D)``; computed on the fly, so nothing is stored and the
    model has no maximum length.

    Returns:
        A ``[K, D]`` tensor with the dtype and device of ``like``.
    """
    pos = torch.arange(k - 1, -1, -1.0, device=like.device)  # [K] descending distances
    if clamp_len > 0:
        pos = pos.clamp(max=clamp_len)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d_model, 2.0, device=like.device) / d_model))
    angles = pos[:, None] * inv_freq[None, :]  # [K, D/2]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(like.dtype)  # [K, D]


class RelMultiHeadAttn(nn.Module):
    """Relative multi-head attention over ``[memory ; segment]`` (the paper's eq. 3).

    Attributes:
        qkv_net: ``nn.Linear(D, 3 H Dh, bias=False)``: ``W_q``, ``W_kE``, ``W_v`` fused.
        r_net: ``nn.Linear(D, H Dh, bias=False)``: ``W_kR`` for the position embeddings.
        o_net: ``nn.Linear(H Dh, D, bias=False)``: output projection.
        layer_norm: Post-norm after the residual, or pre-norm of the input.
    """

    def __init__(self, config: TransformerXLConfig) -> None:
        super().__init__()
        self.n_head, self.d_head = config.n_head, config.d_head
        self.pre_lnorm = config.pre_lnorm
        self.scale = 1.0 / math.sqrt(config.d_head)
        width = config.n_head * config.d_head
        self.qkv_net = nn.Linear(config.d_model, 3 * width, bias=False)
        self.r_net = nn.Linear(config.d_model, width, bias=False)
        self.o_net = nn.Linear(width, config.d_model, bias=False)
        self.layer_norm = nn.LayerNorm(config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.dropatt = nn.Dropout(config.dropatt)

    def forward(
        self,
        h: Tensor,
        r: Tensor,
        r_w_bias: Tensor,
        r_r_bias: Tensor,
        mem: Tensor | None,
        mask: Tensor,
    ) -> Tensor:
        """Applies attention and the residual connection.

        Args:
            h: Current segment ``[B, T, D]``.
            r: Relative position embeddings ``[K, D]`` for distances ``K-1, ..., 0``.
            r_w_bias: ``u``, shape ``[H, Dh]``.
            r_r_bias: ``v``, shape ``[H, Dh]``.
            mem: Cached states ``[B, M, D]`` or None (``M = 0``).
            mask: ``[T, K]`` boolean, True where a key is in the query's future.

        Returns:
            The layer output ``[B, T, D]``.
        """
        b, t, _ = h.shape
        cat = h if mem is None else torch.cat([mem, h], dim=1)  # [B, K, D]
        k_len = cat.shape[1]
        # Pre-norm normalises the memory too: it holds raw residual-stream states.
        heads = self.qkv_net(self.layer_norm(cat) if self.pre_lnorm else cat)  # [B, K, 3HDh]
        q, k, v = heads.view(b, k_len, 3, self.n_head, self.d_head).unbind(dim=2)
        q = q[:, -t:]  # [B, T, H, Dh]: only the current segment asks queries
        r_k = self.r_net(r).view(k_len, self.n_head, self.d_head)  # [K, H, Dh]
        ac = torch.einsum("bihd,bjhd->bhij", q + r_w_bias, k)  # [B, H, T, K]: terms (a)+(c)
        bd = torch.einsum("bihd,jhd->bhij", q + r_r_bias, r_k)  # [B, H, T, K]: (b)+(d)
        score = (ac + rel_shift(bd)) * self.scale  # [B, H, T, K]
        score = score.masked_fill(mask[None, None], float("-inf"))
        prob = self.dropatt(torch.softmax(score, dim=-1))  # [B, H, T, K]
        out = torch.einsum("bhij,bjhd->bihd", prob, v)  # [B, T, H, Dh]
        out = self.drop(self.o_net(out.reshape(b, t, -1)))  # [B, T, D]
        return h + out if self.pre_lnorm else self.layer_norm(h + out)


class PositionwiseFF(nn.Module):
    """Feed-forward sub-layer ``ff2(drop(relu(ff1(x))))`` with residual and LayerNorm.

    Attributes:
        ff1: ``nn.Linear(D, F)``.
        ff2: ``nn.Linear(F, D)``.
    """

    def __init__(self, config: TransformerXLConfig) -> None:
        super().__init__()
        self.pre_lnorm = config.pre_lnorm
        self.ff1 = nn.Linear(config.d_model, config.d_ff)
        self.ff2 = nn.Linear(config.d_ff, config.d_model)
        self.layer_norm = nn.LayerNorm(config.d_model)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Maps ``[B, T, D]`` to ``[B, T, D]``."""
        inner = self.layer_norm(x) if self.pre_lnorm else x
        inner = self.drop(F.relu(self.ff1(inner)))  # [B, T, F]
        out = self.drop(self.ff2(inner))  # [B, T, D]
        return x + out if self.pre_lnorm else self.layer_norm(x + out)


class RelDecoderLayer(nn.Module):
    """One Transformer-XL layer: relative attention then feed-forward."""

    def __init__(self, config: TransformerXLConfig) -> None:
        super().__init__()
        self.dec_attn = RelMultiHeadAttn(config)
        self.pos_ff = PositionwiseFF(config)

    def forward(
        self,
        h: Tensor,
        r: Tensor,
        r_w_bias: Tensor,
        r_r_bias: Tensor,
        mem: Tensor | None,
        mask: Tensor,
    ) -> Tensor:
        """See :meth:`RelMultiHeadAttn.forward`; returns ``[B, T, D]``."""
        return self.pos_ff(self.dec_attn(h, r, r_w_bias, r_r_bias, mem, mask))


# --------------------------------------------------------------------------- adaptive I/O


def _cluster_index(flat: Tensor, lo: int, hi: int) -> Tensor:
    """Positions ``[n]`` of the ids of ``flat`` that fall in ``[lo, hi)``."""
    return ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)


def _check_ids(ids: Tensor, vocab_size: int, name: str) -> None:
    """Raises ValueError if an id is outside ``[0, vocab_size)``.

    The adaptive paths would otherwise silently give such ids a zero embedding / zero loss.
    """
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"{name} must be ids in [0, {vocab_size}), got range "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )


class AdaptiveEmbedding(nn.Module):
    """Adaptive input embedding (Baevski & Auli, 2019), scaled by ``sqrt(D)``.

    ``x_emb = sqrt(D) * E_c[x - l_c] P_c^T`` where ``c`` is the cluster of token ``x``,
    ``E_c`` its ``[n_c, E_c]`` table and ``P_c`` its ``[D, E_c]`` projection (identity
    when ``config.has_projection`` is false). With no cutoffs this is an ordinary
    (optionally projected) embedding.

    Attributes:
        emb_layers: One ``nn.Embedding(n_i, E_i)`` per cluster.
        emb_projs: One ``nn.Parameter`` of shape ``[D, E_i]`` per cluster, or empty.
    """

    def __init__(self, config: TransformerXLConfig) -> None:
        super().__init__()
        self.vocab_size, self.d_model = config.vocab_size, config.d_model
        self.bounds = config.cluster_bounds()
        self.emb_scale = math.sqrt(config.d_model)
        dims = config.cluster_dims()
        self.emb_layers = nn.ModuleList(
            nn.Embedding(r - l, e) for (l, r), e in zip(self.bounds, dims, strict=True)
        )
        self.emb_projs = nn.ParameterList(
            nn.Parameter(torch.empty(config.d_model, e)) for e in dims if config.has_projection
        )

    def _embed_cluster(self, i: int, ids: Tensor) -> Tensor:
        """Embeds ids already offset into cluster ``i``: ``[...]`` -> ``[..., D]``."""
        emb = self.emb_layers[i](ids)  # [..., E_i]
        return F.linear(emb, self.emb_projs[i]) if len(self.emb_projs) else emb

    def forward(self, tokens: Tensor) -> Tensor:
        """Maps ids ``[B, T]`` to embeddings ``[B, T, D]``."""
        if len(self.bounds) == 1:
            return self._embed_cluster(0, tokens) * self.emb_scale
        _check_ids(tokens, self.vocab_size, "tokens")
        flat = tokens.reshape(-1)  # [N]
        pieces = []
        for i, (lo, hi) in enumerate(self.bounds):
            # Empty clusters are embedded too, so every table always gets a gradient.
            idx = _cluster_index(flat, lo, hi)  # [n_i]
            pieces.append((idx, self._embed_cluster(i, flat[idx] - lo)))  # [n_i, D]
        out = pieces[0][1].new_zeros(flat.shape[0], self.d_model)  # [N, D]
        for idx, emb in pieces:
            out = out.index_copy(0, idx, emb)
        return out.view(*tokens.shape, self.d_model) * self.emb_scale


class ProjectedAdaptiveLogSoftmax(nn.Module):
    """Adaptive softmax (Grave et al., 2017) with per-cluster projections.

    The head scores the ``n_0`` shortlist words and one token per tail cluster::

        p(w | h) = softmax([W_0 (h P_0) + b_0 ; W_c (h P_0) + b_c])[w]               w in head
        p(w | h) = p(cluster i | h) * softmax(W_i (h P_i) + b_i)[w - l_i]            w in tail i

    where ``P_i`` is cluster ``i``'s ``[D, E_i]`` projection (identity if unprojected),
    ``W_i`` its ``[n_i, E_i]`` output weight and ``W_c`` / ``b_c`` the tail-cluster logits
    (``cluster_weight`` / ``cluster_bias``; column ``n_0 + i - 1`` of the head is cluster
    ``i``). With no cutoffs it is ``log_softmax(W_0 (h P_0) + b_0)``.

    Attributes:
        out_layers: One ``nn.Linear(E_i, n_i)`` per cluster (weights tied by the model).
        out_projs: One ``nn.Parameter`` ``[D, E_i]`` per cluster, or empty.
        cluster_weight: ``[C - 1, d_embed]`` tail-cluster logit weights (if ``C > 1``).
        cluster_bias: ``[C - 1]`` tail-cluster logit biases (if ``C > 1``).
    """

    def __init__(self, config: TransformerXLConfig) -> None:
        super().__init__()
        self.vocab_size = config.vocab_size
        self.bounds = config.cluster_bounds()
        self.head_size = self.bounds[0][1]
        dims = config.cluster_dims()
        self.out_layers = nn.ModuleList(
            nn.Linear(e, r - l) for (l, r), e in zip(self.bounds, dims, strict=True)
        )
        self.out_projs = nn.ParameterList(
            nn.Parameter(torch.empty(config.d_model, e)) for e in dims if config.has_projection
        )
        self.cluster_weight: nn.Parameter | None = None
        self.cluster_bias: nn.Parameter | None = None
        if len(self.bounds) > 1:
            self.cluster_weight = nn.Parameter(torch.empty(len(self.bounds) - 1, dims[0]))
            self.cluster_bias = nn.Parameter(torch.zeros(len(self.bounds) - 1))

    def _logits(self, hidden: Tensor, i: int) -> Tensor:
        """Cluster ``i``'s word logits ``[N, n_i]`` from ``hidden`` ``[N, D]``."""
        proj = hidden @ self.out_projs[i] if len(self.out_projs) else hidden  # [N, E_i]
        logits = self.out_layers[i](proj)  # [N, n_i]
        if i == 0 and self.cluster_weight is not None:
            # Tail clusters compete with the shortlist words inside the head softmax.
            cluster = F.linear(proj, self.cluster_weight, self.cluster_bias)  # [N, C - 1]
            logits = torch.cat([logits, cluster], dim=-1)  # [N, n_0 + C - 1]
        return logits

    def log_prob(self, hidden: Tensor) -> Tensor:
        """Full log-distribution ``[N, V]`` for ``hidden`` ``[N, D]`` (rows sum to 1)."""
        head = torch.log_softmax(self._logits(hidden, 0).float(), dim=-1)  # [N, n_0 + C - 1]
        parts = [head[:, : self.head_size]]
        for i in range(1, len(self.bounds)):
            tail = torch.log_softmax(self._logits(hidden, i).float(), dim=-1)  # [N, n_i]
            parts.append(head[:, self.head_size + i - 1, None] + tail)
        return torch.cat(parts, dim=-1)  # [N, V]

    def forward(self, hidden: Tensor, target: Tensor) -> Tensor:
        """Negative log-likelihood in nats.

        Only the rows whose target is in a tail cluster evaluate that cluster, which is
        what makes the adaptive softmax cheap for a large vocabulary.

        Args:
            hidden: ``[N, D]`` final hidden states.
            target: ``[N]`` target ids.

        Returns:
            ``[N]`` float32 negative log-probabilities of the targets.
        """
        head = torch.log_softmax(self._logits(hidden, 0).float(), dim=-1)  # [N, n_0 + C - 1]
        if len(self.bounds) == 1:
            return -head.gather(1, target[:, None]).squeeze(1)
        _check_ids(target, self.vocab_size, "targets")
        # Clamp so that tail targets index a valid (ignored) column of the head.
        in_head = target.clamp(max=self.head_size - 1)[:, None]  # [N, 1]
        nll = -head.gather(1, in_head).squeeze(1)  # [N]: right for head targets
        for i, (lo, hi) in enumerate(self.bounds[1:], start=1):
            idx = _cluster_index(target, lo, hi)  # [n]
            tail = torch.log_softmax(self._logits(hidden[idx], i).float(), dim=-1)  # [n, n_i]
            logp = head[idx, self.head_size + i - 1] + tail.gather(
                1, (target[idx] - lo)[:, None]
            ).squeeze(1)  # [n]
            nll = nll.index_copy(0, idx, -logp)
        return nll


# --------------------------------------------------------------------------- model


class TransformerXL(nn.Module):
    """Transformer-XL language model with segment-level recurrence.

    Memories are a list of ``n_layer`` tensors ``[B, M, D]``: ``mems[i]`` holds the last
    ``M`` states that entered layer ``i`` (the reference code also caches the last layer's
    output, which no layer reads, so it is not kept here).

    Attributes:
        config: The validated configuration.
        mem_len: Memory length used by :meth:`forward` when none is passed; starts at
            ``config.mem_len``, set it to ``config.eval_mem_len`` for evaluation.
        word_emb: :class:`AdaptiveEmbedding`.
        layers: ``nn.ModuleList`` of :class:`RelDecoderLayer`.
        r_w_bias: ``u`` of eq. (3), ``[H, Dh]``, shared by all layers.
        r_r_bias: ``v`` of eq. (3), ``[H, Dh]``, shared by all layers.
        crit: :class:`ProjectedAdaptiveLogSoftmax`, tied to ``word_emb`` per the config.
    """

    def __init__(self, config: TransformerXLConfig) -> None:
        """Builds, ties and initialises the model.

        Raises:
            ValueError: If ``config`` is invalid.
        """
        super().__init__()
        config.validate()
        self.config = config
        self.mem_len = config.mem_len
        self.word_emb = AdaptiveEmbedding(config)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(RelDecoderLayer(config) for _ in range(config.n_layer))
        self.r_w_bias = nn.Parameter(torch.empty(config.n_head, config.d_head))
        self.r_r_bias = nn.Parameter(torch.empty(config.n_head, config.d_head))
        self.crit = ProjectedAdaptiveLogSoftmax(config)
        self._init_weights()
        self._tie_weights()

    def _init_weights(self) -> None:
        """Reference initialisation: N(0, 0.02) for weights, embeddings and ``u, v``,
        N(0, 0.01) for the embedding projections, zero biases, LayerNorm (1, 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for proj in [*self.word_emb.emb_projs, *self.crit.out_projs]:
            nn.init.normal_(proj, mean=0.0, std=0.01)
        for bias in (self.r_w_bias, self.r_r_bias):
            nn.init.normal_(bias, mean=0.0, std=0.02)
        if self.crit.cluster_weight is not None:
            nn.init.normal_(self.crit.cluster_weight, mean=0.0, std=0.02)

    def _tie_weights(self) -> None:
        """Shares Parameter objects (not copies) so each tied tensor is one parameter."""
        for i in range(self.config.n_clusters):
            if self.config.tie_weight:
                out_layer, embedding = self.crit.out_layers[i], self.word_emb.emb_layers[i]
                assert isinstance(out_layer, nn.Linear) and isinstance(embedding, nn.Embedding)
                # Embedding [n_i, E_i] and Linear(E_i, n_i).weight have the same shape.
                out_layer.weight = embedding.weight
            if self.config.projection_tied(i):
                self.crit.out_projs[i] = self.word_emb.emb_projs[i]

    def num_parameters(self) -> int:
        """Number of scalar parameters; tied ones (one Parameter object) count once."""
        return sum(p.numel() for p in self.parameters())

    def _check_mems(self, mems: list[Tensor] | None, batch: int) -> None:
        """Raises ValueError if ``mems`` does not fit this model and batch."""
        if mems is None:
            return
        if len(mems) != self.config.n_layer:
            raise ValueError(f"mems must hold {self.config.n_layer} tensors, got {len(mems)}")
        expected = (batch, self.config.d_model)
        for mem in mems:
            if (
                mem.dim() != 3
                or (mem.shape[0], mem.shape[2]) != expected
                or (mem.shape[1] != mems[0].shape[1])
            ):
                raise ValueError(
                    f"every memory must be [B={batch}, M, D={self.config.d_model}] with one "
                    f"M, got {[tuple(m.shape) for m in mems]}"
                )

    @staticmethod
    def _update_mems(hids: list[Tensor], mems: list[Tensor] | None, mem_len: int) -> list[Tensor]:
        """Keeps the last ``mem_len`` states of ``[old memory ; this segment]`` per layer.

        Detached (the paper's stop-gradient ``SG``): gradients never flow into earlier
        segments, so the cost of a step does not grow with the history.
        """
        with torch.no_grad():
            new_mems = []
            for i, h in enumerate(hids):
                cat = h if mems is None else torch.cat([mems[i], h], dim=1)  # [B, M + T, D]
                # cat[:, -0:] would keep everything, so mem_len == 0 is special-cased.
                kept = cat[:, max(cat.shape[1] - mem_len, 0) :] if mem_len > 0 else cat[:, :0]
                new_mems.append(kept.detach())
        return new_mems

    def hidden_states(
        self, tokens: Tensor, mems: list[Tensor] | None = None, mem_len: int | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Runs the layers on one segment.

        Args:
            tokens: ``[B, T]`` long token ids.
            mems: Memories from the previous segment (see the class docstring) or None.
            mem_len: Memory length to keep; defaults to ``self.mem_len``.

        Returns:
            ``(hidden [B, T, D], new_mems)`` with ``new_mems[i]`` of shape
            ``[B, min(M + T, mem_len), D]``, detached.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape [B, T], got {tuple(tokens.shape)}")
        mem_len = self.mem_len if mem_len is None else mem_len
        if mem_len < 0:
            raise ValueError(f"mem_len must be non-negative, got {mem_len}")
        self._check_mems(mems, tokens.shape[0])
        t = tokens.shape[1]
        m = 0 if mems is None else mems[0].shape[1]
        core = self.drop(self.word_emb(tokens))  # [B, T, D]
        pos = self.drop(_sinusoid(m + t, self.config.d_model, self.config.clamp_len, core))
        # Query i (absolute position m + i) may see keys 0 .. m + i: all memory + causal.
        mask = torch.ones(t, m + t, dtype=torch.bool, device=tokens.device).triu(1 + m)
        hids = []
        for i, layer in enumerate(self.layers):
            hids.append(core)
            mem = None if mems is None else mems[i]
            core = layer(core, pos, self.r_w_bias, self.r_r_bias, mem, mask)  # [B, T, D]
        return self.drop(core), self._update_mems(hids, mems, mem_len)

    def forward(
        self,
        tokens: Tensor,
        targets: Tensor,
        mems: list[Tensor] | None = None,
        mem_len: int | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Per-token negative log-likelihood of ``targets`` given ``tokens`` and memory.

        Args:
            tokens: ``[B, T]`` long input ids.
            targets: ``[B, T]`` long ids; ``targets[:, t]`` is predicted from ``tokens[:, :t+1]``
                and the memory.
            mems: Memories returned by the previous call, or None to start fresh.
            mem_len: Memory length to keep; defaults to ``self.mem_len``.

        Returns:
            ``(nll [B, T] float32 in nats, new_mems)``.
        """
        if targets.shape != tokens.shape:
            raise ValueError(
                f"targets {tuple(targets.shape)} must match tokens {tuple(tokens.shape)}"
            )
        hidden, new_mems = self.hidden_states(tokens, mems, mem_len)  # [B, T, D]
        nll = self.crit(hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1))  # [B*T]
        return nll.view(tokens.shape), new_mems

    def log_prob(
        self, tokens: Tensor, mems: list[Tensor] | None = None, mem_len: int | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Full next-token log-distribution ``([B, T, V], new_mems)`` (e.g. for sampling)."""
        hidden, new_mems = self.hidden_states(tokens, mems, mem_len)  # [B, T, D]
        logp = self.crit.log_prob(hidden.reshape(-1, hidden.shape[-1]))  # [B*T, V]
        return logp.view(*tokens.shape, -1), new_mems
