"""Task state for exact resumes: Transformer-XL memories, BERT vocabulary and data position."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from alwayssparse.data import ByteDataConfig
from alwayssparse.data.bert import train_wordpiece
from alwayssparse.models.bert import bert_config
from alwayssparse.models.transformer_xl import enwik8_tiny
from alwayssparse.tasks.bert import BertTask, BertTaskConfig
from alwayssparse.tasks.xl import TransformerXLTask, XLConfig

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _checkpointed(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` after a trip through ``torch.save`` / ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _text(path: Path, n_bytes: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = ["sparse", "dense", "mask", "grow", "prune", "weight", "layer", "memory", "the"]
    text = ""
    while len(text) < n_bytes:
        text += " ".join(rng.choice(words) for _ in range(12)) + ".\n"
    path.write_text(text[:n_bytes], encoding="utf-8")
    return path


# -------------------------------------------------------------------------- Transformer-XL


def _xl_task(corpus: Path, device: str, **kw: int) -> TransformerXLTask:
    config = XLConfig(model=enwik8_tiny(), data=ByteDataConfig(name="text", paths=[str(corpus)]))
    return TransformerXLTask(config, 4, torch.device(device), **kw)


@torch.no_grad()
def _next_loss(task: TransformerXLTask, model: nn.Module) -> float:
    return float(task.loss(model, task.train_batch(torch.Generator())))


@pytest.fixture(scope="module")
def xl_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 2,000 bytes: 1,800 train bytes, 4 streams of 450, 15 windows of 32 per epoch.
    return _text(tmp_path_factory.mktemp("xl") / "corpus.txt", 2000)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("steps", [3, 15])  # mid-epoch; the epoch's last window
def test_xl_resume_continues_with_the_same_memories(
    xl_corpus: Path, device: str, steps: int
) -> None:
    task = _xl_task(xl_corpus, device)
    torch.manual_seed(0)
    model = task.build_model().to(device).eval()
    assert len(task._segments) == 15
    for _ in range(steps):
        _next_loss(task, model)
    state = _checkpointed(task.state_dict())
    assert state["mems"] is not None and all(m.device.type == "cpu" for m in state["mems"])
    resumed = _xl_task(xl_corpus, device)
    resumed.load_state_dict(state)
    assert resumed._mems is not None and resumed._mems[0].device.type == device
    for _ in range(3):  # the memories keep matching over the following windows (and epoch)
        assert _next_loss(resumed, model) == _next_loss(task, model)


def test_xl_state_without_memories_resumes_empty(xl_corpus: Path) -> None:
    task = _xl_task(xl_corpus, "cpu")
    model = task.build_model().eval()
    state = _checkpointed(task.state_dict())  # nothing trained yet: no memories
    assert state["mems"] is None
    resumed = _xl_task(xl_corpus, "cpu")
    resumed.load_state_dict(state)
    assert _next_loss(resumed, model) == _next_loss(task, model)


def test_xl_memories_of_other_rows_are_dropped_with_a_warning(xl_corpus: Path) -> None:
    task = _xl_task(xl_corpus, "cpu")  # one process: rows [0, 4)
    model = task.build_model().eval()
    _next_loss(task, model)
    rank1 = _xl_task(xl_corpus, "cpu", rank=1, world_size=2)  # rows [2, 4)
    with pytest.warns(RuntimeWarning, match=r"rows \[0, 4\].*\[2, 4\]"):
        rank1.load_state_dict(task.state_dict())
    assert rank1._mems is None and rank1._position == 1
    old = {"position": 1}  # a checkpoint from before memories were saved
    with pytest.warns(RuntimeWarning, match="predates"):
        _xl_task(xl_corpus, "cpu").load_state_dict(old)


# -------------------------------------------------------------------------- BERT


@pytest.fixture(scope="module")
def bert_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(80)]
    docs = [
        " ".join(" ".join(rng.choice(words) for _ in range(8)) + "." for _ in range(5))
        for _ in range(20)
    ]
    path = tmp_path_factory.mktemp("bert") / "docs.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def _bert_config(corpus: Path, tokenizer: str = "") -> BertTaskConfig:
    return BertTaskConfig(
        model=bert_config("tiny", vocab_size=150),
        files=[str(corpus)],
        tokenizer=tokenizer,
        max_seq_len=32,
        heldout_fraction=0.2,
    )


def test_bert_resume_draws_the_same_batches(bert_corpus: Path, tmp_path: Path) -> None:
    task = BertTask(_bert_config(bert_corpus), 4, torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)  # the loop's batch generator
    for _ in range(3):
        task.train_batch(generator)
    state = _checkpointed({"task": task.state_dict(), "batches": generator.get_state()})
    # A resumed run whose own vocabulary differs (another tokenizer file) must use the saved one.
    other = tmp_path / "other.json"
    train_wordpiece([bert_corpus], vocab_size=100, path=other)
    resumed = BertTask(_bert_config(bert_corpus, str(other)), 4, torch.device("cpu"))
    assert resumed.tokenizer.get_vocab() != task.tokenizer.get_vocab()
    resumed.load_state_dict(state["task"])
    resumed_generator = torch.Generator()
    resumed_generator.set_state(state["batches"])
    for _ in range(2):
        expected = task.train_batch(generator).batch
        got = resumed.train_batch(resumed_generator).batch
        for name in ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "nsp_labels"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), name


def test_bert_state_must_hold_tokenizer_text(bert_corpus: Path) -> None:
    task = BertTask(_bert_config(bert_corpus), 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="bert task state: 'tokenizer'"):
        task.load_state_dict({"tokenizer": 3})
