"""Transformer-XL language modelling (topkast.md section 5, supplementary A).

Training walks the corpus in order with the segment-level recurrence memory of Dai et al.: the
stream is cut into ``batch_size`` parallel rows, consecutive windows of ``tgt_len`` tokens are
fed in order and each window attends to the cached hidden states (``mem_len``) of the previous
ones. Evaluation runs over a whole split with the (longer) evaluation memory ``eval_mem_len``.
Byte corpora report bits per character; WikiText-103 reports perplexity.

Under several processes the streams are sharded: the ``batch_size`` training streams are cut as
on one process and rank r trains rows ``[r b, (r + 1) b)``, keeping the memories of its own rows
(rows never interact), so the run equals the 1-process run; evaluation streams are split over
the ranks in the same way and the sums all-reduced.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

# The run config holds this task's section: imported as a module, read when a preset is built.
from alwayssparse import runconfig
from alwayssparse.data import ByteDataConfig, load_byte_corpus
from alwayssparse.data.wikitext import OrderedSegments, load_wikitext103, segment_nll_sums
from alwayssparse.models.transformer_xl import (
    TransformerXL,
    TransformerXLConfig,
    enwik8_large,
    enwik8_small,
    enwik8_tiny,
    wikitext103_large,
)
from alwayssparse.presets import register_preset
from alwayssparse.tasks.base import Task, register_task
from alwayssparse.tasks.lm import transformer_size


@dataclass
class XLConfig:
    """Transformer-XL task: the model, and either a byte corpus or WikiText-103.

    Attributes:
        model: Transformer-XL hyper-parameters (presets in ``models.transformer_xl``).
        data: Byte corpus (pystdlib, text, enwik8) when ``wikitext103`` is empty.
        wikitext103: Directory with ``wiki.{train,valid,test}.tokens``; word-level if given.
        eval_batch_size: Parallel rows during evaluation.
    """

    model: TransformerXLConfig = field(default_factory=enwik8_tiny)
    data: ByteDataConfig = field(default_factory=ByteDataConfig)
    wikitext103: str = ""
    eval_batch_size: int = 4

    def validate(self) -> None:
        self.model.validate()
        if not self.wikitext103:
            self.data.validate()
        if self.eval_batch_size < 1:
            raise ValueError(f"xl.eval_batch_size must be >= 1, got {self.eval_batch_size}")


@register_task
class TransformerXLTask(Task):
    """Ordered segments with recurrence memory; BPC for bytes, perplexity for words."""

    name = "xl"
    config_class = XLConfig
    unit = "tokens"

    @classmethod
    def size_label(cls, section: Mapping[str, Any]) -> str:
        """``L24/d512``: layers and width."""
        return transformer_size(section)

    @classmethod
    def use_data(cls, section: XLConfig, corpus: str, paths: list[str]) -> None:
        """``--text`` files or directories, or the ``--enwik8`` file, as the byte corpus."""
        section.data.name, section.data.paths = corpus, list(paths)

    def __init__(
        self,
        config: XLConfig,
        batch_size: int,
        device: torch.device,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(config, batch_size, device, rank=rank, world_size=world_size)
        if config.wikitext103:
            vocab, splits = load_wikitext103(config.wikitext103)
            if config.model.vocab_size != len(vocab):
                raise ValueError(
                    f"xl.model.vocab_size is {config.model.vocab_size} but the WikiText-103 "
                    f"vocabulary built from the train split has {len(vocab)} tokens"
                )
            self.splits: Any = splits
            self.words = True
        else:
            self.splits = load_byte_corpus(config.data)
            self.words = False
        self.metric = "ppl" if self.words else "bpc"  # type: ignore[misc]
        self._segments = OrderedSegments(self.splits.train, batch_size, config.model.tgt_len)
        self._position = 0
        self._iterator = iter(self._segments)
        self._mems: list[Tensor] | None = None

    def describe_data(self) -> str:
        return self.splits.describe()

    def build_model(self) -> nn.Module:
        return TransformerXL(self.config.model)

    def train_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        try:
            x, y = next(self._iterator)
        except StopIteration:  # a new epoch starts from the beginning, with empty memory
            self._iterator, self._position, self._mems = iter(self._segments), 0, None
            x, y = next(self._iterator)
        self._position += 1
        rows = self.local_rows  # this rank's streams; its memories hold the same rows
        return x[rows].long().to(self.device), y[rows].long().to(self.device)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        # Every shard has as many tokens: the mean over ranks of shard means is the global mean.
        x, y = batch
        nll, self._mems = model(x, y, self._mems)
        return nll.mean()

    def units(self, batch: tuple[Tensor, Tensor]) -> int:
        return batch[0].numel()

    def evaluate(self, model: nn.Module, split: str, max_batches: int | None) -> dict[str, float]:
        data = self.splits.valid if split == "valid" else self.splits.test
        if max_batches is not None:  # a prefix of the split, for quick checks during training
            limit = max_batches * self.config.eval_batch_size * self.config.model.tgt_len + 1
            data = data[:limit]
        nats, count = segment_nll_sums(model, data, self.config.eval_batch_size,
                                       self.config.model.tgt_len, self.config.model.eval_mem_len,
                                       device=self.device, rank=self.rank,
                                       world_size=self.world_size)  # fmt: skip
        total_nats, total = self.reduce_sum(torch.tensor([nats, count], dtype=torch.float64))
        nll = float(total_nats / total)
        if self.words:
            return {"ppl": math.exp(nll), "nll": nll}
        return {"bpc": nll / math.log(2), "nll": nll}

    def state_dict(self) -> dict[str, Any]:
        """The data position and the recurrence memories of this rank's rows (on the CPU, so
        that the checkpoint loads on any device): a run resumed without them would attend to
        an empty memory where the uninterrupted run had the previous segments."""
        rows = self.local_rows
        mems = None if self._mems is None else [m.detach().cpu().clone() for m in self._mems]
        return {"position": self._position, "mems": mems, "mem_rows": [rows.start, rows.stop]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; memories move to the task's device.

        Memories saved for other rows (another rank's checkpoint) are dropped with a warning,
        as are none at all in a checkpoint from before they were saved: training then continues
        from an empty memory.
        """
        position = int(state["position"])
        windows = max(1, len(self._segments))
        # position == windows: the epoch's last window was trained, the next batch starts the
        # next epoch (with empty memory), exactly as in the uninterrupted run.
        skip = position if position <= windows else position % windows
        self._iterator = iter(self._segments)
        for _ in range(skip):
            next(self._iterator, None)
        self._position = position
        self._mems = self._loaded_mems(state)

    def _loaded_mems(self, state: dict[str, Any]) -> list[Tensor] | None:
        """The memories of ``state`` on this task's device, or None if there are none to use."""
        rows = [self.local_rows.start, self.local_rows.stop]
        if "mems" not in state:
            reason = "the checkpoint predates saved memories"
        elif state["mems"] is None:
            return None  # saved before the first window of an epoch: empty, as it should be
        elif list(state.get("mem_rows", [])) != rows:
            reason = f"they were saved for rows {state.get('mem_rows')}, this rank trains {rows}"
        else:
            mems = state["mems"]
            if not isinstance(mems, list | tuple) or not all(isinstance(m, Tensor) for m in mems):
                raise ValueError("xl task state: mems must be a list of tensors or None")
            return [m.to(self.device) for m in mems]
        warnings.warn(
            f"xl task state: recurrence memories not restored ({reason}); the resumed run "
            "continues from an empty memory and differs slightly from an uninterrupted one",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


# -- presets ------------------------------------------------------------------------------------


def _xl(model_config: Any, steps: int, batch: int, data: str = "enwik8") -> runconfig.RunConfig:
    """Transformer-XL with the optimiser of topkast.md appendix A: Adam, warm-up over 4000 steps
    from 1e-7 to 2e-4, cosine decay, gradient clipping by global norm 0.25; Top-KAST (80%, 0%)."""
    config = runconfig.RunConfig(task="xl")
    config.xl.model = model_config
    if data == "enwik8":
        config.xl.data.name = "enwik8"
    config.optim = runconfig.OptimConfig(name="adam", lr=2e-4, beta2=0.999, warmup_steps=4000,
                                         warmup_initial_lr=1e-7, schedule="cosine",
                                         min_lr_ratio=0.0, grad_clip=0.25)  # fmt: skip
    config.train = runconfig.LoopConfig(steps=steps, batch_size=batch, eval_interval=4000,
                                        eval_batches=50, final_eval_batches=0,
                                        checkpoint_interval=4000)  # fmt: skip
    config.sparsity.method, config.sparsity.sparsity = "topkast", 0.8
    config.sparsity.topkast.backward_sparsity = 0.0
    return config


@register_preset("enwik8-xl-large")
def enwik8_xl_large() -> runconfig.RunConfig:
    """Transformer-XL 24L d1024 on enwik8 (Table 4, 277M); needs --enwik8 PATH."""
    return _xl(enwik8_large(), steps=400_000, batch=22)


@register_preset("enwik8-xl-small")
def enwik8_xl_small() -> runconfig.RunConfig:
    """Transformer-XL d512 on enwik8 (Table 5, 69M); needs --enwik8 PATH."""
    return _xl(enwik8_small(), steps=400_000, batch=22)


@register_preset("wikitext103-xl-large")
def wikitext103_xl_large() -> runconfig.RunConfig:
    """Transformer-XL 18L d1024 on WikiText-103 (Table 4, 285M); needs xl.wikitext103=DIR."""
    return _xl(wikitext103_large(), steps=200_000, batch=60, data="wikitext103")


@register_preset("xl-tiny")
def xl_tiny() -> runconfig.RunConfig:
    """A tiny Transformer-XL on the default corpus, Top-KAST (80%, 0%); ~1 min here."""
    config = _xl(enwik8_tiny(), steps=300, batch=8, data="pystdlib")
    config.xl.data.max_bytes = 1_000_000
    config.optim.warmup_steps, config.optim.lr = 30, 1e-3
    config.train.eval_interval, config.train.checkpoint_interval = 100, 100
    config.train.final_eval_batches = 50
    return config
