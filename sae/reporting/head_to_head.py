"""Head to head: which arm wins, paired by seed (the report's first section).

The claims compare each setting with the baseline. A reader's own questions are between arms:
does one regularizer beat the other, does the mask matter? Per backbone x dataset x k (and
dictionary size), two kinds of comparison, each paired by seed (``sae.reporting.stats``):

* regularizer against regularizer (every pair of registered regularizers other than the
  baseline, in the registry's order), at the same mask setting;
* mask on against mask off, for each regularizer (at its strength).

For each metric the per-seed differences (first arm minus second) give a Student-t interval;
an arm wins where the interval excludes 0 in its favour (``higher_is_better`` of the metric),
else the comparison is a tie (or undecided with fewer than two seeds). One summary line per
metric and comparison counts the wins.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pandas as pd

from sae import regularizers
from sae.reporting.stats import PAIR_KEYS, Interval, paired_differences, t_interval

# (metric, label, higher is better): the headline metrics of METHOD.md s4.
METRICS = (
    ("r2", "R^2", True), ("r2_variance_weighted", "R^2 (1-FVU)", True),
    ("mono_live", "mono_live", True), ("mono_dead0", "mono_dead0", True),
    ("purity_binary", "purity (binary)", True), ("purity_weighted", "purity (weighted)", True),
    ("dead_count", "dead latents", False), ("probe_small_m_mean", "probe (small m)", True),
    ("k_robustness_mean_ratio", "k robustness", True),
)
PLACE = ("backbone", "dataset", "k", "n_latents")
WIN_A, WIN_B, TIE, UNDECIDED = "a", "b", "tie", "undecided"


@dataclass(frozen=True)
class Cell:
    """One metric of one comparison at one place."""

    interval: Interval  # first arm minus second, over the seeds
    outcome: str  # WIN_A | WIN_B | TIE | UNDECIDED


@dataclass(frozen=True)
class Comparison:
    title: str  # "l1l2 vs offsupport_l1 (mask on)"
    arm_a: str
    arm_b: str
    place: tuple  # (backbone, dataset, k, n_latents)
    cells: dict[str, Cell]  # by metric


def outcome(interval: Interval, higher_is_better: bool) -> str:
    if interval.n < 2 or math.isnan(interval.low):
        return UNDECIDED
    if interval.low > 0:
        return WIN_A if higher_is_better else WIN_B
    if interval.high < 0:
        return WIN_B if higher_is_better else WIN_A
    return TIE


def arms(done: pd.DataFrame) -> list[tuple[str, str, dict, dict]]:
    """(arm a label, arm b label, arm a filter, arm b filter) of every comparison."""
    names = [n for n in regularizers.names() if n != regularizers.BASELINE
             and n in set(done["regularizer"])]
    out = []
    # The later-registered regularizer first (the paper's proposal after its alternative).
    for second, first in itertools.combinations(names, 2):
        for mask in ("on", "off"):
            out.append((f"{first} (mask {mask})", f"{second} (mask {mask})",
                        {"regularizer": first, "mask_label": mask},
                        {"regularizer": second, "mask_label": mask}))
    for name in names:
        out.append((f"{name} mask on", f"{name} mask off",
                    {"regularizer": name, "mask_label": "on"},
                    {"regularizer": name, "mask_label": "off"}))
    return out


def _select(runs: pd.DataFrame, where: dict) -> pd.DataFrame:
    chosen = runs
    for column, value in where.items():
        chosen = chosen[chosen[column] == value]
    return chosen


def compare(done: pd.DataFrame, level: float = 0.95) -> list[Comparison]:
    """Every comparison with runs on both sides at some place."""
    if done.empty:
        return []
    out = []
    keys = list(PAIR_KEYS)
    for label_a, label_b, where_a, where_b in arms(done):
        side_a, side_b = _select(done, where_a), _select(done, where_b)
        if side_a.empty or side_b.empty:
            continue
        for place, block_a in side_a.groupby(list(PLACE), sort=True):
            block_b = side_b
            for column, value in zip(PLACE, place):
                block_b = block_b[block_b[column] == value]
            if block_b.empty:
                continue
            cells = {}
            for metric, _, higher in METRICS:
                diffs = paired_differences(block_a, block_b, keys, metric)
                interval = t_interval(list(diffs), level)
                if interval.n:
                    cells[metric] = Cell(interval, outcome(interval, higher))
            if cells:
                out.append(Comparison(f"{label_a} vs {label_b}", label_a, label_b, place, cells))
    return out


def summary_lines(comparisons: list[Comparison]) -> list[str]:
    """Per comparison and metric: which arm wins where, e.g. "l1l2 (mask on) vs offsupport_l1
    (mask on), mono_dead0: l1l2 (mask on) wins 3, offsupport_l1 (mask on) 0, tie 1 (of 4
    places)"."""
    lines = []
    titles = dict.fromkeys(c.title for c in comparisons)
    for title in titles:
        group = [c for c in comparisons if c.title == title]
        for metric, label, _ in METRICS:
            outcomes = [c.cells[metric].outcome for c in group if metric in c.cells]
            if not outcomes:
                continue
            counts = {o: outcomes.count(o) for o in (WIN_A, WIN_B, TIE, UNDECIDED)}
            a, b = group[0].arm_a, group[0].arm_b
            text = (f"{title}, {label}: {a} wins {counts[WIN_A]}, {b} {counts[WIN_B]}, "
                    f"tie {counts[TIE]}")
            if counts[UNDECIDED]:
                text += f", undecided {counts[UNDECIDED]} (fewer than 2 seeds)"
            lines.append(f"{text} (of {len(outcomes)} places)")
    return lines


def place_text(place: tuple) -> str:
    backbone, dataset, k, n_latents = place
    where = dataset if backbone in (None, "none") else f"{backbone} x {dataset}"
    return f"{where}, k {k}, n {n_latents}"


def markdown(comparisons: list[Comparison]) -> str:
    """The section as Markdown: the summary lines, then one table per comparison."""
    if not comparisons:
        return ("No head-to-head comparison: the sweep has no two arms (regularizers, or mask "
                "on and off) with runs of the same seeds at the same place.\n")
    parts = ["Each cell: mean over seeds of (first arm - second arm) [95 % Student-t "
             "interval]; the winner where the interval excludes 0 (fewer dead latents win).", ""]
    parts += [f"- {line}" for line in summary_lines(comparisons)]
    for title in dict.fromkeys(c.title for c in comparisons):
        group = [c for c in comparisons if c.title == title]
        labels = [label for metric, label, _ in METRICS if any(metric in c.cells for c in group)]
        metrics = [metric for metric, _, _ in METRICS if any(metric in c.cells for c in group)]
        parts += ["", f"### {title}", "", "| where | " + " | ".join(labels) + " |",
                  "|---|" + "---|" * len(labels)]
        for c in group:
            cells = [_cell_text(c, metric) for metric in metrics]
            parts.append(f"| {place_text(c.place)} | " + " | ".join(cells) + " |")
    return "\n".join(parts) + "\n"


def _cell_text(comparison: Comparison, metric: str) -> str:
    cell = comparison.cells.get(metric)
    if cell is None:
        return "—"
    winner = {WIN_A: comparison.arm_a, WIN_B: comparison.arm_b}.get(cell.outcome)
    decided = f" **{winner}**" if winner else f" ({cell.outcome})"
    return cell.interval.text() + decided
