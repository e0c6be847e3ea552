"""The report's figures (matplotlib, Agg backend, PNG), one set per backbone x dataset:

* each table metric against the training k, one line per regularizer x mask (error bars: std
  over seeds);
* R^2 against the inference-time k', one panel per training k (the robustness curves);
* probe accuracy (mAP if multi-label) against the kept budget m, one panel per training k;
* dead latents with and without the mask, per regularizer and k (symmetric log scale, so that a
  count of 0 still shows: linear below 1, logarithmic above).

A figure whose data the sweep does not have is skipped and named in the returned notes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display (compute nodes have none)
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from sae.reporting.aggregate import (  # noqa: E402
    MASK_ORDER,
    REGULARIZER_ORDER,
    SETTING_KEYS,
    TABLE_METRICS,
    finished_runs,
    place,
)

DPI = 110


@dataclass
class Figure:
    path: Path
    title: str
    caption: str


def slug(*parts: object) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(str(p) for p in parts)).strip("-")


def line_label(regularizer: str, mask: str) -> str:
    return regularizer if regularizer == "none" else f"{regularizer}, mask {mask}"


# One colour and one marker per regularizer in every plot, in the registry's order (the baseline
# black); the mask by line style (and hatching for bars), never by colour.
PALETTE = ("black", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")
MARKERS = ("o", "s", "^", "D", "v", "P")
REGULARIZER_COLORS = dict(zip(REGULARIZER_ORDER, PALETTE))
REGULARIZER_MARKERS = dict(zip(REGULARIZER_ORDER, MARKERS))
MASK_STYLES = {"on": "-", "off": "--", "unused": ":"}  # mask told by line style, not colour only
LEGEND_FONT = 11  # points: readable at the page's native size
# Lines that coincide stay visible: each line of a panel is shifted by this fraction of an
# octave along the (log2) x axis, around the true x.
X_OFFSET_OCTAVES = 0.04


def line_style(regularizer: str, mask: str) -> dict:
    """Colour and marker = regularizer, line style = mask (solid on, dashed off, dotted for
    the baseline)."""
    return {"color": REGULARIZER_COLORS.get(regularizer, "tab:grey"),
            "marker": REGULARIZER_MARKERS.get(regularizer, "o"),
            "linestyle": MASK_STYLES.get(mask, "-.")}


def offset_x(x, position: int, lines: int):
    """x shifted for the ``position``-th of ``lines`` lines (log2 axes), so equal lines do not
    hide each other; the shift is a few percent, well inside a marker of the true x."""
    return x * 2 ** ((position - (lines - 1) / 2) * X_OFFSET_OCTAVES)


def outside_legend(fig: plt.Figure, ax: plt.Axes) -> None:
    """One legend for the figure, right of the panels: it never covers data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize=LEGEND_FONT, frameon=False)


def line_order(frame: pd.DataFrame) -> list[tuple[str, str]]:
    pairs = frame[["regularizer", "mask_label"]].drop_duplicates().itertuples(index=False)

    def rank(pair: tuple[str, str]) -> tuple[int, int, str]:
        reg, mask = pair
        return (REGULARIZER_ORDER.index(reg) if reg in REGULARIZER_ORDER else 9,
                MASK_ORDER.index(mask) if mask in MASK_ORDER else 9, reg)

    return sorted((tuple(p) for p in pairs), key=rank)


def save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # keeps the outside legend in the file
    plt.close(fig)
    return path


def _panels(n: int, width: float = 3.6, height: float = 3.0, per_row: int = 4):
    """``n`` panels, at most ``per_row`` in a row (the unused ones hidden)."""
    rows, cols = -(-n // per_row), min(n, per_row)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


# -- metric against k ---------------------------------------------------------------------------
def metrics_vs_k(summary: pd.DataFrame, out: Path, backbone: str, dataset: str) -> Figure | None:
    frame = summary[(summary["backbone"] == backbone) & (summary["dataset"] == dataset)]
    specs = [s for s in TABLE_METRICS
             if f"{s.key}_mean" in frame and frame[f"{s.key}_mean"].notna().any()]
    if frame.empty or not specs:
        return None
    fig, axes = _panels(len(specs))
    for ax, spec in zip(axes, specs):
        order = line_order(frame)
        for position, (reg, mask) in enumerate(order):
            line = frame[(frame["regularizer"] == reg) & (frame["mask_label"] == mask)]
            line = line.groupby("k")[[f"{spec.key}_mean", f"{spec.key}_std"]].mean()
            ax.errorbar(offset_x(line.index.to_numpy(float), position, len(order)),
                        line[f"{spec.key}_mean"], yerr=line[f"{spec.key}_std"], capsize=3,
                        label=line_label(reg, mask), **line_style(reg, mask))
        ax.set(xlabel="training k", ylabel=spec.label, title=spec.label)
        ax.set_xscale("log", base=2)
    outside_legend(fig, axes[0])
    fig.suptitle(f"{place(backbone, dataset)}: metrics against k (mean ± std over seeds)")
    path = save(fig, out / f"metrics_vs_k_{slug(backbone, dataset)}.png")
    return Figure(path, f"Metrics against k — {place(backbone, dataset)}",
                  "Each table metric against the training budget k, per regularizer and mask.")


# -- curves (robustness, probe) -----------------------------------------------------------------
def curve_means(runs: pd.DataFrame, curves: pd.DataFrame, curve: str) -> pd.DataFrame:
    """Mean and std over seeds of one curve, per setting and x."""
    done = finished_runs(runs)[["run_id", *SETTING_KEYS]]
    points = curves[curves["curve"] == curve].merge(done, on="run_id")
    if points.empty:
        return points
    grouped = points.groupby([*SETTING_KEYS, "x"], dropna=False)["y"]
    return grouped.agg(["mean", "std"]).reset_index()


def curve_figure(means: pd.DataFrame, out: Path, backbone: str, dataset: str, name: str,
                 xlabel: str, ylabel: str, title: str, caption: str,
                 reference: float | None = None) -> Figure | None:
    frame = means[(means["backbone"] == backbone) & (means["dataset"] == dataset)] \
        if not means.empty else means
    if frame.empty:
        return None
    ks = sorted(frame["k"].unique())
    fig, axes = _panels(len(ks))
    for ax, k in zip(axes, ks):
        at_k = frame[frame["k"] == k]
        order = line_order(at_k)
        for position, (reg, mask) in enumerate(order):
            line = at_k[(at_k["regularizer"] == reg) & (at_k["mask_label"] == mask)]
            line = line.groupby("x")[["mean", "std"]].mean()
            ax.errorbar(offset_x(line.index.to_numpy(float), position, len(order)),
                        line["mean"], yerr=line["std"], capsize=3,
                        label=line_label(reg, mask), **line_style(reg, mask))
        if name == "robustness":
            ax.axvline(k, color="grey", linestyle=":", linewidth=1)  # the training budget
        if reference is not None and not pd.isna(reference):  # not a ceiling: codes can beat it
            ax.axhline(reference, color="grey", linestyle="-.", linewidth=1,
                       label="raw-embedding probe")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"training k = {k}")
        ax.set_xscale("log", base=2)
    outside_legend(fig, axes[0])
    fig.suptitle(f"{place(backbone, dataset)}: {title}")
    path = save(fig, out / f"{name}_{slug(backbone, dataset)}.png")
    return Figure(path, f"{title} — {place(backbone, dataset)}", caption)


# -- dead latents, mask on and off --------------------------------------------------------------
def dead_by_mask(summary: pd.DataFrame, out: Path, backbone: str, dataset: str) -> Figure | None:
    frame = summary[(summary["backbone"] == backbone) & (summary["dataset"] == dataset)
                    & summary["dead_count_mean"].notna()]
    if frame.empty:
        return None
    bars = frame.sort_values(["k"], kind="stable")
    labels = [f"k={r.k}\n{line_label(r.regularizer, r.mask_label)}"
              for r in bars.itertuples(index=False)]
    colors = [REGULARIZER_COLORS.get(r, "tab:grey") for r in bars["regularizer"]]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(bars) + 1.5), 3.8))
    drawn = ax.bar(range(len(bars)), bars["dead_count_mean"],
                   yerr=bars["dead_count_std"].fillna(0), color=colors, capsize=3)
    for patch, mask in zip(drawn, bars["mask_label"]):
        patch.set_hatch("//" if mask == "off" else "")  # mask off: hatched, not only red
    ax.set_xticks(range(len(bars)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yscale("symlog", linthresh=1)  # 0 dead latents stays visible; log above 1
    top = float((bars["dead_count_mean"] + bars["dead_count_std"].fillna(0)).max())
    ax.set_ylim(0, max(2.0, 3 * top))  # headroom of half a decade above the tallest bar
    ax.set_ylabel("dead latents (evaluation)")
    ax.set_title(f"{place(backbone, dataset)}: dead latents, mask on (plain) / off (hatched)")
    path = save(fig, out / f"dead_mask_{slug(backbone, dataset)}.png")
    return Figure(path, f"Dead latents with and without the mask — {place(backbone, dataset)}",
                  "Evaluation-split dead latents; colour = regularizer (as in every plot), "
                  "hatched = mask off. Symmetric log scale (linear below 1).")


# -- all of them ----------------------------------------------------------------------------------
def raw_probe(summary: pd.DataFrame, backbone: str, dataset: str) -> float | None:
    """Mean score of the raw-embedding probe (a reference line), when the runs measured it."""
    if "probe_raw_mean" not in summary:
        return None
    rows = summary[(summary["backbone"] == backbone) & (summary["dataset"] == dataset)]
    return float(rows["probe_raw_mean"].mean())


def make_plots(runs: pd.DataFrame, curves: pd.DataFrame, summary: pd.DataFrame, out: Path
               ) -> tuple[list[Figure], list[str]]:
    """Every figure of every backbone x dataset; the notes name the ones that had no data."""
    out.mkdir(parents=True, exist_ok=True)
    robustness = curve_means(runs, curves, "k_robustness")
    probe = curve_means(runs, curves, "probe")
    figures, notes = [], []
    pairs = summary[["backbone", "dataset"]].drop_duplicates().itertuples(index=False)
    for backbone, dataset in pairs:
        makers = {
            "metrics against k": lambda b=backbone, d=dataset: metrics_vs_k(summary, out, b, d),
            "robustness curves": lambda b=backbone, d=dataset: curve_figure(
                robustness, out, b, d, "robustness", "inference k'", "R^2",
                "R^2 against inference-time k'",
                "R^2 when the SAE runs with Top-k' at inference; the dotted line marks the "
                "training k."),
            "probe curves": lambda b=backbone, d=dataset: curve_figure(
                probe, out, b, d, "probe", "kept activations m", "probe accuracy / mAP",
                "linear-probe accuracy against m",
                "Linear probe on codes truncated to their top-m activations (mAP when the "
                "dataset is multi-label); dash-dotted grey: the raw-embedding probe (the same "
                "probe on the raw embeddings; a reference, not a ceiling).",
                raw_probe(summary, b, d)),
            "dead latents by mask": lambda b=backbone, d=dataset: dead_by_mask(summary, out, b, d),
        }
        for what, make in makers.items():
            figure = make()
            if figure is None:
                notes.append(f"{place(backbone, dataset)}: no data for the {what} plot")
            else:
                figures.append(figure)
    return figures, notes
