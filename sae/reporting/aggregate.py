"""From one row per cell to one row per setting: mean +- std over seeds.

A *setting* is a cell without its seed: backbone x dataset x k x regularizer (x strength) x
mask (x dictionary size). Only finished runs count, each once: a baseline's two mask cells
share one run (the mask has no effect without a regularizer), so runs are de-duplicated by run
id and the baseline's mask reads ``unused`` (not "n/a", which CSV readers take for a missing
value). The std is the sample std (ddof = 1), undefined (NaN) with a single seed -- a sweep
with one seed reports no spread rather than a spread of zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from sae import regularizers

REGULARIZER_ORDER = regularizers.names()  # the baseline first, then the registry's order
MASK_ORDER = ("unused", "on", "off")
TABLE_KEYS = ("backbone", "dataset", "k")  # one table per combination
ROW_KEYS = ("regularizer", "strength", "mask_label", "n_latents")  # rows within a table
SETTING_KEYS = (*TABLE_KEYS, *ROW_KEYS)


@dataclass(frozen=True)
class MetricSpec:
    key: str  # column of the runs table (a key of metrics.json)
    label: str  # column header
    higher_is_better: bool
    decimals: int


# The paper's table columns (METHOD.md s5): reconstruction, monosemanticity, purity, dead latents.
# R^2 both ways (METHOD.md s4): the paper's uniform average over dimensions, and the
# variance-weighted 1 - FVU, which the quietest dimensions cannot drive negative.
# MonoScore is shown both ways: mono_live averages the latents that fire, mono_dead0 all
# latents with the dead ones counted as 0 (MonoLoss's convention, which rewards fewer dead
# latents as much as more monosemantic live ones); the two can rank settings differently.
TABLE_METRICS = (
    MetricSpec("r2", "R^2", True, 3),
    MetricSpec("r2_variance_weighted", "R^2 (1-FVU)", True, 3),
    MetricSpec("nmse", "NMSE", False, 3),
    MetricSpec("mono_live", "mono_live", True, 3),
    MetricSpec("mono_dead0", "mono_dead0", True, 3),
    MetricSpec("purity_binary", "Purity (binary)", True, 3),
    MetricSpec("purity_weighted", "Purity (weighted)", True, 3),
    MetricSpec("probe_small_m_mean", "Probe (small m)", True, 3),
    MetricSpec("dead_count", "Dead latents", False, 1),
)


def mask_label(regularizer: str, mask: object) -> str:
    if regularizer == "none":
        return "unused"
    if mask is None or pd.isna(mask):
        return "?"
    return "on" if bool(mask) else "off"


def with_labels(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs table plus ``mask_label`` and a sort order for regularizers and masks."""
    runs = runs.copy()
    runs["mask_label"] = [mask_label(r, m) for r, m in zip(runs["regularizer"], runs["mask"])]
    runs["strength"] = runs["strength"].fillna(0.0).astype(float)
    runs["n_latents"] = runs["n_latents"].fillna(-1).astype(int)
    return runs


def finished_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Done runs, each once (mask twins of a baseline share a run id)."""
    done = with_labels(runs[runs["status"] == "done"])
    return done.drop_duplicates("run_id")


def _sort_key(column: pd.Series) -> pd.Series:
    order = {"regularizer": REGULARIZER_ORDER, "mask_label": MASK_ORDER}.get(column.name)
    if order is None:
        return column
    return column.map(lambda v: order.index(v) if v in order else len(order))


def seed_summary(runs: pd.DataFrame, metrics: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """One row per setting: ``n_seeds``, ``seeds``, ``run_ids`` and ``<m>_mean`` / ``<m>_std``
    for every metric ``m`` present (a missing metric column gives NaN, not an error)."""
    done = finished_runs(runs)
    keys = list(SETTING_KEYS)
    columns = [*keys, "n_seeds", "seeds", "run_ids"]
    columns += [f"{m}_{stat}" for m in metrics for stat in ("mean", "std")]
    if done.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for setting, group in done.groupby(keys, dropna=False, sort=False):
        row = dict(zip(keys, setting))
        row.update(n_seeds=len(group), seeds=",".join(str(s) for s in sorted(group["seed"])),
                   run_ids=",".join(group["run_id"]))
        for metric in metrics:
            values = group[metric].astype(float) if metric in group else pd.Series(dtype=float)
            row[f"{metric}_mean"] = values.mean()
            row[f"{metric}_std"] = values.std(ddof=1) if values.count() > 1 else float("nan")
        rows.append(row)
    summary = pd.DataFrame(rows, columns=columns)
    return summary.sort_values(keys, key=_sort_key, kind="stable").reset_index(drop=True)


def setting_label(row: pd.Series, several_strengths: bool, several_sizes: bool) -> str:
    """``l1l2``, or ``l1l2 (lambda=0.01)`` when the sweep varies the strength, ``n=...`` the
    dictionary size."""
    label = str(row["regularizer"])
    extras = []
    if several_strengths and row["regularizer"] != "none":
        extras.append(f"lambda={row['strength']:g}")
    if several_sizes:
        extras.append(f"n={row['n_latents']}")
    return label + (f" ({', '.join(extras)})" if extras else "")


def label_flags(summary: pd.DataFrame) -> tuple[bool, bool]:
    """(a regularizer appears with several strengths, the sweep has several dictionary sizes):
    only then do row labels need to name them."""
    regularized = summary[summary["regularizer"] != "none"]
    several_strengths = bool((regularized.groupby("regularizer")["strength"].nunique() > 1).any())
    return several_strengths, summary["n_latents"].nunique() > 1


# -- per-run numbers derived from the curves ------------------------------------------------------
def robustness_ratio(points: pd.DataFrame, train_k: float) -> float:
    """Mean over inference k' != k of R^2(k') / R^2(k); NaN without the training k or others."""
    at_k = points.loc[points["x"] == train_k, "y"]
    others = points.loc[points["x"] != train_k, "y"]
    if at_k.empty or others.empty or at_k.iloc[0] == 0:
        return float("nan")
    return float((others / at_k.iloc[0]).mean())


def small_m_score(points: pd.DataFrame, small_m: tuple[int, ...]) -> float:
    """Mean probe score over the budgets m in ``small_m`` that were measured."""
    chosen = points.loc[points["x"].isin([float(m) for m in small_m]), "y"]
    return float(chosen.mean()) if not chosen.empty else float("nan")


def add_derived(runs: pd.DataFrame, curves: pd.DataFrame, small_m: tuple[int, ...]
                ) -> pd.DataFrame:
    """``k_robustness_mean_ratio`` and ``probe_small_m_mean`` per run (claims 3 and 4 compare
    them), recomputed from the curves (for the report's own ``small_m``); a run without the
    curve keeps the value of its metrics.json."""
    runs = runs.copy()
    ratio: dict[str, float] = {}
    probe: dict[str, float] = {}
    train_k = dict(zip(runs["run_id"], runs["k"]))
    for (run_id, curve), points in curves.groupby(["run_id", "curve"]):
        if curve == "k_robustness" and train_k.get(run_id) is not None:
            ratio[run_id] = robustness_ratio(points, float(train_k[run_id]))
        elif curve == "probe":
            probe[run_id] = small_m_score(points, small_m)
    for column, values in (("k_robustness_mean_ratio", ratio), ("probe_small_m_mean", probe)):
        derived = runs["run_id"].map(values).astype(float)
        runs[column] = derived.fillna(runs[column]) if column in runs else derived
    return runs


def place(backbone: str, dataset: str, k: object = None) -> str:
    """``clip_vitl14 · imagenet · k = 64``; without a backbone (the dataset is already
    embeddings) just ``synthetic · k = 8``."""
    parts = [dataset] if backbone in ("none", None) else [backbone, dataset]
    if k is not None:
        parts.append(f"k = {k}")
    return " · ".join(str(p) for p in parts)
