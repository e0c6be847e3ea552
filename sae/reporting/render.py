"""``claims.md``: the verdicts, the numbers behind them, the tolerances, the s6 reference."""

from __future__ import annotations

import math

import pandas as pd

from sae.reporting.claims import REFERENCE_K, REFERENCE_N, Claim, Comparison, Tolerances

WORDING = ("Verdicts are worded in proportion: \"held\" means that under the conditions of this "
           "sweep (backbones, data, budgets, strengths, seeds) the stated comparison of seed "
           "means came out as the paper reports, within the tolerances below. It is not a proof "
           "beyond these conditions.")


def number(value: float | None, std: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    text = f"{value:.4g}"
    if std is not None and not math.isnan(std):
        text += f" ± {std:.2g}"
    return text


def claims_table(claims: list[Claim]) -> str:
    """The one-table summary (also printed by the CLI at the end of ``make demo``)."""
    lines = ["| # | claim | verdict | numbers |", "|---|---|---|---|"]
    for c in claims:
        lines.append(f"| {c.number} | {c.statement} | **{c.verdict}** | {c.summary} |")
    return "\n".join(lines)


def comparisons_table(comparisons: list[Comparison], reference_name: str) -> str:
    lines = [f"| setting | metric | {reference_name} | value | difference | holds |",
             "|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c.setting} | {c.metric} | {number(c.reference, c.reference_std)} | "
                     f"{number(c.value, c.value_std)} | {c.difference:+.4g} | "
                     f"{'yes' if c.holds else 'no'} |")
    return "\n".join(lines)


def tolerance_lines(tol: Tolerances) -> list[str]:
    return [
        "## Tolerances used",
        "",
        f"- claim 2: a regularized R^2 may fall at most **{tol.r2_abs:g}** (absolute) below the "
        "baseline's;",
        f"- claims 1, 3, 4, 5: a difference counts when it exceeds **{tol.min_gain:g}**;",
        f"- claim 4: small budgets m in **{list(tol.small_m)}**;",
        f"- a claim is held when its comparison holds in at least **{tol.min_share:.0%}** of the "
        "compared settings. Values are means over seeds (± sample std).",
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
              "| backbone | dataset | k | n | seeds | R^2 (ref) | MonoScore (ref) | "
              "purity binary (ref) | purity weighted (ref) | same budget |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in reference.iterrows():
        lines.append(
            f"| {r['backbone']} | {r['dataset']} | {r['k']} | {r['n_latents']} | "
            f"{r['n_seeds']} | {number(r['r2'])} ({r['r2_reference']}) | "
            f"{number(r['mono_mean_dead0'])} ({r['mono_reference']}) | "
            f"{number(r['purity_binary'])} ({number(r['purity_binary_reference'])}) | "
            f"{number(r['purity_weighted'])} ({number(r['purity_weighted_reference'])}) | "
            f"{'yes' if r['same_budget'] else 'no'} |")
    return [*lines, ""]


def claims_markdown(sweep_name: str, claims: list[Claim], tol: Tolerances,
                    reference: pd.DataFrame) -> str:
    lines = [f"# Claims of arXiv:2606.27321 on sweep `{sweep_name}`", "", WORDING, "",
             claims_table(claims), ""]
    lines += tolerance_lines(tol)
    for claim in claims:
        lines += claim_section(claim)
    lines += reference_section(reference)
    return "\n".join(lines)
