"""The five claims of METHOD.md s5, checked on a finished sweep, and the s6 reference numbers.

Every comparison pairs runs by seed (:mod:`sae.reporting.stats`): a regularized run against
the baseline with the same seed, k, backbone, dataset and dictionary size (claims 1-4), or the
unmasked run against its masked twin (claim 5). Per compared *setting* it reports the mean
paired difference with a Student-t interval over the seeds and a verdict -- ``supported``,
``contradicted`` or ``inconclusive`` (always with fewer than two seeds). Claims 1-4 are about
the method, i.e. the regularizers with the mask on; they fall back to a regularizer's unmasked
runs only when the sweep has no masked one for it (and say so).

A claim is

* **held** when every compared setting supports it;
* **not held** when at least one setting contradicts it;
* **inconclusive** otherwise (some setting neither supports nor contradicts it);
* **not tested** when a needed arm is absent (no baseline, a regularizer without a finished run,
  no mask ablation, a metric that was not measured).

The comparisons (the minimum effects: ``Tolerances.min_effect``, defaults below):

1. ``mono_live``, ``mono_dead0``, ``purity_binary``, ``purity_weighted``: regularized minus
   baseline, an increase, for both regularizers (both MonoScore conventions must agree);
2. ``r2``: regularized minus baseline is non-inferior, margin ``Tolerances.r2_abs``;
3. L1/L2: mean over k' != k of R^2(k') / R^2(k), an increase;
4. L1/L2: mean probe score over m in ``small_m``, an increase;
5. ``dead_fraction``: mask off minus mask on, an increase, for each regularized setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from sae import regularizers
from sae.reporting.aggregate import finished_runs, place
from sae.reporting.stats import (
    CONTRADICTED,
    INCONCLUSIVE,
    PAIR_KEYS,
    SUPPORTED,
    Interval,
    paired_differences,
    t_interval,
    verdict_increase,
    verdict_non_inferior,
)

# The regularized methods claims 1 and 2 compare with the baseline: the registry's others.
REGULARIZERS = tuple(name for name in regularizers.names() if name != regularizers.BASELINE)
HELD, NOT_HELD, UNDECIDED, NOT_TESTED = "held", "not held", "inconclusive", "not tested"
ROBUSTNESS = "k_robustness_mean_ratio"  # per-run numbers, recomputed by the report
PROBE_SMALL_M = "probe_small_m_mean"
MONO_METRICS = ("mono_live", "mono_dead0")
CLAIM_1_METRICS = (*MONO_METRICS, "purity_binary", "purity_weighted")
DEAD_METRIC = "dead_fraction"

# ``report.min_effect``: the smallest paired difference (absolute, in the metric's own units)
# that counts as an effect. A difference whose interval does not clear it is inconclusive.
DEFAULT_MIN_EFFECT = {
    "mono_live": 0.01,  # MonoScore, mean over live latents (in [0, 1])
    "mono_dead0": 0.01,  # MonoScore, mean over all latents, dead ones counted as 0
    "purity_binary": 0.01,  # class purity (share of the top class), mean over live latents
    "purity_weighted": 0.01,
    ROBUSTNESS: 0.01,  # mean R^2(k') / R^2(k) over k' != k
    PROBE_SMALL_M: 0.01,  # probe accuracy (mAP if multi-label) at small m
    DEAD_METRIC: 0.01,  # dead latents as a share of the dictionary (1 % of n)
}


@dataclass(frozen=True)
class Tolerances:
    """How strict the verdicts are (METHOD.md s5). ``r2_abs``: claim 2's non-inferiority margin
    (absolute R^2; the seed spread of R^2 on the demo grid is of that order)."""

    r2_abs: float = 0.01  # claim 2: the largest R^2 loss that still counts as "no cost"
    small_m: tuple[int, ...] = (1, 2, 4)  # claim 4: the small probe budgets m
    level: float = 0.95  # confidence level of the Student-t intervals
    min_effect: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIN_EFFECT))

    def effect(self, metric: str) -> float:
        return float(self.min_effect.get(metric, 0.0))


@dataclass
class Comparison:
    setting: str  # e.g. "clip_vitl14 · imagenet · k = 64 · l1l2 (lambda = 0.1, mask on)"
    metric: str
    reference: float  # mean over the paired seeds: the baseline (1-4) or the masked run (5)
    value: float  # mean over the paired seeds of the compared run
    interval: Interval  # the paired difference value - reference
    threshold: float  # the minimum effect (claims 1, 3-5) or minus the margin (claim 2)
    verdict: str  # supported | contradicted | inconclusive
    seeds: str  # the paired seeds, e.g. "0,1,2"

    @property
    def difference(self) -> float:
        return self.interval.mean


@dataclass
class Claim:
    number: int
    statement: str
    verdict: str
    summary: str  # the counts in one sentence, or why it is not tested
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def inconclusive(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.verdict == INCONCLUSIVE]


STATEMENTS = {
    1: "Both regularizers raise monosemanticity and class purity over the baseline at each k.",
    2: "They do so at no cost to reconstruction (R^2 within the tolerance of the baseline).",
    3: "L1/L2 makes R^2 more robust when the inference k differs from the training k.",
    4: "L1/L2 raises small-budget (small m) linear-probe accuracy.",
    5: "Removing the mask raises the dead-latent count.",
}


# -- selecting rows -------------------------------------------------------------------------------
SETTING = ["backbone", "dataset", "k", "n_latents", "regularizer", "strength", "mask_label"]


def method_rows(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Per regularizer, its runs with the mask on; the unmasked ones only for a regularizer
    that has no masked run in this sweep (and a note saying so)."""
    parts, notes = [], []
    for reg in REGULARIZERS:
        rows = runs[runs["regularizer"] == reg]
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


def compare(group: pd.DataFrame, references: pd.DataFrame, keys: list[str], metric: str,
            threshold: float, non_inferiority: bool, label: str, level: float
            ) -> Comparison | None:
    """One setting's runs against their seed-paired references; None without a single pair."""
    diffs = paired_differences(group, references, keys, metric)
    if diffs.empty:
        return None
    interval = t_interval(list(diffs), level)
    paired = group[group["seed"].isin(diffs.index)]
    value = float(paired[metric].astype(float).mean())
    decided = (verdict_non_inferior(interval, -threshold) if non_inferiority
               else verdict_increase(interval, threshold))
    seeds = ",".join(str(s) for s in sorted(diffs.index))
    return Comparison(label, metric, value - interval.mean, value, interval, threshold, decided,
                      seeds)


def against_baseline(runs: pd.DataFrame, regularizers: tuple[str, ...], metric: str,
                     tol: Tolerances, non_inferiority: bool = False
                     ) -> tuple[list[Comparison], list[str]]:
    """Each method setting of the given regularizers against the baseline, paired by seed."""
    rows, notes = method_rows(runs)
    baselines = runs[runs["regularizer"] == "none"]
    threshold = -tol.r2_abs if non_inferiority else tol.effect(metric)
    comparisons = []
    chosen = rows[rows["regularizer"].isin(regularizers)]
    for _, group in chosen.groupby(SETTING, sort=False, dropna=False):
        found = compare(group, baselines, list(PAIR_KEYS), metric, threshold, non_inferiority,
                        _setting(group.iloc[0]), tol.level)
        comparisons += [found] if found else []
    return comparisons, [n for n in notes if n.split()[0] in regularizers]


def mask_pairs(runs: pd.DataFrame, metric: str, tol: Tolerances) -> list[Comparison]:
    """Each regularized setting with the mask off against the same setting with it on."""
    keys = [*PAIR_KEYS, "regularizer", "strength"]
    on = runs[runs["mask_label"] == "on"]
    comparisons = []
    for _, group in runs[runs["mask_label"] == "off"].groupby(SETTING, sort=False, dropna=False):
        found = compare(group, on, keys, metric, tol.effect(metric), False,
                        _setting(group.iloc[0], with_mask=False) + ": off vs on", tol.level)
        comparisons += [found] if found else []
    return comparisons


# -- verdicts -------------------------------------------------------------------------------------
def verdict(number: int, comparisons: list[Comparison], why_untested: str, notes: list[str],
            missing: list[str] | None = None) -> Claim:
    """held / not held / inconclusive from the settings' verdicts; not tested when an arm is
    missing (``missing`` says which) or nothing could be paired."""
    if missing or not comparisons:
        reason = "; ".join(missing) if missing else why_untested
        return Claim(number, STATEMENTS[number], NOT_TESTED, reason, comparisons, notes)
    counts = {v: sum(c.verdict == v for c in comparisons)
              for v in (SUPPORTED, CONTRADICTED, INCONCLUSIVE)}
    if counts[SUPPORTED] == len(comparisons):
        result = HELD
    elif counts[CONTRADICTED]:
        result = NOT_HELD
    else:
        result = UNDECIDED
    summary = (f"{len(comparisons)} compared settings: {counts[SUPPORTED]} supported, "
               f"{counts[CONTRADICTED]} contradicted, {counts[INCONCLUSIVE]} inconclusive")
    return Claim(number, STATEMENTS[number], result, summary, comparisons, notes)


def missing_arms(runs: pd.DataFrame, wanted: tuple[str, ...]) -> list[str]:
    present = set(runs["regularizer"])
    arms = [f"{r} has no finished run in this sweep" for r in wanted if r not in present]
    if "none" not in present:
        arms.append("the baseline (regularizer=none) has no finished run in this sweep")
    return arms


def unmeasured(comparisons: list[Comparison], metrics: tuple[str, ...]) -> list[str]:
    compared = {c.metric for c in comparisons}
    return [f"{m} was not measured (or not paired) in any setting" for m in metrics
            if m not in compared]


def claim_1(runs: pd.DataFrame, tol: Tolerances) -> Claim:
    comparisons, notes = [], []
    for metric in CLAIM_1_METRICS:
        found, found_notes = against_baseline(runs, REGULARIZERS, metric, tol)
        comparisons += found
        notes += [n for n in found_notes if n not in notes]
    missing = missing_arms(runs, REGULARIZERS)
    missing += unmeasured(comparisons, CLAIM_1_METRICS) if comparisons else []
    return verdict(1, comparisons, "needs a baseline and both regularizers with MonoScore and "
                   "purity at the same backbone, dataset, k and seed", notes, missing)


def claim_2(runs: pd.DataFrame, tol: Tolerances) -> Claim:
    comparisons, notes = against_baseline(runs, REGULARIZERS, "r2", tol, non_inferiority=True)
    return verdict(2, comparisons, "needs a baseline and both regularizers with R^2 at the same "
                   "backbone, dataset, k and seed", notes, missing_arms(runs, REGULARIZERS))


def claim_3(runs: pd.DataFrame, tol: Tolerances) -> Claim:
    comparisons, notes = against_baseline(runs, ("l1l2",), ROBUSTNESS, tol)
    notes = ["robustness = mean over inference k' != k of R^2(k') / R^2(k)", *notes]
    return verdict(3, comparisons, "needs a baseline and an l1l2 run with inference-k "
                   "robustness curves (curves.k_robustness) at the same backbone, dataset, k and "
                   "seed", notes, missing_arms(runs, ("l1l2",)))


def claim_4(runs: pd.DataFrame, tol: Tolerances) -> Claim:
    comparisons, notes = against_baseline(runs, ("l1l2",), PROBE_SMALL_M, tol)
    notes = [f"small-budget score = mean probe accuracy (mAP if multi-label) over m in "
             f"{list(tol.small_m)}", *notes]
    return verdict(4, comparisons, "needs a baseline and an l1l2 run with truncated-probe "
                   f"scores (curves.probe) at m in {list(tol.small_m)}", notes,
                   missing_arms(runs, ("l1l2",)))


def claim_5(runs: pd.DataFrame, tol: Tolerances) -> Claim:
    comparisons = mask_pairs(runs, DEAD_METRIC, tol)
    return verdict(5, comparisons, "needs a mask ablation: the same regularized setting and "
                   "seed with mask=true and mask=false", [])


def check_claims(runs: pd.DataFrame, tol: Tolerances | None = None) -> list[Claim]:
    """The five claims on a runs table (:func:`sae.reporting.collect.collect`'s, with the derived
    columns of :func:`sae.reporting.aggregate.add_derived`); only finished runs count."""
    tol = tol or Tolerances()
    done = finished_runs(runs) if not runs.empty else runs
    if done.empty:
        return [Claim(n, STATEMENTS[n], NOT_TESTED, "no finished run in this sweep")
                for n in STATEMENTS]
    return [check(done, tol) for check in (claim_1, claim_2, claim_3, claim_4, claim_5)]


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
            "mono_dead0": row.get("mono_dead0_mean"), "mono_reference": ref[1],
            "purity_binary": row.get("purity_binary_mean"),
            "purity_binary_reference": purity[0] if purity else None,
            "purity_weighted": row.get("purity_weighted_mean"),
            "purity_weighted_reference": purity[1] if purity else None,
            "same_budget": row["k"] == REFERENCE_K and row["n_latents"] == REFERENCE_N,
        })
    return pd.DataFrame(rows)
