"""The paper's tables: for each backbone x dataset x k, regularizer x mask rows against R^2,
NMSE, MonoScore (mono_live and mono_dead0), purity (binary and weighted), the small-m probe and
dead latents; mean +- std over seeds, the best value of each column marked (bold); then the
seed-paired difference to the baseline with its 95 % interval (:mod:`sae.reporting.stats`).
Markdown for the report page, LaTeX (booktabs) for papers.

"Best" compares the means as displayed (rounded), so two settings that print the same value are
both marked; dead latents are best when lowest.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pandas as pd

from sae.reporting.aggregate import (
    TABLE_KEYS,
    TABLE_METRICS,
    MetricSpec,
    label_flags,
    place,
    setting_label,
)
from sae.reporting.stats import DELTA_METRICS, delta_interval

MISSING = "—"  # a metric that was not measured (or a setting with no finished run)
NEGATIVE_MARK = "†"
NOTE = ("mean ± std over seeds (sample std; one seed: no std); best per column in bold "
        "(lowest for NMSE and dead latents; none marked when all tie); — = not measured. Mask "
        "unused: no regularizer, so the mask has no effect. mono_live: MonoScore averaged over "
        "the latents that fire; mono_dead0: over all latents, dead ones counted as 0. Probe "
        "(small m): probe accuracy (mAP if multi-label) averaged over m in {1, 2, 4}. "
        "Δ: mean over seeds of (setting − baseline of the same seed) [95 % Student-t "
        "interval]; one seed gives no interval. R^2 is the paper's uniform average over "
        "dimensions, R^2 (1-FVU) the variance-weighted one (SAELens' explained variance); "
        f"{NEGATIVE_MARK} marks a negative uniform R^2: its quietest dimensions dominate it, "
        "read R^2 (1-FVU).")


def format_value(mean: float, std: float, decimals: int) -> str:
    if mean is None or math.isnan(mean):
        return MISSING
    if std is None or math.isnan(std):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def best_rows(block: pd.DataFrame, spec: MetricSpec) -> set[int]:
    """Positions (in ``block``) of the best displayed mean of one metric; empty when fewer than
    two settings have a value or all show the same one (nothing stands out)."""
    if f"{spec.key}_mean" not in block:
        return set()
    means = block[f"{spec.key}_mean"].astype(float).round(spec.decimals).reset_index(drop=True)
    if means.count() < 2 or means.nunique() < 2:
        return set()
    best = means.max() if spec.higher_is_better else means.min()
    return {i for i, v in enumerate(means) if v == best}


def table_blocks(summary: pd.DataFrame) -> Iterator[tuple[tuple, pd.DataFrame]]:
    """(backbone, dataset, k), rows of that table -- in the summary's order."""
    for key, block in summary.groupby(list(TABLE_KEYS), sort=False):
        yield key, block.reset_index(drop=True)


def block_cells(block: pd.DataFrame, flags: tuple[bool, bool]) -> list[list[tuple[str, bool]]]:
    """The body of one table as (text, is_best) cells: label, mask, seeds, then the metrics."""
    best = {spec.key: best_rows(block, spec) for spec in TABLE_METRICS}
    body = []
    for i, row in block.iterrows():
        cells = [(setting_label(row, *flags), False), (str(row["mask_label"]), False),
                 (str(row["n_seeds"]), False)]
        for spec in TABLE_METRICS:
            mean = row.get(f"{spec.key}_mean")
            text = format_value(mean, row.get(f"{spec.key}_std"), spec.decimals)
            if spec.key == "r2" and mean is not None and not pd.isna(mean) and mean < 0:
                text += f" {NEGATIVE_MARK}"
            cells.append((text, i in best[spec.key]))
        cells += [(delta_interval(row, metric).text(), False) for metric in DELTA_METRICS]
        body.append(cells)
    return body


DELTA_HEADER = [f"Δ {metric} vs baseline [95 % CI]" for metric in DELTA_METRICS]
HEADER = ["Regularizer", "Mask", "Seeds", *(spec.label for spec in TABLE_METRICS), *DELTA_HEADER]


def title(key: tuple) -> str:
    return place(*key)


# -- Markdown -----------------------------------------------------------------------------------
def markdown_table(header: list[str], body: list[list[tuple[str, bool]]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cells in body:
        texts = [f"**{text}**" if best else text for text, best in cells]
        lines.append("| " + " | ".join(texts) + " |")
    return "\n".join(lines)


def markdown_tables(summary: pd.DataFrame, sweep_name: str) -> str:
    parts = [f"# Results of sweep `{sweep_name}`", "", NOTE, ""]
    if summary.empty:
        return "\n".join([*parts, "No finished run: nothing to tabulate.", ""])
    flags = label_flags(summary)
    for key, block in table_blocks(summary):
        parts += [f"## {title(key)}", "", markdown_table(HEADER, block_cells(block, flags)), ""]
    return "\n".join(parts)


# -- LaTeX --------------------------------------------------------------------------------------
def latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"),
                          ("%", r"\%"), ("#", r"\#"), ("^", r"\^{}")):
        text = text.replace(char, escaped)
    return (text.replace("±", r"$\pm$").replace("—", "--").replace("·", r"$\cdot$")
            .replace("Δ", r"$\Delta$").replace("−", "-"))


def latex_cell(text: str, best: bool) -> str:
    text = latex_escape(text)
    return rf"\textbf{{{text}}}" if best else text


def latex_table(key: tuple, block: pd.DataFrame, flags: tuple[bool, bool]) -> str:
    header = ["Regularizer", "Mask", "Seeds", "$R^2$",
              *(latex_escape(spec.label) for spec in TABLE_METRICS[1:]),
              *(latex_escape(h) for h in DELTA_HEADER)]
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{ll r" + " r" * (len(TABLE_METRICS) + len(DELTA_HEADER)) + "}",
             r"\toprule",
             " & ".join(header) + r" \\", r"\midrule"]
    for cells in block_cells(block, flags):
        lines.append(" & ".join(latex_cell(t, b) for t, b in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}",
              rf"\caption{{{latex_escape(title(key))}: {latex_escape(NOTE)}}}",
              r"\end{table}"]
    return "\n".join(lines)


def latex_tables(summary: pd.DataFrame, sweep_name: str) -> str:
    head = [f"% Results of sweep {sweep_name} (generated by python -m sae.report).",
            "% Needs \\usepackage{booktabs}.", ""]
    if summary.empty:
        return "\n".join([*head, "% No finished run: nothing to tabulate.", ""])
    flags = label_flags(summary)
    return "\n".join([*head, *(latex_table(key, block, flags) + "\n"
                               for key, block in table_blocks(summary))])
