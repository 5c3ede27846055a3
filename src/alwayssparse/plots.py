"""Plots of a run (training curves, mask dynamics, the accumulated pattern of one layer) and of a
sweep (the loss-vs-FLOPs Pareto comparison).

A run directory (see :mod:`alwayssparse.train`) gets ``plots/*.png``: training curves, mask
dynamics (topkast.md Figure 3, dynsparse-bert.md Figures 5 and 11) and the accumulated pattern of
one layer. A sweep gets ``pareto.png``: validation metric against training FLOPs with the dense
family as a curve and sparse runs as points (dynsparse-bert.md Figure 3).

Plots use matplotlib's object API on Agg canvases: no pyplot state, nothing left open. matplotlib
is imported only when a plot is drawn, so that training imports none of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alwayssparse.dynamics import PATTERN_FILE
from alwayssparse.pareto import SweepRow, dense_family, dense_flops_at
from alwayssparse.rundir import higher_is_better, is_number, read_dynamics, read_json, read_metrics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOTS_DIR = "plots"


# -- a run ------------------------------------------------------------------------------------


def _figure(rows: int, cols: int, width: float = 5.0, height: float = 3.6) -> Figure:
    """A figure on its own Agg canvas (matplotlib is imported here, when a plot is drawn)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(cols * width, rows * height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    figure.clear()
    return path


def _series(records: Iterable[Mapping[str, Any]], x: str, y: str) -> tuple[list[float], ...]:
    pairs = [(r[x], r[y]) for r in records if is_number(r.get(x)) and is_number(r.get(y))]
    return tuple(map(list, zip(*pairs, strict=True))) if pairs else ([], [])


def _metric_name(run_dir: Path, records: Sequence[Mapping[str, Any]]) -> str | None:
    """The task's headline metric: from summary.json, else the first ``valid_*`` eval key."""
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        return str(read_json(summary_path)["metric"])
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
        points = [(r["step"], r[key][name]) for r in records if is_number(r[key].get(name))]
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


# -- a sweep ----------------------------------------------------------------------------------


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
    methods = sorted({r.first.method for r in rows if not r.first.dense})
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
