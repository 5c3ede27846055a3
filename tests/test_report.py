"""Reports: dense-family interpolation against the BERT paper, sweep tables and Pareto plots,
run plots and reports (fake run directories and a real short run), TensorBoard."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import alwayssparse
from alwayssparse.config import to_dict
from alwayssparse.dynamics import MaskDynamics
from alwayssparse.metrics import TensorBoardLogger
from alwayssparse.models import bert_config
from alwayssparse.pareto import dense_flops_at, dense_loss_at, flop_reduction, sweep_table
from alwayssparse.plots import plot_run
from alwayssparse.report import write_run_report, write_sweep_report
from alwayssparse.rundir import collect_runs, model_size, read_metrics
from alwayssparse.train import preset, train

PNG = b"\x89PNG\r\n\x1a\n"
# dynsparse-bert.md Table 1 and Table A.8: dense BERT-Mini and BERT-Small (FLOPs, MLM loss).
MINI_SMALL = [(2.617e9, 2.614), (10.07e9, 2.310)]


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


# -- interpolation of the dense family ---------------------------------------------------------


def test_matched_dense_reproduces_the_bert_paper() -> None:
    # "Matched (dense)" rows: 2.350 at 8.33e9 (Table 1) and 2.603 at 2.738e9 (Table A.8). The
    # paper rounds; linear interpolation in FLOPs instead of log(FLOPs) would give 2.381.
    assert dense_loss_at(MINI_SMALL, 8.33e9) == pytest.approx(2.350, abs=4e-3)
    assert dense_loss_at(MINI_SMALL, 2.738e9) == pytest.approx(2.603, abs=1.5e-3)
    assert dense_loss_at(MINI_SMALL, 2.617e9) == pytest.approx(2.614)
    assert dense_loss_at(MINI_SMALL, 2.0e9) is None  # below the family: no extrapolation
    assert dense_loss_at(MINI_SMALL, 20e9) is None


def test_flop_reduction_reproduces_figure_8() -> None:
    # BERT-Base s=0.9 with 16x16 blocks: MLM 2.311 at 8.33e9 FLOPs (Table 1); Figure 8 and
    # section 3.2 give a FLOP reduction of 0.83 for B = 16.
    assert flop_reduction(MINI_SMALL, 8.33e9, 2.311) == pytest.approx(0.83, abs=2e-3)
    # Unstructured (2.160) beats BERT-Small: outside the family without Medium, so None.
    assert flop_reduction(MINI_SMALL, 8.33e9, 2.160) is None
    assert flop_reduction(MINI_SMALL, 2.0e9, 2.7) is None  # worse than the smallest dense run
    for flops in (3e9, 5e9, 9.9e9):
        loss = dense_loss_at(MINI_SMALL, flops)
        assert loss is not None
        assert dense_flops_at(MINI_SMALL, loss) == pytest.approx(flops, rel=1e-9)
        assert flop_reduction(MINI_SMALL, flops, loss) == pytest.approx(1.0)


def test_inversion_direction_and_non_monotone_family() -> None:
    accuracy = [(1e9, 0.70), (4e9, 0.80)]
    assert dense_flops_at(accuracy, 0.75, higher_is_better=True) == pytest.approx(2e9)
    assert flop_reduction(accuracy, 1e9, 0.75, higher_is_better=True) == pytest.approx(0.5)
    assert flop_reduction(accuracy, 1e9, 0.85, higher_is_better=True) is None
    # A noisy family: the fewest FLOPs that reach the loss, segment by segment in FLOP order.
    noisy = [(8.0, 1.0), (1.0, 3.0), (4.0, 2.5), (2.0, 2.0)]
    assert dense_flops_at(noisy, 2.2) == pytest.approx(2 ** (0.8))
    assert dense_flops_at(noisy, 1.5) == pytest.approx(4 * 2 ** (2 / 3))


def test_interpolation_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="dense family is empty"):
        dense_loss_at([], 1e9)
    with pytest.raises(ValueError, match="flops > 0"):
        dense_loss_at([(0.0, 2.0), (1e9, 1.0)], 1e9)
    with pytest.raises(ValueError, match="distinct FLOPs"):
        dense_flops_at([(1e9, 2.0), (1e9, 1.0)], 1.5)
    with pytest.raises(ValueError, match="flops must be finite and > 0"):
        flop_reduction(MINI_SMALL, -1.0, 2.5)
    with pytest.raises(ValueError, match="loss must be finite"):
        dense_flops_at(MINI_SMALL, math.nan)


# -- fake run directories in the trainer's format ------------------------------------------------


def _fake_run(
    sweep: Path,
    name: str,
    *,
    method: str,
    d_model: int,
    loss: float,
    seed: int = 0,
    sparsity: float = 0.9,
    train_flops: float | None = None,
    task_metric: tuple[str, str] = ("lm", "bpc"),
) -> Path:
    """config.json, summary.json and metrics.jsonl as alwayssparse.train writes them."""
    run = sweep / name
    run.mkdir(parents=True)
    config = preset("tiny")
    config.lm.model.d_model, config.sparsity.method = d_model, method
    config.sparsity.sparsity, config.train.seed = sparsity, seed
    config.task = task_metric[0]
    (run / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    density = 1.0 if method == "dense" else 1.0 - sparsity
    flops = {} if train_flops is None else {"train_flops": train_flops,
                                            "inference_flops": train_flops / 3e3}  # fmt: skip
    metric = task_metric[1]
    summary: dict[str, Any] = {
        "steps": 30, "task": task_metric[0], "metric": metric, "method": method,
        f"valid_{metric}": loss, "valid_nll": loss * math.log(2), f"test_{metric}": loss + 0.01,
        "train_seconds": 1.5, "forward_density": density, "backward_density": min(1, 2 * density),
        "explored_dof": density, "parameters": {"total": 1000 * d_model}, **flops,
    }  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    with (run / "metrics.jsonl").open("w") as f:
        for step in (5, 10, 15):
            record = {"kind": "train", "step": step, "loss": loss + 1 / step, "lr": 1e-3}
            if train_flops is not None:
                record["train_flops"] = train_flops * step / 30
            f.write(json.dumps(record) + "\n")
        f.write(json.dumps({"kind": "eval", "step": 15, f"valid_{metric}": loss + 0.1}) + "\n")
        f.write(json.dumps({"kind": "final", **summary}) + "\n")
    return run


def _two_size_sweep(root: Path) -> Path:
    sweep = root / "sweep"
    _fake_run(sweep, "small-dense-seed0", method="dense", d_model=16, loss=3.0, train_flops=1e12)
    _fake_run(sweep, "large-dense-seed0", method="dense", d_model=32, loss=2.0, train_flops=4e12)
    for seed, loss in ((0, 2.4), (1, 2.6)):
        _fake_run(sweep, f"large-topkast-s0.9-seed{seed}", method="topkast", d_model=32,
                  loss=loss, seed=seed, train_flops=1e12)  # fmt: skip
    _fake_run(sweep, "large-static-s0.9-seed0", method="static", d_model=32, loss=1.5,
              train_flops=5e12)  # fmt: skip
    return sweep


def test_sweep_table_groups_seeds_and_compares_with_the_dense_family(tmp_path: Path) -> None:
    runs = collect_runs(_two_size_sweep(tmp_path))
    assert len(runs) == 5
    rows = {row.label: row for row in sweep_table(runs)}
    assert set(rows) == {"small-dense", "large-dense", "large-topkast-s0.9", "large-static-s0.9"}
    topkast = rows["large-topkast-s0.9"]
    assert [r.seed for r in topkast.runs] == [0, 1]
    assert topkast.mean == pytest.approx(2.5) and topkast.std == pytest.approx(math.sqrt(0.02))
    assert topkast.dense_matched == pytest.approx(3.0)  # the small dense run's FLOPs
    # 2.5 lies halfway between 3.0 and 2.0: sqrt(1e12 * 4e12) = 2e12 dense FLOPs.
    assert topkast.flop_ratio == pytest.approx(0.5)
    assert topkast.first.size == "L1/d32" and topkast.first.sparsity == 0.9
    static = rows["large-static-s0.9"]
    assert static.flop_ratio is None and static.dense_matched is None
    assert "outside the dense family's range" in static.note
    assert "better than every dense run" in static.note
    assert rows["small-dense"].note == "dense family"


def test_sweep_report_writes_table_csv_and_plot(tmp_path: Path) -> None:
    sweep = _two_size_sweep(tmp_path)
    report = write_sweep_report(sweep)
    text = report.read_text()
    assert report == sweep / "report.md" and "![Pareto curve](pareto.png)" in text
    assert "| large-topkast-s0.9 | topkast | 0.9 | 0.8 | L1/d32 | 32,000 | 0 1 |" in text
    assert "2.5000 ± 0.1414" in text and "| 0.5000 |" in text
    assert _is_png(sweep / "pareto.png")
    with (sweep / "results.csv").open() as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert float(rows["large-topkast-s0.9"]["FLOP ratio at equal loss"]) == pytest.approx(0.5)
    assert float(rows["large-topkast-s0.9"]["valid_bpc_mean"]) == pytest.approx(2.5)
    assert rows["large-topkast-s0.9"]["seeds"] == "0 1"
    assert rows["large-static-s0.9"]["FLOP ratio at equal loss"] == ""


def test_sweep_errors_name_the_problem(tmp_path: Path) -> None:
    sweep = tmp_path / "no-flops"
    _fake_run(sweep, "dense", method="dense", d_model=16, loss=3.0)
    _fake_run(sweep, "sparse", method="topkast", d_model=16, loss=3.2, train_flops=1e12)
    with pytest.raises(ValueError, match=r"without train_flops.*\['dense'\]"):
        write_sweep_report(sweep)
    mixed = tmp_path / "mixed"
    _fake_run(mixed, "a", method="dense", d_model=16, loss=3.0, train_flops=1e12)
    _fake_run(mixed, "b", method="dense", d_model=16, loss=0.9, train_flops=1e12,
              task_metric=("image", "accuracy"))  # fmt: skip
    with pytest.raises(ValueError, match="one task and metric"):
        sweep_table(collect_runs(mixed))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no finished runs"):
        write_sweep_report(tmp_path / "empty")


# -- run plots and reports --------------------------------------------------------------------


class _Frames:
    def __init__(self) -> None:
        self.step = 0

    def masks(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.step)
        a = torch.rand(8, 12, generator=generator) < 0.2
        return {"fc.weight": (a, a), "out.weight": (a[:2], a[:2])}


def test_run_plots_and_report_from_files(tmp_path: Path) -> None:
    run = _fake_run(tmp_path, "run", method="topkast", d_model=16, loss=2.5, train_flops=3e12)
    source = _Frames()
    tracker = MaskDynamics(source, interval=5)
    for step in (0, 5, 10, 15):
        source.step = step
        tracker.record(step)
    tracker.write_to(run)
    plots = plot_run(run)
    assert [p.name for p in plots] == ["training.png", "dynamics.png", "pattern.png"]
    assert all(_is_png(p) for p in plots)
    text = write_run_report(run).read_text()
    assert text.startswith("# Run `run`") and "**topkast**, sparsity 0.900" in text
    assert "| bpc | 2.5000 | 2.5100 |" in text and "| 3.000e12 | 1.000e9 |" in text
    assert "(plots/dynamics.png)" in text and "`fc.weight`" in text


def test_read_metrics_keeps_the_last_record_of_a_repeated_step(tmp_path: Path) -> None:
    # A resumed run logs again the steps after its last checkpoint.
    lines = [
        {"kind": "train", "step": 5, "loss": 9.0},
        {"kind": "eval", "step": 5, "x": 1},
        {"kind": "train", "step": 5, "loss": 4.0},
        {"kind": "train", "step": 10, "loss": 3.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    records = read_metrics(tmp_path)
    assert [(r["kind"], r["step"]) for r in records] == [("eval", 5), ("train", 5), ("train", 10)]
    assert records[1]["loss"] == 4.0


def test_real_short_run_is_plotted_and_reported(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    config = preset("tiny")
    config.lm.data.name, config.lm.data.paths = "text", [str(corpus)]
    config.train.steps, config.train.eval_interval, config.train.log_interval = 8, 4, 2
    config.train.final_eval_batches = 2
    train(config, tmp_path / "run", progress=False, log=lambda _: None)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    report = write_run_report(tmp_path / "run").read_text()
    assert "![training](plots/training.png)" in report
    assert _is_png(tmp_path / "run" / "plots" / "training.png")
    assert f"| bpc | {summary['valid_bpc']:.4f} |" in report
    if "train_flops" in summary:  # once the trainer records the FLOP ledger
        assert "training FLOPs (whole run)" in report
    else:
        assert "no `train_flops`" in report


def test_model_size_labels() -> None:
    config = preset("bert-mini")
    assert model_size(to_dict(config)) == "BERT-Mini"
    config.bert.model = bert_config("mini", num_layers=3)
    assert model_size(to_dict(config)) == "L3/H256"
    assert model_size(to_dict(preset("resnet20-fashion-mnist"))) == "cifar_resnet20"


# -- TensorBoard -------------------------------------------------------------------------------


def test_tensorboard_logger_writes_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    logger.log({"kind": "train", "step": 5, "loss": 2.0, "note": "text", "lr": 1e-3})
    logger.log({"kind": "train", "step": 10, "loss": 1.5, "lr": 1e-3})
    logger.log({"step": 10, "explored_dof": {"fc.weight": 0.3}, "change_fraction_mean": None})
    logger.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {"train/loss", "train/lr", "dynamics/explored_dof/fc/weight"}
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(5, 2.0), (10, 1.5)]
    with pytest.raises(ValueError, match="integer 'step'"):
        TensorBoardLogger(tmp_path / "x").log({"loss": 1.0})


def test_tensorboard_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"alwayssparse\[tensorboard\]"):
        TensorBoardLogger("unused")


# -- matplotlib only where a plot is drawn -----------------------------------------------------


def test_training_and_the_command_line_import_no_matplotlib() -> None:
    # A fresh interpreter: this one has drawn plots already.
    src = str(Path(alwayssparse.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = (
        "import sys, alwayssparse.train, alwayssparse.cli, alwayssparse.report; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=True)  # fmt: skip
    assert result.stdout.strip() == "[]"
