"""``claims.md``: the verdicts, the numbers behind them, the tolerances, the s6 reference."""

from __future__ import annotations

import math

import pandas as pd

from sae.reporting.claims import REFERENCE_K, REFERENCE_N, Claim, Comparison, Tolerances

WORDING = ("Verdicts are worded in proportion. Each compared setting pairs runs by seed and "
           "gives the mean paired difference with a Student-t interval over the seeds; it "
           "*supports* a claim when the interval lies beyond the minimum effect in the claimed "
           "direction, *contradicts* it when beyond it in the other direction, and is "
           "*inconclusive* otherwise (always with one seed). \"held\" means every compared "
           "setting of this sweep (backbones, data, budgets, strengths, seeds) supports the "
           "claim; it is not a proof beyond these conditions.")


def number(value: float | None, std: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    text = f"{value:.4g}"
    if std is not None and not math.isnan(std):
        text += f" ± {std:.2g}"
    return text


def claims_table(claims: list[Claim]) -> str:
    """The one-table summary (also printed by the CLI at the end of ``make demo``)."""
    lines = ["| # | claim | verdict | settings |", "|---|---|---|---|"]
    for c in claims:
        lines.append(f"| {c.number} | {c.statement} | **{c.verdict}** | {c.summary} |")
    return "\n".join(lines)


def headline(claims: list[Claim]) -> list[str]:
    """What a reader must see first: the inconclusive settings and the one-seed caveat."""
    lines = []
    undecided = [(c.number, comp) for c in claims for comp in c.inconclusive()]
    if any(comp.interval.n < 2 for _, comp in undecided):
        lines.append("**Caution: some settings have a single seed. A single seed gives no "
                     "interval, so no claim can be held on them; run at least 2 seeds "
                     "(3 in the paper preset).**")
    if undecided:
        lines += ["", f"**{len(undecided)} compared settings are inconclusive** (the interval "
                  "does not clear the minimum effect either way):", ""]
        lines += [f"- claim {n}: {comp.setting}, {comp.metric}: {comp.interval.text(4)}"
                  for n, comp in undecided]
    return [*lines, ""] if lines else []


def comparisons_table(comparisons: list[Comparison], reference_name: str) -> str:
    lines = [f"| setting | metric | seeds | {reference_name} | value | difference [95 % CI] | "
             "threshold | verdict |", "|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c.setting} | {c.metric} | {c.seeds} | {number(c.reference)} | "
                     f"{number(c.value)} | {c.interval.text(4)} | {c.threshold:+g} | "
                     f"{c.verdict} |")
    return "\n".join(lines)


def tolerance_lines(tol: Tolerances) -> list[str]:
    effects = ", ".join(f"{m} {v:g}" for m, v in tol.min_effect.items())
    return [
        "## Thresholds used",
        "",
        f"- intervals: {tol.level:.0%} Student-t over the seed-paired differences;",
        f"- minimum effects (report.min_effect; `--min-effect metric=value`): {effects};",
        f"- claim 2 (non-inferiority): the interval's lower end must lie above "
        f"**-{tol.r2_abs:g}** (R^2, absolute; `--r2-tolerance`);",
        f"- claim 4: small budgets m in **{list(tol.small_m)}**;",
        "- a claim is held only when every compared setting supports it.",
        "",
    ]


def claim_section(claim: Claim) -> list[str]:
    lines = [f"## Claim {claim.number}: {claim.verdict}", "", claim.statement, "",
             f"Result: {claim.summary}.", ""]
    lines += [f"- note: {note}" for note in claim.notes]
    if claim.notes:
        lines.append("")
    if claim.comparisons:
        reference = "mask on" if claim.number == 5 else "baseline"
        lines += [comparisons_table(claim.comparisons, reference), ""]
    return lines


def reference_section(reference: pd.DataFrame) -> list[str]:
    lines = ["## Baseline against the reference numbers (METHOD.md s6)", ""]
    if reference.empty:
        return lines + ["Not applicable: no baseline of this sweep is on a backbone and dataset "
                        "of METHOD.md s6 (clip_vitl14, siglip2, vit_l16 on imagenet, "
                        "openimages).", ""]
    lines += [f"Reference: MonoLoss repository figures, Top-k, n = {REFERENCE_N}, "
              f"k = {REFERENCE_K}, no regularizer. Rows at another k or n are shown for "
              "orientation only.", "",
              "| backbone | dataset | k | n | seeds | R^2 (ref) | mono_dead0 (ref) | "
              "purity binary (ref) | purity weighted (ref) | same budget |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in reference.iterrows():
        lines.append(
            f"| {r['backbone']} | {r['dataset']} | {r['k']} | {r['n_latents']} | "
            f"{r['n_seeds']} | {number(r['r2'])} ({r['r2_reference']}) | "
            f"{number(r['mono_dead0'])} ({r['mono_reference']}) | "
            f"{number(r['purity_binary'])} ({number(r['purity_binary_reference'])}) | "
            f"{number(r['purity_weighted'])} ({number(r['purity_weighted_reference'])}) | "
            f"{'yes' if r['same_budget'] else 'no'} |")
    return [*lines, ""]


def claims_markdown(sweep_name: str, claims: list[Claim], tol: Tolerances,
                    reference: pd.DataFrame) -> str:
    lines = [f"# Claims of arXiv:2606.27321 on sweep `{sweep_name}`", "", WORDING, "",
             claims_table(claims), "", *headline(claims)]
    lines += tolerance_lines(tol)
    for claim in claims:
        lines += claim_section(claim)
    lines += reference_section(reference)
    return "\n".join(lines)
