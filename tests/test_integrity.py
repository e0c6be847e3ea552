"""Nothing stale is trusted (issue 13 items 1-3): ``force=true`` retrains from scratch and sets the
old outputs aside (``sae-clean`` removes them), the run id holds the identity of the data, and a
checkpoint is verified against its digest, an older one or a fresh start taking over."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from sae.config import PathsConfig
from tests.helpers import REPO, synthetic_cfg


def tiny_cell(root: Path, **overrides):
    cfg = synthetic_cfg(n_latents=64, max_steps=40, checkpoint_every=10, n_train=1024, dim=16,
                        n_atoms=32)
    cfg.eval = dataclasses.replace(cfg.eval, probe_max_train=256, probe_epochs=1)
    paths = PathsConfig(root=str(root), runs=str(root / "runs"), sweeps=str(root / "sweeps"),
                        cache=str(root / "cache"))
    return dataclasses.replace(cfg, paths=paths, **overrides)


def metrics_of(directory: Path) -> dict:
    return json.loads((Path(directory) / "metrics.json").read_text())


# -- force (item 1) -----------------------------------------------------------------------------
def test_force_retrains_from_scratch_and_sets_the_old_run_aside(tmp_path):
    from sae.train import run_cell

    first = run_cell(tiny_cell(tmp_path))
    directory = Path(first["run_dir"])
    old_model = (directory / "model.safetensors").read_bytes()
    forced = run_cell(tiny_cell(tmp_path, force=True))
    assert forced["state"] == "done" and forced["run_dir"] == first["run_dir"]
    train = metrics_of(directory)["train"]
    assert train["resumed_from_step"] is None and train["steps"] == 40, train
    (previous,) = directory.glob("previous-*")
    assert (previous / "model.safetensors").read_bytes() == old_model
    assert (previous / "checkpoints" / "last.safetensors").exists()
    assert (previous / "metrics.json").exists()

    dry = clean(tmp_path, "--dry-run")
    assert dry.returncode == 0 and str(previous) in dry.stdout and previous.exists(), dry
    assert "would free" in dry.stdout
    done = clean(tmp_path)
    assert done.returncode == 0 and "freed" in done.stdout and not previous.exists(), done
    assert (directory / "model.safetensors").exists()  # the current run is untouched


def test_a_requeued_forced_job_resumes_its_own_checkpoint(tmp_path, monkeypatch):
    """SLURM re-runs a requeued job with the same command, force=true included: the job's own
    checkpoint is resumed, not set aside (that would restart it at every preemption)."""
    from sae.runs import run_dir, write_status
    from sae.train import run_cell

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    first = run_cell(tiny_cell(tmp_path))
    directory = Path(first["run_dir"])
    write_status(directory, "preempted", "SIGUSR2")  # as a preempted job of job 77 leaves it
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    run_cell(tiny_cell(tmp_path, force=True))
    assert not list(directory.glob("previous-*"))
    assert metrics_of(run_dir(tiny_cell(tmp_path)))["train"]["resumed_from_step"] == 40


def clean(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sae.clean", str(root), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
