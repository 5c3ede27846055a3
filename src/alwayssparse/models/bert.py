"""BERT for pre-training: masked language modelling (MLM) plus next sentence prediction (NSP).

Implements the encoder and the two pre-training heads of Devlin et al. (2018), "BERT:
Pre-training of Deep Bidirectional Transformers for Language Understanding" (section 3.1 and
appendix A), in the form used by Dietrich et al. (2021), "Towards Structured Dynamic Sparse
Pre-Training of BERT" (``dynsparse-bert.md``, section 2 and appendix A): post-LayerNorm
Transformer blocks, GELU activations, weights initialised from a normal distribution with
standard deviation 0.02 truncated at two standard deviations, and the BERT family of model
sizes of Turc et al. (2019), "Well-Read Students Learn Better" (Tiny, Mini, Small, Medium,
Base).

As in :mod:`alwayssparse.models.transformer`, every dense projection is an ``nn.Linear`` that is
*called as a module* on every forward pass (never ``F.linear`` on a cached weight): the sparsity
library replaces ``module.weight`` with a ``torch.nn.utils.parametrize`` parametrization or swaps
the ``nn.Linear`` for a sparse module with the same in/out features, and either only works when
the module is called. Embeddings are ``nn.Embedding`` and, with the default layout, stay dense
("all non-embedding weights sparse", section 2.1). The MLM decoder is an ``nn.Linear`` whose
weight *is* the word-embedding ``nn.Parameter``; the layout classifies a parameter shared with an
embedding as an embedding, so the decoder stays dense too, while its bias is its own.

Shapes use ``B`` = batch, ``T`` = sequence length, ``D`` = ``hidden_size``, ``H`` =
``num_heads``, ``Dh`` = ``D // H``, ``F`` = ``intermediate_size`` and ``V`` = ``vocab_size``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BERT_PRESETS",
    "IGNORE_INDEX",
    "BertAttention",
    "BertConfig",
    "BertEmbeddings",
    "BertFeedForward",
    "BertForPreTraining",
    "BertLayer",
    "BertMLMHead",
    "BertOutput",
    "BertPooler",
    "bert_config",
]

# Label value that the MLM and NSP losses ignore (the ``F.cross_entropy`` default).
IGNORE_INDEX = -100

# Vocabulary size of the uncased English WordPiece vocabulary of the original BERT release.
BERT_VOCAB_SIZE = 30522

# The BERT family of Turc et al. (2019), as used in dynsparse-bert.md (figure 3, table A.11):
# name -> (hidden_size, num_layers). Heads are hidden_size / 64 and the FFN is 4 * hidden_size.
# A read-only mapping so that no caller can change the presets for everyone else.
BERT_PRESETS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "tiny": (128, 2),
        "mini": (256, 4),
        "small": (512, 4),
        "medium": (512, 8),
        "base": (768, 12),
    }
)


@dataclass
class BertConfig:
    """Hyper-parameters of :class:`BertForPreTraining` (Devlin et al., 2018, section 3).

    Attributes:
        vocab_size: Number of WordPiece ids ``V``.
        hidden_size: Width ``D`` of the residual stream (BERT's ``H``).
        num_layers: Number of Transformer blocks (BERT's ``L``).
        num_heads: Number of attention heads (BERT's ``A``); must divide ``hidden_size``.
        intermediate_size: Hidden width ``F`` of the feed-forward sub-layer (``4 * D`` in BERT).
        max_position: Size of the learned position-embedding table (longest sequence).
        type_vocab_size: Number of segment (token type) ids; 2 for sentence pairs A/B.
        dropout: Dropout on embeddings and on every residual branch.
        attention_dropout: Dropout on the attention probabilities.
        init_std: Standard deviation of the truncated-normal weight initialisation.
        layer_norm_eps: LayerNorm epsilon (1e-12 in the original BERT).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.1
    init_std: float = 0.02
    layer_norm_eps: float = 1e-12

    def validate(self) -> None:
        """Checks that the configuration describes a buildable model.

        Raises:
            ValueError: If a size is not a positive integer, ``hidden_size`` is not divisible
                by ``num_heads``, a dropout is outside ``[0, 1)``, or ``init_std`` /
                ``layer_norm_eps`` is not positive. The message names the offending field.
        """
        sizes = (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_position",
            "type_vocab_size",
        )
        for name in sizes:
            value = getattr(self, name)
            # bool is a subclass of int; reject it so that e.g. num_layers=True is an error.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        for name in ("init_std", "layer_norm_eps"):
            value = getattr(self, name)
            if not value > 0.0:
                raise ValueError(f"{name} must be positive, got {value!r}")


def bert_config(name: str, vocab_size: int = BERT_VOCAB_SIZE, **overrides: object) -> BertConfig:
    """Returns the configuration of a member of the BERT family (Turc et al., 2019).

    ``num_heads = hidden_size / 64`` and ``intermediate_size = 4 * hidden_size`` as in Turc et
    al. (2019) and Devlin et al. (2018); Base is BERT-Base (110M parameters).

    Args:
        name: One of ``BERT_PRESETS`` (``"tiny"``, ``"mini"``, ``"small"``, ``"medium"``,
            ``"base"``), case-insensitive, optionally prefixed with ``"bert-"``.
        vocab_size: Size of the WordPiece vocabulary (30522 for the original uncased one).
        **overrides: Any other :class:`BertConfig` field, e.g. ``dropout=0.0``.

    Returns:
        A new, validated :class:`BertConfig`.

    Raises:
        ValueError: If ``name`` is not a preset or an override makes the config invalid.
        TypeError: If an override is not a :class:`BertConfig` field.
    """
    key = name.lower().removeprefix("bert-")
    if key not in BERT_PRESETS:
        raise ValueError(f"unknown BERT preset {name!r}; choose one of {list(BERT_PRESETS)}")
    hidden, layers = BERT_PRESETS[key]
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=hidden // 64,
        intermediate_size=4 * hidden,
    )
    config = dataclasses.replace(config, **overrides)  # type: ignore[arg-type]
    config.validate()
    return config


@dataclass
class BertOutput:
    """What :meth:`BertForPreTraining.forward` returns.

    Attributes:
        mlm_logits: ``[B, T, V]`` masked-language-model logits at every position.
        nsp_logits: ``[B, 2]`` next-sentence-prediction logits (class 0 = is next, 1 = random).
        mlm_loss: Mean cross-entropy over positions whose MLM label is not ``-100``; ``None``
            when no MLM labels were given.
        nsp_loss: Mean cross-entropy over examples whose NSP label is not ``-100``; ``None``
            when no NSP labels were given.
        loss: ``mlm_loss + nsp_loss`` (the BERT pre-training objective), or whichever of the
            two was computed; ``None`` when neither was.
    """

    mlm_logits: Tensor
    nsp_logits: Tensor
    mlm_loss: Tensor | None = None
    nsp_loss: Tensor | None = None
    loss: Tensor | None = None


class BertEmbeddings(nn.Module):
    """Sum of word, position and segment embeddings, then LayerNorm and dropout.

    Attributes:
        word_embeddings: ``nn.Embedding(V, D)``; also the weight of the MLM decoder.
        position_embeddings: Learned ``nn.Embedding(max_position, D)``.
        token_type_embeddings: ``nn.Embedding(type_vocab_size, D)`` for segments A/B.
        layer_norm: ``nn.LayerNorm(D)``.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        """Embeds ``input_ids`` and ``token_type_ids`` (both ``[B, T]``); returns ``[B, T, D]``."""
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # [T]
        x = self.word_embeddings(input_ids)  # [B, T, D]
        x = x + self.position_embeddings(pos)  # + [T, D] broadcast over B
        x = x + self.token_type_embeddings(token_type_ids)  # [B, T, D]
        return self.drop(self.layer_norm(x))


class BertAttention(nn.Module):
    """Bidirectional multi-head self-attention with a post-LayerNorm residual connection.

    Separate ``query``/``key``/``value`` projections (as in the original BERT, rather than a
    fused QKV) so that each is its own sparse ``nn.Linear`` with its own density.

    Attributes:
        query, key, value: ``nn.Linear(D, D)`` projections.
        output: ``nn.Linear(D, D)`` projection back into the residual stream.
        layer_norm: ``nn.LayerNorm(D)`` applied after the residual addition.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.attention_dropout = config.attention_dropout
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.output = nn.Linear(d, d)
        self.drop = nn.Dropout(config.dropout)
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, attn_bias: Tensor) -> Tensor:
        """Applies ``LayerNorm(x + Dropout(output(attention(x))))``.

        Args:
            x: Input of shape ``[B, T, D]``.
            attn_bias: Additive attention bias of shape ``[B, 1, 1, T]``: 0 for real keys and
                a large negative number for padding keys.

        Returns:
            Output of shape ``[B, T, D]``.
        """
        b, t, d = x.shape
        # Calling the modules (not caching .weight) keeps parametrized sparse weights live.
        q = self._split_heads(self.query(x))  # [B, H, T, Dh]
        k = self._split_heads(self.key(x))  # [B, H, T, Dh]
        v = self._split_heads(self.value(x))  # [B, H, T, Dh]
        # SDPA has no notion of train/eval mode, so attention dropout is switched off by hand.
        p = self.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=p)
        y = y.transpose(1, 2).reshape(b, t, d)  # [B, H, T, Dh] -> [B, T, D]
        return self.layer_norm(x + self.drop(self.output(y)))  # [B, T, D]

    def _split_heads(self, x: Tensor) -> Tensor:
        """Reshapes ``[B, T, D]`` into ``[B, H, T, Dh]``."""
        b, t, d = x.shape
        return x.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)


class BertFeedForward(nn.Module):
    """Position-wise feed-forward sub-layer, ``LayerNorm(x + out(GELU(inner(x))))``.

    Attributes:
        inner: ``nn.Linear(D, F)`` expansion (BERT's "intermediate" dense layer).
        out: ``nn.Linear(F, D)`` projection back into the residual stream.
        layer_norm: ``nn.LayerNorm(D)`` applied after the residual addition.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.inner = nn.Linear(config.hidden_size, config.intermediate_size)
        # BERT uses the exact (erf) GELU, not the tanh approximation.
        self.act = nn.GELU()
        self.out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.drop = nn.Dropout(config.dropout)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        """Applies the sub-layer to ``x`` of shape ``[B, T, D]``; returns ``[B, T, D]``."""
        h = self.act(self.inner(x))  # [B, T, F]
        return self.layer_norm(x + self.drop(self.out(h)))  # [B, T, D]


class BertLayer(nn.Module):
    """One post-LayerNorm Transformer encoder block (Vaswani et al., 2017; Devlin et al., 2018)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.ffn = BertFeedForward(config)

    def forward(self, x: Tensor, attn_bias: Tensor) -> Tensor:
        """Applies the block to ``x`` of shape ``[B, T, D]``; returns ``[B, T, D]``."""
        return self.ffn(self.attention(x, attn_bias))


class BertPooler(nn.Module):
    """``tanh(dense(h_[CLS]))``: the sentence representation that feeds the NSP head.

    Attributes:
        dense: ``nn.Linear(D, D)``.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        """Pools ``hidden`` of shape ``[B, T, D]`` into ``[B, D]`` using the first token."""
        return torch.tanh(self.dense(hidden[:, 0]))  # [B, D]


class BertMLMHead(nn.Module):
    """MLM head: ``decoder(LayerNorm(GELU(transform(h))))`` with a decoder tied to the embedding.

    Attributes:
        transform: ``nn.Linear(D, D)``.
        layer_norm: ``nn.LayerNorm(D)``.
        decoder: ``nn.Linear(D, V)`` whose ``weight`` is set by :class:`BertForPreTraining` to
            the word-embedding Parameter and whose ``bias`` is its own (output-only, as in BERT).
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = nn.GELU()
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden: Tensor) -> Tensor:
        """Maps ``hidden`` of shape ``[B, T, D]`` to vocabulary logits ``[B, T, V]``."""
        h = self.layer_norm(self.act(self.transform(hidden)))  # [B, T, D]
        return self.decoder(h)  # [B, T, V]


class BertForPreTraining(nn.Module):
    """BERT encoder with the MLM and NSP pre-training heads (Devlin et al., 2018, section 3.1).

    Attributes:
        config: The (validated) configuration.
        embeddings: :class:`BertEmbeddings`.
        layers: ``nn.ModuleList`` of :class:`BertLayer`.
        pooler: :class:`BertPooler`.
        mlm_head: :class:`BertMLMHead`; ``mlm_head.decoder.weight`` *is*
            ``embeddings.word_embeddings.weight``.
        nsp_head: ``nn.Linear(D, 2)`` on the pooled output (0 = is next, 1 = random).
    """

    def __init__(self, config: BertConfig) -> None:
        """Builds and initialises the model.

        Args:
            config: Model hyper-parameters; validated here.

        Raises:
            ValueError: If ``config`` is invalid (see :meth:`BertConfig.validate`).
        """
        super().__init__()
        config.validate()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))
        self.pooler = BertPooler(config)
        self.mlm_head = BertMLMHead(config)
        self.nsp_head = nn.Linear(config.hidden_size, 2)
        self._init_weights()
        # Share the Parameter object itself (not a copy): one tensor, counted and optimised
        # once, and classified as an embedding (dense) by the sparsity layout.
        self.mlm_head.decoder.weight = self.embeddings.word_embeddings.weight

    def _init_weights(self) -> None:
        """BERT initialisation (Devlin et al., 2018; dynsparse-bert.md section 2.1, figure 9).

        Linear and Embedding weights are drawn from a normal distribution with standard
        deviation ``init_std`` (0.02) truncated at two standard deviations (TensorFlow's
        ``truncated_normal_initializer``), biases are zero and LayerNorms are weight 1, bias 0.
        """
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                _truncated_normal_(module.weight, std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def encode(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Runs the encoder.

        Args:
            input_ids: Integer ids of shape ``[B, T]``, ``T <= config.max_position``.
            token_type_ids: Segment ids of shape ``[B, T]`` (0 for A, 1 for B); zeros if None.
            attention_mask: ``[B, T]``, 1 (or True) for real tokens and 0 for padding; all
                ones if None.

        Returns:
            Final hidden states of shape ``[B, T, D]``.

        Raises:
            ValueError: If ``input_ids`` is not 2-D, ``T`` exceeds ``config.max_position`` or
                the other inputs do not have the shape of ``input_ids``.
        """
        self._check_inputs(input_ids, token_type_ids, attention_mask)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)  # [B, T, D]
        attn_bias = self._attention_bias(attention_mask, x.dtype)  # [B, 1, 1, T]
        for layer in self.layers:
            x = layer(x, attn_bias)  # [B, T, D]
        return x

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        mlm_labels: Tensor | None = None,
        nsp_labels: Tensor | None = None,
    ) -> BertOutput:
        """Computes the MLM and NSP logits and, given labels, the pre-training losses.

        Args:
            input_ids: Integer ids of shape ``[B, T]``.
            token_type_ids: Segment ids ``[B, T]``; zeros if None.
            attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding; all ones if None.
            mlm_labels: ``[B, T]`` original ids at the masked positions and ``-100`` elsewhere.
            nsp_labels: ``[B]``, 0 if segment B follows A, 1 if B is random; ``-100`` ignored.

        Returns:
            A :class:`BertOutput`. The MLM loss is averaged over the labelled positions of the
            whole batch (not per sequence), as in the original implementation; it is 0, not
            NaN, for a batch without any labelled position.
        """
        hidden = self.encode(input_ids, token_type_ids, attention_mask)  # [B, T, D]
        mlm_logits = self.mlm_head(hidden)  # [B, T, V]
        nsp_logits = self.nsp_head(self.pooler(hidden))  # [B, 2]
        mlm_loss = None if mlm_labels is None else _masked_cross_entropy(mlm_logits, mlm_labels)
        nsp_loss = None if nsp_labels is None else _masked_cross_entropy(nsp_logits, nsp_labels)
        losses = [x for x in (mlm_loss, nsp_loss) if x is not None]
        loss = sum(losses[1:], losses[0]) if losses else None
        return BertOutput(mlm_logits, nsp_logits, mlm_loss, nsp_loss, loss)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Returns the number of scalar parameters, counting the tied decoder weight once.

        Args:
            exclude_embeddings: Leave out the word, position and token-type embedding tables
                (the tied decoder weight included), i.e. count only what the paper makes sparse
                plus biases and LayerNorms.
        """
        # nn.Module.parameters() de-duplicates by identity, so the tied weight counts once.
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            embedding_modules = (
                m for m in self.embeddings.modules() if isinstance(m, nn.Embedding)
            )
            total -= sum(m.weight.numel() for m in embedding_modules)
        return total

    def _check_inputs(
        self, input_ids: Tensor, token_type_ids: Tensor | None, attention_mask: Tensor | None
    ) -> None:
        """Raises ``ValueError`` for inputs of the wrong rank or length (see :meth:`encode`)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
        t = input_ids.shape[1]
        if t > self.config.max_position:
            raise ValueError(f"sequence length {t} exceeds max_position {self.config.max_position}")
        for name, other in (("token_type_ids", token_type_ids), ("attention_mask", attention_mask)):
            if other is not None and other.shape != input_ids.shape:
                raise ValueError(
                    f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                    f"got {tuple(other.shape)}"
                )

    @staticmethod
    def _attention_bias(attention_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """Turns a ``[B, T]`` 0/1 padding mask into an additive ``[B, 1, 1, T]`` bias.

        An additive bias with a large *finite* negative value (rather than a boolean mask)
        keeps a row finite even if every key of a sequence were padding, where a boolean mask
        would produce NaN from a softmax over nothing.
        """
        if attention_mask is None:
            return None
        keep = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
        bias = torch.zeros(keep.shape, dtype=dtype, device=attention_mask.device)
        return bias.masked_fill(~keep, torch.finfo(dtype).min)


@torch.no_grad()
def _truncated_normal_(weight: Tensor, std: float) -> None:
    """Fills ``weight`` from N(0, std^2) truncated to ``[-2 std, 2 std]``, in place.

    Rejection sampling: draw normally, redraw the ~4.6% outside the interval until none is
    left. Same distribution as ``nn.init.trunc_normal_`` (inverse-CDF sampling) but an order
    of magnitude faster on CPU, which matters for the 23M-entry BERT-Base embedding.
    """
    weight.normal_(0.0, std)
    if weight.is_meta:  # No values to check; lets tests build BERT-Base on the meta device.
        return
    flat = weight.view(-1)  # Parameters are freshly allocated, hence contiguous.
    # One pass over the whole tensor; later rounds only touch the (shrinking) rejected set.
    redo = (flat.abs() > 2 * std).nonzero().squeeze(1)  # [n]
    while redo.numel() > 0:
        flat[redo] = torch.randn(redo.numel(), dtype=flat.dtype, device=flat.device) * std
        redo = redo[flat[redo].abs() > 2 * std]


def _masked_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the entries whose label is not ``IGNORE_INDEX``.

    Args:
        logits: ``[..., C]``.
        labels: Integer labels of shape ``logits.shape[:-1]``.

    Returns:
        A scalar. Summing then dividing by ``max(count, 1)`` makes a batch with no labelled
        entry give 0 (with a gradient graph) instead of the NaN that ``reduction="mean"`` gives.
    """
    c = logits.shape[-1]
    flat_labels = labels.reshape(-1).long()  # [N]
    total = F.cross_entropy(
        logits.reshape(-1, c).float(), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = (flat_labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count
