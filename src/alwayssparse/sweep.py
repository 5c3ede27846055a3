"""Grids of runs: methods x sparsities x model sizes x seeds, each run in its own directory.

The BERT paper compares methods by validation loss against training FLOPs over a family of model
sizes (dynsparse-bert.md section 2.3, Figure 3): the dense family draws a curve, each sparse run is
a point, and the gain is the FLOP reduction at equal loss. A sweep runs such a grid; the report
(:func:`alwayssparse.report.write_sweep_report`) draws and tabulates it.

A spec is a TOML or JSON file (or the same fields given as command-line options)::

    preset = "tiny"                     # base configuration of every run
    methods = ["dense", "static", "topkast"]
    sparsities = ["0.9", "0.8/0.5"]     # forward, or FORWARD/BACKWARD for Top-KAST
    seeds = [0, 1]
    overrides = ["train.steps=200"]     # applied to every run

    [sizes]                             # model sizes: name = overrides on the base preset
    small = ["lm.model.d_model=32", "lm.model.d_ff=64"]
    large = ["lm.model.d_model=64", "lm.model.d_ff=128"]

``sizes`` may instead be a list of preset names (``["bert-tiny", "bert-mini"]``), each the base
of its own runs. Dense runs ignore ``sparsities`` (one per size and seed). Runs are named
``{size}-{method}[-s{sparsity}]-seed{seed}``.

The sweep is resumable: finished runs (with ``summary.json``) are skipped, interrupted runs with a
checkpoint are resumed, and interrupted runs without one start again. The resolved spec is saved as
``sweep.json``; running a different spec into the same directory is an error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alwayssparse.config import apply_overrides, from_dict, to_dict
from alwayssparse.methods import DENSE
from alwayssparse.presets import PRESETS, preset
from alwayssparse.report import write_sweep_report
from alwayssparse.runconfig import RunConfig, is_sparse_method
from alwayssparse.sparsity import parse_sparsity
from alwayssparse.train import train

SPEC_FILE = "sweep.json"


@dataclass
class SweepSpec:
    """A grid of runs (see the module docstring for the file format).

    Attributes:
        preset: Base preset of every run (unless ``sizes`` lists presets).
        methods: Method names, ``"dense"`` included.
        sparsities: Forward sparsities as text: ``"0.9"``, ``"90%"``, ``"0.9/0.8"``.
        sizes: Model sizes: a table name -> overrides on ``preset``, or a list of preset names.
            Empty: one size, named after ``preset``.
        seeds: Values of ``train.seed``.
        overrides: Dotted ``key=value`` overrides applied to every run.
    """

    preset: str = "tiny"
    methods: list[str] = field(default_factory=lambda: [DENSE, "topkast"])
    sparsities: list[str] = field(default_factory=lambda: ["0.9"])
    sizes: dict[str, list[str]] | list[str] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> SweepSpec:
        """Read a ``.toml`` or ``.json`` spec; unknown keys are an error."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"sweep spec {path} not found")
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                raise ValueError("TOML specs need Python 3.11; write the spec as JSON") from None
            data = tomllib.loads(path.read_text())
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise ValueError(f"sweep spec must be .toml or .json, got {path.name}")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown sweep spec keys {unknown}; valid: {sorted(names)}")
        data = dict(data)
        if "sparsities" in data:
            data["sparsities"] = [str(s) for s in data["sparsities"]]
        return cls(**data)

    def size_bases(self) -> dict[str, Callable[[], RunConfig]]:
        """Per size name, a function building that size's base configuration."""
        if isinstance(self.sizes, list):
            unknown = [name for name in self.sizes if name not in PRESETS]
            if unknown:
                raise ValueError(f"sizes {unknown} are not presets; available: {sorted(PRESETS)}")
            return {name: functools.partial(preset, name) for name in self.sizes}
        if not self.sizes:
            return {self.preset: functools.partial(preset, self.preset)}
        return {
            name: functools.partial(_with_overrides, self.preset, items)
            for name, items in self.sizes.items()
        }

    def runs(self) -> dict[str, RunConfig]:
        """Every run of the grid by name, validated (errors name the run)."""
        for key in ("methods", "seeds"):
            if not getattr(self, key):
                raise ValueError(f"sweep spec: {key} is empty")
        if any(is_sparse_method(m) for m in self.methods) and not self.sparsities:
            raise ValueError("sweep spec: sparsities is empty but sparse methods are listed")
        runs: dict[str, RunConfig] = {}
        for size, base in self.size_bases().items():
            for method in self.methods:
                levels = self.sparsities if is_sparse_method(method) else [None]
                for level in levels:
                    for seed in self.seeds:
                        name = _run_name(size, method, level, seed)
                        try:
                            runs[name] = self._configure(base(), method, level, seed)
                        except ValueError as error:
                            raise ValueError(f"sweep run {name}: {error}") from None
        return runs

    def _configure(self, config: RunConfig, method: str, level: str | None, seed: int) -> RunConfig:
        apply_overrides(config, self.overrides)
        config.sparsity.method = method
        if level is not None:
            forward, backward = parse_sparsity(level)
            config.sparsity.sparsity = forward
            if backward is not None:
                config.sparsity.topkast.backward_sparsity = backward
        config.train.seed = seed
        config.validate()
        return config


def _with_overrides(name: str, overrides: list[str]) -> RunConfig:
    return apply_overrides(preset(name), overrides)


def _run_name(size: str, method: str, level: str | None, seed: int) -> str:
    tag = "" if level is None else "-s" + level.strip("()").replace("%", "").replace(" ", "")
    return f"{size}-{method}{tag.replace('/', '_').replace(',', '_')}-seed{seed}"


def run_sweep(
    spec: SweepSpec,
    sweep_dir: str | Path,
    *,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Run every run of ``spec`` not yet finished in ``sweep_dir``; return run name -> directory.

    All runs are built and validated before the first one starts. Each run writes its own
    report; the sweep's report (table and Pareto plot) is written at the end.
    """
    sweep_dir = Path(sweep_dir)
    runs = spec.runs()
    saved = sweep_dir / SPEC_FILE
    resolved = to_dict(spec)
    if saved.exists():
        previous = json.loads(saved.read_text())
        if previous != resolved:
            raise ValueError(
                f"{sweep_dir} holds a different sweep ({saved}); use another directory"
            )
    sweep_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(resolved, indent=2) + "\n")
    directories: dict[str, Path] = {}
    for index, (name, config) in enumerate(runs.items(), start=1):
        run_dir = sweep_dir / name
        directories[name] = run_dir
        header = f"[{index}/{len(runs)}] {name}"
        if (run_dir / "summary.json").exists():
            log(f"{header}: done, skipped")
            continue
        resume = (run_dir / "checkpoint.pt").exists()
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)  # interrupted before its first checkpoint: start again
        log(f"{header}: {'resuming' if resume else 'training'}")
        train(config, run_dir, resume=resume, progress=progress, log=lambda _: None)
    report = write_sweep_report(sweep_dir)
    log(f"sweep report: {report}")
    return directories


def load_spec(sweep_dir: str | Path) -> SweepSpec:
    """The spec saved in a sweep directory."""
    path = Path(sweep_dir) / SPEC_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a sweep directory")
    return from_dict(SweepSpec, json.loads(path.read_text()))


__all__ = ["SweepSpec", "load_spec", "run_sweep"]
