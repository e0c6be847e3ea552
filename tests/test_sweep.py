"""The grid runner: sweep planning, dedupe, skip on re-launch, W&B offline, failures."""

import json
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sae.config import ConfigError, register_configs
from sae.grid.runs import write_status
from sae.grid.sweep import Cell, SweepError, checkpoints_line, plan_cells
from sae.identity import run_id
from tests.helpers import REPO, run_cli, synthetic_cfg
from tests.test_config import compose_train

register_configs()

# The demo grid at its tiniest: one dataset, one k, one seed -> 3 regularizers x 2 masks =
# 6 cells -> 5 runs (the baseline's mask twins are one run).
TINY = ["dataset=synthetic", "k=8", "seed=0", "train.max_steps=8", "dataset.n_train=600",
        "dataset.n_eval=200", "sae.n_latents=64", "eval.probe_epochs=2",
        "eval.probe_max_train=300"]


def compose_cell(overrides):
    return compose_train(list(overrides))


def test_run_id_normalises_settings_with_no_effect():
    assert run_id(synthetic_cfg(mask=True)) == run_id(synthetic_cfg(mask=False))
    assert run_id(synthetic_cfg(reg="l1l2", strength=0.1, mask=True)) != run_id(
        synthetic_cfg(reg="l1l2", strength=0.1, mask=False))
    # how a run executes never changes its identity
    assert run_id(synthetic_cfg(device="cpu")) == run_id(synthetic_cfg(device="auto"))
    assert run_id(synthetic_cfg(k=4)) != run_id(synthetic_cfg(k=8))


def test_plan_dedupes_and_classifies(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_OUTPUT_ROOT", str(tmp_path))
    grid = [["regularizer=none", "mask=true"], ["regularizer=none", "mask=false"],
            ["regularizer=l1l2", "mask=true"], ["regularizer=l1l2", "mask=false"]]
    cells = plan_cells(grid, compose_cell)
    assert [c.duplicate_of for c in cells] == [None, 0, None, None]
    assert all(c.state == "new" for c in cells)
    # mark one done (with metrics) and one failed: a re-plan skips the first, re-runs the second
    write_status(Path(cells[2].run_dir), "done")
    (Path(cells[2].run_dir) / "metrics.json").write_text("{}")
    write_status(Path(cells[3].run_dir), "failed", "boom")
    lines = []
    again = plan_cells(grid, compose_cell, progress=lines.append)
    assert lines == ["planning: composing and validating cell 1 of 4 (0 s)"]
    assert [c.state for c in again] == ["new", "new", "done", "failed"]
    assert [c.to_launch for c in again] == [True, False, False, True]


def test_paper_dry_run_names_the_reference_checkpoints(tmp_path, monkeypatch):
    """METHOD.md s1: the paper grid's backbones are the reference code's checkpoints."""
    monkeypatch.setenv("SAE_OUTPUT_ROOT", str(tmp_path))
    monkeypatch.delenv("IMAGENET_ROOT", raising=False)  # a dry run lists the cell anyway
    params = OmegaConf.load(REPO / "sweeps" / "paper.yaml").hydra.sweeper.params
    grid = [["dataset=imagenet", f"backbone={name}"] for name in params.backbone.split(",")]
    cells = plan_cells(grid, compose_cell, dry_run=True)
    assert checkpoints_line(cells) == (
        "backbones: clip_vitl14: open_clip ViT-L-14 / datacomp_xl_s13b_b90k; "
        "siglip2: transformers google/siglip2-so400m-patch14-384; "
        "vit_l16: transformers google/vit-large-patch16-224")
    assert checkpoints_line(plan_cells([["k=8"]], compose_cell)) == (
        "backbones: none (embedding datasets)")


def test_a_done_status_without_metrics_is_not_done(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_OUTPUT_ROOT", str(tmp_path))
    cell = plan_cells([["k=8"]], compose_cell)[0]
    write_status(Path(cell.run_dir), "done")
    assert plan_cells([["k=8"]], compose_cell)[0].state == "failed"


@pytest.mark.parametrize("grid,message", [
    ([["k=8"], ["k=9000"]], "cell 1 (k=9000): k: 9000 exceeds sae.n_latents"),
    ([["regularizer=l3"]], "cell 0 (regularizer=l3)"),
    ([["dataset=imagenet", "backbone=vit_tiny", "dataset.root=/no/such/dir"]],
     "dataset.root: /no/such/dir is not a directory"),
])
def test_a_bad_cell_stops_the_plan_naming_cell_and_field(grid, message):
    with pytest.raises(SweepError) as info:
        plan_cells(grid, compose_cell)
    assert message in str(info.value)


def test_cell_description():
    cell = Cell(0, ["k=8", "seed=1"], "rid", "/x", "new")
    assert cell.describe() == "k=8 seed=1" and cell.to_launch


def sweep(root: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_cli(["-m", "sae.train", "-m", "+sweep=demo", *TINY, *extra],
                   env_extra={"SAE_OUTPUT_ROOT": str(root), "WANDB_MODE": "offline"},
                   timeout=timeout)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    first = sweep(root)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return root, first


@pytest.mark.slow  # a subprocess sweep: > 20 s on 2 cores (--durations)
def test_demo_sweep_runs_every_cell_once(tiny_sweep):
    root, first = tiny_sweep
    assert "6 cells -> 5 unique runs (1 duplicates" in first.stdout
    record = json.loads((root / "sweeps" / "demo" / "cells.json").read_text())
    results = [c["result"] for c in record["cells"]]
    assert results.count("done") == 5 and results.count("skipped") == 1
    runs = sorted((root / "runs").iterdir())
    assert len(runs) == 5
    for run in runs:
        status = json.loads((run / "status.json").read_text())
        assert status["state"] == "done"
        for name in ("config.yaml", "metrics.json", "model.safetensors", "model.json",
                     "method_card.md", "method_card.json", "checkpoints/last.safetensors"):
            assert (run / name).exists(), f"{run.name}/{name}"
        metrics = json.loads((run / "metrics.json").read_text())
        assert {"r2", "nmse", "l0", "dead_count"} <= set(metrics)


@pytest.mark.slow  # a subprocess sweep: > 20 s on 2 cores (--durations)
def test_relaunch_skips_done_cells(tiny_sweep):
    root, _ = tiny_sweep
    again = sweep(root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "5 done (skipped)" in again.stdout
    assert "sweep demo: 0 done, 0 failed, 0 cancelled, 6 skipped" in again.stdout


def test_dry_run_lists_cells_and_runs_nothing(tmp_path):
    listing = sweep(tmp_path, "dry_run=true")
    assert listing.returncode == 0, listing.stderr[-3000:]
    assert listing.stdout.count("synthetic-k8-") == 6
    assert "same run as cell" in listing.stdout
    assert not (tmp_path / "runs").exists()


def test_invalid_grid_stops_before_any_job(tmp_path):
    bad = sweep(tmp_path, "k=8,9000")
    assert bad.returncode != 0
    assert "k: 9000 exceeds sae.n_latents=64" in bad.stderr + bad.stdout
    assert not (tmp_path / "runs").exists()


def wandb_summary(run_dir: Path) -> dict:
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    out = subprocess.run([str(Path(__import__("sys").executable).parent / "wandb"), "leet",
                          "inspect", "--summary", "--json", str(offline)],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


@pytest.mark.slow  # a subprocess sweep: > 20 s on 2 cores (--durations)
def test_wandb_offline_run_holds_config_and_summary(tiny_sweep):
    root, _ = tiny_sweep
    run = next(r for r in (root / "runs").iterdir() if "l1l2-mask" in r.name)
    summary = wandb_summary(run)
    metrics = json.loads((run / "metrics.json").read_text())
    text = json.dumps(summary)
    assert run.name in text  # the W&B run id is the run id
    flat = json.dumps(summary)
    for key in ("r2", "mono_dead0"):
        assert key in flat
        assert f"{metrics[key]:.6g}"[:6] in flat
    config = OmegaConf.load(run / "config.yaml")
    assert config.regularizer.name == "l1l2" and str(config.regularizer.strength) in flat


@pytest.mark.slow  # a subprocess sweep: > 20 s on 2 cores (--durations)
def test_failing_cell_ends_failed_and_the_others_complete(tmp_path):
    # lr=1e30 diverges; the sweep exits non-zero after running both cells.
    result = sweep(tmp_path, "regularizer=none", "train.lr=1e30,1e-3", "train.log_every=2",
                   "logger=none")
    assert result.returncode != 0
    assert "1 of 2 launched cells failed" in result.stderr + result.stdout
    states = sorted(json.loads((r / "status.json").read_text())["state"]
                    for r in (tmp_path / "runs").iterdir())
    assert states == ["done", "failed"]
    failed = next(r for r in (tmp_path / "runs").iterdir()
                  if json.loads((r / "status.json").read_text())["state"] == "failed")
    assert "train.lr" in json.loads((failed / "status.json").read_text())["reason"]


def test_config_error_type_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_running_status_without_a_live_process_is_interrupted(tmp_path):
    from sae.grid.runs import run_lock, run_state

    write_status(tmp_path, "running")
    assert run_state(tmp_path) == "interrupted"  # nobody holds the lock: the job was killed
    with run_lock(tmp_path):
        assert run_state(tmp_path) == "running"


def test_the_progress_line_counts_and_estimates():
    from sae.grid.sweep import progress_line

    assert progress_line(12, 1, 2, 40, 300.0) == (
        "sweep progress: 12/40 jobs ended (11 done, 1 failed), 2 running, 26 waiting; "
        "5 min elapsed, ETA 12 min")
    assert progress_line(0, 0, 4, 4, 10.0) == (
        "sweep progress: 0/4 jobs ended (0 done, 0 failed), 4 running, 0 waiting; 10 s elapsed")


def test_a_submitit_local_sweep_leaves_findable_logs_printed_once(tmp_path):
    """Issue 23: a run links its task log (``slurm.out``) and names it in status.json; each
    submitit line appears once; no empty ``.submitit/%j`` folder stays; the launcher prints
    its progress while it waits."""
    import json

    from tests.helpers import run_cli

    result = run_cli(["-m", "sae.train", "-m", "launcher=submitit_local", "dataset=synthetic",
                      "sae=tiny", "logger=none", "train.max_steps=10", "k=4,8",
                      "train.progress=false"], env_extra={"SAE_OUTPUT_ROOT": str(tmp_path)},
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep progress: 2/2 jobs ended (2 done, 0 failed)" in result.stderr
    submitit = tmp_path / "sweeps" / "adhoc" / ".submitit"
    assert sorted(p.name for p in submitit.iterdir() if "%" in p.name) == []
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    for run in runs:
        logs = json.loads((run / "status.json").read_text())["logs"]
        log_text = (run / "slurm.out").read_text()
        assert (run / "slurm.out").resolve() == Path(logs["stdout"]).resolve()
        assert log_text.count("Job completed successfully") == 1, log_text
        assert f"run {run.name} done" in log_text


def test_sae_status_counts_every_state_of_the_runs_vocabulary():
    """sae-status's states are sae.grid.runs' own (new, running, interrupted, done, failed) and the
    scheduler's (pending, and how it ended a task); its summary line orders every one."""
    from sae.grid.runs import RUN_STATES, SCHEDULER_STATES
    from sae.grid.status import ORDER
    from sae.grid.sweep import SCHEDULER_ENDS

    assert set(ORDER) == {*RUN_STATES, *SCHEDULER_STATES} and len(ORDER) == len(set(ORDER))
    assert set(SCHEDULER_ENDS.values()) <= set(SCHEDULER_STATES)
