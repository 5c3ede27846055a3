"""Command line: ``alwayssparse train|sweep|report|config|presets|methods``.

Each subcommand is a short function that turns arguments into a config and calls the library.
Configuration changes are dotted ``key=value`` overrides (``model.n_layer=4``,
``sparsity.topkast.refresh_interval=100``); unknown keys are rejected with the list of valid ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from alwayssparse.backends import BACKENDS
from alwayssparse.config import apply_overrides, to_dict
from alwayssparse.methods import METHODS
from alwayssparse.presets import PRESETS, preset
from alwayssparse.report import write_run_report, write_sweep_report
from alwayssparse.runconfig import RunConfig, is_sparse_method, load_run_config
from alwayssparse.sparsity import parse_sparsity
from alwayssparse.sweep import SPEC_FILE, SweepSpec, run_sweep
from alwayssparse.tasks import TASKS
from alwayssparse.train import TrainingDiverged, train


def build_config(args: argparse.Namespace) -> RunConfig:
    """The run configuration from a preset (or a run directory) plus the options given."""
    config = load_run_config(args.resume) if args.resume else preset(args.preset)
    if args.method is not None:
        config.sparsity.method = args.method
    if args.sparsity is not None:
        _set_sparsity(config, args.sparsity)
    if args.steps is not None:
        config.train.steps = args.steps
    if args.backend is not None:
        config.sparsity.backend = args.backend
    # Data files go to the data section of the task trained; the task says what it reads.
    if args.text:
        TASKS[config.task].use_data(config.task_config(), "text", list(args.text))
    if args.enwik8:
        TASKS[config.task].use_data(config.task_config(), "enwik8", [args.enwik8])
    apply_overrides(config, args.overrides)
    config.validate()
    return config


def _set_sparsity(config: RunConfig, text: str) -> None:
    """``--sparsity FORWARD`` or ``FORWARD/BACKWARD``; a backward sparsity only for a method
    whose options have a ``backward_sparsity`` field (Top-KAST's)."""
    forward, backward = parse_sparsity(text)
    config.sparsity.sparsity = forward
    if backward is None:
        return
    options = config.sparsity.method_options()
    if "backward_sparsity" not in {f.name for f in dataclasses.fields(options)}:
        raise ValueError(
            f"--sparsity {text}: method {config.sparsity.method} has no backward sparsity "
            "(its gradient set is its forward set); give the forward sparsity only"
        )
    setattr(options, "backward_sparsity", backward)  # noqa: B010 (a field of this method only)


def _default_run_dir(config: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    method = config.sparsity.method
    tag = f"{method}-s{config.sparsity.sparsity:g}" if is_sparse_method(method) else method
    return Path("runs") / f"{tag}-{stamp}"


def cmd_train(args: argparse.Namespace) -> int:
    config = build_config(args)
    run_dir = Path(args.resume or args.out or _default_run_dir(config))
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 speaks
        print(f"run directory: {run_dir}")
    train(config, run_dir, resume=bool(args.resume), overwrite=args.overwrite,
          progress=not args.no_progress)  # fmt: skip
    return 0


_GRID = ("preset", "methods", "sparsities", "seeds", "sizes")


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run (or resume) a grid of runs into ``--out`` and write the sweep report."""
    if args.spec and "=" in args.spec and not Path(args.spec).exists():
        args.overrides, args.spec = [args.spec, *args.overrides], None  # an override, not a file
    if args.spec:
        spec = SweepSpec.load(args.spec)
        given = [k for k in _GRID if getattr(args, k)]
        if given:
            raise ValueError(f"give the grid in the spec file or as options, not both: {given}")
    else:
        spec = SweepSpec()
        for key in _GRID:
            if getattr(args, key):
                setattr(spec, key, getattr(args, key))
    spec.overrides = [*spec.overrides, *args.overrides]
    if args.steps is not None:
        spec.overrides.append(f"train.steps={args.steps}")
    run_sweep(spec, args.out, progress=not args.no_progress)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report of a run directory or of a sweep directory."""
    directory = Path(args.directory)
    if (directory / SPEC_FILE).exists():
        print(write_sweep_report(directory))
    elif (directory / "summary.json").exists():
        print(write_run_report(directory))
    else:
        raise FileNotFoundError(
            f"{directory} is neither a run directory (summary.json) nor a sweep ({SPEC_FILE})"
        )
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(json.dumps(to_dict(build_config(args)), indent=2))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for name, entry in sorted(PRESETS.items()):
        print(f"{name:12s} {entry.description}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    for name, cls in sorted(METHODS.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:10s} {doc}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else "..."
            print(f"{'':10s}   sparsity.{name}.{f.name} = {default}")
    return 0


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="quickstart", choices=sorted(PRESETS))
    parser.add_argument("--method", help=f"one of {sorted(METHODS)}")
    parser.add_argument(
        "--sparsity",
        help="forward sparsity, or FORWARD/BACKWARD for a method with a backward sparsity "
        "(Top-KAST): 0.9, 90%%, 0.9/0.8, '(90%%, 80%%)'",
    )
    parser.add_argument("--steps", type=int, help="number of optimizer steps")
    parser.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        help="masked (any layer), sparse (Linear, CPU) or gpu (Linear, CUDA block-sparse)",
    )
    parser.add_argument(
        "--text",
        nargs="+",
        metavar="PATH",
        help="train on these text files/dirs (tasks lm, xl; bert: files)",
    )
    parser.add_argument(
        "--enwik8", metavar="PATH", help="the enwik8 file or enwik8.zip (tasks lm, xl)"
    )
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def make_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``alwayssparse`` command."""
    parser = argparse.ArgumentParser(
        prog="alwayssparse", description="Always-sparse training (Top-KAST, static, ...)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a byte-level language model")
    _add_run_options(p_train)
    p_train.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/...)")
    p_train.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_train.add_argument(
        "--overwrite", action="store_true", help="replace the run files already in --out"
    )
    p_train.set_defaults(func=cmd_train)
    p_sweep = sub.add_parser(
        "sweep", help="run a grid of methods x sparsities x sizes x seeds (resumable)"
    )
    p_sweep.add_argument("spec", nargs="?", help="sweep spec file (.toml or .json)")
    p_sweep.add_argument("--out", required=True, metavar="SWEEP_DIR", help="sweep directory")
    p_sweep.add_argument("--preset", choices=sorted(PRESETS), help="base preset of every run")
    p_sweep.add_argument("--methods", nargs="+", help="methods, dense included")
    p_sweep.add_argument("--sparsities", nargs="+", help="e.g. 0.9 0.8/0.5 95%%")
    p_sweep.add_argument("--sizes", nargs="+", metavar="PRESET", help="presets as model sizes")
    p_sweep.add_argument("--seeds", nargs="+", type=int, help="train.seed values")
    p_sweep.add_argument("--steps", type=int, help="optimizer steps of every run")
    p_sweep.add_argument("--no-progress", action="store_true", help="no progress bars")
    p_sweep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="for every run")
    p_sweep.set_defaults(func=cmd_sweep)
    p_report = sub.add_parser("report", help="(re)write the report of a run or a sweep")
    p_report.add_argument("directory", help="a run directory or a sweep directory")
    p_report.set_defaults(func=cmd_report)
    p_config = sub.add_parser("config", help="print the resolved configuration")
    _add_run_options(p_config)
    p_config.set_defaults(func=cmd_config)
    sub.add_parser("presets", help="list presets").set_defaults(func=cmd_presets)
    sub.add_parser("methods", help="list methods and options").set_defaults(func=cmd_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Bad input (configuration, files, checkpoints) and failed runs (divergence,
    a full disk) print one ``alwayssparse: error:`` line, with no traceback, and exit with
    status 2 (bad input) or 1 (the run failed)."""
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also come after options (argparse stops at the first option).
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args))
    except (ValueError, OSError) as error:
        print(f"alwayssparse: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"alwayssparse: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("alwayssparse: interrupted (resume with --resume RUN_DIR)", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (an OSError without one: its errno text and file)."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.filename}: {error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


__all__ = ["build_config", "main", "make_parser", "parse_sparsity"]
