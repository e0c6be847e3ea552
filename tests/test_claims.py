"""Claim verdicts on constructed run tables (METHOD.md s5): seed pairing, Student-t intervals,
minimum effects, non-inferiority, missing arms, one seed."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from sae.reporting.claims import (
    CLAIM_1_METRICS,
    HELD,
    NOT_HELD,
    NOT_TESTED,
    PROBE_SMALL_M,
    ROBUSTNESS,
    UNDECIDED,
    Tolerances,
    check_claims,
)
from sae.reporting.stats import (
    CONTRADICTED,
    INCONCLUSIVE,
    SUPPORTED,
    Interval,
    add_deltas,
    t_interval,
    t_quantile,
    verdict_increase,
    verdict_non_inferior,
)

# Two-sided 95 % Student-t critical values from a printed table (df = 1 .. 5, 10, 30).
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 30: 2.042}
METRICS = (*CLAIM_1_METRICS, "r2", ROBUSTNESS, PROBE_SMALL_M, "dead_fraction")


def run_row(reg: str, mask: bool, seed: int, values: dict[str, float], k: int = 8) -> dict:
    return {"status": "done", "run_id": f"{reg}-{mask}-{seed}-k{k}", "backbone": "none",
            "dataset": "synthetic", "k": k, "regularizer": reg,
            "strength": 0.0 if reg == "none" else 0.1, "mask": mask, "seed": seed,
            "n_latents": 64, **values}


def base_values(seed: int) -> dict[str, float]:
    """Baseline numbers that vary a lot between seeds (pairing must remove this)."""
    return {m: 0.5 + 0.1 * seed for m in METRICS}


def grid(effect: dict[str, list[float]] | None = None, seeds: tuple[int, ...] = (0, 1, 2),
         regularizers: tuple[str, ...] = ("offsupport_l1", "l1l2"), masks: tuple[bool, ...] =
         (True, False), dead_effect: list[float] | None = None) -> pd.DataFrame:
    """A sweep's runs: each regularized run = its seed's baseline + ``effect[metric][i]`` at
    the i-th seed (default +0.05 with a little noise everywhere, R^2 -0.002)."""
    noise = [0.0, 0.004, -0.003, 0.002]
    effect = effect or {}
    rows = [run_row("none", True, s, base_values(s)) for s in seeds]
    for reg in regularizers:
        for mask in masks:
            for i, seed in enumerate(seeds):
                values = {m: base_values(seed)[m] + effect.get(m, [0.05 + noise[i]] * 4)[i]
                          for m in METRICS}
                values["r2"] = base_values(seed)["r2"] + effect.get("r2", [-0.002 + noise[i] / 4]
                                                                   * 4)[i]
                if not mask:  # the unmasked twin: more dead latents
                    values["dead_fraction"] += (dead_effect or [0.2, 0.21, 0.19, 0.2])[i]
                rows.append(run_row(reg, mask, seed, values))
    return pd.DataFrame(rows)


def verdicts(runs: pd.DataFrame, tol: Tolerances | None = None) -> dict[int, str]:
    return {c.number: c.verdict for c in check_claims(runs, tol)}


# -- the interval ---------------------------------------------------------------------------------
def naive_interval(values: list[float], t: float) -> tuple[float, float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = t * (var / n) ** 0.5
    return mean, mean - half, mean + half


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_matches_the_printed_table(df):
    assert t_quantile(0.95, df) == pytest.approx(T_TABLE[df], abs=1e-3)


@pytest.mark.parametrize("values", [[0.1, 0.3], [0.05, 0.02, 0.08], [1.0, -1.0, 0.5, 0.25, 2.0]])
def test_t_interval_matches_a_naive_reference(values):
    interval = t_interval(values)
    mean, low, high = naive_interval(values, T_TABLE[len(values) - 1])
    assert interval.n == len(values)
    assert (interval.mean, interval.low, interval.high) == pytest.approx((mean, low, high),
                                                                         abs=2e-3)


def test_one_value_gives_no_interval_and_is_always_inconclusive():
    interval = t_interval([5.0])
    assert interval.mean == 5.0 and math.isnan(interval.low) and math.isnan(interval.high)
    assert verdict_increase(interval, 0.0) == INCONCLUSIVE
    assert verdict_non_inferior(interval, 0.01) == INCONCLUSIVE
    assert "no interval" in interval.text()


def test_verdict_rules_at_the_thresholds():
    def iv(low: float, high: float) -> Interval:
        return Interval(3, (low + high) / 2, low, high)

    assert verdict_increase(iv(0.02, 0.05), 0.01) == SUPPORTED
    assert verdict_increase(iv(0.005, 0.05), 0.01) == INCONCLUSIVE  # does not clear the effect
    assert verdict_increase(iv(-0.05, -0.02), 0.01) == CONTRADICTED
    assert verdict_increase(iv(-0.05, -0.005), 0.01) == INCONCLUSIVE
    assert verdict_non_inferior(iv(-0.009, 0.01), 0.01) == SUPPORTED
    assert verdict_non_inferior(iv(-0.03, -0.011), 0.01) == CONTRADICTED
    assert verdict_non_inferior(iv(-0.03, 0.0), 0.01) == INCONCLUSIVE


# -- claims on constructed run tables -------------------------------------------------------------
def test_supported_everywhere_holds_every_claim():
    found = check_claims(grid())
    assert {c.number: c.verdict for c in found} == {n: HELD for n in range(1, 6)}
    claim_1 = found[0]
    assert len(claim_1.comparisons) == 2 * len(CLAIM_1_METRICS)  # masked runs only
    assert all(c.seeds == "0,1,2" and c.interval.n == 3 for c in claim_1.comparisons)


def test_pairing_by_seed_removes_the_seed_to_seed_spread():
    # The baseline varies by 0.1 per seed; unpaired means would give an interval far wider than
    # the +0.05 effect. Paired, the effect is supported. Shuffling the rows changes nothing.
    runs = grid().sample(frac=1.0, random_state=0)
    comparison = check_claims(runs)[0].comparisons[0]
    assert comparison.verdict == SUPPORTED
    mean, low, _ = naive_interval([0.05, 0.054, 0.047], T_TABLE[2])
    assert comparison.interval.mean == pytest.approx(mean) and comparison.interval.low == \
        pytest.approx(low, abs=1e-3)
    unpaired = t_interval([v - 0.6 for v in (0.55, 0.654, 0.747)])  # vs the baseline mean
    assert unpaired.low < 0.0 < unpaired.high


def test_contradicted_settings_mean_not_held():
    effect = {m: [-0.05, -0.046, -0.053] for m in CLAIM_1_METRICS}
    found = check_claims(grid(effect))
    assert found[0].verdict == NOT_HELD
    assert {c.verdict for c in found[0].comparisons} == {CONTRADICTED}


def test_effects_inside_the_noise_are_inconclusive():
    # +0.02 on average, but +-0.06 from seed to seed (the demo's claim-3 situation).
    effect = {m: [0.08, -0.04, 0.02] for m in METRICS if m != "r2"}
    found = verdicts(grid(effect))
    assert found[1] == UNDECIDED and found[3] == UNDECIDED and found[4] == UNDECIDED
    assert found[5] == HELD  # the mask effect is added on top and is clear


def test_min_effect_is_a_parameter():
    effect = {m: [0.03, 0.031, 0.029] for m in METRICS if m != "r2"}
    assert verdicts(grid(effect))[1] == HELD  # +0.03 clears the default 0.01
    strict = Tolerances(min_effect={**Tolerances().min_effect, "mono_dead0": 0.05})
    claim_1 = check_claims(grid(effect), strict)[0]
    assert claim_1.verdict == UNDECIDED
    assert {c.metric for c in claim_1.inconclusive()} == {"mono_dead0"}


def test_one_seed_never_holds_a_claim():
    found = check_claims(grid(seeds=(0,)))
    assert not [c for c in found if c.verdict == HELD]
    assert all(c.verdict in (UNDECIDED, NOT_TESTED) for c in found)
    assert all(comp.interval.n == 1 for c in found for comp in c.comparisons)


def test_a_missing_arm_is_not_tested():
    found = verdicts(grid(regularizers=("l1l2",)))  # no off-support run at all
    assert found[1] == NOT_TESTED and found[2] == NOT_TESTED
    assert found[3] == HELD and found[4] == HELD  # l1l2-only claims are still tested
    no_ablation = verdicts(grid(masks=(True,)))
    assert no_ablation[5] == NOT_TESTED
    no_baseline = grid()
    no_baseline = verdicts(no_baseline[no_baseline["regularizer"] != "none"])
    assert [no_baseline[n] for n in (1, 2, 3, 4)] == [NOT_TESTED] * 4
    assert no_baseline[5] == HELD  # the mask ablation needs no baseline


def test_a_metric_never_measured_is_not_tested():
    runs = grid().drop(columns=["purity_binary"])
    claim_1 = check_claims(runs)[0]
    assert claim_1.verdict == NOT_TESTED and "purity_binary was not measured" in claim_1.summary


def test_claim_2_is_non_inferiority():
    small_loss = {"r2": [-0.004, -0.003, -0.005]}  # within the 0.01 margin
    assert verdicts(grid(small_loss))[2] == HELD
    big_loss = {"r2": [-0.05, -0.048, -0.052]}
    assert verdicts(grid(big_loss))[2] == NOT_HELD
    assert verdicts(grid(big_loss), Tolerances(r2_abs=0.06))[2] == HELD
    noisy = {"r2": [-0.03, 0.01, -0.01]}  # could be a loss beyond the margin, or none
    assert verdicts(grid(noisy))[2] == UNDECIDED


def test_delta_columns_pair_by_seed():
    runs = grid()
    runs["mask_label"] = ["unused" if r == "none" else ("on" if m else "off")
                          for r, m in zip(runs["regularizer"], runs["mask"])]
    summary = runs.groupby(["backbone", "dataset", "k", "n_latents", "regularizer", "strength",
                            "mask_label"], as_index=False).first()
    deltas = add_deltas(summary, runs, ("mono_dead0",))
    baseline = deltas[deltas["regularizer"] == "none"].iloc[0]
    assert math.isnan(baseline["delta_mono_dead0_mean"])
    row = deltas[(deltas["regularizer"] == "l1l2") & (deltas["mask_label"] == "on")].iloc[0]
    mean, low, high = naive_interval([0.05, 0.054, 0.047], T_TABLE[2])
    assert (row["delta_mono_dead0_mean"], row["delta_mono_dead0_low"],
            row["delta_mono_dead0_high"]) == pytest.approx((mean, low, high), abs=1e-3)
