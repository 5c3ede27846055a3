"""The training command and loop: a real short run, resume, validation errors, the README."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from alwayssparse import host_memory
from alwayssparse.cli import build_config, main, make_parser, parse_sparsity
from alwayssparse.train import (
    PRESETS,
    OptimConfig,
    RunConfig,
    learning_rate,
    load_run_config,
    preset,
    train,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def _tiny(tmp_path: Path, **overrides: object) -> RunConfig:
    """The tiny preset on a small corpus written by the test (fast, no stdlib scan)."""
    corpus = tmp_path / "corpus.txt"
    text = "the quick brown fox jumps over the lazy dog. " * 400
    corpus.write_text(text)
    config = preset("tiny")
    config.lm.data.name, config.lm.data.paths = "text", [str(corpus)]
    for key, value in overrides.items():
        section, field = key.split("__")
        setattr(getattr(config, section), field, value)
    return config


def _quiet(_: str) -> None:
    pass


def test_short_topkast_run_lowers_loss_and_writes_run_dir(tmp_path: Path) -> None:
    config = _tiny(tmp_path, train__steps=60)
    summary = train(config, tmp_path / "run", progress=False, log=_quiet)
    run = tmp_path / "run"
    for name in ("config.json", "layout.txt", "metrics.jsonl", "checkpoint.pt", "summary.json"):
        assert (run / name).exists(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < losses[0] - 1.0  # from ~ln(256)=5.5 nats down on a repetitive corpus
    assert summary["valid_bpc"] < 6.0
    assert summary["forward_density"] == pytest.approx(0.1, abs=1e-3)
    assert summary["backward_density"] == pytest.approx(0.2, abs=1e-3)
    assert any(r["kind"] == "eval" for r in records)
    assert json.loads((run / "summary.json").read_text())["test_bpc"] == summary["test_bpc"]
    assert load_run_config(run) == config


def test_dense_and_static_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reuse: list[int] = []  # train.reuse_host_memory: on by default, off in the static run
    monkeypatch.setattr(host_memory, "reuse_freed_memory", lambda: reuse.append(1) or True)
    dense = train(_tiny(tmp_path, sparsity__method="dense"), tmp_path / "d", progress=False,
                  log=_quiet)  # fmt: skip
    assert reuse == [1]
    # Dense is a method: a Sparsity that makes nothing sparse, no division by zero sparse entries.
    assert dense["forward_density"] == dense["backward_density"] == dense["explored_dof"] == 1.0
    total = dense["parameters"]["total"]
    assert dense["parameters"] == {"total": total, "dense": total, "sparse": 0, "forward": total,
                                   "backward": total}  # fmt: skip
    assert "dense method" in (tmp_path / "d" / "layout.txt").read_text()
    assert not (tmp_path / "d" / "dynamics.jsonl").exists()
    static = train(_tiny(tmp_path, sparsity__method="static", train__reuse_host_memory=False),
                   tmp_path / "s", progress=False, log=_quiet)  # fmt: skip
    assert reuse == [1]
    assert static["forward_density"] == static["backward_density"] == pytest.approx(0.1, abs=1e-3)


def test_dense_run_resumes_from_a_checkpoint_without_sparsity_state(tmp_path: Path) -> None:
    # Dense runs from before dense was a method saved no sparsity state (None).
    config = _tiny(tmp_path, sparsity__method="dense", train__steps=4, train__checkpoint_interval=4)
    train(config, tmp_path / "d", progress=False, log=_quiet)
    path = tmp_path / "d" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["sparsity"] = None
    torch.save(state, path)
    resumed = load_run_config(tmp_path / "d")
    resumed.train.steps = 6
    summary = train(resumed, tmp_path / "d", resume=True, progress=False, log=_quiet)
    assert summary["steps"] == 6


def test_resume_continues_bit_identically(tmp_path: Path) -> None:
    # A constant schedule, so that a 10-step run is the first half of the 20-step run.
    config = _tiny(tmp_path, train__steps=20, train__checkpoint_interval=10,
                   optim__schedule="constant")  # fmt: skip
    config.sparsity.topkast.random_exploration = True  # the sparsity generator matters
    full = train(config, tmp_path / "full", progress=False, log=_quiet)

    half = _tiny(tmp_path, train__steps=10, train__checkpoint_interval=10,
                 optim__schedule="constant")  # fmt: skip
    half.sparsity.topkast.random_exploration = True
    train(half, tmp_path / "part", progress=False, log=_quiet)
    resumed_config = load_run_config(tmp_path / "part")
    resumed_config.train.steps = 20
    resumed = train(resumed_config, tmp_path / "part", resume=True, progress=False, log=_quiet)

    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["valid_bpc"] == full["valid_bpc"]


def test_existing_run_is_not_overwritten(tmp_path: Path) -> None:
    config = _tiny(tmp_path, train__steps=5)
    train(config, tmp_path / "run", progress=False, log=_quiet)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(FileExistsError):
        train(config, tmp_path / "run", progress=False, log=_quiet)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sparsity.sparsity=1.0"], "sparsity must be in [0, 1)"),
        (["sparsity.sparsity=-0.5"], "sparsity must be in [0, 1)"),
        (["sparsity.topkast.backward_sparsity=-0.2"], "backward density D + M <= 1"),
        (["sparsity.topkast.backward_sparsity=0.95"], "must not exceed the forward sparsity"),
        (["sparsity.topkast.refresh_interval=0"], "refresh_interval must be >= 1"),
        (["sparsity.method=bogus"], "sparsity.method must be one of"),
        (["sparsity.bogus=1"], "unknown config key 'sparsity.bogus'"),
        (["optim.name=lion"], "optim.name must be one of"),
        (["train.steps=0"], "train.steps must be >= 1"),
        (["lm.model.d_model=33"], "n_head"),
        (["lm.data.name=enwik8"], "data.paths is required"),
        (["task=vision"], "task must be one of"),
    ],
)
def test_invalid_config_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], message: str
) -> None:
    code = main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), *overrides])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written


def test_sparsity_pair_forms() -> None:
    assert parse_sparsity("0.9") == (0.9, None)
    assert parse_sparsity("90%") == (0.9, None)
    assert parse_sparsity("0.9/0.8") == (0.9, 0.8)
    assert parse_sparsity("(80%, 60%)") == (0.8, 0.6)
    with pytest.raises(ValueError, match="sparsity"):
        parse_sparsity("a/b")
    args = make_parser().parse_args(["train", "--sparsity", "(95%, 90%)", "--method", "topkast"])
    config = build_config(args)
    assert config.sparsity.sparsity == pytest.approx(0.95)
    assert config.sparsity.topkast.backward_sparsity == pytest.approx(0.9)


def test_cli_train_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefgh " * 2000)
    run = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--text", str(corpus), "--out", str(run),
                 "--no-progress", "--steps", "10", "--method", "static"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "valid bpc" in out and "sparse" in out
    assert json.loads((run / "config.json").read_text())["sparsity"]["method"] == "static"
    assert main(["config", "--preset", "tiny", "lm.model.n_layer=3"]) == 0
    assert json.loads(capsys.readouterr().out)["lm"]["model"]["n_layer"] == 3
    assert main(["methods"]) == 0 and "topkast" in capsys.readouterr().out
    assert main(["presets"]) == 0 and "quickstart" in capsys.readouterr().out


def test_learning_rate_schedule() -> None:
    config = preset("quickstart").optim
    assert learning_rate(0, 1000, config) == pytest.approx(config.lr / config.warmup_steps)
    assert learning_rate(config.warmup_steps, 1000, config) == pytest.approx(config.lr)
    assert learning_rate(1000, 1000, config) == pytest.approx(config.lr * config.min_lr_ratio)


def test_learning_rate_linear_step_and_warmup_start() -> None:
    # Transformer-XL: warm-up from 1e-7 to 2e-4 over 4000 steps (topkast.md appendix A).
    xl = OptimConfig(lr=2e-4, warmup_steps=4000, warmup_initial_lr=1e-7)
    assert learning_rate(0, 10_000, xl) == pytest.approx(1e-7 + (2e-4 - 1e-7) / 4000)
    assert learning_rate(3999, 10_000, xl) == pytest.approx(2e-4)
    # BERT: linear decay after warm-up; halfway through the decay -> half way to min.
    bert = OptimConfig(lr=1e-3, warmup_steps=100, schedule="linear", min_lr_ratio=0.0)
    assert learning_rate(100 + 450, 1000, bert) == pytest.approx(0.5e-3)
    assert learning_rate(1000, 1000, bert) == pytest.approx(0.0)
    # ResNet-50: x0.1 at 30%, 70%, 90% of the run (epochs 30, 70, 90 of ~100).
    resnet = OptimConfig(lr=1.6, warmup_steps=5, schedule="step")
    assert learning_rate(10, 100, resnet) == pytest.approx(1.6)
    assert learning_rate(30, 100, resnet) == pytest.approx(0.16)
    assert learning_rate(75, 100, resnet) == pytest.approx(0.016)
    assert learning_rate(95, 100, resnet) == pytest.approx(0.0016)


def _readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_example_runs_and_trains() -> None:
    example = _readme_blocks("python")[0]  # "Sparse training in your own loop"
    namespace: dict[str, object] = {}
    torch.manual_seed(0)
    exec(compile(example, "README example", "exec"), namespace)
    sparsity = namespace["sparsity"]
    densities = sparsity.densities()  # type: ignore[attr-defined]
    assert all(fwd == pytest.approx(0.1, abs=2e-3) for fwd, _ in densities.values())
    assert all(bwd == pytest.approx(0.2, abs=2e-3) for _, bwd in densities.values())
    assert namespace["loss"].item() < 2.0  # type: ignore[attr-defined]  # ln(10) = 2.30 at chance


def test_readme_setup_commands() -> None:
    setup = _readme_blocks("bash")[0].strip().splitlines()
    assert len(setup) == 2
    assert setup[0].startswith('pip install "torch==2.13.0"') and "alwayssparse train" in setup[0]
    assert "pytest" in setup[1]


def test_sparse_backend_run_matches_masked(tmp_path: Path) -> None:
    masked = train(_tiny(tmp_path, train__steps=20), tmp_path / "m", progress=False, log=_quiet)
    config = _tiny(tmp_path, train__steps=20)
    config.sparsity.backend = "sparse"
    sparse = train(config, tmp_path / "s", progress=False, log=_quiet)
    assert sparse["valid_bpc"] == pytest.approx(masked["valid_bpc"], abs=1e-4)
    assert sparse["parameters"] == masked["parameters"]
    resumed = load_run_config(tmp_path / "s")
    assert resumed.sparsity.backend == "sparse"


# -- the command line: data flags, backward sparsity, preset descriptions -----------------------


def _enwik8_like(path: Path, pages: int = 40) -> Path:
    """A few KB in enwik8's format: a MediaWiki XML dump."""
    page = (
        "<page>\n  <title>Anarchism</title>\n  <id>12</id>\n  <revision>\n"
        "    <text xml:space=\"preserve\">'''Anarchism''' is a [[political philosophy]] that "
        "holds [[the state]] to be undesirable.</text>\n  </revision>\n</page>\n"
    )
    path.write_text('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.3/">\n' + page * pages)
    return path


def _cli_config(*argv: str) -> RunConfig:
    return build_config(make_parser().parse_args(["config", *argv]))


def test_data_flags_go_to_the_data_section_of_the_task_trained(tmp_path: Path) -> None:
    enwik8 = _enwik8_like(tmp_path / "enwik8")
    text = tmp_path / "book.txt"
    text.write_text("Some text. More text.\n\nAnother document.\n")
    lm = _cli_config("--preset", "tiny", "--enwik8", str(enwik8))
    assert (lm.lm.data.name, lm.lm.data.paths) == ("enwik8", [str(enwik8)])
    xl = _cli_config("--preset", "enwik8-xl-small", "--enwik8", str(enwik8))
    assert (xl.xl.data.name, xl.xl.data.paths) == ("enwik8", [str(enwik8)])
    assert xl.lm.data.paths == []  # not the lm section's
    xl = _cli_config("--preset", "xl-tiny", "--text", str(text), str(tmp_path))
    assert (xl.xl.data.name, xl.xl.data.paths) == ("text", [str(text), str(tmp_path)])
    bert = _cli_config("--preset", "bert-tiny-here", "--text", str(text))
    assert bert.bert.files == [str(text)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "bert-tiny-here", "--enwik8", "{enwik8}"], "task bert reads text files"),
        (["--preset", "bert-tiny-here", "--text", "{dir}"], "not directories"),
        (["--preset", "resnet20-fashion-mnist", "--text", "{text}"], "image.path=DIR"),
        (["--preset", "resnet50-imagenet", "--enwik8", "{enwik8}"], "image.path=DIR"),
    ],
)
def test_data_flags_a_task_cannot_read_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    paths = {"enwik8": str(_enwik8_like(tmp_path / "enwik8")), "dir": str(tmp_path),
             "text": str(_enwik8_like(tmp_path / "a.txt"))}  # fmt: skip
    argv = [arg.format(**paths) for arg in argv]
    assert main(["train", *argv, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["static", "set", "rigl", "dynsparse", "gmp", "dense"])
def test_backward_sparsity_is_refused_for_methods_without_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str
) -> None:
    code = main(["train", "--preset", "tiny", "--method", method, "--sparsity", "0.9/0.8",
                 "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 2
    assert f"method {method} has no backward sparsity" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    forward_only = _cli_config("--preset", "tiny", "--method", method, "--sparsity", "0.8")
    assert forward_only.sparsity.sparsity == 0.8


def test_presets_list_their_own_one_line_descriptions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(PRESETS)  # one line each
    for line, (name, entry) in zip(lines, sorted(PRESETS.items()), strict=True):
        assert line.split()[0] == name and line.endswith(entry.description)
        assert "partial(" not in line and entry.description
    assert "BERT-Mini" in PRESETS["bert-mini"].description


def test_enwik8_xl_preset_trains_on_an_enwik8_file(tmp_path: Path) -> None:
    enwik8 = _enwik8_like(tmp_path / "enwik8")  # 8.5 KB; the split below takes 8 KB of it
    run = tmp_path / "run"
    small = [
        "train.steps=2", "train.batch_size=2", "train.report=false",
        "xl.data.enwik8_split=[6000,1000,1000]", "xl.model.n_layer=1", "xl.model.d_model=32",
        "xl.model.n_head=2", "xl.model.d_head=16", "xl.model.d_ff=64", "xl.model.d_embed=32",
        "xl.model.tgt_len=16", "xl.model.mem_len=16", "xl.model.eval_mem_len=16",
    ]  # fmt: skip
    code = main(["train", "--preset", "enwik8-xl-small", "--enwik8", str(enwik8), "--out",
                 str(run), "--no-progress", *small])  # fmt: skip
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "xl" and summary["steps"] == 2 and summary["valid_bpc"] > 0
    config = load_run_config(run)
    assert (config.xl.data.name, config.xl.data.paths) == ("enwik8", [str(enwik8)])


def test_adam_is_fused_where_torch_has_the_kernel() -> None:
    """optim.fused (default): torch's fused Adam/AdamW on CPU float parameters, the plain loop
    when turned off or when the parameters cannot take it; both step alike."""
    from alwayssparse.optim import build_optimizer, fused_supported
    from alwayssparse.runconfig import OptimConfig

    torch.manual_seed(0)
    models = [torch.nn.Linear(8, 4) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = build_optimizer(models[0], OptimConfig(weight_decay=0.1))
    plain = build_optimizer(models[1], OptimConfig(weight_decay=0.1, fused=False))
    assert fused.defaults["fused"] is True and not plain.defaults.get("fused")
    x = torch.randn(16, 8)
    for _ in range(3):
        for model, optimizer in zip(models, (fused, plain), strict=True):
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not fused_supported([])
    assert not fused_supported([torch.zeros(2, dtype=torch.long)])
    sgd = build_optimizer(models[0], OptimConfig(name="sgd"))
    assert not sgd.defaults.get("fused")
