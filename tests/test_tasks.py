"""Every model family trains through the same loop, dense or sparse (issue 5's smoke tests)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from alwayssparse.cli import main
from alwayssparse.config import apply_overrides
from alwayssparse.rundir import model_size
from alwayssparse.tasks import TASKS
from alwayssparse.train import PRESETS, RunConfig, load_run_config, preset, train

SENTENCES = [
    "The cat sat on the mat.", "A dog ran in the park!", "Birds sing in the morning.",
    "The sun is bright today.", "We read books at night?", "Rain falls on the roof.",
]  # fmt: skip


def _quiet(_: str) -> None:
    pass


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    docs = []
    for d in range(30):
        docs.append(" ".join(SENTENCES[(d + i) % len(SENTENCES)] for i in range(8)))
    path.write_text("\n\n".join(docs) + "\n")
    return path


def _idx(path: Path, array: torch.Tensor) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.dim()) + struct.pack(
        f">{array.dim()}I", *array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.to(torch.uint8).numpy().tobytes())


def _images(tmp_path: Path) -> Path:
    """A learnable 10-class problem in Fashion-MNIST's IDX format: class c lights row band c."""
    root = tmp_path / "idx"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 400), ("t10k", 100)):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = torch.randint(0, 60, (n, 28, 28), generator=g)
        for i, c in enumerate(labels.tolist()):
            images[i, 2 * c : 2 * c + 4] += 180
        _idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def _config(family: str, tmp_path: Path) -> RunConfig:
    if family == "xl":
        config = preset("xl-tiny")
        config.xl.data.name, config.xl.data.paths = "text", [str(_corpus(tmp_path))]
        config.optim.warmup_steps = 5
    elif family == "bert":
        config = preset("bert-tiny-here")
        config.bert.files = [str(_corpus(tmp_path))]
        config.bert.model.vocab_size = 200
        config.bert.heldout_fraction = 0.2
    else:
        config = preset("resnet20-fashion-mnist")
        config.image.path = str(_images(tmp_path))
        config.image.model.width = 8
        config.optim.warmup_steps = 5
    config.train.steps, config.train.batch_size = 40, 16
    config.train.eval_interval = config.train.checkpoint_interval = 40
    config.train.eval_batches = config.train.final_eval_batches = 2
    return config


@pytest.mark.parametrize("method", ["topkast", "dynsparse"])
@pytest.mark.parametrize("family", ["xl", "bert", "image"])
def test_each_family_trains_sparse(tmp_path: Path, family: str, method: str) -> None:
    torch.set_num_threads(1)  # tiny models: threads only add contention
    config = _config(family, tmp_path)
    config.sparsity.method = method
    config.sparsity.topkast.backward_sparsity = 0.5
    config.sparsity.dynsparse.num_updates = 4
    summary = train(config, tmp_path / "run", progress=False, log=_quiet)
    losses = _losses(tmp_path / "run")
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    assert summary["forward_density"] == pytest.approx(1 - config.sparsity.sparsity, abs=0.01)
    assert summary["task"] == family and f"test_{summary['metric']}" in summary


def test_paper_presets_resolve() -> None:
    for name in PRESETS:
        config = preset(name)
        assert config.task in ("lm", "xl", "bert", "image"), name
        config.task_config().model.validate()
    large = preset("enwik8-xl-large")
    assert (large.optim.lr, large.optim.warmup_steps, large.optim.grad_clip) == (2e-4, 4000, 0.25)
    assert large.optim.warmup_initial_lr == 1e-7
    bert = preset("bert-base")
    assert (bert.optim.eps, bert.optim.weight_decay, bert.optim.schedule) == (1e-6, 0.01, "linear")
    assert bert.bert.max_seq_len == 128 and bert.sparsity.dynsparse.init_std == 0.02
    resnet = preset("resnet50-imagenet")
    assert resnet.optim.weight_decay == 1e-4 and resnet.sparsity.layout.dense_first_last


# -- a new task is one file ----------------------------------------------------------------------


@pytest.fixture
def toy_task(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """Load tests/toy_task.py (registering its task and preset); restore the registries after."""
    tasks, presets = dict(TASKS), dict(PRESETS)
    spec = importlib.util.spec_from_file_location(
        "toy_task", Path(__file__).with_name("toy_task.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "toy_task", module)  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        TASKS.clear(), TASKS.update(tasks)
        PRESETS.clear(), PRESETS.update(presets)


def test_a_new_task_is_one_file(
    toy_task: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its section is in every run config, with its defaults; dotted overrides reach it.
    config = preset("toy")
    assert config.task == "toy" and config.toy == toy_task.ToyConfig()
    apply_overrides(config, ["toy.width=8", "train.steps=10"])
    summary = train(config, tmp_path / "run", progress=False, log=_quiet)
    assert summary["task"] == "toy" and summary["steps"] == 10 and "test_mse" in summary
    assert len(_losses(tmp_path / "run")) == 2  # log_interval 5
    assert summary["forward_density"] == pytest.approx(0.5, abs=0.01)
    saved = load_run_config(tmp_path / "run")
    assert saved.toy.width == 8 and saved == config
    assert model_size(json.loads((tmp_path / "run" / "config.json").read_text())) == "w8"
    # The command line: the preset, its description, a dotted override of the section.
    assert main(["presets"]) == 0 and "toy " in capsys.readouterr().out
    code = main(["train", "--preset", "toy", "toy.width=4", "train.steps=4", "--no-progress",
                 "--out", str(tmp_path / "cli")])  # fmt: skip
    assert code == 0 and load_run_config(tmp_path / "cli").toy.width == 4
    assert main(["train", "--preset", "toy", "toy.width=0", "--out", str(tmp_path / "x")]) == 2
    assert "toy.width" in capsys.readouterr().err
