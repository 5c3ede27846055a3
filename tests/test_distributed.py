"""Multi-process training (issue 7): torchrun + DDP on gloo, 2 processes on CPU.

One torchrun job (this file run as a script, see ``_worker``) trains every method for a few
steps on 2 processes while recording each rank's masks after every step; the tests compare the
ranks with each other (bit-identical) and with the same runs on 1 process (masks exactly, losses
to float tolerance), check that only rank 0 wrote, and resume checkpoints across process counts.
Separate launches run the ``alwayssparse train`` command under torchrun and stop a rank to see
the job fail within its timeout instead of hanging.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import alwayssparse.train as train_module
from alwayssparse import distributed
from alwayssparse.config import from_dict, to_dict
from alwayssparse.data.bert import train_wordpiece
from alwayssparse.sparsity import Sparsity
from alwayssparse.tasks import BertTask, ByteLMTask, ImageTask, TransformerXLTask
from alwayssparse.train import RunConfig, load_run_config, preset, train

WORLD = 2
SRC = Path(__file__).resolve().parents[1] / "src"
TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen jugs. " * 300
SENTENCES = [
    "The cat sat on the mat.", "A dog ran in the park!", "Birds sing in the morning.",
    "The sun is bright today.", "We read books at night?", "Rain falls on the roof.",
]  # fmt: skip


# -- configurations ----------------------------------------------------------------------------


def _lm(corpus: Path, method: str, steps: int = 12) -> RunConfig:
    """The tiny byte LM, short enough that every method updates its masks several times."""
    config = preset("tiny")
    config.lm.data.name, config.lm.data.paths = "text", [str(corpus)]
    config.train.steps, config.train.batch_size = steps, 8
    config.train.log_interval, config.train.eval_interval = 1, 6
    config.train.eval_batches = config.train.final_eval_batches = 2
    config.train.checkpoint_interval = 6
    config.train.threads, config.train.dist_check_interval = 1, 1
    config.optim.warmup_steps = 2
    config.sparsity.method = method
    config.train.report = False  # plots take longer than the run; one case keeps them
    for name in ("set", "rigl", "dynsparse"):
        options = getattr(config.sparsity, name)
        options.update_interval, options.stop_fraction = 2, 1.0
    config.sparsity.gmp.update_interval, config.sparsity.gmp.stop_step = 2, 10
    return config


def _topkast_random(config: RunConfig) -> None:
    config.sparsity.topkast.random_exploration = True  # B\A from the shared generator


def _blocks(config: RunConfig) -> None:
    config.sparsity.block_size = 4


def _sparse_backend(config: RunConfig) -> None:
    config.sparsity.backend = "sparse"


# name -> (method, extra setup); every method on the masked backend, Top-KAST also sparse.
CASES: dict[str, tuple[str, Callable[[RunConfig], None] | None]] = {
    "dense": ("dense", None),
    "static": ("static", None),
    "topkast": ("topkast", None),
    "topkast-random": ("topkast", _topkast_random),
    "set": ("set", None),
    "rigl": ("rigl", None),
    "dynsparse-4x4": ("dynsparse", _blocks),
    "gmp": ("gmp", None),
    "topkast-sparse": ("topkast", _sparse_backend),
}


def _case_config(corpus: Path, name: str) -> RunConfig:
    method, setup = CASES[name]
    config = _lm(corpus, method)
    config.train.report = name == "topkast"  # rank 1 must not write it either
    if setup is not None:
        setup(config)
    return config


def _resume_config(corpus: Path, steps: int) -> RunConfig:
    """Top-KAST with random exploration and a constant rate: a run of n steps is the start of
    a run of more steps, so a resumed run can be compared with an uninterrupted one."""
    config = _lm(corpus, "topkast", steps=steps)
    _topkast_random(config)
    config.optim.schedule = "constant"
    config.train.checkpoint_interval = steps
    return config


def _xl(corpus: Path) -> RunConfig:
    config = preset("xl-tiny")
    config.xl.data.name, config.xl.data.paths = "text", [str(corpus)]
    config.xl.eval_batch_size = 3  # not a multiple of 2: ranks evaluate 1 and 2 streams
    config.optim.warmup_steps = 2
    config.train.steps, config.train.batch_size = 6, 4
    config.train.log_interval, config.train.eval_interval = 1, 3
    config.train.checkpoint_interval = 3
    config.train.eval_batches = config.train.final_eval_batches = 2
    config.train.threads, config.train.dist_check_interval = 1, 1
    config.train.report = False
    return config


def _bert(documents: Path) -> RunConfig:
    """Tiny BERT with a vocabulary saved once, which the 1-process reference reads too."""
    tokenizer = documents.with_suffix(".tokenizer.json")
    if not tokenizer.exists():
        train_wordpiece([documents], vocab_size=200, path=tokenizer)
    config = preset("bert-tiny-here")
    config.bert.files, config.bert.tokenizer = [str(documents)], str(tokenizer)
    config.bert.model.vocab_size = 200
    # Each rank draws its own dropout noise: only a run without dropout equals 1 process.
    config.bert.model.dropout = config.bert.model.attention_dropout = 0.0
    config.bert.heldout_fraction = 0.2
    config.optim.warmup_steps = 2
    config.sparsity.dynsparse.num_updates = 3
    config.train.steps, config.train.batch_size = 6, 8
    config.train.log_interval, config.train.eval_interval = 1, 3
    config.train.checkpoint_interval = 3
    config.train.eval_batches = config.train.final_eval_batches = 3
    config.train.threads, config.train.dist_check_interval = 1, 1
    config.train.report = False
    return config


def _image(root: Path) -> RunConfig:
    config = preset("resnet20-fashion-mnist")
    config.image.path = str(root)
    config.image.model.width = 4
    config.optim.warmup_steps = 2
    config.train.steps, config.train.batch_size = 4, 8
    config.train.log_interval, config.train.eval_interval = 1, 2
    config.train.checkpoint_interval = 2
    config.train.eval_batches = config.train.final_eval_batches = 2
    config.train.threads, config.train.dist_check_interval = 1, 1
    config.train.sync_batchnorm = False  # CPU: SyncBatchNorm does not run on gloo
    config.train.report = False
    return config


# -- data written by the tests -----------------------------------------------------------------


def _write_text(path: Path) -> Path:
    path.write_text(TEXT)
    return path


def _write_documents(path: Path) -> Path:
    docs = [" ".join(SENTENCES[(d + i) % len(SENTENCES)] for i in range(8)) for d in range(30)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def _idx(path: Path, array: torch.Tensor) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.dim())
    header += struct.pack(f">{array.dim()}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.to(torch.uint8).numpy().tobytes())


def _write_images(root: Path) -> Path:
    """Fashion-MNIST-format IDX files of a learnable 10-class problem (32x32: augmented)."""
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 200), ("t10k", 40)):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = torch.randint(0, 60, (n, 32, 32), generator=g)
        for i, c in enumerate(labels.tolist()):
            images[i, 3 * c : 3 * c + 3] += 180
        _idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


# -- recording a run ---------------------------------------------------------------------------


class _RecordingSparsity(Sparsity):
    """Sparsity that keeps a copy of every mask after every step (test instrumentation)."""

    history: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    # The unit scores each step's update ranked (block norms of theta after the optimizer step).
    scores: list[dict[str, torch.Tensor]] = []

    def step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        scores = {t.name: t.storage.grid_scores().detach().clone() for t in self.tensors}
        _RecordingSparsity.scores.append(scores)
        super().step(step, optimizer)
        masks = {name: (a.clone(), b.clone()) for name, (a, b) in self.masks().items()}
        _RecordingSparsity.history.append(masks)


class _FileWrites:
    """Paths under ``root`` that this process opens for writing, creates, renames or removes,
    seen through Python's audit hooks (which no library code can bypass by mistake)."""

    def __init__(self, root: str) -> None:
        self.root, self.paths, self.active = root, [], False
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active or event not in ("open", "os.rename", "os.mkdir", "os.remove"):
            return
        if event == "open":
            path, mode, flags = args
            writing = (
                any(c in mode for c in "wax+")
                if isinstance(mode, str)
                else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))
            )
            if not writing:
                return
        path = str(args[0])
        if path.startswith(self.root):
            self.paths.append(f"{event} {path}")


_WRITES: _FileWrites | None = None


def _recorded_train(config: RunConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train with mask recording, counting ``torch.save`` calls (torch writes files from C++)
    and log lines, and listing other writes when a :class:`_FileWrites` is installed."""
    saved: list[str] = []
    logged: list[str] = []
    if _WRITES is not None:
        _WRITES.paths, _WRITES.active = [], True
    real_save, real_sparsity = torch.save, train_module.Sparsity

    def counting_save(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        saved.append(str(path))
        real_save(obj, path, *args, **kwargs)

    _RecordingSparsity.history, _RecordingSparsity.scores = [], []
    torch.save, train_module.Sparsity = counting_save, _RecordingSparsity  # type: ignore[misc]
    try:
        summary = train(config, run_dir, resume=resume, progress=False, log=logged.append)
    finally:
        torch.save, train_module.Sparsity = real_save, real_sparsity  # type: ignore[misc]
        if _WRITES is not None:
            _WRITES.active = False
    writes = list(_WRITES.paths) if _WRITES is not None else None
    return {"history": _RecordingSparsity.history, "scores": _RecordingSparsity.scores,
            "saves": saved, "log": logged,
            "writes": writes, "summary": summary}  # fmt: skip


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def _train_steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["kind"] == "train"]


def _assert_same_history(got: list[Any], expected: list[Any]) -> None:
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.keys() == b.keys()
        for name in a:
            for kind, x, y in zip(("A", "B"), a[name], b[name], strict=True):
                assert torch.equal(x, y), f"step {step}: mask {kind} of {name} differs"


def _assert_same_history_up_to_ties(
    got: list[Any], expected: list[Any], scores: list[Any], block: int, rtol: float = 1e-5
) -> int:
    """Masks of a run on other processes equal the reference run's exactly, except where the
    reference's ranking was a tie to float rounding: the 2-process gradient is summed in another
    order, so its weights equal the 1-process weights only to rounding, and units whose scores
    differ by less than that may swap (seen: two 4x4 blocks regrown at zero whose norms were
    3e-14 and 5e-14, rounding noise, against ~0.1 elsewhere in the layer). At the first step
    whose masks differ, the units in the difference must score within ``rtol`` (relative to
    the layer's largest score) of each other, the swap a float-rounding tie; the runs then
    follow different (float-close) trajectories, so comparison stops there.
    Returns the number of steps compared exactly."""
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.keys() == b.keys()
        differing = {}
        for name in a:
            for kind, x, y in zip(("A", "B"), a[name], b[name], strict=True):
                if not torch.equal(x, y):
                    differing.setdefault(name, []).append(kind)
        if not differing:
            continue
        for name, kinds in differing.items():
            for kind in kinds:
                i = 0 if kind == "A" else 1
                x, y = a[name][i], b[name][i]
                # Per unit of the block grid: units whose membership differs.
                units = (x != y).reshape(x.shape[0], -1)
                units = units.reshape(units.shape[0] // block, block, -1, block).any(dim=(1, 3))
                layer = scores[step][name].reshape(units.shape)
                s = layer[units]
                assert s.numel() > 0
                spread = (s.max() - s.min()) / layer.abs().max()
                assert spread <= rtol, (
                    f"step {step}: mask {kind} of {name} differs in {int(units.sum())} units "
                    f"whose scores are not a float-rounding tie (spread {float(spread):.2e})"
                )
        return step
    return len(got)


def _mask_changes(history: list[Any]) -> int:
    """Number of steps after which some mask differs from the step before."""
    return sum(
        any(not torch.equal(now[n][0], before[n][0]) for n in now)
        for before, now in zip(history, history[1:], strict=False)
    )


# -- the worker: this file run under torchrun --------------------------------------------------


def _worker(spec_path: str) -> None:
    """Run the jobs of a spec file on this rank and save what each rank recorded."""
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    global _WRITES
    _WRITES = _FileWrites(str(Path(spec_path).parent))
    try:
        # The consistency check must be able to fail: different tensors on the two ranks.
        try:
            distributed.assert_same_across_ranks({"x": torch.tensor([rank])}, "probe")
            caught = ""
        except RuntimeError as error:
            caught = str(error)
        received = distributed.broadcast_object({"from": rank})
        probe = {"caught": caught, "received": received, "fsdp": _try_fsdp()}
        torch.save(probe, f"{spec['probe']}.rank{rank}.pt")
        for job in spec["jobs"]:
            config = from_dict(RunConfig, job["config"])
            record = _recorded_train(config, Path(job["run_dir"]), resume=job["resume"])
            torch.save(record, f"{job['record']}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _try_fsdp() -> str:
    """FSDP2 shards theta into DTensors while the masks stay whole: Sparsity must refuse it."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return "no FSDP2 in this PyTorch"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    sparsity = Sparsity(model, method="topkast", sparsity=0.5)
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    try:
        sparsity.regularizer()
    except NotImplementedError as error:
        return str(error)
    return "accepted"


def _stuck_worker(run_dir: str, corpus: str) -> None:
    """Rank 1 joins the group and then never answers; rank 0 trains with a 3 s timeout."""
    rank = int(os.environ["RANK"])
    if rank == 1:
        dist.init_process_group("gloo", timeout=timedelta(seconds=3))
        time.sleep(120)
        return
    config = _lm(Path(corpus), "topkast")
    config.train.dist_timeout = 3.0
    train(config, run_dir, progress=False)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(*args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={WORLD}", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env())


# -- the 2-process job and its 1-process references --------------------------------------------


def _load_ranks(prefix: Path) -> list[dict[str, Any]]:
    return [torch.load(f"{prefix}.rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every 2-process run, launched once: configs, run directories and per-rank records."""
    root = tmp_path_factory.mktemp("distributed")
    corpus = _write_text(root / "corpus.txt")
    configs = {name: _case_config(corpus, name) for name in CASES}
    configs["xl"] = _xl(corpus)
    configs["bert"] = _bert(_write_documents(root / "documents.txt"))
    configs["image"] = _image(_write_images(root / "images"))
    configs["half"] = _resume_config(corpus, steps=8)
    # A 1-process checkpoint for the 2-process job to resume.
    torch.set_num_threads(1)
    train(_resume_config(corpus, steps=8), root / "one-then-two", progress=False, log=print)
    resumed_on_two = _resume_config(corpus, steps=12)
    runs = [(name, c, False) for name, c in configs.items()]
    runs.append(("one-then-two", resumed_on_two, True))
    jobs = [
        {"name": name, "config": to_dict(c), "run_dir": str(root / name), "resume": resume,
         "record": str(root / f"{name}.record")}
        for name, c, resume in runs
    ]  # fmt: skip
    spec = root / "spec.json"
    spec.write_text(json.dumps({"jobs": jobs, "probe": str(root / "probe")}))
    started = time.perf_counter()
    result = _torchrun(__file__, str(spec))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    records = {j["name"]: _load_ranks(Path(j["record"])) for j in jobs}
    seconds = time.perf_counter() - started
    yield {"root": root, "corpus": corpus, "configs": configs, "records": records,
           "probe": _load_ranks(root / "probe"), "seconds": seconds}  # fmt: skip


def _one_process(job: dict[str, Any], name: str, config: RunConfig | None = None) -> Any:
    config = copy.deepcopy(config or job["configs"][name])
    run_dir = job["root"] / f"{name}-one"
    return _recorded_train(config, run_dir), run_dir


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_hold_identical_masks_and_match_one_process(
    job: dict[str, Any], name: str
) -> None:
    rank0, rank1 = job["records"][name]
    config = job["configs"][name]
    assert len(rank0["history"]) == config.train.steps  # dense too: a Sparsity with no masks
    # Bit-identical masks on both ranks after every step (and the trainer's own check of
    # parameters, masks and generator ran after every step: dist_check_interval=1).
    _assert_same_history(rank1["history"], rank0["history"])
    if name not in ("dense", "static"):
        assert _mask_changes(rank0["history"]) >= 3, "masks should change several times"
    # The same run on one process: the same masks exactly (up to float-rounding ties in the
    # ranking, checked), losses to float rounding.
    one, one_dir = _one_process(job, name)
    block = config.sparsity.block_size
    exact = _assert_same_history_up_to_ties(rank0["history"], one["history"], one["scores"], block)
    two_dir = job["root"] / name
    assert _losses(two_dir) == pytest.approx(_losses(one_dir), rel=1e-4)
    metric = f"valid_{rank0['summary']['metric']}"
    assert rank0["summary"][metric] == pytest.approx(one["summary"][metric], rel=1e-4)
    assert rank1["summary"][metric] == rank0["summary"][metric]  # reduced, the same everywhere
    a = torch.load(two_dir / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(one_dir / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and not any(k.startswith("module.") for k in a)
    for key in a:
        if a[key].dtype == torch.bool:
            if exact == len(one["history"]):  # no rounding tie swapped units
                assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", ["xl", "bert"])
def test_sharded_tasks_match_one_process(job: dict[str, Any], name: str) -> None:
    # Transformer-XL: each rank trains its own streams with its own memories; BERT: losses
    # divided by the global counts of labelled tokens; both evaluate sharded.
    rank0, rank1 = job["records"][name]
    _assert_same_history(rank1["history"], rank0["history"])
    one, one_dir = _one_process(job, name)
    block = job["configs"][name].sparsity.block_size
    _assert_same_history_up_to_ties(rank0["history"], one["history"], one["scores"], block)
    assert _losses(job["root"] / name) == pytest.approx(_losses(one_dir), rel=1e-4)
    for key, value in one["summary"].items():
        if key.startswith(("valid_", "test_")):
            assert rank0["summary"][key] == pytest.approx(value, rel=1e-4), key


def test_image_task_runs_on_two_processes_with_per_process_batchnorm(job: dict[str, Any]) -> None:
    # On CPU BatchNorm normalises each shard with its own statistics, so the run differs from
    # one process; ranks still agree on everything (checked every step) and on the metrics.
    rank0, rank1 = job["records"]["image"]
    _assert_same_history(rank1["history"], rank0["history"])
    assert rank0["summary"]["test_accuracy"] == rank1["summary"]["test_accuracy"]
    assert len(_losses(job["root"] / "image")) == 4


def test_only_rank_zero_writes(job: dict[str, Any]) -> None:
    for name in ("topkast", "dense", "xl", "one-then-two"):
        rank0, rank1 = job["records"][name]
        assert rank1["writes"] == [] and rank1["saves"] == [] and rank1["log"] == []
        run_dir = job["root"] / name
        assert any(w.endswith("metrics.jsonl") for w in rank0["writes"])
        config = job["configs"].get(name)
        if config is not None:  # not resumed: a fresh run directory
            checkpoints = config.train.steps // config.train.checkpoint_interval + 1  # + final
            assert sum("checkpoint" in path for path in rank0["saves"]) == checkpoints
            assert _train_steps(run_dir) == list(range(1, config.train.steps + 1))  # each once
            files = {p.name for p in run_dir.iterdir()}
            assert {"config.json", "metrics.jsonl", "checkpoint.pt", "summary.json"} <= files


def test_checkpoints_resume_with_a_different_number_of_processes(job: dict[str, Any]) -> None:
    # 8 steps on 2 processes, resumed to 12 on 1 process; 8 steps on 1 process, resumed to 12
    # on 2 processes: both equal the uninterrupted 12-step run on 1 process.
    full, full_dir = _one_process(job, "full", _resume_config(job["corpus"], steps=12))
    two_then_one = load_run_config(job["root"] / "half")
    two_then_one.train.steps = 12
    resumed = _recorded_train(two_then_one, job["root"] / "half", resume=True)
    _assert_same_history(resumed["history"], full["history"][8:])
    one_then_two = job["records"]["one-then-two"][0]
    _assert_same_history(one_then_two["history"], full["history"][8:])
    for run in ("half", "one-then-two"):
        assert _losses(job["root"] / run)[-4:] == pytest.approx(_losses(full_dir)[-4:], rel=1e-4)
    final = torch.load(full_dir / "checkpoint.pt", weights_only=True)["model"]
    for run in ("half", "one-then-two"):
        state = torch.load(job["root"] / run / "checkpoint.pt", weights_only=True)["model"]
        for key in final:
            torch.testing.assert_close(state[key], final[key], rtol=1e-4, atol=1e-5, msg=key)


def test_consistency_check_detects_differences(job: dict[str, Any]) -> None:
    for probe in job["probe"]:
        assert (
            "probe differs across ranks" in probe["caught"] and "x (ranks [1])" in probe["caught"]
        )
        assert probe["received"] == {"from": 0}
        if probe["fsdp"] != "no FSDP2 in this PyTorch":
            assert "FSDP is not supported" in probe["fsdp"], probe["fsdp"]


def test_bert_checkpoint_carries_its_vocabulary(tmp_path: Path) -> None:
    # A resumed BERT run must number tokens as the saved model does, whatever it would train.
    documents = _write_documents(tmp_path / "d.txt")
    config = _bert(documents).bert
    task = BertTask(config, 8, torch.device("cpu"))
    config.tokenizer = str(tmp_path / "other.json")
    # Smaller than the corpus's full vocabulary (100): WordPiece is deterministic, so the
    # other vocabulary must differ by construction.
    train_wordpiece([documents], vocab_size=80, path=config.tokenizer)
    other = BertTask(config, 8, torch.device("cpu"), rank=1, world_size=2)
    assert other.tokenizer.get_vocab() != task.tokenizer.get_vocab()
    other.load_state_dict(task.state_dict())
    assert other.tokenizer.get_vocab() == task.tokenizer.get_vocab()
    assert torch.equal(other.data.train.tokens, task.data.train.tokens)


def test_torchrun_command_line(tmp_path: Path) -> None:
    corpus = _write_text(tmp_path / "corpus.txt")
    run, logs = tmp_path / "run", tmp_path / "logs"
    result = _torchrun(
        "--log-dir", str(logs), "--redirects", "3", "-m", "alwayssparse", "train",
        "--preset", "tiny", "--text", str(corpus), "--out", str(run), "--no-progress",
        "--steps", "4", "train.threads=1", "train.eval_batches=1", "train.final_eval_batches=1",
    )  # fmt: skip
    stdout = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    stderr = "".join(p.read_text() for p in logs.rglob("stderr.log"))
    assert result.returncode == 0, result.stderr[-3000:] + stderr[-3000:]
    assert "valid bpc" in stdout[0] and "sparse" in stdout[0]
    assert "bpc" not in stdout[1] and "sparse" not in stdout[1]  # rank 1 logs nothing
    assert _train_steps(run) == [4]  # logged once (every 5 steps and at the end)
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_stuck_rank_fails_the_job_within_the_timeout(tmp_path: Path) -> None:
    corpus = _write_text(tmp_path / "corpus.txt")
    port = str(_free_port())
    procs = []
    for rank in range(WORLD):
        env = _env() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
        command = [sys.executable, __file__, "--stuck", str(tmp_path / "run"), str(corpus)]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    started = time.perf_counter()
    try:
        _, err = procs[0].communicate(timeout=90)
        elapsed = time.perf_counter() - started
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    assert procs[0].returncode != 0
    assert "timed out" in err.lower(), err[-3000:]
    assert "rank 0 of 2 failed" in err and "another rank died or stopped responding" in err
    assert elapsed < 60


# -- in one process ----------------------------------------------------------------------------


def test_batch_must_split_evenly_and_launch_environment_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _lm(_write_text(tmp_path / "c.txt"), "topkast")
    with pytest.raises(ValueError, match=r"batch_size \(8\) is the global batch .* \(3\)"):
        ByteLMTask(config.lm, 8, torch.device("cpu"), rank=0, world_size=3)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="not both RANK and WORLD_SIZE"):
        distributed.launch_environment()
    with pytest.raises(ValueError, match="names one GPU"):
        distributed.process_device("cuda:1", 0, 2)
    config.train.dist_timeout = 0
    with pytest.raises(ValueError, match="dist_timeout"):
        config.validate()
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    two = distributed.DistContext(rank=0, world_size=2)
    with pytest.raises(ValueError, match="sync_batchnorm=false"):
        distributed.prepare_batchnorm(model, two, sync=True)
    assert distributed.prepare_batchnorm(model, two, sync=False) is model


def test_digest_sees_every_bit() -> None:
    x = torch.randn(5, 7)
    y = x.clone()
    y.view(-1)[17] = torch.nextafter(y.view(-1)[17], torch.tensor(1e9))
    assert distributed.tensor_digest(x) == distributed.tensor_digest(x.clone())
    assert distributed.tensor_digest(x) != distributed.tensor_digest(y)
    assert distributed.tensor_digest(x) != distributed.tensor_digest(x.view(7, 5))
    assert distributed.tensor_digest(torch.zeros(3)) != distributed.tensor_digest(
        torch.zeros(3, dtype=torch.float64)
    )


def _shards(make: Callable[[int, int], Any]) -> tuple[Any, list[Any]]:
    return make(0, 1), [make(rank, WORLD) for rank in range(WORLD)]


def test_shards_partition_the_global_batch_and_average_to_its_loss(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    corpus = _write_text(tmp_path / "c.txt")

    # Byte LM: rows of the global batch, mean loss.
    lm = _lm(corpus, "dense").lm
    whole, parts = _shards(lambda r, w: ByteLMTask(lm, 8, cpu, rank=r, world_size=w))
    model = whole.build_model()
    batch = whole.train_batch(torch.Generator().manual_seed(1))
    shards = [p.train_batch(torch.Generator().manual_seed(1)) for p in parts]
    assert torch.equal(torch.cat([s[0] for s in shards]), batch[0])
    shard_mean = sum(p.loss(model, s) for p, s in zip(parts, shards, strict=True)) / WORLD
    torch.testing.assert_close(shard_mean, whole.loss(model, batch))

    # Transformer-XL: each rank's streams and memories are rows of the global ones.
    xl = _xl(corpus).xl
    whole, parts = _shards(lambda r, w: TransformerXLTask(xl, 4, cpu, rank=r, world_size=w))
    model = whole.build_model().eval()
    for _ in range(3):  # the memory carries over windows
        batch = whole.train_batch(torch.Generator())
        shards = [p.train_batch(torch.Generator()) for p in parts]
        assert torch.equal(torch.cat([s[0] for s in shards]), batch[0])
        shard_mean = sum(p.loss(model, s) for p, s in zip(parts, shards, strict=True)) / WORLD
        torch.testing.assert_close(shard_mean, whole.loss(model, batch))

    # BERT: shards hold different numbers of masked tokens; normalised by the global counts.
    bert = _bert(_write_documents(tmp_path / "d.txt")).bert
    whole, parts = _shards(lambda r, w: BertTask(bert, 8, cpu, rank=r, world_size=w))
    model = whole.build_model()
    batch = whole.train_batch(torch.Generator().manual_seed(2))
    shards = [p.train_batch(torch.Generator().manual_seed(2)) for p in parts]
    assert torch.equal(torch.cat([s.batch.mlm_labels for s in shards]), batch.batch.mlm_labels)
    counts = [int((s.batch.mlm_labels != -100).sum()) for s in shards]
    assert counts[0] != counts[1]  # the case that a mean per shard would get wrong
    shard_mean = sum(p.loss(model, s) for p, s in zip(parts, shards, strict=True)) / WORLD
    expected = model(**batch.batch.as_kwargs()).loss
    torch.testing.assert_close(shard_mean, expected)
    torch.testing.assert_close(whole.loss(model, batch), expected)

    # Images: each rank loads and augments only its rows, as one process would.
    image = _image(_write_images(tmp_path / "images")).image
    whole, parts = _shards(lambda r, w: ImageTask(image, 8, cpu, rank=r, world_size=w))
    batch = whole.train_batch(torch.Generator().manual_seed(3))
    shards = [p.train_batch(torch.Generator().manual_seed(3)) for p in parts]
    assert torch.equal(torch.cat([s[0] for s in shards]), batch[0])
    assert torch.equal(torch.cat([s[1] for s in shards]), batch[1])


def test_tie_check_accepts_rounding_ties_and_rejects_real_differences() -> None:
    before = torch.tensor([[True, True, False, False]])
    scores = [{"w": torch.tensor([[0.5, 0.5, 0.1, 3e-14]])}] * 2
    swap_tie = {"w": (torch.tensor([[True, True, True, False]]),) * 2}
    other = {"w": (torch.tensor([[True, True, False, True]]),) * 2}
    same = {"w": (before, before)}
    # Units 2 and 3 swap: scores 0.1 and 3e-14 are not a tie.
    with pytest.raises(AssertionError, match="not a float-rounding tie"):
        _assert_same_history_up_to_ties([same, swap_tie], [same, other], scores, block=1)
    tie = [{"w": torch.tensor([[0.5, 0.5, 2e-14, 3e-14]])}] * 2
    assert _assert_same_history_up_to_ties([same, swap_tie], [same, other], tie, block=1) == 1
    assert _assert_same_history_up_to_ties([same, same], [same, same], tie, block=1) == 2


if __name__ == "__main__":
    if sys.argv[1] == "--stuck":
        _stuck_worker(sys.argv[2], sys.argv[3])
    else:
        _worker(sys.argv[1])
