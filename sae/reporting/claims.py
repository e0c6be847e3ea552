"""The five claims of METHOD.md s5, checked on a finished sweep, and the s6 reference numbers.

Every claim compares seed means of settings that differ in one axis only (same backbone,
dataset, k and dictionary size). Claims 1-4 are about the method, i.e. the regularizers with
the mask on; they fall back to a regularizer's unmasked rows only when the sweep has no masked
one for it (and say so). A claim is

* **held** when its comparison holds in at least ``min_share`` of the compared settings,
* **not held** otherwise,
* **not testable** when the sweep has nothing to compare (no baseline, no regularizer, no mask
  ablation, a metric that was not measured).

The comparisons, per compared setting (``gain`` = ``Tolerances.min_gain``):

1. MonoScore (mean, dead = 0), binary and weighted purity: regularized > baseline + gain, for
   both regularizers;
2. R^2: regularized >= baseline - ``r2_abs``;
3. L1/L2: mean over k' != k of R^2(k') / R^2(k) > the baseline's + gain;
4. L1/L2: mean probe score over m in ``small_m`` > the baseline's + gain;
5. dead latents (evaluation): mask off > mask on + gain, for each regularizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from sae import regularizers
from sae.reporting.aggregate import TABLE_KEYS, place

# The regularized methods claims 1 and 2 compare with the baseline: the registry's others.
REGULARIZERS = tuple(name for name in regularizers.names() if name != regularizers.BASELINE)
HELD, NOT_HELD, NOT_TESTABLE = "held", "not held", "not testable"
GROUP_KEYS = (*TABLE_KEYS, "n_latents")
ROBUSTNESS = "derived.k_robustness_mean_ratio"  # per-run columns added by the report
PROBE_SMALL_M = "derived.probe_small_m_mean"


@dataclass(frozen=True)
class Tolerances:
    """How strict the verdicts are. Defaults: a regularizer may cost at most 0.01 of R^2
    (absolute; the seed spread of R^2 on the demo grid is of that order), any positive gain
    counts as a gain, and a claim must hold in every compared setting."""

    r2_abs: float = 0.01  # claim 2: max drop of R^2 below the baseline (absolute)
    min_gain: float = 0.0  # claims 1, 3, 4, 5: a difference must exceed this to count
    small_m: tuple[int, ...] = (1, 2, 4)  # claim 4: the small probe budgets m
    min_share: float = 1.0  # share of compared settings in which a comparison must hold


@dataclass
class Comparison:
    setting: str  # e.g. "clip_vitl14 · imagenet · k = 64 · l1l2 (mask on)"
    metric: str
    reference: float  # the baseline (claims 1-4) or the masked run (claim 5)
    reference_std: float
    value: float
    value_std: float
    holds: bool

    @property
    def difference(self) -> float:
        return self.value - self.reference


@dataclass
class Claim:
    number: int
    statement: str
    verdict: str
    summary: str  # the numbers in one sentence, or why it is not testable
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


STATEMENTS = {
    1: "Both regularizers raise monosemanticity and class purity over the baseline at each k.",
    2: "They do so at no cost to reconstruction (R^2 within the tolerance of the baseline).",
    3: "L1/L2 makes R^2 more robust when the inference k differs from the training k.",
    4: "L1/L2 raises small-budget (small m) linear-probe accuracy.",
    5: "Removing the mask raises the dead-latent count.",
}


# -- selecting rows -------------------------------------------------------------------------------
def method_rows(summary: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Per regularizer, its settings with the mask on; the unmasked ones only for a regularizer
    that has no masked run in this sweep (and a note saying so)."""
    parts, notes = [], []
    for reg in REGULARIZERS:
        rows = summary[summary["regularizer"] == reg]
        masked = rows[rows["mask_label"] == "on"]
        if masked.empty and not rows.empty:
            notes.append(f"{reg} has no masked run in this sweep: compared its unmasked runs")
        parts.append(rows if masked.empty else masked)
    return pd.concat(parts), notes


def _setting(row: pd.Series, with_mask: bool = True) -> str:
    label = f"{place(row['backbone'], row['dataset'], row['k'])} · {row['regularizer']}"
    if row["regularizer"] != "none":
        label += f" (lambda = {row['strength']:g}"
        label += f", mask {row['mask_label']})" if with_mask else ")"
    return label


def _stat(row: pd.Series, metric: str) -> tuple[float, float]:
    mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    return (float("nan") if mean is None else float(mean),
            float("nan") if std is None else float(std))


def against_baseline(summary: pd.DataFrame, regularizers: tuple[str, ...], metric: str,
                     holds: Callable[[float, float], bool]) -> tuple[list[Comparison], list[str]]:
    """Each method row of the given regularizers against the baseline of its table."""
    rows, notes = method_rows(summary)
    comparisons = []
    baselines = summary[summary["regularizer"] == "none"]
    for _, row in rows[rows["regularizer"].isin(regularizers)].iterrows():
        found = _compare_with_match(baselines, list(GROUP_KEYS), row, metric, holds,
                                    _setting(row))
        comparisons += [found] if found else []
    return comparisons, [n for n in notes if n.split()[0] in regularizers]


def mask_pairs(summary: pd.DataFrame, metric: str, holds: Callable[[float, float], bool]
               ) -> list[Comparison]:
    """Each regularized setting with the mask off against the same setting with it on."""
    keys = [*GROUP_KEYS, "regularizer", "strength"]
    on = summary[summary["mask_label"] == "on"]
    comparisons = []
    for _, off_row in summary[summary["mask_label"] == "off"].iterrows():
        found = _compare_with_match(on, keys, off_row, metric, holds,
                                    _setting(off_row, with_mask=False) + ": off vs on")
        comparisons += [found] if found else []
    return comparisons


def _compare_with_match(references: pd.DataFrame, keys: list[str], row: pd.Series, metric: str,
                        holds: Callable[[float, float], bool], label: str) -> Comparison | None:
    """``row`` against the first reference row equal to it on ``keys``; None when there is no
    such row or either value is missing."""
    same = (references[keys] == row[keys]).all(axis=1)
    if not same.any():
        return None
    (r, r_std), (v, v_std) = _stat(references[same].iloc[0], metric), _stat(row, metric)
    if math.isnan(r) or math.isnan(v):
        return None
    return Comparison(label, metric, r, r_std, v, v_std, holds(v, r))


# -- verdicts -------------------------------------------------------------------------------------
def verdict(number: int, comparisons: list[Comparison], tol: Tolerances, why_untestable: str,
            notes: list[str]) -> Claim:
    if not comparisons:
        return Claim(number, STATEMENTS[number], NOT_TESTABLE, why_untestable, [], notes)
    held = sum(c.holds for c in comparisons)
    share = held / len(comparisons)
    result = HELD if share >= tol.min_share else NOT_HELD
    summary = (f"holds in {held} of {len(comparisons)} compared settings ({share:.0%}; "
               f"required: {tol.min_share:.0%})")
    return Claim(number, STATEMENTS[number], result, summary, comparisons, notes)


def missing_regularizers(summary: pd.DataFrame, wanted: tuple[str, ...]) -> list[str]:
    present = set(summary["regularizer"])
    return [f"{r} is not in this sweep: the claim is checked without it"
            for r in wanted if r not in present]


def claim_1(summary: pd.DataFrame, tol: Tolerances) -> Claim:
    comparisons, notes = [], missing_regularizers(summary, REGULARIZERS)
    for metric in ("mono_mean_dead0", "purity_binary", "purity_weighted"):
        found, found_notes = against_baseline(summary, REGULARIZERS, metric,
                                              lambda v, b: v > b + tol.min_gain)
        comparisons += found
        notes += [n for n in found_notes if n not in notes]
    return verdict(1, comparisons, tol, "needs a baseline and a regularized run with "
                   "MonoScore or purity at the same backbone, dataset and k", notes)


def claim_2(summary: pd.DataFrame, tol: Tolerances) -> Claim:
    comparisons, notes = against_baseline(summary, REGULARIZERS, "r2",
                                          lambda v, b: v >= b - tol.r2_abs)
    notes = missing_regularizers(summary, REGULARIZERS) + notes
    return verdict(2, comparisons, tol, "needs a baseline and a regularized run with R^2 at "
                   "the same backbone, dataset and k", notes)


def claim_3(summary: pd.DataFrame, tol: Tolerances) -> Claim:
    comparisons, notes = against_baseline(summary, ("l1l2",), ROBUSTNESS,
                                          lambda v, b: v > b + tol.min_gain)
    notes = ["robustness = mean over inference k' != k of R^2(k') / R^2(k)", *notes]
    return verdict(3, comparisons, tol, "needs a baseline and an l1l2 run with inference-k "
                   "robustness curves (curves.k_robustness) at the same backbone, dataset and k",
                   notes)


def claim_4(summary: pd.DataFrame, tol: Tolerances) -> Claim:
    comparisons, notes = against_baseline(summary, ("l1l2",), PROBE_SMALL_M,
                                          lambda v, b: v > b + tol.min_gain)
    notes = [f"small-budget score = mean probe accuracy (mAP if multi-label) over m in "
             f"{list(tol.small_m)}", *notes]
    return verdict(4, comparisons, tol, "needs a baseline and an l1l2 run with truncated-probe "
                   f"scores (curves.probe) at m in {list(tol.small_m)}", notes)


def claim_5(summary: pd.DataFrame, tol: Tolerances) -> Claim:
    comparisons = mask_pairs(summary, "dead_count", lambda v, r: v > r + tol.min_gain)
    return verdict(5, comparisons, tol, "needs a mask ablation: the same regularized setting "
                   "with mask=true and mask=false", [])


def check_claims(summary: pd.DataFrame, tol: Tolerances | None = None) -> list[Claim]:
    """The five claims on a seed summary (:func:`sae.reporting.aggregate.seed_summary` with the
    columns ``mono_mean_dead0``, ``purity_*``, ``r2``, ``dead_count`` and the two derived ones)."""
    tol = tol or Tolerances()
    if summary.empty:
        return [Claim(n, STATEMENTS[n], NOT_TESTABLE, "no finished run in this sweep")
                for n in STATEMENTS]
    return [check(summary, tol) for check in (claim_1, claim_2, claim_3, claim_4, claim_5)]


# -- METHOD.md s6 ---------------------------------------------------------------------------------
# MonoLoss repository figures: Top-k, n = 8192, k = 64, no regularizer.
REFERENCE = {  # (dataset, backbone): (R^2, MonoScore mean with dead = 0)
    ("imagenet", "clip_vitl14"): (0.817, 0.469),
    ("imagenet", "siglip2"): (0.651, 0.594),
    ("imagenet", "vit_l16"): (0.809, 0.238),
    ("openimages", "clip_vitl14"): (0.758, 0.386),
    ("openimages", "siglip2"): (0.567, 0.548),
    ("openimages", "vit_l16"): (0.702, 0.128),
}
REFERENCE_PURITY = {  # backbone: (binary, weighted); dataset likely ImageNet (METHOD.md s6)
    "clip_vitl14": (0.159, 0.240), "siglip2": (0.340, 0.400), "vit_l16": (0.128, 0.319),
}
REFERENCE_K, REFERENCE_N = 64, 8192


def reference_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The sweep's baselines on a backbone and dataset of METHOD.md s6, beside the reference."""
    rows = []
    baselines = summary[summary["regularizer"] == "none"] if not summary.empty else summary
    for _, row in baselines.iterrows():
        ref = REFERENCE.get((row["dataset"], row["backbone"]))
        if ref is None:
            continue
        purity = REFERENCE_PURITY.get(row["backbone"]) if row["dataset"] == "imagenet" else None
        rows.append({
            "backbone": row["backbone"], "dataset": row["dataset"], "k": row["k"],
            "n_latents": row["n_latents"], "n_seeds": row["n_seeds"],
            "r2": row.get("r2_mean"), "r2_reference": ref[0],
            "mono_mean_dead0": row.get("mono_mean_dead0_mean"), "mono_reference": ref[1],
            "purity_binary": row.get("purity_binary_mean"),
            "purity_binary_reference": purity[0] if purity else None,
            "purity_weighted": row.get("purity_weighted_mean"),
            "purity_weighted_reference": purity[1] if purity else None,
            "same_budget": row["k"] == REFERENCE_K and row["n_latents"] == REFERENCE_N,
        })
    return pd.DataFrame(rows)
