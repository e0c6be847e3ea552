"""``index.html``: one page over the whole report, working when opened from disk.

Every link and image is relative (to files in ``report/`` or to the run directories), and the
page loads nothing from the network, so it can be copied with the sweep and its runs, or opened
on a laptop with ``file://``.
"""

from __future__ import annotations

import datetime as dt
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sae.grid.runs import (
    CONFIG_FILE,
    METHOD_CARD_MD,
    METRICS_FILE,
    STATUS_FILE,
    inspect_page,
    is_synced,
    wandb_offline_runs,
)
from sae.reporting.aggregate import label_flags
from sae.reporting.claims import Claim
from sae.reporting.plots import Figure
from sae.reporting.tables import HEADER, NOTE, block_cells, table_blocks, title

WANDB_APP = "https://wandb.ai"  # where a synced run is shown (WANDB_BASE_URL when set)

STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; } td.best { font-weight: bold; background: #eef7ee; }
.held { color: #1a7f37; font-weight: bold; } .not-held { color: #b42318; font-weight: bold; }
.not-tested, .inconclusive { color: #777; font-weight: bold; }
.headline { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 1em; }
table.card td { vertical-align: top; } table.card table { margin: 0; font-size: 1em; }
.failed, .new, .running, .interrupted { background: #fff1f0; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; max-width: 60em; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
nav a { margin-right: 1em; }
"""

REPORT_FILES = (
    ("runs.csv", "one row per cell: axes, status, every metric, config"), ("runs.parquet", ""),
    ("tables.md", "the paper's tables"), ("tables.tex", "LaTeX (booktabs)"),
    ("tables.csv", "mean and std over seeds of every metric, per setting"),
    ("claims.md", "the five claims"), ("method_card.md", "the sweep's method card"),
    ("method_card.json", ""), ("seed_stability.csv", "atom stability and metric spread"),
    ("notes.md", "missing pieces"),
)


@dataclass
class PageInputs:
    sweep_name: str
    report_dir: Path
    runs: pd.DataFrame
    summary: pd.DataFrame
    claims: list[Claim]
    figures: list[Figure]
    card_markdown: str
    claims_markdown: str
    notes: list[str] = field(default_factory=list)
    card: dict = field(default_factory=dict)  # the sweep's method card (rendered as a table)
    head_to_head: list = field(default_factory=list)  # sae.reporting.head_to_head.Comparison


def esc(value: object) -> str:
    """HTML-escaped text; None, NaN and pd.NA (a gap in the table) become empty."""
    missing = value is None or (not isinstance(value, str | list | dict) and pd.isna(value))
    return "" if missing else html.escape(str(value))


def rel(target: Path, report_dir: Path) -> str:
    """A relative URL from the report page to ``target`` (a file in or outside the report)."""
    return Path(os.path.relpath(target, report_dir)).as_posix()


def link(href: str, text: str) -> str:
    return f'<a href="{esc(href)}">{esc(text)}</a>'


# -- sections -----------------------------------------------------------------------------------
def files_section(report_dir: Path) -> str:
    items = [f"<li>{link(name, name)} {esc(what)}</li>" for name, what in REPORT_FILES
             if (report_dir / name).exists()]
    return "<h2 id='files'>Files</h2><ul>" + "".join(items) + "</ul>"


def inconclusive_headline(claims: list[Claim]) -> str:
    """The settings that decide nothing, shown first (not buried under the verdicts)."""
    undecided = [(c.number, s) for c in claims for s in c.inconclusive()]
    if not undecided:
        return ""
    one_seed = any(s.interval.n < 2 for _, s in undecided)
    items = "".join(f"<li>claim {n}: {esc(s.setting)}, {esc(s.metric)}: "
                    f"{esc(s.interval.text(4))}</li>" for n, s in undecided)
    caution = ("<p><b>Some settings have a single seed: no interval, so no claim can be held "
               "on them. Run at least 2 seeds.</b></p>" if one_seed else "")
    return (f"<div class='headline'>{caution}<details><summary><b>{len(undecided)} compared "
            "settings are inconclusive</b> (the 95 % interval does not clear the minimum "
            f"effect either way)</summary><ul>{items}</ul></details></div>")


def comparisons_table(claim: Claim) -> str:
    reference = "mask on" if claim.number == 5 else "baseline"
    body = [[(c.setting, False), (c.metric, False), (c.seeds, False),
             (f"{c.reference:.4g}", False), (f"{c.value:.4g}", False),
             (c.interval.text(4), False), (f"{c.threshold:+g}", False), (c.verdict, False)]
            for c in claim.comparisons]
    return html_table(["setting", "metric", "seeds", reference, "value",
                       "difference [95 % CI]", "threshold", "verdict"], body)


def claims_section(claims: list[Claim], claims_markdown: str) -> str:
    rows = "".join(
        f"<tr><td>{c.number}</td><td>{esc(c.statement)}</td>"
        f"<td class='{c.verdict.replace(' ', '-')}'>{esc(c.verdict)}</td>"
        f"<td>{esc(c.summary)}</td></tr>" for c in claims)
    details = "".join(f"<h4>Claim {c.number}: {esc(c.verdict)}</h4>"
                      + "".join(f"<p>note: {esc(n)}</p>" for n in c.notes)
                      + (comparisons_table(c) if c.comparisons else "") for c in claims)
    return ("<h2 id='claims'>Claims (METHOD.md s5)</h2>"
            "<table><tr><th>#</th><th>claim</th><th>verdict</th><th>settings</th></tr>"
            f"{rows}</table>{inconclusive_headline(claims)}<details><summary>The compared "
            f"settings behind each verdict ({link('claims.md', 'claims.md')}: thresholds, "
            f"reference numbers)</summary>{details}</details>")


def html_table(header: list[str], body: list[list[tuple[str, bool]]],
               extra: list[str] | None = None) -> str:
    """``extra``: one more cell per row, already HTML (the run links)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    rows = "".join(
        "<tr>" + "".join(f"<td class='best'>{esc(t)}</td>" if b else f"<td>{esc(t)}</td>"
                         for t, b in cells)
        + (f"<td>{extra[i]}</td>" if extra is not None else "") + "</tr>"
        for i, cells in enumerate(body))
    return f"<table><tr>{head}</tr>{rows}</table>"


def wandb_url(run_dir: Path, run_id: str, entity: object, project: object) -> str | None:
    """The W&B page of a run that ``sae-sync`` / ``wandb sync`` uploaded (None otherwise)."""
    if not any(is_synced(run) for run in wandb_offline_runs(run_dir)) or \
            not isinstance(entity, str) or not isinstance(project, str):
        return None
    return f"{os.environ.get('WANDB_BASE_URL', WANDB_APP)}/{entity}/{project}/runs/{run_id}"


def setting_links(row: pd.Series, runs: pd.DataFrame, report_dir: Path) -> str:
    """Links to the run directories of one table row (one per seed), and their W&B runs."""
    parts = []
    for run_id in str(row.get("run_ids") or "").split(","):
        match = runs[runs["run_id"] == run_id]
        if not run_id or match.empty:
            continue
        run = match.iloc[0]
        seed = run.get("seed")
        label = f"s{seed}" if seed is not None and not pd.isna(seed) else run_id
        parts.append(link(rel(Path(run["run_dir"]), report_dir) + "/", label))
        url = wandb_url(Path(run["run_dir"]), run_id, run.get("config.logger.entity"),
                        run.get("config.logger.project"))
        if url:
            parts.append(f"(<a href='{esc(url)}'>W&amp;B</a>)")
    return " ".join(parts)


def tables_section(summary: pd.DataFrame, runs: pd.DataFrame, report_dir: Path) -> str:
    parts = [f"<h2 id='tables'>Tables</h2><p>{esc(NOTE)}</p>"]
    if summary.empty:
        return parts[0] + "<p>No finished run: nothing to tabulate.</p>"
    flags = label_flags(summary)
    for key, block in table_blocks(summary):
        body = block_cells(block, flags)
        links = [setting_links(row, runs, report_dir) for _, row in block.iterrows()]
        parts.append(f"<h3>{esc(title(key))}</h3>"
                     + html_table([*HEADER, "runs"], body, extra=links))
    return "".join(parts)


def figures_section(figures: list[Figure], report_dir: Path) -> str:
    items = "".join(
        f"<figure><img src='{esc(rel(f.path, report_dir))}' alt='{esc(f.title)}'>"
        f"<figcaption><b>{esc(f.title)}</b>. {esc(f.caption)}</figcaption></figure>"
        for f in figures)
    return f"<h2 id='plots'>Plots</h2>{items or '<p>No plot: no finished run.</p>'}"


def feature_browser(run_dir: Path) -> Path | None:
    page = inspect_page(run_dir)
    return page if page.exists() else None


def browser_section(runs: pd.DataFrame, report_dir: Path) -> str:
    """Links to every run's feature browser, and one contact sheet per backbone x dataset."""
    done = runs[runs["status"] == "done"].drop_duplicates("run_id")
    links, previews, shown = [], [], set()
    for row in done.itertuples(index=False):
        page = feature_browser(Path(row.run_dir))
        if page is None:
            continue
        links.append(f"<li>{link(rel(page, report_dir), row.run_id)}</li>")
        sheets = sorted(page.parent.rglob("*.png"))
        if sheets and (row.backbone, row.dataset) not in shown:
            shown.add((row.backbone, row.dataset))
            previews.append(f"<figure><a href='{esc(rel(page, report_dir))}'><img src='"
                            f"{esc(rel(sheets[0], report_dir))}' alt='contact sheet' "
                            f"style='max-width:480px'></a><figcaption>{esc(row.run_id)}: "
                            f"{esc(sheets[0].name)}</figcaption></figure>")
    if not links:
        return ("<h2 id='browser'>Feature browser</h2><p>No run has a feature browser (its "
                "dataset has no images).</p>")
    return ("<h2 id='browser'>Feature browser</h2>" + "".join(previews)
            + f"<details><summary>All {len(links)} runs' pages</summary><ul>{''.join(links)}"
            "</ul></details>")


RUN_COLUMNS = ("cell", "backbone", "dataset", "k", "regularizer", "strength", "mask", "seed",
               "status", "reason")


def run_links(row: pd.Series, report_dir: Path) -> str:
    run_dir = Path(row["run_dir"])
    found = [(name, run_dir / name) for name in (METHOD_CARD_MD, METRICS_FILE, STATUS_FILE,
                                                 CONFIG_FILE)]
    parts = [link(rel(path, report_dir), name.split(".")[0]) for name, path in found
             if path.exists()]
    page = feature_browser(run_dir)
    if page is not None:
        parts.append(link(rel(page, report_dir), "features"))
    return " ".join(parts)


def _number(value) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.4f}"


def runs_section(runs: pd.DataFrame, report_dir: Path) -> str:
    head = "".join(f"<th>{c}</th>" for c in (*RUN_COLUMNS, "run id", "R^2", "R^2 (1-FVU)",
                                               "files"))
    rows = []
    for _, row in runs.iterrows():
        cells = "".join(f"<td>{esc(row.get(c))}</td>" for c in RUN_COLUMNS)
        dup = f" (same run as cell {int(row['duplicate_of'])})" \
            if pd.notna(row.get("duplicate_of")) else ""
        r2s = "".join(f"<td>{_number(row.get(key))}</td>"
                      for key in ("r2", "r2_variance_weighted"))
        rows.append(f"<tr class='{esc(row['status'])}'>{cells}<td>{esc(row['run_id'])}{dup}</td>"
                    f"{r2s}<td>{run_links(row, report_dir)}</td></tr>")
    return (f"<h2 id='runs'>Runs ({len(runs)} cells)</h2>"
            f"<table><tr>{head}</tr>{''.join(rows)}</table>")


def notes_section(notes: list[str]) -> str:
    if not notes:
        return "<h2 id='notes'>Missing pieces</h2><p>None.</p>"
    return ("<h2 id='notes'>Missing pieces</h2><ul>"
            + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")


def html_value(value: object) -> str:
    """A card value as HTML: dicts as nested key/value tables, lists as bullets."""
    if isinstance(value, dict):
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{html_value(v)}</td></tr>"
                       for k, v in value.items())
        return f"<table>{rows}</table>" if rows else ""
    if isinstance(value, list):
        return "<ul>" + "".join(f"<li>{html_value(v)}</li>" for v in value) + "</ul>"
    return esc(value)


def card_section(card: dict) -> str:
    """Collapsed: it is long, and a reader comes for the comparisons first."""
    rows = "".join(f"<tr><th>{esc(k.replace('_', ' ').capitalize())}</th>"
                   f"<td>{html_value(v)}</td></tr>" for k, v in card.items())
    return (f"<h2 id='card'>Method card</h2><p>{link('method_card.json', 'JSON')} · "
            f"{link('method_card.md', 'Markdown')}</p><details><summary>The sweep's method "
            f"card ({len(card)} fields)</summary><table class='card'>{rows}</table></details>")


def head_to_head_section(comparisons: list) -> str:
    """Which arm wins, paired by seed: the summary lines, then a table per comparison (the
    winning cell in bold)."""
    from sae.reporting import head_to_head as h2h

    title = "<h2 id='h2h'>Head to head</h2>"
    if not comparisons:
        return title + f"<p>{esc(h2h.markdown([]))}</p>"
    intro = ("<p>Each cell: mean over seeds of (first arm − second arm) [95 % Student-t "
             "interval], the winner in bold where the interval excludes 0 (fewer dead latents "
             f"win). {link('head_to_head.md', 'Markdown')}</p>")
    lines = "".join(f"<li>{esc(line)}</li>" for line in h2h.summary_lines(comparisons))
    blocks = []
    for name in dict.fromkeys(c.title for c in comparisons):
        group = [c for c in comparisons if c.title == name]
        metrics = [(m, label) for m, label, _ in h2h.METRICS
                   if any(m in c.cells for c in group)]
        body = [[(h2h.place_text(c.place), False),
                 *((h2h._cell_text(c, m).replace("**", ""),
                    m in c.cells and c.cells[m].outcome in (h2h.WIN_A, h2h.WIN_B))
                   for m, _ in metrics)] for c in group]
        blocks.append(f"<h3>{esc(name)}</h3>"
                      + html_table(["where", *(label for _, label in metrics)], body))
    return title + intro + f"<ul>{lines}</ul>" + "".join(blocks)


def render_page(p: PageInputs) -> str:
    states = p.runs.drop_duplicates("run_id")["status"].value_counts().to_dict()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f"<a href='#{a}'>{t}</a>" for a, t in (
        ("h2h", "Head to head"), ("claims", "Claims"), ("tables", "Tables"), ("plots", "Plots"),
        ("browser", "Features"), ("runs", "Runs"), ("card", "Method card"),
        ("notes", "Missing pieces"), ("files", "Files")))
    body = [f"<h1>Sweep {esc(p.sweep_name)}</h1>",
            f"<p>{len(p.runs)} cells, {p.runs['run_id'].nunique()} runs: "
            f"{esc(', '.join(f'{v} {k}' for k, v in states.items()))}. Generated {stamp} by "
            "<code>python -m sae.report</code>.</p>", f"<nav>{nav}</nav>",
            head_to_head_section(p.head_to_head),
            claims_section(p.claims, p.claims_markdown),
            tables_section(p.summary, p.runs, p.report_dir),
            figures_section(p.figures, p.report_dir), browser_section(p.runs, p.report_dir),
            runs_section(p.runs, p.report_dir), card_section(p.card),
            notes_section(p.notes), files_section(p.report_dir)]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>Sweep {esc(p.sweep_name)}: report</title><style>{STYLE}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")
