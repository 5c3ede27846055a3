"""Kill -9 a training run at random moments, resume it each time, compare with an uninterrupted run.

For each preset: one uninterrupted ``alwayssparse train`` into ``ref/``, then the same run into
``killed/`` killed with SIGKILL ``--kills`` times at random moments (a random step of what is
left to train, then a random delay: while it trains, evaluates or writes a checkpoint) and
resumed with ``--resume`` after each kill (a kill before the first
checkpoint restarts it with ``--overwrite``). At the end ``summary.json`` (all but timings) and
every tensor of the final checkpoint (model, optimizer, sparsity state, RNG states) must be
identical. Prints a table: preset, kills, resumes, restarts, identical or not.

    python benchmarks/stress_resume.py --presets tiny xl-tiny --kills 5
    python benchmarks/stress_resume.py --presets tiny --kills 2 --steps 30   # quick

Extra ``KEY=VALUE`` overrides apply to every run (e.g. ``train.steps=60``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

TIMING_KEYS = ("seconds", "per_second")


def _command(
    preset: str, out: Path, overrides: list[str], resume: bool, overwrite: bool
) -> list[str]:
    base = [sys.executable, "-m", "alwayssparse", "train", "--no-progress"]
    if resume:
        return [*base, "--resume", str(out)]
    return [*base, "--preset", preset, "--out", str(out), *(["--overwrite"] if overwrite else []),
            *overrides]  # fmt: skip


def _run(command: list[str], run_dir: Path, kill_at: int | None, delay: float) -> bool:
    """Run ``command``; SIGKILL it ``delay`` seconds after its metrics reach step ``kill_at``
    (``None``: never). True if it finished by itself."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_at is not None:
        while process.poll() is None and _last_step(run_dir) < kill_at:
            time.sleep(0.005)
        time.sleep(delay)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return False
    process.wait()
    if process.returncode != 0:
        error = process.stderr.read().decode() if process.stderr else ""
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{error}")
    return True


def _last_step(run_dir: Path) -> int:
    """The last step a run logged (0 before it logs)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines if line.endswith("}")]
    return max(steps, default=0)


def _tensors(state: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    if isinstance(state, dict):
        return {
            k: v
            for key, value in state.items()
            for k, v in _tensors(value, f"{prefix}.{key}").items()
        }
    if isinstance(state, list | tuple):
        return {
            k: v
            for i, value in enumerate(state)
            for k, v in _tensors(value, f"{prefix}[{i}]").items()
        }
    return {prefix: state}


def _differences(ref: Path, run: Path) -> list[str]:
    """What differs between two finished run directories (empty: identical)."""
    differ = []
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    for key in sorted(set(a) | set(b)):
        if not any(t in key for t in TIMING_KEYS) and a.get(key) != b.get(key):
            differ.append(f"summary.{key}: {a.get(key)} != {b.get(key)}")
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (ref, run))
    ta, tb = _tensors(ca), _tensors(cb)
    for key in sorted(set(ta) | set(tb)):
        x, y = ta.get(key), tb.get(key)
        if "seconds" in key:
            continue
        same = (
            torch.equal(x, y)
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
            else x == y
        )
        if not same:
            differ.append(f"checkpoint{key}")
    return differ


def stress(preset: str, kills: int, overrides: list[str], root: Path, rng: random.Random) -> dict:
    ref, run = root / f"{preset}-ref", root / f"{preset}-killed"
    _run(_command(preset, ref, overrides, resume=False, overwrite=False), ref, None, 0.0)
    steps = json.loads((ref / "config.json").read_text())["train"]["steps"]
    resumes = restarts = done_kills = 0
    finished = False
    while not finished:
        have_checkpoint = (run / "checkpoint.pt").exists()
        started_before = run.exists()
        command = _command(preset, run, overrides, resume=have_checkpoint,
                           overwrite=started_before and not have_checkpoint)  # fmt: skip
        if have_checkpoint:
            resumes += 1
        elif started_before:
            restarts += 1
        # A random step of what is left, then a random moment after it (mid-step, evaluating
        # or writing a checkpoint).
        start = _last_step(run) if have_checkpoint else 0
        kill_at = rng.randint(start + 1, max(start + 1, steps - 1)) if done_kills < kills else None
        finished = _run(command, run, kill_at, rng.uniform(0.0, 0.5))
        done_kills += not finished
    differ = _differences(ref, run)
    return {"preset": preset, "kills": done_kills, "resumes": resumes, "restarts": restarts,
            "identical": not differ, "differences": differ[:5]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny"])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--keep", metavar="DIR", help="keep the run directories here")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="stress-"))
    root.mkdir(parents=True, exist_ok=True)
    env_threads = os.environ.get("OMP_NUM_THREADS")
    print(f"kills at a random step of what is left, plus 0-0.5 s; "
          f"OMP_NUM_THREADS={env_threads}; directories under {root}")  # fmt: skip
    rows = [stress(p, args.kills, list(args.overrides), root, rng) for p in args.presets]
    print("\n| preset | kills | resumes | restarts | identical |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['kills']} | {r['resumes']} | {r['restarts']} | "
              f"{'yes' if r['identical'] else 'NO: ' + '; '.join(r['differences'])} |")  # fmt: skip
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if all(r["identical"] for r in rows) else 1)


if __name__ == "__main__":
    main()
