"""Paired differences over seeds, their Student-t interval, and the verdict of one setting.

A regularized run is compared with the run that differs from it in one arm only and shares its
seed (the baseline of the same seed, k, backbone, dataset and dictionary size; for the mask
ablation, the masked twin). The per-seed differences ``d_s`` give

    mean = (1/n) sum_s d_s,  half = t_{(1 + level)/2, n - 1} * sd(d, ddof = 1) / sqrt(n)

and the interval ``[mean - half, mean + half]`` (95 % by default). With fewer than two pairs
there is no interval (NaN ends) and the verdict is always inconclusive.

Verdicts (METHOD.md s5), for a claimed increase with minimum effect ``e >= 0``:

* ``supported``    the interval's lower end lies above ``+e``;
* ``contradicted`` its upper end lies below ``-e``;
* ``inconclusive`` anything else.

Non-inferiority (claim 2, margin ``m``): supported when the lower end lies above ``-m``,
contradicted when the upper end lies below ``-m``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from scipy import stats

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
PAIR_KEYS = ("backbone", "dataset", "k", "n_latents", "seed")  # what a baseline shares


@dataclass(frozen=True)
class Interval:
    n: int  # number of seed pairs
    mean: float  # mean paired difference
    low: float  # NaN with fewer than two pairs
    high: float

    def text(self, digits: int = 3) -> str:
        """``+0.021 [+0.004, +0.038]``, or ``+0.021 (1 seed, no interval)``."""
        if math.isnan(self.mean):
            return "—"
        if math.isnan(self.low):
            return f"{self.mean:+.{digits}f} ({self.n} seed, no interval)"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def t_quantile(level: float, df: int) -> float:
    """The two-sided Student-t critical value, e.g. 12.706 for 95 % and one degree of freedom."""
    return float(stats.t.ppf((1.0 + level) / 2.0, df))


def t_interval(differences: list[float], level: float = 0.95) -> Interval:
    """Mean paired difference and its Student-t interval over the seeds (NaN values dropped)."""
    values = [float(d) for d in differences if d is not None and not math.isnan(float(d))]
    n = len(values)
    if n == 0:
        return Interval(0, float("nan"), float("nan"), float("nan"))
    mean = sum(values) / n
    if n < 2:
        return Interval(n, mean, float("nan"), float("nan"))
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(level, n - 1) * sd / math.sqrt(n)
    return Interval(n, mean, mean - half, mean + half)


def verdict_increase(interval: Interval, min_effect: float) -> str:
    """A claimed increase of at least ``min_effect``."""
    if interval.n < 2 or math.isnan(interval.low):
        return INCONCLUSIVE
    if interval.low > min_effect:
        return SUPPORTED
    if interval.high < -min_effect:
        return CONTRADICTED
    return INCONCLUSIVE


def verdict_non_inferior(interval: Interval, margin: float) -> str:
    """A claimed loss of at most ``margin`` (the difference stays above ``-margin``)."""
    if interval.n < 2 or math.isnan(interval.low):
        return INCONCLUSIVE
    if interval.low > -margin:
        return SUPPORTED
    if interval.high < -margin:
        return CONTRADICTED
    return INCONCLUSIVE


def paired_differences(runs: pd.DataFrame, references: pd.DataFrame, keys: list[str],
                       metric: str) -> pd.Series:
    """Per seed, ``runs[metric] - references[metric]`` over the rows that agree on ``keys``
    (which include the seed); indexed by seed, pairs with a missing value left out."""
    if metric not in runs or metric not in references:
        return pd.Series(dtype=float)
    left = runs[[*keys, metric]].dropna(subset=[metric])
    right = references[[*keys, metric]].dropna(subset=[metric]).drop_duplicates(keys)
    joined = left.merge(right, on=keys, suffixes=("", "_ref"))
    diffs = joined[metric].astype(float) - joined[f"{metric}_ref"].astype(float)
    return pd.Series(diffs.to_numpy(), index=joined["seed"].to_numpy(), dtype=float)


# -- the tables' delta-vs-baseline columns --------------------------------------------------------
DELTA_METRICS = ("r2", "mono_dead0")  # the tables' delta-vs-baseline columns
SETTING_COLUMNS = ["backbone", "dataset", "k", "n_latents", "regularizer", "strength",
                   "mask_label"]


def delta_interval(row: pd.Series, metric: str) -> Interval:
    """The delta columns of one summary row as an :class:`Interval`."""
    return Interval(int(row.get(f"delta_{metric}_n", 0) or 0),
                    *(float(row.get(f"delta_{metric}_{end}", float("nan")))
                      for end in ("mean", "low", "high")))


def add_deltas(summary: pd.DataFrame, done: pd.DataFrame, metrics: tuple[str, ...] = DELTA_METRICS,
               level: float = 0.95) -> pd.DataFrame:
    """``delta_<m>_{n,mean,low,high}`` per regularized setting: its runs minus the baseline of
    the same seed (NaN for the baseline itself, or without a paired baseline)."""
    summary = summary.copy()
    baselines = done[done["regularizer"] == "none"] if not done.empty else done
    for metric in metrics:
        columns = {end: [] for end in ("n", "mean", "low", "high")}
        for _, row in summary.iterrows():
            interval = Interval(0, float("nan"), float("nan"), float("nan"))
            if row["regularizer"] != "none" and not done.empty:
                same = (done[SETTING_COLUMNS] == row[SETTING_COLUMNS]).all(axis=1)
                diffs = paired_differences(done[same], baselines, list(PAIR_KEYS), metric)
                interval = t_interval(list(diffs), level)
            for end in columns:
                columns[end].append(getattr(interval, end))
        for end, values in columns.items():
            summary[f"delta_{metric}_{end}"] = values
    return summary
