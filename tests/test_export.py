"""Sparse export and inference: safetensors files (compressed CSR/BSR or dense), the inference
layer, ``alwayssparse export RUN_DIR OUT`` and ``alwayssparse.load``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import alwayssparse
from alwayssparse import Sparsity
from alwayssparse.cli import main
from alwayssparse.inference import (
    SparseInferenceLinear,
    compress,
    expand,
    read_header,
    save,
)


@pytest.mark.parametrize("block", [1, 4])
def test_compress_expand_round_trip(block: int) -> None:
    torch.manual_seed(0)
    dense = torch.randn(8, 16) * (torch.rand(8, 16) < 0.3)
    if block > 1:  # whole blocks zero or not
        keep = torch.rand(2, 4) < 0.5
        dense = torch.randn(8, 16) * keep.repeat_interleave(4, 0).repeat_interleave(4, 1)
    row_ptr, cols, values = compress(dense, block)
    assert cols.dtype == torch.int32 and row_ptr.dtype == torch.int64
    assert torch.equal(expand(row_ptr, cols, values, (8, 16)), dense)


@pytest.mark.parametrize(("block", "transposed"), [(1, False), (4, False), (1, True), (4, True)])
def test_inference_layer_matches_dense(block: int, transposed: bool) -> None:
    torch.manual_seed(0)
    weight = torch.randn(16, 8) * (torch.rand(16, 8) < 0.2)
    if block > 1:
        keep = torch.rand(4, 2) < 0.5
        weight = torch.randn(16, 8) * keep.repeat_interleave(4, 0).repeat_interleave(4, 1)
    bias = torch.randn(16)
    stored = weight.t() if transposed else weight  # a Conv1D stores (in, out)
    layer = SparseInferenceLinear.from_dense(stored, bias, block, transposed=transposed)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(layer(x), x @ weight.t() + bias)
    assert layer.weight.shape == stored.shape and torch.equal(layer.weight, stored)
    assert (layer.in_features, layer.out_features) == (8, 16)
    # Its state dict holds the plain layer's keys; loading a dense weight compresses it again.
    state = layer.state_dict()
    assert set(state) == {"weight", "bias"}
    other = SparseInferenceLinear.from_dense(torch.zeros_like(stored), bias, block, transposed)
    other.load_state_dict(state)
    torch.testing.assert_close(other(x), layer(x))


@pytest.mark.parametrize("storage", ["compressed", "dense"])
def test_save_and_load_a_model_under_sparsity(tmp_path: Path, storage: str) -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                          nn.Linear(16, 8))  # fmt: skip
    sp = Sparsity(model, method="static", sparsity=0.75, block_size=4)
    x = torch.randn(4, 16)
    expected = model(x).detach()
    header = save(model, tmp_path / "m.safetensors", sparsity=sp, storage=storage)
    assert header == read_header(tmp_path / "m.safetensors")
    entry = header["tensors"]["2.weight"]
    assert entry["layout"] == ("bsr" if storage == "compressed" else "dense")
    assert entry["nnz"] == int(sp.masks()["2.weight"][0].sum()) and entry["block"] == 4
    plain = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                          nn.Linear(16, 8))  # fmt: skip
    loaded = alwayssparse.load(tmp_path / "m.safetensors", model=plain)
    kind = SparseInferenceLinear if storage == "compressed" else nn.Linear
    assert all(isinstance(loaded[i], kind) for i in (0, 2, 4))
    torch.testing.assert_close(loaded(x), expected)
    with pytest.raises(ValueError, match="pass model="):
        alwayssparse.load(tmp_path / "m.safetensors")


def test_compressed_file_is_smaller(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    sp = Sparsity(model, method="static", sparsity=0.9, dense_first_last=False)
    save(model, tmp_path / "c.safetensors", sparsity=sp)
    save(model, tmp_path / "d.safetensors", sparsity=sp, storage="dense")
    compressed, dense = (
        (tmp_path / "c.safetensors").stat().st_size,
        (tmp_path / "d.safetensors").stat().st_size,
    )
    # 10% of the entries, each a float32 value and an int32 index: about 20% of the dense size.
    assert compressed < 0.25 * dense


def test_export_run_directory_and_load(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--text", str(corpus), "--out", str(run), "--steps",
            "4", "--no-progress", "train.report=false", "train.checkpoint_interval=0",
            "train.eval_interval=100", "sparsity.block_size=4"]  # fmt: skip
    assert main(args) == 0
    out = tmp_path / "model.safetensors"
    assert main(["export", str(run), str(out)]) == 0
    assert "sparse weights" in capsys.readouterr().out
    header = read_header(out)
    assert header["model"]["kind"] == "run" and header["storage"] == "compressed"
    assert {e["layout"] for e in header["tensors"].values()} == {"bsr"}
    model = alwayssparse.load(out)  # rebuilt from the header alone
    assert sum(isinstance(m, SparseInferenceLinear) for m in model.modules()) == 4

    # The reference: the run's checkpoint loaded into a model under Sparsity.
    from alwayssparse.config import from_dict
    from alwayssparse.inference import _run_model
    from alwayssparse.sparsity import SparsityConfig

    config = json.loads((run / "config.json").read_text())
    reference = _run_model(config)
    Sparsity(reference, from_dict(SparsityConfig, config["sparsity"]), total_steps=4)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    reference.load_state_dict(checkpoint["model"])
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.eval()(x))
    assert main(["export", str(tmp_path / "nothing"), str(out)]) == 2
