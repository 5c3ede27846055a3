"""Plots and one-page reports of runs and sweeps, the loss-vs-FLOPs Pareto comparison, TensorBoard.

A run directory (see :mod:`alwayssparse.train`) gets ``plots/*.png`` and ``report.md``: training
curves, mask dynamics (topkast.md Figure 3, dynsparse-bert.md Figures 5 and 11) and the
accumulated pattern of one layer. A sweep directory (one run per subdirectory) gets
``pareto.png``, ``results.csv`` and ``report.md``: validation metric against training FLOPs with
the dense family as a curve and sparse runs as points (dynsparse-bert.md Figure 3), and the FLOP
ratio at equal loss against the dense family interpolated linearly in log(FLOPs) (Table 1 and
Table A.8 "Matched (dense)"; section 3.1, "a factor of 0.48"; Figure 8).

Plots use matplotlib's object API on Agg canvases: no pyplot state, nothing left open.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from alwayssparse.dynamics import DYNAMICS_FILE, PATTERN_FILE
from alwayssparse.models.bert import BERT_PRESETS

DENSE = "dense"  # the method name of dense runs (alwayssparse.train.DENSE)
PLOTS_DIR = "plots"
REPORT_FILE = "report.md"
# Settings that do not change what a run computes: runs differing only in these are seeds.
_NOT_CONFIG = ("train.seed", "train.device", "train.threads")


# -- reading run directories --------------------------------------------------------------------


def _read_jsonl(path: Path, key: Any) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; of records with equal ``key(record)``, the last wins (a
    resumed run repeats the steps it logged after its last checkpoint)."""
    if not path.exists():
        return []
    latest: dict[Any, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON record ({error})") from None
        latest.pop(key(record), None)
        latest[key(record)] = record
    return sorted(latest.values(), key=lambda r: r.get("step", math.inf))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (kinds ``train``, ``eval``, ``final``) by step; ``[]``
    when the file is missing."""
    return _read_jsonl(Path(run_dir) / "metrics.jsonl", lambda r: (r.get("kind"), r.get("step")))


def read_dynamics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``dynamics.jsonl`` (see :class:`~alwayssparse.dynamics.MaskDynamics`)."""
    return _read_jsonl(Path(run_dir) / DYNAMICS_FILE, lambda r: r.get("step"))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a finished run directory")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def higher_is_better(metric: str) -> bool:
    """Direction of a task metric: accuracies go up, losses, BPC and perplexities go down."""
    return metric.endswith("accuracy")


def model_size(config: Mapping[str, Any]) -> str:
    """A short model-size label from a run's ``config.json``: ``BERT-Mini`` (Turc et al.'s
    family), ``L2/d128`` (transformers), ``resnet50`` (ResNets)."""
    task = config.get("task", "")
    model = config.get(task, {}).get("model", {}) if isinstance(config.get(task), dict) else {}
    if "hidden_size" in model and "num_layers" in model:
        shape = (model["hidden_size"], model["num_layers"])
        names = [name for name, preset in BERT_PRESETS.items() if preset == shape]
        return f"BERT-{names[0].capitalize()}" if names else f"L{shape[1]}/H{shape[0]}"
    if "n_layer" in model and "d_model" in model:
        return f"L{model['n_layer']}/d{model['d_model']}"
    if "arch" in model:
        return str(model["arch"]) + (f"/w{model['width']}" if model.get("width") else "")
    return "?"


# -- plots of one run ---------------------------------------------------------------------------


def _figure(rows: int, cols: int, width: float = 5.0, height: float = 3.6) -> Figure:
    figure = Figure(figsize=(cols * width, rows * height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    figure.clear()
    return path


def _series(records: Iterable[Mapping[str, Any]], x: str, y: str) -> tuple[list[float], ...]:
    pairs = [(r[x], r[y]) for r in records if _number(r.get(x)) and _number(r.get(y))]
    return tuple(map(list, zip(*pairs, strict=True))) if pairs else ([], [])


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _metric_name(run_dir: Path, records: Sequence[Mapping[str, Any]]) -> str | None:
    """The task's headline metric: from summary.json, else the first ``valid_*`` eval key."""
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        return str(_read_json(summary_path)["metric"])
    for record in records:
        for key in record:
            if record.get("kind") == "eval" and key.startswith("valid_"):
                return key.removeprefix("valid_")
    return None


def plot_training(run_dir: Path, out: Path) -> list[Path]:
    """``training.png``: train loss vs step, the validation metric vs step, and train loss vs
    cumulative training FLOPs (log axis) when the records carry ``train_flops``."""
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    metric = _metric_name(run_dir, records)
    flops = _series(train, "train_flops", "loss")
    if not train:
        return []
    panels = 2 + bool(flops[0])
    figure = _figure(1, panels)
    axes = figure.subplots(1, panels)
    axes[0].plot(*_series(train, "step", "loss"), lw=1)
    axes[0].set(xlabel="step", ylabel="train loss", title="Training loss")
    if metric is not None:
        axes[1].plot(
            *_series(evals, "step", f"valid_{metric}"), "o-", ms=3, label="during training"
        )
        final = _series(
            [r for r in records if r.get("kind") == "final"], "steps", f"valid_{metric}"
        )
        if final[0]:
            axes[1].plot(*final, "k*", ms=9, label="final")
        axes[1].legend(fontsize=7)
    axes[1].set(xlabel="step", ylabel=f"valid {metric}", title="Validation")
    if flops[0]:
        axes[2].plot(*flops, lw=1)
        axes[2].set(xscale="log", xlabel="training FLOPs", ylabel="train loss",
                    title="Loss vs training FLOPs")  # fmt: skip
    for ax in axes:
        ax.grid(alpha=0.3)
    return [_save(figure, out / "training.png")]


def _per_layer(ax: Axes, records: Sequence[Mapping[str, Any]], key: str) -> None:
    """Thin lines, one per sparse tensor, of a per-layer field of the dynamics records."""
    layers = list(records[-1].get(key, {}))
    for name in layers:
        points = [(r["step"], r[key][name]) for r in records if _number(r[key].get(name))]
        if points:
            ax.plot(*zip(*points, strict=True), lw=0.7, alpha=0.6,
                    label=name if len(layers) <= 8 else None)  # fmt: skip
    if 0 < len(layers) <= 8:
        ax.legend(fontsize=6)


def plot_dynamics(run_dir: Path, out: Path) -> list[Path]:
    """``dynamics.png``: (a) fraction of A that changed between recorded points, min/mean/max
    over layers (topkast.md Fig. 3a); (b) fraction of the initial reservoir C ever in A (Fig. 3b);
    (c) explored degrees of freedom (dynsparse-bert.md Fig. 11 left); (d) density of A per layer."""
    records = read_dynamics(run_dir)
    if not records:
        return []
    figure = _figure(2, 2)
    (a, b), (c, d) = figure.subplots(2, 2)
    steps, low = _series(records, "step", "change_fraction_min")
    _, mean = _series(records, "step", "change_fraction_mean")
    _, high = _series(records, "step", "change_fraction_max")
    if steps:
        a.fill_between(steps, low, high, alpha=0.3, label="min-max over layers")
        a.plot(steps, mean, "o-", ms=3, label="mean over layers")
        a.legend(fontsize=7)
    gap = records[-1]["step"] - (records[-1].get("previous_step") or 0)
    apart = f"{gap} step{'s' * (gap != 1)} apart"
    a.set(xlabel="step", ylabel="fraction of A changed", title=f"Mask change ({apart})")
    b.plot(*_series(records, "step", "reservoir_entered_total"), "k-", lw=2, label="all")
    _per_layer(b, records, "reservoir_entered")
    b.set(xlabel="step", ylabel="fraction of initial C", title="Reservoir C ever in A")
    c.plot(*_series(records, "step", "explored_dof_total"), "k-", lw=2, label="all")
    _per_layer(c, records, "explored_dof")
    c.set(xlabel="step", ylabel="fraction ever in A", title="Explored degrees of freedom")
    _per_layer(d, records, "forward_density")
    d.set(xlabel="step", ylabel="density of A", title="Per-layer forward density")
    # Densities are often constant: no offset notation (1e-6 + 1e-1), and the axis from 0.
    d.ticklabel_format(axis="y", useOffset=False, style="plain")
    d.set_ylim(bottom=0.0, top=max(d.get_ylim()[1] * 1.1, 1e-3))
    for ax in (a, b, c, d):
        ax.grid(alpha=0.3)
    return [_save(figure, out / "dynamics.png")]


def plot_pattern(run_dir: Path, out: Path) -> list[Path]:
    """``pattern.png``: the accumulated pattern of one layer, positions ever in A (black) as in
    dynsparse-bert.md Figure 11 right, and the fraction of recorded points spent in A."""
    path = run_dir / PATTERN_FILE
    if not path.exists():
        return []
    counts = np.load(path)
    records = read_dynamics(run_dir)
    last = records[-1] if records else {}
    points = max(int(last.get("pattern_points", counts.max(initial=1))), 1)
    figure = _figure(1, 2, width=5.5, height=4.5)
    ever, share = figure.subplots(1, 2)
    ever.imshow(counts > 0, cmap="Greys", aspect="auto", interpolation="nearest", vmin=0, vmax=1)
    ever.set(title="Ever in A (black)", xlabel="input", ylabel="output")
    image = share.imshow(counts / points, cmap="viridis", aspect="auto", interpolation="nearest",
                         vmin=0, vmax=1)  # fmt: skip
    share.set(title=f"Fraction of {points} recorded points in A", xlabel="input")
    figure.colorbar(image, ax=share)
    figure.suptitle(str(last.get("pattern_layer", "pattern layer")))
    return [_save(figure, out / "pattern.png")]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write every plot the run's files allow into ``run_dir/plots``; return their paths.

    Training curves need ``metrics.jsonl``; the FLOP panel needs ``train_flops`` in its train
    records; mask dynamics need ``dynamics.jsonl``; the pattern image needs ``pattern.npy``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory")
    out = run_dir / PLOTS_DIR
    return [*plot_training(run_dir, out), *plot_dynamics(run_dir, out), *plot_pattern(run_dir, out)]


# -- the report of one run ----------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and not 1e-3 <= abs(value) < 1e5:
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _sparsity_text(config: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    if summary.get("method") == DENSE:
        return "every weight dense"
    forward = config.get("sparsity", {}).get("sparsity")
    return (
        f"sparsity {_fmt(forward, 3)} (density used: forward "
        f"{_fmt(summary.get('forward_density'))}, backward {_fmt(summary.get('backward_density'))})"
    )


def write_run_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.md`` (and its plots): configuration headline, final metrics from
    ``summary.json``, FLOPs, parameter counts, mask-dynamics headline, and the plots."""
    run_dir = Path(run_dir)
    summary = _read_json(run_dir / "summary.json")
    config = _read_json(run_dir / "config.json")
    plots = plot_run(run_dir)
    metric = summary["metric"]
    train = config.get("train", {})
    lines = [
        f"# Run `{run_dir.name}`",
        "",
        f"**{summary['method']}**, {_sparsity_text(config, summary)} · task {summary['task']} · "
        f"model {model_size(config)} · {summary['steps']:,} steps · seed {train.get('seed', '?')}"
        f" · {_fmt(summary.get('train_seconds'), 1)} s",
        "",
        f"## Final metrics (headline: {metric}, "
        f"{'higher' if higher_is_better(metric) else 'lower'} is better)",
        "",
    ]
    names = sorted({k.split("_", 1)[1] for k in summary if k.startswith(("valid_", "test_"))})
    lines += _table(
        ["metric", "valid", "test"],
        [(n, summary.get(f"valid_{n}"), summary.get(f"test_{n}")) for n in names],
    )
    lines += ["", "## FLOPs", ""]
    if "train_flops" in summary:
        lines += _table(
            ["training FLOPs (whole run)", "inference FLOPs"],
            [(summary["train_flops"], summary.get("inference_flops"))],
        )
    else:
        lines.append("Not recorded: this run's summary.json has no `train_flops`.")
    params = summary.get("parameters", {})
    lines += ["", "## Parameters and sparsity", ""]
    lines += _table(
        ["total", "dense", "sparse", "used forward", "receive gradient", "explored DOF"],
        [(params.get("total"), params.get("dense"), params.get("sparse"), params.get("forward"),
          params.get("backward"), summary.get("explored_dof"))],
    )  # fmt: skip
    dynamics = read_dynamics(run_dir)
    if dynamics:
        last = dynamics[-1]
        lines += ["", f"## Mask dynamics (last recorded point, step {last['step']:,})", ""]
        lines += _table(
            ["changed since previous point (min / mean / max)", "initial reservoir C ever in A",
             "explored DOF", "pattern layer"],
            [(" / ".join(_fmt(last.get(f"change_fraction_{k}")) for k in ("min", "mean", "max")),
              last.get("reservoir_entered_total"), last.get("explored_dof_total"),
              f"`{last.get('pattern_layer')}`")],
        )  # fmt: skip
    if plots:
        lines += ["", "## Plots", ""]
        for plot in plots:
            lines += [f"![{plot.stem}]({plot.relative_to(run_dir).as_posix()})", ""]
    path = run_dir / REPORT_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the dense family: interpolation in log(FLOPs) -----------------------------------------------


def _dense_curve(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """(log FLOPs, value) sorted by FLOPs, after checking every point."""
    if not points:
        raise ValueError("the dense family is empty: no dense runs to compare against")
    for flops, value in points:
        if not (_number(flops) and flops > 0 and _number(value)):
            raise ValueError(f"dense point (flops={flops}, value={value}): need finite, flops > 0")
    if len({f for f, _ in points}) != len(points):
        raise ValueError(f"dense points must have distinct FLOPs, got {sorted(points)}")
    return sorted((math.log(f), v) for f, v in points)


def dense_loss_at(dense_points: Sequence[tuple[float, float]], flops: float) -> float | None:
    """The dense family's metric at ``flops``: linear in log(FLOPs) between the adjacent dense
    points (dynsparse-bert.md Table 1 / A.8, "Matched (dense)"); ``None`` outside their range.

    Args:
        dense_points: (training FLOPs, metric) of each dense model size.
        flops: Training FLOPs at which to read the curve (> 0).
    """
    curve = _dense_curve(dense_points)
    if not (_number(flops) and flops > 0):
        raise ValueError(f"flops must be finite and > 0, got {flops}")
    x = math.log(flops)
    for (x0, v0), (x1, v1) in zip(curve, curve[1:], strict=False):
        if x0 <= x <= x1:
            return v0 + (v1 - v0) * (x - x0) / (x1 - x0)
    return curve[0][1] if math.isclose(x, curve[0][0], rel_tol=0, abs_tol=1e-12) else None


def dense_flops_at(
    dense_points: Sequence[tuple[float, float]], loss: float, *, higher_is_better: bool = False
) -> float | None:
    """The fewest training FLOPs at which the dense curve is as good as ``loss``: the inverse
    of :func:`dense_loss_at` on the first segment (in FLOP order) that reaches it. ``None`` when
    no dense point is that good, or the smallest one is already strictly better (both would be
    extrapolation)."""
    curve = _dense_curve(dense_points)
    if not _number(loss):
        raise ValueError(f"loss must be finite, got {loss}")

    def reaches(value: float) -> bool:
        return value >= loss if higher_is_better else value <= loss

    x0, v0 = curve[0]
    if reaches(v0):
        return math.exp(x0) if v0 == loss else None
    for x1, v1 in curve[1:]:
        if reaches(v1):
            return math.exp(x0 + (x1 - x0) * (loss - v0) / (v1 - v0))
        x0, v0 = x1, v1
    return None


def flop_reduction(
    dense_points: Sequence[tuple[float, float]],
    flops: float,
    loss: float,
    *,
    higher_is_better: bool = False,
) -> float | None:
    """FLOP ratio at equal loss: ``flops`` over the dense family's FLOPs reaching ``loss``.

    The horizontal arrow of dynsparse-bert.md Figure 3 ("a reduction of FLOPs for the same MLM
    loss by a factor of 0.48") and Figure 8; below 1 the sparse run needs fewer FLOPs. ``None``
    when ``loss`` lies outside the dense family's range (no extrapolation).

    Args:
        dense_points: (training FLOPs, metric) of each dense model size.
        flops: Training FLOPs of the sparse run.
        loss: Its metric (validation loss, or accuracy with ``higher_is_better``).
        higher_is_better: Direction of the metric.
    """
    if not (_number(flops) and flops > 0):
        raise ValueError(f"flops must be finite and > 0, got {flops}")
    matched = dense_flops_at(dense_points, loss, higher_is_better=higher_is_better)
    return None if matched is None else flops / matched


# -- sweeps ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    """One finished run of a sweep, read from its ``config.json`` and ``summary.json``.

    Attributes:
        path: The run directory.
        method: Method name (``"dense"`` for dense runs).
        sparsity: Forward sparsity (0 for dense runs).
        backward_sparsity: Sparsity of the gradient set B actually used (1 - backward density).
        size: Model-size label (:func:`model_size`).
        seed: ``train.seed``.
        task: Task name; ``metric`` its headline metric, ``value`` its validation value.
        train_flops: Training FLOPs of the whole run, ``None`` if not recorded.
        inference_flops: FLOPs of one inference forward pass, ``None`` if not recorded.
        parameters: Total parameter count.
        group_key: The configuration without seed and device: runs sharing it are seeds.
    """

    path: Path
    method: str
    sparsity: float
    backward_sparsity: float
    size: str
    seed: int
    task: str
    metric: str
    value: float
    train_flops: float | None
    inference_flops: float | None
    parameters: int
    group_key: str = field(repr=False)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def read_run(run_dir: str | Path) -> RunResult:
    """The :class:`RunResult` of a finished run directory."""
    run_dir = Path(run_dir)
    summary = _read_json(run_dir / "summary.json")
    config = _read_json(run_dir / "config.json")
    metric = summary["metric"]
    if f"valid_{metric}" not in summary:
        raise ValueError(f"{run_dir}/summary.json lacks valid_{metric}")
    flat = {k: v for k, v in _flatten(config).items() if k not in _NOT_CONFIG}
    dense = summary["method"] == DENSE
    return RunResult(
        path=run_dir,
        method=summary["method"],
        sparsity=0.0 if dense else float(config["sparsity"]["sparsity"]),
        backward_sparsity=round(1.0 - float(summary.get("backward_density", 1.0)), 6),
        size=model_size(config),
        seed=int(config.get("train", {}).get("seed", 0)),
        task=summary["task"],
        metric=metric,
        value=float(summary[f"valid_{metric}"]),
        train_flops=summary.get("train_flops"),
        inference_flops=summary.get("inference_flops"),
        parameters=int(summary.get("parameters", {}).get("total", 0)),
        group_key=json.dumps(flat, sort_keys=True),
    )


def collect_runs(sweep_dir: str | Path) -> list[RunResult]:
    """Every finished run (a subdirectory holding summary.json and config.json), by name."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a directory")
    return [
        read_run(d)
        for d in sorted(sweep_dir.iterdir())
        if (d / "summary.json").exists() and (d / "config.json").exists()
    ]


@dataclass
class SweepRow:
    """One row of the sweep table: the runs of one configuration over seeds.

    Attributes:
        label: The run directory name without its ``-seed<N>`` suffix.
        runs: The member runs; ``mean``/``std`` of their validation metric (``std`` is ``None``
            for a single seed). FLOPs are means over seeds.
        dense_matched: The dense family's metric at this row's training FLOPs.
        flop_ratio: :func:`flop_reduction` of this row against the dense family.
        note: Why a comparison is missing (outside the dense family's range...).
    """

    label: str
    runs: list[RunResult]
    mean: float
    std: float | None
    train_flops: float
    inference_flops: float | None
    dense_matched: float | None = None
    flop_ratio: float | None = None
    note: str = ""

    @property
    def first(self) -> RunResult:
        """The member with the lowest seed (method, sparsity and size are shared by all)."""
        return self.runs[0]


_SEED_SUFFIX = re.compile(r"[-_]seed\d+$")


def _group(runs: Sequence[RunResult]) -> list[SweepRow]:
    groups: dict[str, list[RunResult]] = {}
    for run in runs:
        groups.setdefault(run.group_key, []).append(run)
    rows = []
    for members in groups.values():
        values = [r.value for r in members]
        names = sorted({_SEED_SUFFIX.sub("", r.path.name) for r in members})
        train = [r.train_flops for r in members if r.train_flops is not None]
        inference = [r.inference_flops for r in members if r.inference_flops is not None]
        complete = len(inference) == len(members)
        rows.append(
            SweepRow(
                label=" + ".join(names),
                runs=sorted(members, key=lambda r: r.seed),
                mean=statistics.fmean(values),
                std=statistics.stdev(values) if len(values) > 1 else None,
                train_flops=statistics.fmean(train),
                inference_flops=statistics.fmean(inference) if complete else None,
            )
        )
    return sorted(rows, key=lambda r: (r.first.method != DENSE, r.first.method, r.train_flops))


def dense_family(rows: Sequence[SweepRow]) -> list[SweepRow]:
    """The dense rows, one per training-FLOP count (the best one where several share it, as the
    paper keeps each size's best learning rate), sorted by FLOPs."""
    best: dict[float, SweepRow] = {}
    for row in rows:
        if row.first.method != DENSE:
            continue
        sign = -1.0 if higher_is_better(row.first.metric) else 1.0
        held = best.get(row.train_flops)
        if held is None or sign * row.mean < sign * held.mean:
            best[row.train_flops] = row
    return [best[f] for f in sorted(best)]


def sweep_table(runs: Sequence[RunResult]) -> list[SweepRow]:
    """Group ``runs`` over seeds and compare each sparse group with the dense family.

    Raises:
        ValueError: If there are no runs, the runs mix tasks or metrics, or a run's summary.json
            lacks ``train_flops`` (the Pareto comparison needs the FLOP ledger).
    """
    if not runs:
        raise ValueError("no finished runs (subdirectories with summary.json and config.json)")
    kinds = sorted({(r.task, r.metric) for r in runs})
    if len(kinds) > 1:
        raise ValueError(f"a sweep compares one task and metric, found {kinds}")
    missing = [r.path.name for r in runs if not _number(r.train_flops)]
    if missing:
        raise ValueError(
            f"runs without train_flops in summary.json: {missing}; the loss-vs-FLOPs "
            "comparison needs training FLOPs recorded by the trainer's FLOP ledger"
        )
    rows = _group(runs)
    family = dense_family(rows)
    points = [(r.train_flops, r.mean) for r in family]
    higher = higher_is_better(runs[0].metric)
    for row in rows:
        if row.first.method == DENSE:
            row.note = (
                "dense family" if any(row is f for f in family) else "dense, not best at its FLOPs"
            )
            continue
        if not points:
            row.note = "no dense runs to compare with"
            continue
        row.dense_matched = dense_loss_at(points, row.train_flops)
        row.flop_ratio = flop_reduction(points, row.train_flops, row.mean, higher_is_better=higher)
        row.note = _range_note(points, row, higher)
    return rows


def _range_note(points: Sequence[tuple[float, float]], row: SweepRow, higher: bool) -> str:
    notes = []
    if row.dense_matched is None:
        notes.append("FLOPs outside the dense family's range")
    if row.flop_ratio is None:
        best = max(v for _, v in points) if higher else min(v for _, v in points)
        beyond = row.mean > best if higher else row.mean < best
        notes.append(
            "better than every dense run (ratio would need extrapolation)"
            if beyond
            else "worse than the smallest dense run (ratio would need extrapolation)"
        )
    return "; ".join(notes)


def plot_pareto(rows: Sequence[SweepRow], path: Path) -> Path:
    """``pareto.png``: validation metric against training FLOPs (log axis); the dense family as a
    dashed line with markers, each sparse method as points (with seed std as error bars), and an
    arrow from each sparse point to the dense curve at equal loss (dynsparse-bert.md Figure 3)."""
    metric = rows[0].first.metric
    figure = _figure(1, 1, width=7.5, height=5.0)
    ax = figure.subplots()
    family = dense_family(rows)
    if family:
        ax.plot([r.train_flops for r in family], [r.mean for r in family], "k--o",
                label="dense family")  # fmt: skip
        for row in family:
            ax.annotate(row.first.size, (row.train_flops, row.mean), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)  # fmt: skip
    points = [(r.train_flops, r.mean) for r in family]
    higher = higher_is_better(metric)
    methods = sorted({r.first.method for r in rows} - {DENSE})
    markers = "s^vD<>pP*X"
    for index, method in enumerate(methods):
        group = [r for r in rows if r.first.method == method]
        ax.errorbar([r.train_flops for r in group], [r.mean for r in group],
                    yerr=[r.std or 0.0 for r in group], fmt=markers[index % len(markers)],
                    color=f"C{index}", capsize=3, ls="none", label=method)  # fmt: skip
        for row in group:
            ax.annotate(f"s={row.first.sparsity:g} {row.first.size}",
                        (row.train_flops, row.mean), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color=f"C{index}")  # fmt: skip
            matched = dense_flops_at(points, row.mean, higher_is_better=higher) if points else None
            if matched is not None:
                ax.annotate("", xy=(row.train_flops, row.mean), xytext=(matched, row.mean),
                            arrowprops={"arrowstyle": "->", "color": "0.4", "lw": 0.8})  # fmt: skip
                ax.annotate(f"x{row.train_flops / matched:.2f}", (matched, row.mean),
                            textcoords="offset points", xytext=(-8, 4), ha="right",
                            fontsize=7, color="0.3")  # fmt: skip
    ax.set(xscale="log", xlabel="training FLOPs", ylabel=f"valid {metric}",
           title=f"valid {metric} vs training FLOPs")  # fmt: skip
    ax.margins(x=0.12, y=0.08)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(figure, path)


_COLUMNS = ("run", "method", "sparsity", "backward sparsity", "size", "parameters", "seeds",
            "mean", "std", "training FLOPs", "inference FLOPs", "dense at same FLOPs",
            "FLOP ratio at equal loss", "note")  # fmt: skip


def _row_values(row: SweepRow) -> list[Any]:
    run = row.first
    return [row.label, run.method, run.sparsity, run.backward_sparsity, run.size, run.parameters,
            " ".join(str(r.seed) for r in row.runs), row.mean, row.std, row.train_flops,
            row.inference_flops, row.dense_matched, row.flop_ratio, row.note]  # fmt: skip


def write_sweep_report(sweep_dir: str | Path) -> Path:
    """Write ``pareto.png``, ``results.csv`` and ``report.md`` into ``sweep_dir``.

    Reads every finished run below ``sweep_dir`` (:func:`collect_runs`), groups seeds, and
    compares each sparse group with the dense family (:func:`sweep_table`).
    """
    sweep_dir = Path(sweep_dir)
    rows = sweep_table(collect_runs(sweep_dir))
    metric = rows[0].first.metric
    plot = plot_pareto(rows, sweep_dir / "pareto.png")
    with (sweep_dir / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            _COLUMNS[:7] + (f"valid_{metric}_mean", f"valid_{metric}_std") + _COLUMNS[9:]
        )
        writer.writerows(["" if v is None else v for v in _row_values(row)] for row in rows)
    direction = "higher" if higher_is_better(metric) else "lower"
    family = dense_family(rows)
    table = []
    for row in rows:
        values = _row_values(row)
        values[2:4] = [f"{v:.3g}" if row.first.method != DENSE else "—" for v in values[2:4]]
        mean = _fmt(row.mean) + ("" if row.std is None else f" ± {_fmt(row.std)}")
        table.append([*values[:7], mean, *values[9:]])
    lines = [
        f"# Sweep `{sweep_dir.name}`",
        "",
        f"{sum(len(r.runs) for r in rows)} runs in {len(rows)} configurations; metric: valid "
        f"{metric} ({direction} is better), mean ± std over seeds. Dense family: "
        + (", ".join(f"{r.first.size} ({_fmt(r.train_flops)} FLOPs)" for r in family) or "none")
        + ".",
        "",
        f"![Pareto curve]({plot.name})",
        "",
        *_table([*_COLUMNS[:7], f"valid {metric}", *_COLUMNS[9:]], table),
        "",
        "*Dense at same FLOPs*: the dense family's metric interpolated linearly in log(FLOPs)"
        ' between adjacent dense sizes (dynsparse-bert.md Table 1, "Matched (dense)"). '
        "*FLOP ratio at equal loss*: training FLOPs of the run over the dense-family FLOPs that"
        ' reach its metric (dynsparse-bert.md Figure 3, "a factor of 0.48"); below 1 the sparse'
        " run needs fewer FLOPs. Outside the dense family's range nothing is extrapolated (—).",
    ]
    path = sweep_dir / REPORT_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


# -- TensorBoard --------------------------------------------------------------------------------


class TensorBoardLogger:
    """Writes metrics records as TensorBoard scalars into ``run_dir`` (optional dependency).

    Every numeric field of a record becomes a scalar tagged ``{kind}/{field}`` (nested dicts,
    like the per-layer fields of dynamics records, as ``{kind}/{field}/{name}``) at the record's
    ``step`` (``steps`` for the final record).

    Args:
        run_dir: Where the event files go (the run directory).

    Raises:
        ImportError: If TensorBoard is not installed.
    """

    def __init__(self, run_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "TensorBoard logging needs the tensorboard package: "
                "pip install 'alwayssparse[tensorboard]'"
            ) from error
        self._writer = SummaryWriter(log_dir=str(run_dir))

    def log(self, record: Mapping[str, Any], kind: str | None = None) -> None:
        """Write every numeric field of ``record`` at its step; ``kind`` (default the record's
        ``kind`` field, else ``"dynamics"``) prefixes the tags."""
        step = record.get("step", record.get("steps"))
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"a record needs an integer 'step', got {step!r}")
        prefix = kind or str(record.get("kind", "dynamics"))
        fields = {k: v for k, v in record.items() if k not in ("step", "steps", "kind")}
        for tag, value in _flatten(fields).items():
            if _number(value):
                self._writer.add_scalar(f"{prefix}/{tag.replace('.', '/')}", value, step)

    def flush(self) -> None:
        """Push pending events to disk."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()
