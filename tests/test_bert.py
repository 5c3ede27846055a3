"""Tests for BERT pre-training: alwayssparse.models.bert and alwayssparse.data.bert."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn

import alwayssparse
from alwayssparse.data.bert import (
    IGNORE_INDEX,
    BertPretrainingData,
    BertVocab,
    collate_pairs,
    evaluate_pretraining,
    load_tokenizer,
    read_documents,
    split_sentences,
    train_wordpiece,
    whole_word_mask,
)
from alwayssparse.layout import LayoutConfig, classify
from alwayssparse.models.bert import (
    BERT_PRESETS,
    BertConfig,
    BertForPreTraining,
    bert_config,
)

ENGLISH = """The quick brown fox jumps over the lazy dog. The dog sleeps in the warm sun.
A fox is a small animal that lives in the forest. Foxes hunt at night and sleep by day.

The river runs through the old town. Children play by the water in the summer.
The bridge over the river is made of stone. It was built a long time ago.

Music fills the streets in the evening. People sing and dance until the night ends.
The old man plays the violin. His daughter sings with him.
"""

# Syllables of made-up words: with a small vocabulary WordPiece splits most of them into a
# first piece plus "##" continuations, which the whole-word-masking tests need.
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "po", "si", "ve", "zu", "da", "fe"]


def _pseudo_corpus(path: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """Writes ``n_docs`` documents of made-up multi-syllable words, blank-line separated."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(3, 9)):
            sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 16)))
            sentences.append(sentence.capitalize() + rng.choice([".", "!", "?"]))
        # Wrap a document over several lines to exercise the line joining.
        text = " ".join(sentences)
        docs.append("\n".join(text[i : i + 70] for i in range(0, len(text), 70)))
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pseudo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Tokenizer]:
    """A synthetic corpus and a small WordPiece tokenizer trained on it."""
    root = tmp_path_factory.mktemp("bert")
    corpus = _pseudo_corpus(root / "corpus.txt")
    return corpus, train_wordpiece([corpus], vocab_size=120, path=root / "wp.json")


@pytest.fixture(scope="module")
def data(pseudo: tuple[Path, Tokenizer]) -> BertPretrainingData:
    corpus, tokenizer = pseudo
    return BertPretrainingData.from_files([corpus], tokenizer, heldout_fraction=0.1)


# --------------------------------------------------------------------------------------------
# Tokenizer and corpus reading
# --------------------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_save_load(tmp_path: Path) -> None:
    corpus = tmp_path / "english.txt"
    corpus.write_text(ENGLISH, encoding="utf-8")
    path = tmp_path / "tok" / "wordpiece.json"
    tokenizer = train_wordpiece([corpus], vocab_size=200, path=path)
    for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]):
        assert tokenizer.token_to_id(token) == i
    text = "The Old Fox sleeps by the river in the evening."
    enc = tokenizer.encode(text)
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    assert "[UNK]" not in enc.tokens
    assert tokenizer.decode(enc.ids) == text.lower()  # uncased: normalised = lowercased
    loaded = load_tokenizer(path)
    assert loaded.encode(text).ids == enc.ids
    pair = ("The dog sleeps.", "Children sing!")
    assert loaded.encode(*pair).ids == tokenizer.encode(*pair).ids
    assert loaded.encode(*pair).type_ids == tokenizer.encode(*pair).type_ids


_TRAIN_IN_SUBPROCESS = """
import sys
from alwayssparse.data.bert import train_wordpiece
tokenizer = train_wordpiece([sys.argv[1]], vocab_size=int(sys.argv[2]))
sys.stdout.write(tokenizer.to_str())
"""


def _letters_corpus(path: Path, seed: int = 0) -> Path:
    """Made-up words over 26 letters: many continuation pieces and many tied merge counts."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(400)]
    docs = [" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(30)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def _train_in_fresh_processes(corpus: Path, vocab_size: int, runs: int) -> list[str]:
    """``train_wordpiece`` in ``runs`` separate interpreters (fresh hash seeds), in parallel."""
    src = str(Path(alwayssparse.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-c", _TRAIN_IN_SUBPROCESS, str(corpus), str(vocab_size)]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(runs)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    return [out for out, _ in outputs]


def test_wordpiece_vocabulary_is_the_same_in_every_process(tmp_path: Path) -> None:
    corpus = _letters_corpus(tmp_path / "letters.txt")
    texts = _train_in_fresh_processes(corpus, vocab_size=300, runs=3)
    vocabs = [json.loads(t)["model"]["vocab"] for t in texts]
    assert len(vocabs[0]) == 300
    for other in vocabs[1:]:
        differ = sorted(
            k for k in vocabs[0].keys() | other.keys() if vocabs[0].get(k) != other.get(k)
        )
        assert not differ, f"{len(differ)} tokens differ between processes, e.g. {differ[:5]}"
    assert texts[1:] == texts[:-1]  # the whole tokenizer JSON, not just the vocabulary
    in_process = train_wordpiece([corpus], vocab_size=300).to_str()
    assert json.loads(in_process) == json.loads(texts[0])


def test_wordpiece_keeps_only_the_bert_special_tokens(tmp_path: Path) -> None:
    tokenizer = train_wordpiece([_letters_corpus(tmp_path / "letters.txt")], vocab_size=300)
    added = json.loads(tokenizer.to_str())["added_tokens"]
    assert [t["content"] for t in added] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert all(t["special"] for t in added)
    # "##a" in the text is punctuation plus a letter, not the continuation piece "##a".
    assert tokenizer.encode("x ##a", add_special_tokens=False).tokens[-1] == "a"


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_wordpiece([tmp_path / "missing.txt"], vocab_size=100)
    with pytest.raises(ValueError, match="no corpus files"):
        train_wordpiece([], vocab_size=100)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")


def test_split_sentences_and_read_documents(tmp_path: Path) -> None:
    assert split_sentences('He said "Stop." Then left! Why? ok') == [
        'He said "Stop."',
        "Then left!",
        "Why?",
        "ok",
    ]
    path = tmp_path / "docs.txt"
    path.write_text("One. Two\ncontinues.\n\n  \n\nThree! Four?\n\n\n", encoding="utf-8")
    assert read_documents([path]) == [["One.", "Two continues."], ["Three!", "Four?"]]


# --------------------------------------------------------------------------------------------
# Whole word masking
# --------------------------------------------------------------------------------------------


def _words(ids: list[int], tokenizer: Tokenizer, specials: set[int]) -> list[list[int]]:
    """Positions of each word (a piece plus its '##' continuations), computed independently."""
    words: list[list[int]] = []
    for pos, i in enumerate(ids):
        if i in specials:
            continue
        is_continuation = str(tokenizer.id_to_token(i)).startswith("##")
        if is_continuation and words and words[-1][-1] == pos - 1:
            words[-1].append(pos)
        else:
            words.append([pos])
    return words


def test_whole_word_masking_statistics(
    data: BertPretrainingData, pseudo: tuple[Path, Tokenizer]
) -> None:
    _, tokenizer = pseudo
    vocab = data.vocab
    gen = torch.Generator().manual_seed(0)
    pairs = data.sample_pairs(400, gen)
    ids, _, _ = collate_pairs(pairs, vocab)
    masked, labels = whole_word_mask(ids, vocab, gen)
    specials = set(vocab.is_special.nonzero().flatten().tolist())

    chosen_words = total_words = multi_piece = 0
    for row in range(ids.shape[0]):
        words = _words(ids[row].tolist(), tokenizer, specials)
        chosen = [bool(labels[row, w[0]] != IGNORE_INDEX) for w in words]
        for word, c in zip(words, chosen, strict=True):
            multi_piece += len(word) > 1
            # All pieces of a word are chosen together or not at all.
            assert all(bool(labels[row, p] != IGNORE_INDEX) == c for p in word)
        # Exactly max(1, round(15% of the words)) words per sequence.
        assert sum(chosen) == max(1, round(0.15 * len(words)))
        chosen_words += sum(chosen)
        total_words += len(words)
    assert multi_piece > 1000  # the corpus really exercises whole-word grouping
    assert abs(chosen_words / total_words - 0.15) < 0.01

    is_special = vocab.is_special[ids]
    assert (labels[is_special] == IGNORE_INDEX).all()  # specials never predicted
    assert torch.equal(masked[is_special], ids[is_special])  # ... nor corrupted
    assert torch.equal(masked[labels == IGNORE_INDEX], ids[labels == IGNORE_INDEX])
    picked = labels != IGNORE_INDEX
    assert torch.equal(labels[picked], ids[picked])
    n = int(picked.sum())
    frac_mask = float((masked[picked] == vocab.mask_id).float().mean())
    frac_same = float((masked[picked] == ids[picked]).float().mean())
    frac_random = 1.0 - frac_mask - frac_same
    assert n > 3000
    assert abs(frac_mask - 0.8) < 0.03
    # A random replacement can draw the original token (1 / #non-special tokens).
    assert abs(frac_same - 0.1) < 0.03 and abs(frac_random - 0.1) < 0.03
    replaced = picked & (masked != vocab.mask_id)
    assert not vocab.is_special[masked[replaced]].any()


# --------------------------------------------------------------------------------------------
# Sentence pairs for NSP
# --------------------------------------------------------------------------------------------


def _contains(haystack: Tensor, needle: Tensor) -> bool:
    """Whether ``needle`` occurs as a contiguous run in ``haystack``."""
    hay, nee = haystack.tolist(), needle.tolist()
    return any(hay[i : i + len(nee)] == nee for i in range(len(hay) - len(nee) + 1))


def test_nsp_pairs(data: BertPretrainingData) -> None:
    gen = torch.Generator().manual_seed(1)
    docs = data.train
    pairs = data.sample_pairs(1000, gen)
    assert abs(sum(p.is_random for p in pairs) / len(pairs) - 0.5) < 0.05
    for p in pairs:
        assert len(p.a) > 0 and len(p.b) > 0 and len(p.a) + len(p.b) <= 128 - 3
        assert p.nsp_label == int(p.is_random)
        doc_a = docs.run(docs.document_starts[p.doc_a], docs.document_starts[p.doc_a + 1])
        doc_b = docs.run(docs.document_starts[p.doc_b], docs.document_starts[p.doc_b + 1])
        assert _contains(doc_a, p.a) and _contains(doc_b, p.b)
        assert (p.doc_a != p.doc_b) == p.is_random  # random B never from A's document
        if not p.is_random and len(p.a) + len(p.b) < 125:  # untruncated: B follows A
            assert _contains(doc_a, torch.cat([p.a, p.b]))


def test_batch_layout(data: BertPretrainingData) -> None:
    vocab = data.vocab
    batch = data.batch(64, torch.Generator().manual_seed(2), pad_to_max=True)
    assert batch.input_ids.shape == (64, 128)
    assert batch.nsp_labels.shape == (64,)
    # Undo the masking to check the structure on the original ids.
    ids = torch.where(batch.mlm_labels != IGNORE_INDEX, batch.mlm_labels, batch.input_ids)
    for row in range(64):
        n = int(batch.attention_mask[row].sum())
        assert batch.attention_mask[row, :n].all() and not batch.attention_mask[row, n:].any()
        assert (ids[row, n:] == vocab.pad_id).all()
        seps = (ids[row, :n] == vocab.sep_id).nonzero().flatten().tolist()
        assert ids[row, 0] == vocab.cls_id and len(seps) == 2 and seps[1] == n - 1
        types = batch.token_type_ids[row]
        assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1 : n] == 1).all()
        assert (types[n:] == 0).all()


def test_batches_are_reproducible_and_splits_disjoint(data: BertPretrainingData) -> None:
    a = data.batch(8, torch.Generator().manual_seed(3))
    b = data.batch(8, torch.Generator().manual_seed(3))
    for name, x in a.as_kwargs().items():
        assert torch.equal(x, b.as_kwargs()[name]), name
    assert data.heldout is not None
    assert data.train.num_documents + data.heldout.num_documents == 40
    assert data.heldout.num_documents == 4
    h1, h2 = data.heldout_batches(8, 2, seed=5), data.heldout_batches(8, 2, seed=5)
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(h1, h2, strict=True))


def test_corpus_errors(tmp_path: Path, pseudo: tuple[Path, Tokenizer]) -> None:
    _, tokenizer = pseudo
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        BertPretrainingData.from_files([empty], tokenizer)
    single = tmp_path / "single.txt"
    single.write_text("Kalo mine. Ruta posi.\nVezu dafe kalo.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="single document"):
        BertPretrainingData.from_files([single], tokenizer, heldout_fraction=0.0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BertPretrainingData.from_files([tmp_path / "nope.txt"], tokenizer)
    with pytest.raises(ValueError, match="too few"):
        BertPretrainingData([["Ka lo."], ["Mi ne."], ["Ru ta."]], tokenizer, heldout_fraction=0.5)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def _tiny(vocab_size: int = 50, **overrides: object) -> BertForPreTraining:
    torch.manual_seed(0)
    return BertForPreTraining(bert_config("tiny", vocab_size=vocab_size, **overrides))


def test_model_shapes_and_tied_decoder() -> None:
    model = _tiny()
    ids = torch.randint(0, 50, (3, 17))
    out = model(ids, torch.zeros_like(ids), torch.ones_like(ids))
    assert out.mlm_logits.shape == (3, 17, 50) and out.nsp_logits.shape == (3, 2)
    assert out.loss is None and out.mlm_loss is None and out.nsp_loss is None
    assert model.mlm_head.decoder.weight is model.embeddings.word_embeddings.weight
    assert model.mlm_head.decoder.bias is not None
    names = [n for n, _ in model.named_parameters()]
    assert "mlm_head.decoder.weight" not in names  # the tied weight is one parameter


def test_projections_are_linear_and_embeddings_dense() -> None:
    model = _tiny()
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    per_layer = {"attention.query", "attention.key", "attention.value", "attention.output"}
    per_layer |= {"ffn.inner", "ffn.out"}
    expected = {f"layers.{i}.{p}" for i in range(2) for p in per_layer}
    expected |= {"pooler.dense", "mlm_head.transform", "mlm_head.decoder", "nsp_head"}
    assert linears == expected
    infos = {i.name: i for i in classify(model, LayoutConfig())}
    sparse = {n for n, i in infos.items() if i.sparse}
    assert sparse == {f"{n}.weight" for n in expected - {"mlm_head.decoder"}}
    assert not infos["embeddings.word_embeddings.weight"].sparse


def test_preset_parameter_counts() -> None:
    expected = {
        "tiny": 4_433_468,
        "mini": 11_267_900,
        "small": 29_058_876,
        "medium": 41_668_412,
        "base": 110_106_428,  # BERT-Base, "110M" in Devlin et al. (2018)
    }
    assert set(BERT_PRESETS) == set(expected)
    for name, count in expected.items():
        config = bert_config(name)
        assert config.num_heads * 64 == config.hidden_size
        assert config.intermediate_size == 4 * config.hidden_size
        with torch.device("meta"):  # no memory, no initialisation cost
            assert BertForPreTraining(config).num_parameters() == count, name
    assert bert_config("BERT-Tiny", vocab_size=1000).vocab_size == 1000
    with pytest.raises(ValueError, match="unknown BERT preset"):
        bert_config("huge")


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(
            vocab_size=10, hidden_size=30, num_layers=1, num_heads=4, intermediate_size=8
        ).validate()
    with pytest.raises(ValueError, match="num_layers"):
        BertForPreTraining(bert_config("tiny", vocab_size=10, num_layers=0))
    with pytest.raises(ValueError, match="dropout"):
        bert_config("tiny", dropout=1.0)


def test_initialisation() -> None:
    model = _tiny(vocab_size=5000)
    for name, p in model.named_parameters():
        if name.endswith("bias") and "layer_norm" not in name:
            assert (p == 0).all(), name
        elif "layer_norm" in name:
            assert (p == (1 if name.endswith("weight") else 0)).all(), name
        else:
            assert p.abs().max() <= 0.04, name  # truncated at two standard deviations
    w = model.embeddings.word_embeddings.weight
    assert abs(float(w.detach().std()) - 0.02 * 0.8796) < 5e-4  # std of N(0,1) truncated at +-2


def test_mlm_ignore_index_and_padding() -> None:
    model = _tiny().eval()
    ids = torch.randint(5, 50, (2, 12))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3], labels[1, 7] = 11, 22
    out = model(ids, mlm_labels=labels, nsp_labels=torch.tensor([0, IGNORE_INDEX]))
    expected = F.cross_entropy(out.mlm_logits[[0, 1], [3, 7]], torch.tensor([11, 22]))
    assert out.mlm_loss is not None and out.nsp_loss is not None and out.loss is not None
    torch.testing.assert_close(out.mlm_loss, expected)
    torch.testing.assert_close(out.nsp_loss, F.cross_entropy(out.nsp_logits[:1], torch.tensor([0])))
    torch.testing.assert_close(out.loss, out.mlm_loss + out.nsp_loss)
    none = model(ids, mlm_labels=torch.full_like(ids, IGNORE_INDEX))
    assert none.mlm_loss is not None and float(none.mlm_loss.detach()) == 0.0  # not NaN
    # Padding keys are masked out: appending padding does not change real positions.
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(2, 5, dtype=torch.long)], dim=1)
    out_padded = model(padded, attention_mask=mask)
    torch.testing.assert_close(out_padded.mlm_logits[:, :12], out.mlm_logits)
    torch.testing.assert_close(out_padded.nsp_logits, out.nsp_logits)


def test_adamw_steps_lower_the_loss(pseudo: tuple[Path, Tokenizer]) -> None:
    corpus, tokenizer = pseudo
    # Shorter sequences than the paper's 128 keep this CPU test fast.
    data = BertPretrainingData.from_files([corpus], tokenizer, max_seq_len=64)
    torch.manual_seed(0)
    model = BertForPreTraining(bert_config("tiny", vocab_size=data.vocab.size))
    # Optimiser of dynsparse-bert.md appendix A / Devlin et al. (2018): Adam(W), decay 0.01.
    opt = torch.optim.AdamW(
        model.parameters(), lr=2e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01
    )
    heldout = data.heldout_batches(16, 2, seed=0)
    before = evaluate_pretraining(model, heldout)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(20):
        out = model(**data.batch(12, gen).as_kwargs())
        assert out.loss is not None
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    after = evaluate_pretraining(model, heldout)
    assert model.training  # evaluation restores the mode
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2
    assert after.mlm_loss < before.mlm_loss - 0.3
    assert 0.0 <= after.nsp_accuracy <= 1.0 and 0.0 <= after.mlm_accuracy <= 1.0


def test_vocab_tables(pseudo: tuple[Path, Tokenizer]) -> None:
    _, tokenizer = pseudo
    vocab = BertVocab.from_tokenizer(tokenizer)
    assert vocab.size == tokenizer.get_vocab_size()
    assert int(vocab.is_special.sum()) == 5 and vocab.mask_id == 4
    assert len(vocab.random_ids) == vocab.size - 5
    some = [i for t, i in tokenizer.get_vocab().items() if t.startswith("##")]
    assert some and vocab.is_continuation[some].all()
