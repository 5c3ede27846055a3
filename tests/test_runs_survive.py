"""Runs that survive anything: exact resume on every task, no silent loss, one line per failure."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import alwayssparse.train as train_module
from alwayssparse.cli import main
from alwayssparse.train import RunConfig, TrainingDiverged, preset, train
from test_tasks import _config


def _quiet(_: str) -> None:
    pass


def _text(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return corpus


def _tiny(tmp_path: Path, steps: int = 12) -> RunConfig:
    config = preset("tiny")
    config.lm.data.name, config.lm.data.paths = "text", [str(_text(tmp_path))]
    config.train.steps, config.train.checkpoint_interval = steps, 4
    config.train.eval_interval, config.train.log_interval = 4, 2
    return config


def _flat(state: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(state, dict):
        for key, value in state.items():
            yield from _flat(value, f"{prefix}.{key}")
    elif isinstance(state, list | tuple):
        for i, value in enumerate(state):
            yield from _flat(value, f"{prefix}[{i}]")
    else:
        yield prefix, state


def _assert_same_run(a: Path, b: Path) -> None:
    """summary.json (all but timings) and every entry of the final checkpoint are identical."""
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert {k: v for k, v in sa.items() if "seconds" not in k} == {
        k: v for k, v in sb.items() if "seconds" not in k
    }
    ca, cb = (dict(_flat(torch.load(d / "checkpoint.pt", weights_only=True))) for d in (a, b))
    assert ca.keys() == cb.keys()
    for key, x in ca.items():
        y = cb[key]
        if "seconds" in key:
            continue
        same = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        assert same, key
    ma, mb = ((d / "metrics.jsonl").read_text().splitlines() for d in (a, b))
    strip = [
        {k: v for k, v in json.loads(line).items() if "seconds" not in k and "per_second" not in k}
        for line in ma
    ]
    assert strip == [
        {k: v for k, v in json.loads(line).items() if "seconds" not in k and "per_second" not in k}
        for line in mb
    ]


class _Interrupt(Exception):
    pass


def _interrupted(config: RunConfig, run: Path, at: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train until step ``at`` (a checkpoint step) fails, as a kill would, then resume."""
    original = train_module._train_step

    def failing(run_: Any, model: Any, step: int, lr: float) -> Any:
        if step == at:
            raise _Interrupt
        return original(run_, model, step, lr)

    monkeypatch.setattr(train_module, "_train_step", failing)
    with pytest.raises(_Interrupt):
        train(config, run, progress=False, log=_quiet)
    monkeypatch.setattr(train_module, "_train_step", original)
    torch.manual_seed(1234)  # whatever the process did since: the checkpoint must restore it
    train(config, run, resume=True, progress=False, log=_quiet)


@pytest.mark.parametrize("family", ["lm", "xl", "bert", "image"])
def test_resume_is_exact_on_every_task(
    tmp_path: Path, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropout, XL memories, the BERT vocabulary, image batches: all in the checkpoint."""
    torch.set_num_threads(1)
    if family == "lm":
        config = _tiny(tmp_path)
        config.lm.model.dropout = 0.1
    else:
        config = _config(family, tmp_path)
        config.train.steps, config.train.checkpoint_interval = 12, 4
        config.train.eval_interval = 4
        if family == "bert":
            config.bert.model.dropout = 0.1
        if family == "xl":
            config.xl.model.dropout = 0.1
    train(config, tmp_path / "whole", progress=False, log=_quiet)
    _interrupted(config, tmp_path / "killed", at=6, monkeypatch=monkeypatch)
    _assert_same_run(tmp_path / "whole", tmp_path / "killed")


def test_a_directory_holding_a_run_is_never_overwritten(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # a run killed before its first checkpoint
    (run / "metrics.jsonl").write_text('{"kind": "final", "step": 3}\n')
    config = _tiny(tmp_path, steps=4)
    with pytest.raises(FileExistsError, match=r"already holds a run .*--overwrite"):
        train(config, run, progress=False, log=_quiet)
    assert (run / "metrics.jsonl").read_text() == '{"kind": "final", "step": 3}\n'
    with pytest.raises(FileNotFoundError, match="before its first checkpoint.*--overwrite"):
        train(config, run, resume=True, progress=False, log=_quiet)
    train(config, run, overwrite=True, progress=False, log=_quiet)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records].count("final") == 1


def test_a_run_failing_before_training_leaves_nothing(tmp_path: Path) -> None:
    config = _tiny(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    config.lm.data.paths = [str(tmp_path / "empty.txt")]  # fails while loading the data
    with pytest.raises(ValueError):
        train(config, tmp_path / "run", progress=False, log=_quiet)
    assert not (tmp_path / "run").exists()
    config = _tiny(tmp_path)
    config.sparsity.layout.dense_patterns = ["no.such.*"]
    with pytest.raises(ValueError, match="no.such"):
        train(config, tmp_path / "run", progress=False, log=_quiet)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["dense", "static", "rigl", "topkast"])
def test_divergence_stops_at_once_with_one_line(tmp_path: Path, method: str) -> None:
    config = _tiny(tmp_path, steps=40)
    config.sparsity.method = method
    config.optim.lr, config.optim.warmup_steps = 1e6, 0
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+: loss .* lower the learning"):
        train(config, run, progress=False, log=_quiet)
    assert not (run / "summary.json").exists()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(c)) for line in lines]
    assert records[-1]["kind"] == "diverged"  # strict JSON: a NaN loss is written as null
    if (run / "checkpoint.pt").exists():  # the last good one: finite weights
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        assert all(
            torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()
        )


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def _finished_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    train(_tiny(tmp_path, steps=4), run, progress=False, log=_quiet)
    return run


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "damaged"),
        ("random", "damaged"),
        ("partial", "lacks"),
        ("evil", "refused"),
        ("other-task", "does not fit this run's model"),
    ],
)
def test_bad_checkpoints_give_one_line(
    tmp_path: Path, damage: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _finished_run(tmp_path)
    path = run / "checkpoint.pt"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "random":
        path.write_bytes(os.urandom(4096))
    elif damage == "partial":
        torch.save({"format": 1, "step": 3}, path)
    elif damage == "evil":
        path.write_bytes(pickle.dumps(_Evil()))
    else:
        other = _config("image", tmp_path)
        other.train.steps = 1
        train(other, tmp_path / "other", progress=False, log=_quiet)
        path.write_bytes((tmp_path / "other" / "checkpoint.pt").read_bytes())
    code, err = _cli(["train", "--resume", str(run), "--no-progress"], capsys)
    assert code == 2
    lines = err.splitlines()
    assert lines[-1].startswith("alwayssparse: error: ") and message in lines[-1]
    assert "Traceback" not in err and "weights_only=False" not in err
    assert not Path("pwned").exists()


def test_unwritable_and_full_disk_give_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    corpus = _text(tmp_path)
    base = ["train", "--preset", "tiny", "--text", str(corpus), "--no-progress", "train.steps=4"]
    code, err = _cli([*base, "--out", str(blocker / "run")], capsys)
    assert code == 2 and err.startswith("alwayssparse: error: ") and "Traceback" not in err

    def full(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "[enforce fail at inline_container.cc:626] . basic_ios::clear: iostream error"
        )

    monkeypatch.setattr(torch, "save", full)
    code, err = _cli([*base, "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "disk full" in err and "Traceback" not in err
    assert not list((tmp_path / "run").glob("*.tmp")) and not list((tmp_path / "run").glob(".*"))


def test_kill_9_and_resume_gives_the_uninterrupted_run(tmp_path: Path) -> None:
    """The short version of benchmarks/stress_resume.py: SIGKILL right after the first
    checkpoint appears, then --resume."""
    corpus = _text(tmp_path)
    args = ["--preset", "tiny", "--text", str(corpus), "--no-progress", "train.steps=24",
            "train.checkpoint_interval=4", "train.eval_interval=8", "train.threads=1"]  # fmt: skip
    base = [sys.executable, "-m", "alwayssparse", "train"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([*base, *args, "--out", str(tmp_path / "whole")], check=True, env=env,
                   capture_output=True)  # fmt: skip
    run = tmp_path / "killed"
    process = subprocess.Popen([*base, *args, "--out", str(run)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    subprocess.run([*base, "--resume", str(run), "--no-progress"], check=True, env=env,
                   capture_output=True)  # fmt: skip
    _assert_same_run(tmp_path / "whole", run)
