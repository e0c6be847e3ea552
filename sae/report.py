"""Stage 4: a finished sweep directory -> tables, plots, claims, method card, one HTML page.

    python -m sae.report outputs/sweeps/demo                 # writes outputs/sweeps/demo/report/
    python -m sae.report SWEEP_DIR --r2-tolerance 0.02 --small-m 1 2
    sae-report SWEEP_DIR                                      # the same, as a console script

Writes into ``SWEEP_DIR/report/``::

    runs.parquet, runs.csv     one row per cell (failed and missing ones too)
    tables.md, tables.tex      the paper's tables; tables.csv: every metric's mean/std per setting
    plots/*.png                metrics vs k, R^2 vs inference k', probe vs m, dead latents by mask
    claims.md                  the five claims of METHOD.md s5, and the s6 reference numbers
    method_card.md / .json     the sweep's card (METHOD.md s7), seed stability filled in
    seed_stability.csv         atom stability and the spread of every metric, per setting
    notes.md                   what is missing (failed cells, one seed, no mask ablation, ...)
    index.html                 all of the above on one page (relative links: opens from disk)

Missing pieces are reported, never fatal: the only error is a directory that is not a sweep.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sae.method_card import render_markdown
from sae.reporting import aggregate, card, claims, collect, html, plots, render, tables
from sae.reporting.claims import Tolerances


@dataclass(frozen=True)
class ReportOptions:
    tolerances: Tolerances = Tolerances()
    seed_stability: bool = True  # load the models and compare atoms (slow for n = 8192 grids)


def write_text(path: Path, text: str) -> Path:
    from sae.io import atomic_write_text

    atomic_write_text(path, text)
    return path


def parquet_ready(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns of mixed Python types (e.g. a config value that is a number in one run and a
    string in another) become text, which Parquet requires of a column."""
    frame = frame.copy()
    for column in frame.columns:
        if frame[column].dtype == object:
            kinds = {type(v) for v in frame[column] if v is not None and not pd.isna(v)}
            if len(kinds) > 1 or kinds - {str, bool, int, float}:
                frame[column] = frame[column].map(lambda v: None if v is None else str(v))
    return frame


def write_runs(runs: pd.DataFrame, out: Path) -> None:
    runs.to_csv(out / "runs.csv", index=False)
    parquet_ready(runs).to_parquet(out / "runs.parquet", index=False)


def missing_notes(runs: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    """Cells without a finished run, and settings that cannot give a spread."""
    notes = []
    for _, row in runs[runs["status"] != "done"].iterrows():
        notes.append(f"cell {row['cell']} ({row['overrides'] or 'defaults'}): {row['status']}"
                     f" -- {row['reason'] or 'no reason recorded'} (run {row['run_id']})")
    single = int((summary["n_seeds"] == 1).sum()) if not summary.empty else 0
    if single:
        notes.append(f"{single} of {len(summary)} settings have one finished seed: no std and "
                     "no seed stability for them")
    return notes


@dataclass
class Report:
    index: Path  # report/index.html
    claims: list[claims.Claim]
    notes: list[str]  # the missing pieces


def build_report(sweep_dir: Path, options: ReportOptions | None = None) -> Path:
    """Write every report file into ``sweep_dir/report/``; returns the path of index.html."""
    return write_report(sweep_dir, options).index


def write_report(sweep_dir: Path, options: ReportOptions | None = None) -> Report:
    """:func:`build_report`, returning the verdicts and notes as well (for the CLI)."""
    from sae.io import atomic_write_json, code_version

    options = options or ReportOptions()
    tol = options.tolerances
    sweep = collect.collect(Path(sweep_dir))
    out = sweep.sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)

    runs = aggregate.add_derived(sweep.runs, sweep.curves, tol.small_m)
    write_runs(runs, out)
    metrics = collect.metric_columns(runs)
    summary = aggregate.seed_summary(runs, metrics)
    summary.to_csv(out / "tables.csv", index=False)
    write_text(out / "tables.md", tables.markdown_tables(summary, sweep.name))
    write_text(out / "tables.tex", tables.latex_tables(summary, sweep.name))

    verdicts = claims.check_claims(summary, tol)
    claims_md = render.claims_markdown(sweep.name, verdicts, tol, claims.reference_rows(summary))
    write_text(out / "claims.md", claims_md)

    figures, plot_notes = plots.make_plots(runs, sweep.curves, summary, out / "plots")

    stability = card.seed_stability_table(runs, metrics, options.seed_stability)
    stability.to_csv(out / "seed_stability.csv", index=False)
    sweep_card = card.sweep_card(
        sweep.name, sweep.sweep_dir, runs,
        card.stability_field(stability, metrics, options.seed_stability), verdicts,
        code_version(), sweep.multirun)
    atomic_write_json(out / "method_card.json", sweep_card)
    card_md = write_text(out / "method_card.md", render_markdown(sweep_card, f"sweep `{sweep.name}`"))

    notes = missing_notes(sweep.runs, summary) + plot_notes
    write_text(out / "notes.md", "# Missing pieces\n\n" + "".join(f"- {n}\n" for n in notes)
               if notes else "# Missing pieces\n\nNone.\n")
    page = html.PageInputs(sweep.name, out, runs, summary, verdicts, figures,
                           card_md.read_text(), claims_md, notes)
    index = write_text(out / "index.html", html.render_page(page))
    return Report(index, verdicts, notes)


# -- command line ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Tolerances()
    parser = argparse.ArgumentParser(prog="sae-report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory (holds cells.json)")
    parser.add_argument("--r2-tolerance", type=float, default=defaults.r2_abs,
                        help="claim 2: max absolute R^2 drop below the baseline "
                             "(default %(default)s)")
    parser.add_argument("--min-gain", type=float, default=defaults.min_gain,
                        help="claims 1, 3, 4, 5: a difference must exceed this "
                             "(default %(default)s)")
    parser.add_argument("--small-m", type=int, nargs="+", default=list(defaults.small_m),
                        help="claim 4: the small probe budgets (default %(default)s)")
    parser.add_argument("--min-share", type=float, default=defaults.min_share,
                        help="share of compared settings in which a claim must hold "
                             "(default %(default)s)")
    parser.add_argument("--no-seed-stability", action="store_true",
                        help="skip loading the models to compare decoder atoms between seeds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tol = Tolerances(args.r2_tolerance, args.min_gain, tuple(args.small_m), args.min_share)
    try:
        report = write_report(args.sweep_dir, ReportOptions(tol, not args.no_seed_stability))
    except collect.ReportError as exc:
        print(f"sae-report: {exc}", file=sys.stderr)
        return 2
    print(render.claims_table(report.claims))
    if report.notes:
        print("\nMissing pieces:\n" + "\n".join(f"- {n}" for n in report.notes))
    # Last line: the page to open (make demo ends with it).
    print(f"\nreport: {report.index.resolve()}")
    return 0


def cli() -> None:
    """Console script ``sae-report``."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
