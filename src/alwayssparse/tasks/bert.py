"""BERT pre-training: masked language modelling + next sentence prediction (dynsparse-bert.md).

Sentence pairs are drawn on the fly from the training documents with whole-word masking; the
WordPiece vocabulary is trained locally on the same corpus with ``tokenizers`` (or loaded from
``tokenizer``). Evaluation reports MLM and NSP loss on held-out documents.

The MLM loss is a mean over the labelled tokens of the whole batch, and shards hold different
numbers of them; under several processes each rank therefore divides its *summed* losses by the
global counts (known, since every rank draws the whole batch), times the number of ranks, so
that DDP's average over ranks is exactly the global loss.
"""

from __future__ import annotations

import functools
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn
from torch.nn import functional as F

# The run config holds this task's section: imported as a module, read when a preset is built.
from alwayssparse import runconfig
from alwayssparse.data.bert import (
    IGNORE_INDEX,
    BertBatch,
    BertPretrainingData,
    eval_result,
    load_tokenizer,
    pretraining_sums,
    read_documents,
    train_wordpiece,
)
from alwayssparse.distributed import broadcast_object
from alwayssparse.models.bert import BERT_PRESETS, BertConfig, BertForPreTraining, bert_config
from alwayssparse.presets import register_preset
from alwayssparse.tasks.base import Task, register_task


def _tiny_bert() -> BertConfig:
    return bert_config("tiny", vocab_size=2000)


def _default_corpus_files(limit: int = 40) -> list[str]:
    """Text that exists on every machine: the first standard-library modules' sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [str(p) for p in sorted(root.glob("*.py"))[:limit]]


@dataclass
class BertTaskConfig:
    """BERT pre-training task.

    Attributes:
        model: Encoder size (``bert_config("tiny" | "mini" | "small" | "medium" | "base")``).
        files: Text files (documents separated by blank lines); empty: the first 40 Python
            standard-library sources, so a run works with no data at hand.
        tokenizer: A saved WordPiece tokenizer (JSON); empty: train one on ``files``.
        max_seq_len: Sequence length (the paper: 128).
        heldout_fraction: Share of documents held out for evaluation.
        eval_batches: Held-out batches per evaluation.
    """

    model: BertConfig = field(default_factory=_tiny_bert)
    files: list[str] = field(default_factory=list)
    tokenizer: str = ""
    max_seq_len: int = 128
    heldout_fraction: float = 0.05
    eval_batches: int = 8

    def validate(self) -> None:
        self.model.validate()
        for path in [*self.files, *([self.tokenizer] if self.tokenizer else [])]:
            if not Path(path).exists():
                raise ValueError(f"bert: {path} does not exist")
        if not 5 <= self.max_seq_len <= self.model.max_position:
            raise ValueError(f"bert.max_seq_len must be in [5, {self.model.max_position}]")


class BertShard(NamedTuple):
    """This rank's rows of a global batch, with the global counts the losses are divided by.

    Attributes:
        batch: The rows.
        mlm_tokens: Labelled MLM positions in the whole global batch.
        nsp_examples: Labelled NSP examples in the whole global batch.
    """

    batch: BertBatch
    mlm_tokens: int
    nsp_examples: int


def _summed_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy summed over the entries whose label is not ``IGNORE_INDEX``."""
    c = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, c).float(), labels.reshape(-1).long(),
                           ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip


@register_task
class BertTask(Task):
    """MLM + NSP loss; evaluation: held-out MLM and NSP loss."""

    name = "bert"
    config_class = BertTaskConfig
    unit = "sequences"
    metric = "mlm_loss"

    @classmethod
    def size_label(cls, section: Mapping[str, Any]) -> str:
        """``BERT-Mini`` for the sizes of Turc et al.'s family, else ``L3/H256``."""
        model = section.get("model", {})
        if "hidden_size" not in model or "num_layers" not in model:
            return "?"
        shape = (model["hidden_size"], model["num_layers"])
        names = [name for name, preset in BERT_PRESETS.items() if preset == shape]
        return f"BERT-{names[0].capitalize()}" if names else f"L{shape[1]}/H{shape[0]}"

    @classmethod
    def use_data(cls, section: BertTaskConfig, corpus: str, paths: list[str]) -> None:
        """``--text`` files (documents separated by blank lines) as ``bert.files``."""
        if corpus != "text":
            raise ValueError(
                f"task bert reads text files, not --{corpus}: give them with --text FILE... "
                "(or bert.files=[...])"
            )
        folders = [path for path in paths if Path(path).is_dir()]
        if folders:
            raise ValueError(f"task bert reads text files, not directories: {folders}")
        section.files = list(paths)

    def __init__(
        self,
        config: BertTaskConfig,
        batch_size: int,
        device: torch.device,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(config, batch_size, device, rank=rank, world_size=world_size)
        self._files = config.files or _default_corpus_files()
        if config.tokenizer:
            tokenizer = load_tokenizer(config.tokenizer)
        elif world_size == 1:
            tokenizer = train_wordpiece(self._files, vocab_size=config.model.vocab_size)
        else:
            # WordPiece training breaks ties between merges differently in every process: rank
            # 0 trains the vocabulary and every rank uses it.
            trained = None
            if rank == 0:
                trained = train_wordpiece(self._files, config.model.vocab_size).to_str()
            text = broadcast_object(trained)
            if text is None:
                raise RuntimeError(
                    f"rank {rank} of {world_size} receives rank 0's WordPiece vocabulary through "
                    "the process group, which is not initialized; or set bert.tokenizer"
                )
            tokenizer = Tokenizer.from_str(text)
        self._use_tokenizer(tokenizer)

    def _use_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Tokenize the documents with ``tokenizer``."""
        if tokenizer.get_vocab_size() > self.config.model.vocab_size:
            raise ValueError(
                f"bert.model.vocab_size ({self.config.model.vocab_size}) is smaller than the "
                f"tokenizer's vocabulary ({tokenizer.get_vocab_size()})"
            )
        self.tokenizer = tokenizer
        self.data = BertPretrainingData(read_documents(self._files), tokenizer,
                                        max_seq_len=self.config.max_seq_len,
                                        heldout_fraction=self.config.heldout_fraction)  # fmt: skip

    def describe_data(self) -> str:
        documents = len(self.data.train.document_starts) - 1
        return f"{documents} train documents (BERT sentence pairs)"

    def build_model(self) -> nn.Module:
        return BertForPreTraining(self.config.model)

    def train_batch(self, generator: torch.Generator) -> BertShard:
        full = self.data.batch(self.batch_size, generator)  # every rank makes the same draws
        rows = self.local_rows
        batch = BertBatch(full.input_ids[rows], full.token_type_ids[rows],
                          full.attention_mask[rows], full.mlm_labels[rows],
                          full.nsp_labels[rows])  # fmt: skip
        return BertShard(
            batch.to(self.device),
            mlm_tokens=int((full.mlm_labels != IGNORE_INDEX).sum()),
            nsp_examples=int((full.nsp_labels != IGNORE_INDEX).sum()),
        )

    def loss(self, model: nn.Module, batch: BertShard) -> Tensor:
        b = batch.batch
        out = model(b.input_ids, b.token_type_ids, b.attention_mask)
        # Sum over this shard / global count: the mean over ranks of (world x this) is the
        # global mean (dynsparse-bert.md: MLM loss per labelled token, NSP per example).
        mlm = _summed_cross_entropy(out.mlm_logits, b.mlm_labels) / max(batch.mlm_tokens, 1)
        nsp = _summed_cross_entropy(out.nsp_logits, b.nsp_labels) / max(batch.nsp_examples, 1)
        return (mlm + nsp) * self.world_size

    def units(self, batch: BertShard) -> int:
        return int(batch.batch.input_ids.shape[0])

    def evaluate(self, model: nn.Module, split: str, max_batches: int | None) -> dict[str, float]:
        # One held-out set; "valid" and "test" use different draws of pairs from it.
        seed = 0 if split == "valid" else 1
        count = max_batches or self.config.eval_batches
        batches = self.data.heldout_batches(self.batch_size, count, seed)
        mine = [b.to(self.device) for b in batches[self.rank :: self.world_size]]
        result = eval_result(self.reduce_sum(pretraining_sums(model, mine)))
        return {
            "mlm_loss": result.mlm_loss,
            "nsp_loss": result.nsp_loss,
            "mlm_accuracy": result.mlm_accuracy,
            "nsp_accuracy": result.nsp_accuracy,
        }

    def state_dict(self) -> dict[str, Any]:
        """The vocabulary, as the tokenizer's JSON text.

        A resumed run must number tokens as the saved model does, whatever it would train or
        load itself (another ``bert.tokenizer`` file, another ``tokenizers`` version). The
        data position is the state of the loop's batch generator (examples are drawn from it,
        nothing else moves) and evaluation batches come from fixed seeds, so nothing else is
        needed to continue identically.
        """
        return {"tokenizer": self.tokenizer.to_str()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: re-tokenize the corpus if the vocabulary differs.

        Raises:
            ValueError: If the saved tokenizer is not JSON text.
        """
        if "tokenizer" not in state:
            return  # a checkpoint from before the vocabulary was saved
        if not isinstance(state["tokenizer"], str):
            raise ValueError(
                "bert task state: 'tokenizer' must be the tokenizer's JSON text, got "
                f"{type(state['tokenizer']).__name__}"
            )
        tokenizer = Tokenizer.from_str(state["tokenizer"])
        if tokenizer.get_vocab() != self.tokenizer.get_vocab():
            self._use_tokenizer(tokenizer)


# -- presets ------------------------------------------------------------------------------------


def _bert(size: str, steps: int = 100_000) -> runconfig.RunConfig:
    """BERT pre-training with dynsparse-bert.md appendix A: Adam (0.9, 0.999, eps 1e-6), weight
    decay 0.01, linear warm-up over 10000 steps then linear decay, sequence length 128,
    DynSparse at sparsity 0.9 on all non-embedding weights."""
    config = runconfig.RunConfig(task="bert")
    config.bert.model = bert_config(size)
    lr = {"medium": 2e-4, "base": 1e-4}.get(size, 4e-4)
    config.optim = runconfig.OptimConfig(name="adamw", lr=lr, beta2=0.999, eps=1e-6,
                                         weight_decay=0.01, warmup_steps=10_000,
                                         schedule="linear", min_lr_ratio=0.0,
                                         sparsity_lr_scaling=True)  # fmt: skip
    config.train = runconfig.LoopConfig(steps=steps, batch_size=256, eval_interval=5000,
                                        checkpoint_interval=5000, final_eval_batches=0,
                                        flop_scope=["layers"])  # fmt: skip
    config.sparsity.method, config.sparsity.sparsity = "dynsparse", 0.9
    config.sparsity.dynsparse.init_std = 0.02
    return config


for _size in ("tiny", "mini", "small", "medium", "base"):
    register_preset(
        f"bert-{_size}",
        f"BERT-{_size.capitalize()} MLM+NSP pre-training, DynSparse s=0.9 (dynsparse-bert.md "
        "appendix A); needs --text FILE... or bert.files=[...]",
    )(functools.partial(_bert, _size))


@register_preset("bert-tiny-here")
def bert_tiny_here() -> runconfig.RunConfig:
    """BERT-Tiny shape (vocab 2000, seq 64) on standard-library text; seconds here."""
    config = _bert("tiny", steps=100)
    config.bert.model = bert_config("tiny", vocab_size=2000)
    config.bert.max_seq_len = 64
    config.optim.warmup_steps = 10
    config.train = runconfig.LoopConfig(steps=100, batch_size=16, eval_interval=50,
                                        eval_batches=4, final_eval_batches=8,
                                        checkpoint_interval=50, flop_scope=["layers"])  # fmt: skip
    return config
