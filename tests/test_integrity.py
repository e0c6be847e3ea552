"""Nothing stale is trusted (issue 13 items 1-3): ``force=true`` retrains from scratch and sets the
old outputs aside (``sae-clean`` removes them), the run id holds the identity of the data, and a
checkpoint is verified against its digest, an older one or a fresh start taking over."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


# -- checkpoints protect themselves (item 3) -----------------------------------------------------
CKPT_CELL = dict(reg="l1l2", strength=0.05, n_train=2000, batch=256, n_latents=128, k=4,
                 checkpoint_every=5)


def train_to(ckpt: Path, max_steps: int):
    from sae.data.synthetic import load_synthetic
    from tests.test_trainer import train

    cfg = synthetic_cfg(max_steps=max_steps, **CKPT_CELL)
    return train(cfg, load_synthetic(cfg.dataset)[0].x, ckpt)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])  # as a full disk or a killed copy leaves it


def flip_a_weight_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-9] ^= 0xFF  # in the tensor data: the header still parses
    path.write_bytes(bytes(data))


def test_the_last_two_checkpoints_are_kept_with_a_digest(tmp_path):
    from sae.trainer import older_checkpoint

    ckpt = tmp_path / "checkpoints" / "last.safetensors"
    train_to(ckpt, 12)
    older = older_checkpoint(ckpt)
    assert older.name == "prev.safetensors"
    last_meta = json.loads(ckpt.with_suffix(".json").read_text())
    prev_meta = json.loads(older.with_suffix(".json").read_text())
    assert (last_meta["step"], prev_meta["step"]) == (12, 10)
    assert len(last_meta["digest"]) == 64 and last_meta["digest"] != prev_meta["digest"]


@pytest.mark.parametrize("damage", [truncate, flip_a_weight_byte], ids=["truncated", "bitflip"])
def test_a_corrupt_checkpoint_is_set_aside_and_the_older_one_resumes(tmp_path, damage, caplog):
    straight, _, _ = train_to(tmp_path / "straight" / "last.safetensors", 20)
    ckpt = tmp_path / "damaged" / "last.safetensors"
    train_to(ckpt, 12)  # last: step 12, prev: step 10
    damage(ckpt)
    with caplog.at_level("WARNING"):
        resumed, state, trainer = train_to(ckpt, 20)
    assert trainer.resumed_from == 10 and state.step == 20
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    (aside,) = ckpt.parent.glob("last.safetensors.corrupt-*")
    assert len(warnings) == 1 and str(ckpt) in warnings[0] and str(aside) in warnings[0]
    assert "\n" not in warnings[0]
    for name, value in straight.state_dict().items():  # the older checkpoint resumes exactly
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_with_both_checkpoints_corrupt_training_starts_afresh(tmp_path, caplog):
    from sae.trainer import older_checkpoint

    ckpt = tmp_path / "last.safetensors"
    train_to(ckpt, 12)
    truncate(ckpt)
    older = older_checkpoint(ckpt)
    meta_end = older.read_bytes()
    older.write_bytes(b"\xff" * 8 + meta_end[8:])  # a header length no file can have
    with caplog.at_level("WARNING"):
        _, state, trainer = train_to(ckpt, 12)
    assert trainer.resumed_from is None and state.step == 12
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 2
