"""Sweeps: the grid, resumption, spec files, the command line, and the sweep report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alwayssparse.cli import main
from alwayssparse.sweep import SweepSpec, load_spec, run_sweep


def _corpus(tmp_path: Path) -> str:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return str(corpus)


def _spec(tmp_path: Path, **fields: object) -> SweepSpec:
    spec = SweepSpec(
        preset="tiny",
        methods=["dense", "topkast"],
        sparsities=["0.9/0.8"],
        overrides=[
            "lm.data.name=text", f"lm.data.paths={_corpus(tmp_path)}", "train.steps=12",
            "train.eval_interval=6", "train.checkpoint_interval=6", "train.log_interval=3",
            "train.final_eval_batches=2", "train.eval_batches=2",
        ],
    )  # fmt: skip
    for key, value in fields.items():
        setattr(spec, key, value)
    return spec


def test_grid_names_and_configs(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        methods=["dense", "static", "topkast"],
        sparsities=["0.9", "(80%, 50%)"],
        sizes={"narrow": ["lm.model.d_model=16"], "wide": ["lm.model.d_model=32"]},
        seeds=[0, 1],
    )
    runs = spec.runs()
    # per size: dense x 2 seeds + 2 sparse methods x 2 sparsities x 2 seeds
    assert len(runs) == 2 * (2 + 2 * 2 * 2)
    topkast = runs["wide-topkast-s80_50-seed1"]
    assert topkast.lm.model.d_model == 32
    assert topkast.sparsity.sparsity == pytest.approx(0.8)
    assert topkast.sparsity.topkast.backward_sparsity == pytest.approx(0.5)
    assert topkast.train.seed == 1 and topkast.train.steps == 12
    assert runs["narrow-dense-seed0"].sparsity.method == "dense"
    assert runs["narrow-static-s0.9-seed0"].lm.model.d_model == 16


def test_sizes_as_presets_and_bad_specs(tmp_path: Path) -> None:
    spec = SweepSpec(methods=["dense"], sizes=["tiny", "quickstart"])
    assert set(spec.runs()) == {"tiny-dense-seed0", "quickstart-dense-seed0"}
    with pytest.raises(ValueError, match="not presets"):
        SweepSpec(sizes=["no-such-preset"]).runs()
    with pytest.raises(ValueError, match="sweep run .*topkast.*sparsity"):
        SweepSpec(sparsities=["1.5"]).runs()
    with pytest.raises(ValueError, match="unknown config key"):
        SweepSpec(overrides=["train.nope=1"]).runs()
    with pytest.raises(ValueError, match="seeds is empty"):
        SweepSpec(seeds=[]).runs()
    with pytest.raises(ValueError, match="unknown sweep spec keys"):
        SweepSpec.from_dict({"method": ["dense"]})


def test_spec_files(tmp_path: Path) -> None:
    toml = tmp_path / "spec.toml"
    toml.write_text(
        'preset = "tiny"\nmethods = ["dense", "set"]\nsparsities = [0.8]\nseeds = [3]\n'
        '[sizes]\nsmall = ["lm.model.d_model=16"]\n'
    )
    spec = SweepSpec.load(toml)
    assert spec.sparsities == ["0.8"] and spec.sizes == {"small": ["lm.model.d_model=16"]}
    assert set(spec.runs()) == {"small-dense-seed3", "small-set-s0.8-seed3"}
    as_json = tmp_path / "spec.json"
    as_json.write_text(json.dumps({"methods": ["dense"], "seeds": [0]}))
    assert SweepSpec.load(as_json).methods == ["dense"]
    (tmp_path / "spec.yaml").write_text("methods: [dense]\n")
    with pytest.raises(ValueError, match=".toml or .json"):
        SweepSpec.load(tmp_path / "spec.yaml")
    with pytest.raises(FileNotFoundError):
        SweepSpec.load(tmp_path / "missing.toml")


def test_sweep_runs_resumes_and_reports(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    out = tmp_path / "sweep"
    lines: list[str] = []
    dirs = run_sweep(spec, out, log=lines.append)
    assert set(dirs) == {"tiny-dense-seed0", "tiny-topkast-s0.9_0.8-seed0"}
    for run_dir in dirs.values():
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["train_flops"] > 0 and summary["inference_flops"] > 0
        assert (run_dir / "report.md").exists()
    dense = json.loads((dirs["tiny-dense-seed0"] / "summary.json").read_text())
    sparse = json.loads((dirs["tiny-topkast-s0.9_0.8-seed0"] / "summary.json").read_text())
    assert sparse["train_flops"] < dense["train_flops"]
    assert (out / "report.md").exists() and (out / "results.csv").exists()
    assert (out / "pareto.png").stat().st_size > 0
    assert load_spec(out) == spec

    # A second call skips finished runs; an interrupted one (checkpoint, no summary) resumes.
    (dirs["tiny-dense-seed0"] / "summary.json").unlink()
    lines.clear()
    run_sweep(spec, out, log=lines.append)
    assert any("tiny-topkast" in line and "skipped" in line for line in lines)
    assert any("tiny-dense" in line and "resuming" in line for line in lines)

    with pytest.raises(ValueError, match="different sweep"):
        run_sweep(_spec(tmp_path, seeds=[5]), out, log=lines.append)


def test_cli_sweep_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-sweep"
    corpus = _corpus(tmp_path)
    args = [
        "sweep", "--out", str(out), "--preset", "tiny", "--methods", "dense", "static",
        "--sparsities", "0.8", "--steps", "6", "--no-progress", "lm.data.name=text",
        f"lm.data.paths={corpus}", "train.eval_interval=3", "train.checkpoint_interval=3",
        "train.final_eval_batches=2", "train.log_interval=3",
    ]  # fmt: skip
    assert main(args) == 0
    assert (out / "tiny-static-s0.8-seed0" / "summary.json").exists()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("report.md")
    assert main(["report", str(out / "tiny-dense-seed0")]) == 0
    assert main(["report", str(tmp_path)]) == 2
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    assert main(["sweep", str(spec), "--out", str(out), "--methods", "dense"]) == 2
