"""The one-page Markdown reports of a run and of a sweep.

A run directory (see :mod:`alwayssparse.train`) gets ``report.md`` with its plots in ``plots/``
(:mod:`alwayssparse.plots`). A sweep directory (one run per subdirectory) gets ``pareto.png``,
``results.csv`` and ``report.md``: the runs grouped over seeds and compared with the dense family
at equal loss (:mod:`alwayssparse.pareto`).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from alwayssparse.pareto import SweepRow, dense_family, sweep_table
from alwayssparse.plots import plot_pareto, plot_run
from alwayssparse.runconfig import is_sparse_method
from alwayssparse.rundir import collect_runs, higher_is_better, model_size, read_dynamics, read_json

REPORT_FILE = "report.md"


# -- a run ------------------------------------------------------------------------------------


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
    if not is_sparse_method(summary.get("method", "")):
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
    summary = read_json(run_dir / "summary.json")
    config = read_json(run_dir / "config.json")
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


# -- a sweep ----------------------------------------------------------------------------------

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
        values[2:4] = [f"{v:.3g}" if not row.first.dense else "—" for v in values[2:4]]
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
