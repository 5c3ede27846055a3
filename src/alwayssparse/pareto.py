"""The dense family and the FLOP ratio at equal loss: sweep results grouped over seeds, each sparse
group compared with the dense runs' curve interpolated linearly in log(FLOPs) (dynsparse-bert.md
Table 1 and Table A.8 "Matched (dense)"; section 3.1, "a factor of 0.48"; Figure 3 and 8)."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from alwayssparse.rundir import RunResult, higher_is_better, is_number

# -- the dense family: interpolation in log(FLOPs) -----------------------------------------------


def _dense_curve(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """(log FLOPs, value) sorted by FLOPs, after checking every point."""
    if not points:
        raise ValueError("the dense family is empty: no dense runs to compare against")
    for flops, value in points:
        if not (is_number(flops) and flops > 0 and is_number(value)):
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
    if not (is_number(flops) and flops > 0):
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
    if not is_number(loss):
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
    if not (is_number(flops) and flops > 0):
        raise ValueError(f"flops must be finite and > 0, got {flops}")
    matched = dense_flops_at(dense_points, loss, higher_is_better=higher_is_better)
    return None if matched is None else flops / matched


# -- sweeps ------------------------------------------------------------------------------------


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
    return sorted(rows, key=lambda r: (not r.first.dense, r.first.method, r.train_flops))


def dense_family(rows: Sequence[SweepRow]) -> list[SweepRow]:
    """The dense rows, one per training-FLOP count (the best one where several share it, as the
    paper keeps each size's best learning rate), sorted by FLOPs."""
    best: dict[float, SweepRow] = {}
    for row in rows:
        if not row.first.dense:
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
    missing = [r.path.name for r in runs if not is_number(r.train_flops)]
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
        if row.first.dense:
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
