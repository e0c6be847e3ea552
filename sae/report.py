"""Stage 4: a finished sweep directory -> tables, plots, claims, method card, one HTML page.

    python -m sae.report outputs/sweeps/demo                 # writes outputs/sweeps/demo/report/
    python -m sae.report SWEEP_DIR --r2-tolerance 0.02 --small-m 1 2
    python -m sae.report SWEEP_DIR --min-effect mono_dead0=0.02 purity_binary=0.005
    sae-report SWEEP_DIR                                      # the same, as a console script

Writes into ``SWEEP_DIR/report/``::

    runs.parquet, runs.csv     one row per cell (failed and never started ones too)
    tables.md, tables.tex      the paper's tables; tables.csv: every metric's mean/std per setting
    plots/*.png                metrics vs k, R^2 vs inference k', probe vs m, dead latents by mask
    claims.md                  the five claims of METHOD.md s5 (seed-paired intervals, verdicts),
                               and the s6 reference numbers
    method_card.md / .json     the sweep's card (METHOD.md s7), seed stability filled in
    seed_stability.csv         atom stability and the spread of every metric, per setting
    notes.md                   what is missing (failed cells, one seed, no mask ablation, ...)
    index.html                 all of the above on one page (relative links: opens from disk)
    wandb/                     when the sweep's runs were tracked with W&B: a job_type=report run
                               in the sweep's group (tables and claims as tables, plots as
                               images; offline unless W&B is online, see sae.tracking)

Missing pieces are reported, never fatal: the only error is a directory that is not a sweep.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sae.evaluation.method_card import render_markdown
from sae.reporting import (
    aggregate,
    card,
    claims,
    collect,
    dashboard,
    head_to_head,
    html,
    plots,
    render,
    stats,
    tables,
)
from sae.reporting.claims import DEFAULT_MIN_EFFECT, Tolerances


@dataclass(frozen=True)
class ReportOptions:
    tolerances: Tolerances = field(default_factory=Tolerances)
    seed_stability: bool = True  # load the models and compare atoms (slow for n = 8192 grids)
    wandb: bool = True  # log a report run when the sweep's runs were tracked with W&B


def write_text(path: Path, text: str) -> Path:
    from sae.io.files import atomic_write_text

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


def wandb_logger(runs: pd.DataFrame) -> dict | None:
    """The logger settings of the sweep's W&B-tracked runs; None when none was tracked."""
    if "config.logger.name" not in runs:
        return None
    tracked = runs[runs["config.logger.name"] == "wandb"]
    if tracked.empty:
        return None
    first = tracked.iloc[0]
    settings = {key: first.get(f"config.logger.{key}")
                for key in ("project", "entity", "mode", "probe_timeout_s")}
    return {k: v for k, v in settings.items() if v is not None and not pd.isna(v)}


def claims_frames(verdicts: list[claims.Claim]) -> dict[str, pd.DataFrame]:
    """The claims and the compared settings behind them, as tables."""
    rows = [{"claim": c.number, "statement": c.statement, "verdict": c.verdict,
             "settings": c.summary} for c in verdicts]
    settings = [{"claim": c.number, "setting": s.setting, "metric": s.metric, "seeds": s.seeds,
                 "reference": s.reference, "value": s.value, "difference": s.interval.mean,
                 "ci_low": s.interval.low, "ci_high": s.interval.high,
                 "threshold": s.threshold, "verdict": s.verdict}
                for c in verdicts for s in c.comparisons]
    return {"claims": pd.DataFrame(rows), "claim_settings": pd.DataFrame(settings)}


def log_report_run(sweep: collect.SweepRuns, runs: pd.DataFrame, summary: pd.DataFrame,
                   verdicts: list[claims.Claim], figures: list[plots.Figure], out: Path) -> None:
    """The sweep's W&B report run, when its runs were tracked with W&B."""
    logger = wandb_logger(runs)
    if logger is None:
        return
    from sae.tracking import log_report

    tables = {"paper_tables": parquet_ready(summary), **claims_frames(verdicts)}
    images = {f"plots/{figure.path.stem}": figure.path for figure in figures}
    log_report(sweep.name, out, logger, tables, images)
    save_dashboard_online(out / dashboard.SPEC_FILE, logger)


def write_dashboard_spec(sweep_name: str, runs: pd.DataFrame, out: Path) -> Path | None:
    """``report/wandb_dashboard.json`` when the sweep's runs were tracked with W&B (saved to
    the server by ``sae-sync SWEEP_DIR --dashboard``, or at once when the server answers)."""
    from sae.io.files import atomic_write_json

    logger = wandb_logger(runs)
    if logger is None:
        return None
    spec = dashboard.dashboard_spec(sweep_name, str(logger.get("project", "sae-grid")),
                                    logger.get("entity"))
    path = out / dashboard.SPEC_FILE
    atomic_write_json(path, spec)
    return path


def save_dashboard_online(spec_path: Path, logger: dict) -> None:
    """Save the dashboard now when W&B is online here (a warning, never an error, otherwise)."""
    import json
    import logging
    import os

    from sae.tracking import save_dashboard, wandb_mode

    if not spec_path.is_file() or not os.environ.get("WANDB_API_KEY"):
        return
    if wandb_mode(str(logger.get("mode", "auto")), float(logger.get("probe_timeout_s", 3.0))
                  ) != "online":
        return
    try:
        url = save_dashboard(json.loads(spec_path.read_text()))
        print(f"W&B dashboard: {url}")
    except Exception as exc:  # noqa: BLE001 -- the report stands without it
        logging.getLogger(__name__).warning("W&B dashboard not saved (%s); save it later with "
                                            "`sae-sync SWEEP_DIR --dashboard`", exc)


@dataclass
class Report:
    index: Path  # report/index.html
    claims: list[claims.Claim]
    notes: list[str]  # the missing pieces


def build_report(sweep_dir: Path, options: ReportOptions | None = None) -> Path:
    """Write every report file into ``sweep_dir/report/``; returns the path of index.html."""
    return write_report(sweep_dir, options).index


REPORT_DIR = "report"
PARTIAL_PREFIX = ".report-partial-"  # a report being written (removed if the writing fails)


def write_report(sweep_dir: Path, options: ReportOptions | None = None) -> Report:
    """:func:`build_report`, returning the verdicts and notes as well (for the CLI).

    The report is written into a new directory beside the sweep's ``report/`` and swapped in
    when complete, so a report killed half way leaves the previous one whole (and at most a
    ``.report-partial-*`` directory, which the next report removes)."""
    import shutil
    import tempfile

    sweep_dir = Path(sweep_dir)
    for stale in sweep_dir.glob(f"{PARTIAL_PREFIX}*"):  # left by a killed report
        shutil.rmtree(stale, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=sweep_dir))
    partial.chmod(0o755)  # mkdtemp's 0700 would hide the published report from other users
    try:
        written = _write_report(sweep_dir, partial, options)
        final = publish(partial, sweep_dir / REPORT_DIR)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return Report(final / written.index.name, written.claims, written.notes)


def publish(partial: Path, final: Path) -> Path:
    """Swap the complete ``partial`` directory in as ``final``: the old one is moved aside (one
    rename), the new one renamed in (another), then the old one removed."""
    import os
    import shutil

    old = None
    if final.exists():
        old = final.with_name(f".report-old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(partial, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_report(sweep_dir: Path, out: Path, options: ReportOptions | None) -> Report:
    from sae.io.files import atomic_write_json
    from sae.io.version import code_version

    options = options or ReportOptions()
    tol = options.tolerances
    sweep = collect.collect(Path(sweep_dir))

    runs = aggregate.add_derived(sweep.runs, sweep.curves, tol.small_m)
    write_runs(runs, out)
    metrics = collect.metric_columns(runs)
    summary = aggregate.seed_summary(runs, metrics)
    summary = stats.add_deltas(summary, aggregate.finished_runs(runs), level=tol.level)
    summary.to_csv(out / "tables.csv", index=False)
    write_text(out / "tables.md", tables.markdown_tables(summary, sweep.name))
    write_text(out / "tables.tex", tables.latex_tables(summary, sweep.name))

    comparisons = head_to_head.compare(aggregate.finished_runs(runs), tol.level)
    write_text(out / "head_to_head.md", f"# Head to head: sweep `{sweep.name}`\n\n"
               + head_to_head.markdown(comparisons))

    verdicts = claims.check_claims(runs, tol)
    claims_md = render.claims_markdown(sweep.name, verdicts, tol, claims.reference_rows(summary))
    write_text(out / "claims.md", claims_md)

    figures, plot_notes = plots.make_plots(runs, sweep.curves, summary, out / "plots")
    write_dashboard_spec(sweep.name, runs, out)

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
                           card_md.read_text(), claims_md, notes, sweep_card, comparisons)
    index = write_text(out / "index.html", html.render_page(page))
    if options.wandb:
        log_report_run(sweep, runs, summary, verdicts, figures, out)
    return Report(index, verdicts, notes)


# -- command line ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Tolerances()
    parser = argparse.ArgumentParser(prog="sae-report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory (holds cells.json)")
    parser.add_argument("--r2-tolerance", type=float, default=defaults.r2_abs,
                        help="claim 2: non-inferiority margin, the largest absolute R^2 loss "
                             "against the baseline (default %(default)s)")
    parser.add_argument("--min-effect", nargs="+", default=[], metavar="METRIC=VALUE",
                        help="minimum effect per metric (report.min_effect), overriding the "
                             f"defaults {DEFAULT_MIN_EFFECT}")
    parser.add_argument("--small-m", type=int, nargs="+", default=list(defaults.small_m),
                        help="claim 4: the small probe budgets (default %(default)s)")
    parser.add_argument("--level", type=float, default=defaults.level,
                        help="confidence level of the intervals (default %(default)s)")
    parser.add_argument("--no-seed-stability", action="store_true",
                        help="skip loading the models to compare decoder atoms between seeds")
    parser.add_argument("--no-wandb", action="store_true",
                        help="do not log the report run to W&B (logged only when the sweep's "
                             "runs were tracked with W&B)")
    return parser.parse_args(argv)


def min_effects(items: list[str]) -> dict[str, float]:
    """``["mono_dead0=0.02"]`` -> the defaults with that one replaced."""
    effects = dict(DEFAULT_MIN_EFFECT)
    for item in items:
        metric, sep, value = item.partition("=")
        try:
            effects[metric.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise SystemExit(f"sae-report: --min-effect {item!r}: expected METRIC=NUMBER, "
                             "e.g. --min-effect mono_dead0=0.02")
    return effects


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tol = Tolerances(args.r2_tolerance, tuple(args.small_m), args.level,
                     min_effects(args.min_effect))
    try:
        report = write_report(args.sweep_dir, ReportOptions(tol, not args.no_seed_stability,
                                                            not args.no_wandb))
    except collect.ReportError as exc:
        print(f"sae-report: {exc}", file=sys.stderr)
        return 2
    print(render.claims_table(report.claims))
    undecided = sum(len(c.inconclusive()) for c in report.claims)
    if undecided:
        print(f"\n{undecided} compared settings are inconclusive: see the list at the top of "
              f"{report.index.parent / 'claims.md'}")
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
