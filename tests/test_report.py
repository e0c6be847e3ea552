"""The report (stage 4): a finished sweep -> tables, plots, claims, method card, index.html.

Two kinds of sweep:

* ``demo_report`` (session scope): the real thing, ``python -m sae.train -m +sweep=demo`` on a
  tiny slice (digits, k = 8, seeds 0 and 1: 12 cells -> 10 runs) into a temporary
  output root, then ``python -m sae.report``. Its numbers are read back from the runs'
  ``metrics.json`` and compared with the tables; its page is opened in headless Chromium.
* hand-made sweeps (``fake_sweep``) with chosen numbers and chosen gaps -- a failed cell, a
  cell that never started, one seed, no mask ablation -- to check the verdicts and that missing
  pieces are reported rather than fatal.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from sae.evaluation.method_card import CARD_FIELDS, render_markdown, run_card
from sae.grid.runs import METRICS_FILE, NEW, RUN_STATES, STATES, run_lock, run_state, write_status
from sae.grid.status import sweep_status
from sae.io.files import atomic_write_json
from sae.metrics import seed_stability
from sae.model import TopKSAE, load_model, save_model
from sae.report import ReportOptions, build_report, main
from sae.reporting.aggregate import TABLE_METRICS
from sae.reporting.claims import HELD, NOT_HELD, NOT_TESTED, UNDECIDED, Tolerances, check_claims
from sae.reporting.collect import collect
from tests.helpers import run_cli

VERDICTS = (HELD, NOT_HELD, UNDECIDED, NOT_TESTED)
# METHOD.md s7, in its own words -> the card field that carries it.
METHOD_CARD_ITEMS = {
    "source model and layer": "source_model", "dataset and split sizes": "dataset",
    "embedding preprocessing": "embedding_preprocessing", "dictionary size": "dictionary_size",
    "Top-k budget": "topk_budget", "regularizer type and strength": "regularizer",
    "active-unit mask rule": "active_unit_mask_rule", "reconstruction metric and value":
    "reconstruction", "monosemanticity metric and value": "monosemanticity",
    "class-purity method and value": "class_purity", "dead-latent count": "dead_latents",
    "qualitative inspection protocol": "qualitative_inspection",
    "inference-time k sensitivity": "inference_k_sensitivity",
    "seed stability": "seed_stability", "code version": "code_version",
    "the exact command that reproduces it": "reproduce",
}
# The demo grid, sliced to what trains in seconds on 2 cores: digits (labels, and images for
# the feature browser), one k, two seeds -> 3 regularizers x 2 masks x 2 seeds = 12 cells.
DEMO_SLICE = ["dataset=digits", "k=8", "seed=0,1", "train.max_steps=10", "logger=none",
              "sae.n_latents=64", "eval.probe_epochs=2", "eval.probe_max_train=400",
              "eval.inspect_latents=2", "eval.inspect_top_images=4"]


# -- the real demo sweep ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def demo_report(tmp_path_factory) -> Path:
    """A finished tiny demo sweep and its report; returns the sweep directory."""
    root = tmp_path_factory.mktemp("demo_root")
    env = {"SAE_OUTPUT_ROOT": str(root), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    trained = run_cli(["-m", "sae.train", "-m", "+sweep=demo", *DEMO_SLICE], env_extra=env,
                      timeout=240)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    sweep_dir = root / "sweeps" / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # in-process: the imports are already paid for
        assert main([str(sweep_dir)]) == 0
    # The CLI ends with the page to open and shows the claims table before it.
    lines = printed.getvalue().strip().splitlines()
    assert lines[-1] == f"report: {(sweep_dir / 'report' / 'index.html').resolve()}"
    assert "| # | claim | verdict | settings |" in lines
    return sweep_dir


def cells_of(sweep_dir: Path) -> list[dict]:
    return json.loads((sweep_dir / "cells.json").read_text())["cells"]


def done_runs(sweep_dir: Path) -> dict[str, dict]:
    """run id -> {"config", "metrics", "dir"} of every finished run, read from its directory."""
    runs = {}
    for cell in cells_of(sweep_dir):
        run_dir = Path(cell["run_dir"])
        status = json.loads((run_dir / "status.json").read_text())
        if status["state"] == "done":
            runs[cell["run_id"]] = {"config": yaml.safe_load((run_dir / "config.yaml").read_text()),
                                    "metrics": json.loads((run_dir / "metrics.json").read_text()),
                                    "dir": run_dir}
    return runs


@pytest.mark.slow  # shares the ~40 s demo sweep
def test_demo_report_writes_every_file(demo_report):
    out = demo_report / "report"
    for name in ("runs.parquet", "runs.csv", "tables.md", "tables.tex", "tables.csv",
                 "claims.md", "method_card.md", "method_card.json", "seed_stability.csv",
                 "notes.md", "index.html"):
        assert (out / name).stat().st_size > 0, name
    pngs = {p.name.split("_")[0] for p in (out / "plots").glob("*.png")}
    assert {"metrics", "robustness", "probe", "dead"} <= pngs


@pytest.mark.slow  # shares the ~40 s demo sweep
def test_runs_table_has_every_cell_with_its_metrics(demo_report):
    runs = pd.read_parquet(demo_report / "report" / "runs.parquet")
    cells = cells_of(demo_report)
    assert len(runs) == len(cells) == 12
    assert list(runs["cell"]) == [c["index"] for c in cells]
    assert pd.read_csv(demo_report / "report" / "runs.csv").shape == runs.shape
    finished = done_runs(demo_report)
    assert len(finished) == 10  # the baseline's mask twins share a run
    for _, row in runs.iterrows():
        truth = finished[row["run_id"]]
        assert row["status"] == "done"
        assert row["k"] == truth["config"]["k"] and row["seed"] == truth["config"]["seed"]
        assert row["regularizer"] == truth["config"]["regularizer"]["name"]
        for spec in TABLE_METRICS:
            assert row[spec.key] == pytest.approx(truth["metrics"][spec.key], rel=1e-12)


def expected_settings(sweep_dir: Path) -> dict[tuple, list[dict]]:
    """(regularizer, mask label) -> metrics of its seeds, straight from the run directories."""
    settings: dict[tuple, list[dict]] = {}
    for run in done_runs(sweep_dir).values():
        reg = run["config"]["regularizer"]["name"]
        mask = "unused" if reg == "none" else ("on" if run["config"]["mask"] else "off")
        settings.setdefault((reg, mask), []).append(run["metrics"])
    return settings


@pytest.mark.slow  # shares the ~40 s demo sweep
def test_tables_hold_the_runs_numbers(demo_report):
    out = demo_report / "report"
    summary = pd.read_csv(out / "tables.csv")
    markdown, latex = (out / "tables.md").read_text(), (out / "tables.tex").read_text()
    settings = expected_settings(demo_report)
    assert len(summary) == len(settings) == 5
    for (reg, mask), seeds in settings.items():
        row = summary[(summary["regularizer"] == reg) & (summary["mask_label"] == mask)]
        assert len(row) == 1 and row["n_seeds"].item() == len(seeds) == 2
        line = next(ln for ln in markdown.splitlines() if ln.startswith(f"| {reg} | {mask} |"))
        tex_line = next(ln for ln in latex.splitlines()
                        if ln.startswith(f"{reg.replace('_', chr(92) + '_')} & {mask} &"))
        for spec in TABLE_METRICS:
            values = pd.Series([m[spec.key] for m in seeds], dtype=float)
            mean, std = values.mean(), values.std(ddof=1)
            assert row[f"{spec.key}_mean"].item() == pytest.approx(mean, rel=1e-9, abs=1e-12)
            assert row[f"{spec.key}_std"].item() == pytest.approx(std, rel=1e-9, abs=1e-12)
            shown = f"{mean:.{spec.decimals}f} ± {std:.{spec.decimals}f}"
            assert shown in line, (spec.key, shown, line)
            assert shown.replace("±", "$\\pm$") in tex_line


@pytest.mark.slow  # shares the ~40 s demo sweep
def test_best_value_of_each_column_is_marked(demo_report):
    markdown = (demo_report / "report" / "tables.md").read_text()
    rows = [ln.split(" | ")[3:] for ln in markdown.splitlines() if ln.startswith("| ")
            and not ln.startswith("| Regularizer")]
    for column, spec in enumerate(TABLE_METRICS):
        cells = [r[column].strip(" |") for r in rows]
        means = [float(c.strip("*").split(" ")[0]) for c in cells]
        best = max(means) if spec.higher_is_better else min(means)
        marked = {m for c, m in zip(cells, means) if c.startswith("**")}
        assert marked == (set() if len(set(means)) == 1 else {best}), (spec.key, cells)


@pytest.mark.slow  # shares the ~40 s demo sweep
def test_every_claim_has_a_verdict_with_numbers(demo_report):
    claims = (demo_report / "report" / "claims.md").read_text()
    found = re.findall(r"^## Claim (\d): (.+)$", claims, flags=re.M)
    assert [int(n) for n, _ in found] == [1, 2, 3, 4, 5]
    assert all(v in VERDICTS for _, v in found)
    # The demo slice has baselines, both regularizers, curves and the mask ablation: every
    # claim is testable, with its thresholds stated and a table of seed-paired intervals.
    assert all(v != NOT_TESTED for _, v in found), found
    assert "lower end must lie above **-0.01**" in claims
    assert claims.count("| setting | metric | seeds |") == 5
    assert re.search(r"\| 0,1 \| .* \[[-+]\d\.\d+, [-+]\d\.\d+\] \|", claims)


@pytest.mark.slow  # shares the ~40 s demo sweep
@pytest.mark.parametrize("backbone,expected", [
    ("siglip2", ("checkpoint: transformers google/siglip2-so400m-patch14-384;",
                 "library: transformers;", "own AutoImageProcessor", "get_image_features")),
    ("vit_l16", ("checkpoint: transformers google/vit-large-patch16-224;", "AutoImageProcessor",
                 "CLS token of last_hidden_state")),
    ("vit_l16_timm", ("checkpoint: timm vit_large_patch16_224.augreg_in21k_ft_in1k;",
                      "timm's eval transform", "before the classifier")),
    ("clip_vitl14", ("checkpoint: open_clip ViT-L-14 / datacomp_xl_s13b_b90k;",
                     "open_clip's inference transform", "encode_image")),
    ("clip_tiny", ("checkpoint: open_clip ViT-S-32 (random weights);",)),
])
def test_method_card_names_checkpoint_library_and_preprocessing(backbone, expected):
    from sae.config import RootConfig, validate
    from tests.test_config import compose_train

    cfg = validate(compose_train([f"backbone={backbone}", "dataset=digits_images"]), RootConfig)
    source = run_card(cfg, {}, {}, "v0", "cmd")["source_model"]
    for text in expected:
        assert text in source, (text, source)


def test_method_card_has_every_field_and_seed_stability(demo_report):
    out = demo_report / "report"
    card = json.loads((out / "method_card.json").read_text())
    assert set(METHOD_CARD_ITEMS.values()) == set(CARD_FIELDS) <= set(card)
    assert all(card[f] not in (None, "", {}) for f in CARD_FIELDS)
    markdown = (out / "method_card.md").read_text()
    for field in CARD_FIELDS:
        assert f"**{field.replace('_', ' ').capitalize()}**" in markdown
    assert "+sweep=demo" in card["reproduce"] and "sae.report" in card["reproduce"]
    stability = card["seed_stability"]
    assert stability["settings_with_several_seeds"] == 5
    # Recompute one setting's atom stability from the two models.
    l1l2 = [r for r in done_runs(demo_report).values()
            if r["config"]["regularizer"]["name"] == "l1l2" and r["config"]["mask"]]
    atoms = [load_model(r["dir"] / "model.safetensors").W_dec for r in l1l2]
    expected = seed_stability(atoms[0], atoms[1])
    entry = next(e for e in stability["per_setting"]
                 if e["regularizer"] == "l1l2" and e["mask_label"] == "on")
    assert entry["value"] == pytest.approx(expected, abs=1e-4)
    assert "r2" in stability["metric_spread"]


# -- the page in a real browser ------------------------------------------------------------------
def chromium_binary() -> str:
    """Chromium, installed with apt-get when missing; skips only where it cannot be installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be (needs root and apt-get): "
                    "apt-get install -y chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            pytest.skip(f"apt-get could not install chromium: {result.stderr[-500:]}")
    return shutil.which("chromium")


def run_chromium(*args: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        return subprocess.run(
            [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", "--allow-file-access-from-files", f"--user-data-dir={profile}",
             "--virtual-time-budget=5000", *args],
            capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


# After load, the page writes the state of every image into an element the DOM dump shows.
IMAGE_PROBE = """<script>
window.addEventListener('load', () => {
  const images = [...document.images].map(i => [i.getAttribute('src'), i.complete,
                                                i.naturalWidth, i.naturalHeight]);
  const out = document.createElement('pre'); out.id = 'image-probe';
  out.textContent = JSON.stringify(images); document.body.appendChild(out);
});
</script>"""


@pytest.mark.slow  # shares the ~40 s demo sweep
def test_index_renders_in_chromium_and_every_image_loads(demo_report):
    report = demo_report / "report"
    page = (report / "index.html").read_text()
    sources = re.findall(r"<img src='([^']+)'", page)
    assert len(sources) >= 5  # 4 plots and a contact sheet of the feature browser
    assert any("/inspect/" in src for src in sources)
    for src in sources:  # relative, and on disk
        assert not re.match(r"^[a-z]+:", src) and (report / src).is_file(), src
    for href in re.findall(r"href=['\"]([^'\"#]+)['\"]", page):
        assert (report / href).exists(), href
    probe_page = report / "image_probe.html"  # the same page plus the probe, same directory
    probe_page.write_text(page.replace("</body>", IMAGE_PROBE + "</body>"))
    dump = run_chromium("--dump-dom", probe_page.as_uri())
    probe_page.unlink()
    found = re.search(r'<pre id="image-probe">(.*?)</pre>', dump.stdout, flags=re.S)
    assert found, dump.stdout[-2000:] + dump.stderr[-2000:]
    images = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(images) == len(sources)
    for src, complete, width, height in images:
        assert complete and width > 0 and height > 0, f"image did not load: {src}"
    assert "Claims (METHOD.md s5)" in dump.stdout
    shot = report.parent / "screenshot.png"
    run_chromium(f"--screenshot={shot}", "--window-size=1280,2400",
                 (report / "index.html").as_uri())
    from PIL import Image

    with Image.open(shot) as image:
        colours = image.convert("L").getextrema()
    assert image.size == (1280, 2400) and colours[0] < colours[1]  # not a blank page


# -- hand-made sweeps: verdicts and missing pieces ------------------------------------------------
def fake_metrics(reg: str, mask: bool, seed: int, k: int, effects: dict) -> dict:
    """Metrics where a regularizer adds ``effects[reg]`` to the baseline's numbers."""
    gain = effects.get(reg, {}) if reg != "none" else {}
    jitter = 0.002 * seed
    dead = 5 + gain.get("dead", 0) + (gain.get("dead_nomask", 0) if not mask else 0)
    ratio = 0.6 + gain.get("robust", 0)
    return {
        "r2": 0.8 + gain.get("r2", 0) + jitter, "nmse": 0.2, "l0": float(k),
        "mono_dead0": 0.3 + gain.get("mono", 0) + jitter, "mono_live": 0.35 + gain.get("mono", 0),
        "purity_binary": 0.2 + gain.get("purity", 0), "purity_weighted": 0.25 + gain.get(
            "purity", 0), "dead_count": dead + seed, "dead_fraction": (dead + seed) / 64,
        "curves": {"k_robustness": {"train_k": k, "r2": {str(k // 2): ratio * 0.8,
                                                         str(k): 0.8, str(2 * k): ratio * 0.8}},
                   "probe": {"1": 0.3 + gain.get("probe", 0), "2": 0.4, "4": 0.5, str(k): 0.7}},
        "protocols": {"purity": "max-class share"},
    }


def fake_card(reg: str, mask: bool, metrics: dict, seed: int) -> dict:
    card = {field: f"{field} of the run" for field in CARD_FIELDS}
    card.update(dataset={"name": "synthetic", "train_samples": 100, "eval_samples": 50},
                regularizer=reg, active_unit_mask_rule=f"mask {mask}",
                reconstruction={"metric": "R^2", "value": metrics["r2"]},
                reproduce=f"python -m sae.train regularizer={reg} mask={mask} seed={seed}")
    return card


def fake_run(run_dir: Path, reg: str, mask: bool, seed: int, k: int, state: str,
             effects: dict) -> None:
    config = {"backbone": {"name": "none"}, "dataset": {"name": "synthetic"}, "k": k,
              "regularizer": {"name": reg, "strength": 0.0 if reg == "none" else 0.1},
              "mask": mask, "seed": seed, "sae": {"n_latents": 64}}
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if state == NEW:  # never started: no config, no status
        (run_dir / "config.yaml").unlink()
        return
    write_status(run_dir, state, None if state == "done" else "RuntimeError: boom")
    if state != "done":
        return
    metrics = fake_metrics(reg, mask, seed, k, effects)
    atomic_write_json(run_dir / "metrics.json", metrics)
    atomic_write_json(run_dir / "method_card.json", fake_card(reg, mask, metrics, seed))
    torch.manual_seed(seed)
    save_model(TopKSAE(8, 64, k), run_dir / "model.safetensors", config)


def fake_sweep(root: Path, grid: list[tuple[str, bool, int]], effects: dict | None = None,
               states: dict[int, str] | None = None, k: int = 8) -> Path:
    """A sweep directory with one run per (regularizer, mask, seed); ``states`` sets a cell's
    end state (done by default, or what its status file says: failed, running, ...; ``new``:
    none)."""
    sweep_dir, cells = root / "sweeps" / "fake", []
    for index, (reg, mask, seed) in enumerate(grid):
        run_id = f"synthetic-k{k}-{reg}-{'mask' if mask else 'nomask'}-s{seed}"
        run_dir = root / "runs" / run_id
        fake_run(run_dir, reg, mask, seed, k, (states or {}).get(index, "done"), effects or {})
        cells.append({"index": index, "run_id": run_id, "run_dir": str(run_dir), "state": "new",
                      "overrides": [f"regularizer={reg}", f"mask={str(mask).lower()}",
                                    f"seed={seed}", f"k={k}"], "duplicate_of": None,
                      "result": "done", "problem": None})
    sweep_dir.mkdir(parents=True)
    atomic_write_json(sweep_dir / "cells.json", {"sweep": "fake", "cells": cells})
    return sweep_dir


def verdicts(sweep_dir: Path) -> dict[int, str]:
    text = (sweep_dir / "report" / "claims.md").read_text()
    return {int(n): v for n, v in re.findall(r"^## Claim (\d): (.+)$", text, flags=re.M)}


FULL_GRID = [(reg, mask, seed) for reg in ("none", "offsupport_l1", "l1l2")
             for mask in (True, False) for seed in (0, 1) if not (reg == "none" and not mask)]
GOOD = {r: {"mono": 0.1, "purity": 0.1, "r2": -0.005, "robust": 0.2, "probe": 0.1,
            "dead_nomask": 50} for r in ("offsupport_l1", "l1l2")}


def test_claims_held_when_the_numbers_say_so(tmp_path):
    sweep_dir = fake_sweep(tmp_path, FULL_GRID, GOOD)
    build_report(sweep_dir, ReportOptions(seed_stability=False))
    assert verdicts(sweep_dir) == {n: HELD for n in range(1, 6)}


def test_claims_not_held_and_tolerance_is_a_parameter(tmp_path):
    worse = {"offsupport_l1": {**GOOD["offsupport_l1"], "r2": -0.05},
             "l1l2": {"mono": -0.1, "purity": 0.1, "r2": -0.05, "robust": -0.1, "probe": -0.1}}
    sweep_dir = fake_sweep(tmp_path, FULL_GRID, worse)
    # An R^2 drop of 0.05 is beyond the default 0.01 but within 0.06, and the CLI takes it.
    assert main([str(sweep_dir), "--r2-tolerance", "0.06", "--no-seed-stability"]) == 0
    # Claim 5: l1l2 without the mask has no more dead latents -> no seed-to-seed spread, a
    # difference of 0, inside the minimum effect: inconclusive.
    assert verdicts(sweep_dir) == {1: NOT_HELD, 2: HELD, 3: NOT_HELD, 4: NOT_HELD, 5: UNDECIDED}
    assert "lower end must lie above **-0.06**" in (sweep_dir / "report" / "claims.md").read_text()
    runs = pd.read_csv(sweep_dir / "report" / "runs.csv")
    assert check_claims(runs)[1].verdict == NOT_HELD  # the default, 0.01
    assert Tolerances().r2_abs == 0.01
    # A minimum effect above the mask's +50/64 dead share: claim 5 is no longer supported.
    assert main([str(sweep_dir), "--min-effect", "dead_fraction=0.9", "--no-seed-stability"]) == 0
    assert verdicts(sweep_dir)[5] == UNDECIDED
    assert "dead_fraction 0.9" in (sweep_dir / "report" / "claims.md").read_text()


def test_missing_pieces_are_reported_not_fatal(tmp_path, capsys):
    # One seed, no mask ablation (mask on only), one failed cell, one cell that never ran.
    grid = [("none", True, 0), ("offsupport_l1", True, 0), ("l1l2", True, 0), ("l1l2", True, 1)]
    sweep_dir = fake_sweep(tmp_path, grid, GOOD, states={2: "failed", 3: "new"})
    assert main([str(sweep_dir)]) == 0
    printed = capsys.readouterr().out
    out = sweep_dir / "report"
    runs = pd.read_csv(out / "runs.csv")
    assert list(runs["status"]) == ["done", "done", "failed", "new"]
    assert runs.loc[2, "reason"] == "RuntimeError: boom" and math.isnan(runs.loc[2, "r2"])
    table_rows = [ln for ln in (out / "tables.md").read_text().splitlines()
                  if ln.startswith(("| none", "| offsupport_l1"))]
    assert len(table_rows) == 2 and not any("±" in ln for ln in table_rows)  # one seed: no std
    found = verdicts(sweep_dir)
    assert found[5] == NOT_TESTED  # no mask ablation
    assert found[3] == NOT_TESTED and found[4] == NOT_TESTED  # l1l2 never finished
    assert found[1] == NOT_TESTED  # claim 1 is about both regularizers
    claims_md = (out / "claims.md").read_text()
    assert "l1l2 has no finished run in this sweep" in claims_md
    assert HELD not in found.values()  # one seed: nothing is held
    assert "**Caution: some settings have a single seed." in claims_md
    notes = (out / "notes.md").read_text()
    assert "cell 2 (regularizer=l1l2" in notes and "failed -- RuntimeError: boom" in notes
    assert "cell 3" in notes and ": new -- the run never started" in notes
    assert "one finished seed" in notes
    assert "cell 2 (regularizer=l1l2" in printed and printed.strip().endswith("index.html")
    card = json.loads((out / "method_card.json").read_text())
    assert "not measurable" in card["seed_stability"]["value"]


def test_the_report_reads_run_states_as_sae_runs_and_sae_status_do(tmp_path):
    """One vocabulary: a cell that never started is ``new`` in the report as in ``sae.grid.runs`` and
    ``sae-status``; a preempted run, or a running one whose process is gone (nobody holds its
    lock), is ``interrupted``; a done one without metrics ``failed``."""
    grid = [("none", True, 0), ("offsupport_l1", True, 0), ("l1l2", True, 0), ("l1l2", True, 1),
            ("l1l2", False, 0)]
    sweep_dir = fake_sweep(tmp_path, grid, GOOD, states={1: NEW, 2: "preempted", 3: "running"})
    runs = collect(sweep_dir).runs
    (Path(runs.loc[4, "run_dir"]) / METRICS_FILE).unlink()
    runs = collect(sweep_dir).runs
    assert list(runs["status"]) == ["done", NEW, "interrupted", "interrupted", "failed"]
    assert list(runs["status"]) == [run_state(Path(d)) for d in runs["run_dir"]]
    status = {r.run_id: r.state for r in sweep_status(sweep_dir).runs}
    assert dict(zip(runs["run_id"], runs["status"], strict=True)) == status
    assert runs.loc[1, "reason"] == "the run never started (no status.json)"


def test_every_state_the_report_shows_is_in_the_runs_vocabulary(tmp_path):
    """Whatever a status file says (or none at all, or done without metrics), the report's
    status is one of ``sae.grid.runs.RUN_STATES``."""
    written = [NEW, *STATES, "done without metrics"]
    grid = [("none", True, seed) for seed in range(len(written))]
    states = {i: "done" if w == "done without metrics" else w for i, w in enumerate(written)}
    sweep_dir = fake_sweep(tmp_path, grid, GOOD, states=states)
    run_dirs = [tmp_path / "runs" / f"synthetic-k8-none-mask-s{i}" for i in range(len(written))]
    (run_dirs[-1] / METRICS_FILE).unlink()
    with run_lock(run_dirs[written.index("running")]):  # its process is alive: running
        shown = collect(sweep_dir).runs["status"]
    assert set(shown) <= set(RUN_STATES), set(shown) - set(RUN_STATES)
    assert set(shown) == set(RUN_STATES)  # and every one of them can be shown


def test_a_directory_that_is_not_a_sweep_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "cells.json is missing" in capsys.readouterr().err


def test_reference_numbers_shown_for_a_matching_baseline(tmp_path):
    sweep_dir = fake_sweep(tmp_path, [("none", True, 0), ("l1l2", True, 0)], GOOD, k=64)
    for run_dir in (tmp_path / "runs").iterdir():  # pretend these ran on CLIP / ImageNet
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        config.update(backbone={"name": "clip_vitl14"}, dataset={"name": "imagenet"},
                      sae={"n_latents": 8192})
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    build_report(sweep_dir, ReportOptions(seed_stability=False))
    claims = (sweep_dir / "report" / "claims.md").read_text()
    row = next(ln for ln in claims.splitlines() if ln.startswith("| clip_vitl14 | imagenet |"))
    assert "0.8 (0.817)" in row and "0.3 (0.469)" in row and row.endswith("| yes |")


def test_run_card_states_the_training_precision():
    from tests.helpers import synthetic_cfg

    for bf16, expected in ((False, "float32"), (True, "bf16 autocast")):
        card = run_card(synthetic_cfg(autocast_bf16=bf16), {}, {"train": 8, "eval": 2}, "v", "cmd")
        assert card["reconstruction"]["training_precision"].startswith(expected)
        assert f"training_precision: {expected}" in render_markdown(card, "run")


def test_page_renders_the_card_as_a_table_and_links_rows_to_runs(tmp_path):
    sweep_dir = fake_sweep(tmp_path, FULL_GRID, GOOD)
    build_report(sweep_dir, ReportOptions(seed_stability=False))
    page = (sweep_dir / "report" / "index.html").read_text()
    assert "<table class='card'>" in page and "<pre>" not in page
    assert "<th>Regularizer</th><td>" in page  # a card field is a table row, not Markdown
    tables = page.split("<h2 id='tables'>")[1].split("<h2 id='plots'>")[0]
    for run_dir in (tmp_path / "runs").iterdir():
        assert f"href=\"../../../runs/{run_dir.name}/\"" in tables, run_dir.name
    assert "Δ r2 vs baseline [95 % CI]" in tables and "mono_live" in tables


def test_runs_evaluated_under_the_old_metric_names_are_read(tmp_path):
    sweep_dir = fake_sweep(tmp_path, [("none", True, 0), ("l1l2", True, 0)], GOOD)
    for metrics_file in (tmp_path / "runs").glob("*/metrics.json"):
        metrics = json.loads(metrics_file.read_text())
        metrics["mono_mean_dead0"] = metrics.pop("mono_dead0")
        metrics.update(train_k=8, k_robust_r2_k16=0.5, k_robust_r2_k2=0.25, probe_ceiling=0.9)
        metrics_file.write_text(json.dumps(metrics))
    build_report(sweep_dir, ReportOptions(seed_stability=False))
    runs = pd.read_csv(sweep_dir / "report" / "runs.csv")
    assert list(runs["mono_dead0"]) == [0.3, 0.4]
    assert list(runs["r2_at_k_x2"]) == [0.5, 0.5] and list(runs["r2_at_k_div4"]) == [0.25, 0.25]
    assert list(runs["probe_raw"]) == [0.9, 0.9]
    assert not [c for c in runs.columns if "mono_mean" in c or "k_robust_r2_k" in c]


def test_a_negative_uniform_r2_is_marked_and_both_r2_are_tabulated():
    """Issue 22 item 5: the tables show the variance-weighted R^2 beside the paper's, and a
    negative uniform R^2 carries the mark the note explains."""
    from sae.reporting.tables import HEADER, NEGATIVE_MARK, NOTE, block_cells

    assert HEADER[3:5] == ["R^2", "R^2 (1-FVU)"]
    block = pd.DataFrame([
        {"regularizer": "none", "mask_label": "unused", "n_seeds": 1, "r2_mean": -5.371,
         "r2_std": None, "r2_variance_weighted_mean": 0.444, "r2_variance_weighted_std": None},
        {"regularizer": "l1l2", "mask_label": "on", "n_seeds": 1, "r2_mean": 0.5,
         "r2_std": None, "r2_variance_weighted_mean": 0.6, "r2_variance_weighted_std": None}])
    rows = block_cells(block, (False, False))
    assert rows[0][3][0].endswith(NEGATIVE_MARK) and not rows[1][3][0].endswith(NEGATIVE_MARK)
    assert rows[0][4][0].startswith("0.444")
    assert NEGATIVE_MARK in NOTE


def test_head_to_head_pairs_by_seed_and_names_the_winner():
    """Issue 23: L1/L2 against off-support L1 and mask on against off, paired by seed, with the
    Student-t interval of the per-seed differences and the winner where it excludes 0."""
    from scipy import stats as scipy_stats

    from sae.reporting import head_to_head as h2h

    rows = []
    noise = [0.003, -0.002, 0.001]
    for seed in range(3):
        for reg, mask, mono, dead, r2 in (("offsupport_l1", "on", 0.30, 40, 0.80),
                                          ("l1l2", "on", 0.40, 30, 0.80 + noise[seed]),
                                          ("l1l2", "off", 0.35, 60, 0.81)):
            rows.append({"backbone": "none", "dataset": "synthetic", "k": 8, "n_latents": 64,
                         "seed": seed, "regularizer": reg, "mask_label": mask, "strength": 0.1,
                         "mono_dead0": mono + noise[seed] * (reg == "l1l2"),
                         "dead_count": dead + seed, "r2": r2})
    comparisons = {c.title: c for c in h2h.compare(pd.DataFrame(rows))}
    assert set(comparisons) == {"l1l2 (mask on) vs offsupport_l1 (mask on)",
                                "l1l2 mask on vs l1l2 mask off"}
    regs = comparisons["l1l2 (mask on) vs offsupport_l1 (mask on)"]
    diffs = [0.1 + n for n in noise]  # mono_dead0, l1l2 minus off-support, by seed
    mean = sum(diffs) / 3
    half = scipy_stats.t.ppf(0.975, 2) * pd.Series(diffs).std(ddof=1) / 3 ** 0.5
    cell = regs.cells["mono_dead0"]
    assert cell.interval.n == 3 and cell.interval.mean == pytest.approx(mean)
    assert (cell.interval.low, cell.interval.high) == pytest.approx((mean - half, mean + half))
    assert cell.outcome == h2h.WIN_A
    assert regs.cells["dead_count"].outcome == h2h.WIN_A  # fewer dead latents win
    assert regs.cells["r2"].outcome == h2h.TIE  # differences of both signs
    mask = comparisons["l1l2 mask on vs l1l2 mask off"]
    assert mask.cells["mono_dead0"].outcome == h2h.WIN_A and \
        mask.cells["r2"].outcome == h2h.WIN_B
    lines = h2h.summary_lines(list(comparisons.values()))
    assert ("l1l2 (mask on) vs offsupport_l1 (mask on), mono_dead0: l1l2 (mask on) wins 1, "
            "offsupport_l1 (mask on) 0, tie 0 (of 1 places)") in lines


def test_the_report_leads_with_the_head_to_head_and_folds_the_method_card(tmp_path):
    sweep_dir = fake_sweep(tmp_path, FULL_GRID, GOOD)
    build_report(sweep_dir, ReportOptions(seed_stability=False))
    page = (sweep_dir / "report" / "index.html").read_text()
    assert page.index("id='h2h'") < page.index("id='claims'")
    assert page.index("id='runs'") < page.index("id='card'")
    assert "<details><summary>The sweep's method card" in page
    markdown = (sweep_dir / "report" / "head_to_head.md").read_text()
    assert "l1l2 (mask on) vs offsupport_l1 (mask on)" in markdown
    assert "l1l2 mask on vs l1l2 mask off" in markdown


def test_a_report_killed_half_way_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    from sae.reporting import html as report_html

    sweep_dir = fake_sweep(tmp_path, FULL_GRID, GOOD)
    build_report(sweep_dir, ReportOptions(seed_stability=False))
    report = sweep_dir / "report"
    before = {p.relative_to(report): p.read_bytes() for p in report.rglob("*") if p.is_file()}

    def killed(_page):
        raise KeyboardInterrupt  # as a ^C or a kill between the tables and the page

    monkeypatch.setattr(report_html, "render_page", killed)
    with pytest.raises(KeyboardInterrupt):
        build_report(sweep_dir, ReportOptions(seed_stability=False))
    after = {p.relative_to(report): p.read_bytes() for p in report.rglob("*") if p.is_file()}
    assert after == before
    assert not list(sweep_dir.glob(".report-*"))
    monkeypatch.undo()
    index = build_report(sweep_dir, ReportOptions(seed_stability=False))
    assert index == report / "index.html" and index.is_file()
    assert oct(report.stat().st_mode & 0o777) == oct(0o755)


def test_plots_use_one_colour_per_regularizer_and_mask_by_line_style():
    """Issue 23: the dead-latents bars took blue for "mask on" while every other plot took blue
    for offsupport_l1; the colours now come from the regularizer everywhere, in the registry's
    order, and coinciding lines are shifted apart."""
    from sae import regularizers
    from sae.reporting import plots

    names = regularizers.names()
    assert [plots.REGULARIZER_COLORS[n] for n in names] == list(plots.PALETTE[:len(names)])
    on, off = plots.line_style("l1l2", "on"), plots.line_style("l1l2", "off")
    assert on["color"] == off["color"] and on["linestyle"] != off["linestyle"]
    assert plots.line_style("offsupport_l1", "on")["color"] != on["color"]
    import numpy as np

    xs = [plots.offset_x(np.array([8.0]), i, 3)[0] for i in range(3)]
    assert xs[0] < 8.0 == xs[1] < xs[2] and max(xs) / min(xs) < 1.1
    assert plots.LEGEND_FONT >= 10
