"""A pack's life is a lone run's (issue 19): force, stop signals at any phase, run locks.

Each signal test runs a real ``python -m sae.train`` process whose training (or evaluation)
sends the process SIGTERM at a fixed point, through a small wrapper that patches one function
before Hydra starts: the signal then arrives at a known step, not at a time that depends on the
machine's load.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO
from tests.test_packed import PACK_CELLS, compose_cell
from tests.test_reliability import cell_env, signal_when

# Two cells of one pack (they share every preset), long enough to be stopped mid-way.
PACK = ["dataset=synthetic", "sae=tiny", "sae.n_latents=64", "logger=none",
        "train.batch_size=256", "dataset.n_train=2048", "dataset.n_eval=512",
        "eval.probe_max_train=512", "eval.probe_epochs=2", "train.max_steps=120",
        "train.log_every=20", "train.progress=false", "train.device=cpu", "k=8",
        "regularizer=none,l1l2", "mask=true", "seed=0", "pack=2"]
LONE = [a for a in PACK if not a.startswith(("regularizer=", "pack="))] + ["regularizer=l1l2"]

# Patches `target` (module:Class.method or module:function) to send SIGTERM to the process
# when called with `at` as its first argument after self (or at its first call), then runs
# `python -m sae.train ARGS`.
WRAPPER = """
import os, signal, sys, importlib
module_name, attr = {target!r}.split(":")
module = importlib.import_module(module_name)
owner, name = (getattr(module, attr.split(".")[0]), attr.split(".")[1]) if "." in attr \\
    else (module, attr)
original = getattr(owner, name)
def patched(*args, **kwargs):
    key = args[1] if "." in attr else None
    if key == {at!r}:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)
setattr(owner, name, patched)
sys.argv = ["sae.train", *{args!r}]
from sae.train import main
main()
"""


def run_train(root: Path, args: list[str], target: str | None = None, at=None,
              check: bool = True) -> subprocess.CompletedProcess:
    if target is None:
        command = [sys.executable, "-m", "sae.train", *args]
    else:
        command = [sys.executable, "-c", WRAPPER.format(target=target, at=at, args=args)]
    result = subprocess.run(command, cwd=REPO, env=cell_env(root), text=True, capture_output=True,
                            timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def ended_by_sigterm(result: subprocess.CompletedProcess) -> bool:
    """Killed by the re-delivered signal (-15), or exited with the shell's code for it (143)."""
    return result.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM)


def run_dirs(root: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((root / "runs").iterdir()) if p.is_dir()}


def status(directory: Path) -> dict:
    return json.loads((directory / "status.json").read_text())


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.slow
def test_sigterm_on_a_pack_checkpoints_every_member_and_a_relaunch_finishes(tmp_path):
    """SIGTERM at step 50 of a pack of two: both members checkpoint step 50 and are
    ``interrupted`` (signal and step recorded), the process exits 143; the re-launch resumes
    both and ends with the weights of an undisturbed packed sweep."""
    root, reference = tmp_path / "signalled", tmp_path / "reference"
    stopped = run_train(root, ["-m", *PACK], "sae.training.loop:PackedStep.step", 50,
                        check=False)
    assert ended_by_sigterm(stopped), (stopped.returncode, stopped.stderr[-3000:])
    dirs = run_dirs(root)
    assert len(dirs) == 2
    for directory in dirs.values():
        record = status(directory)
        assert (record["state"], record["signal"], record["step"]) == (
            "interrupted", "SIGTERM", 51), record
        meta = json.loads((directory / "checkpoints" / "last.json").read_text())
        assert meta["step"] == 51
        assert not (directory / "metrics.json").exists()
    run_train(root, ["-m", *PACK])
    run_train(reference, ["-m", *PACK])
    for name, directory in run_dirs(root).items():
        assert status(directory)["state"] == "done"
        metrics = json.loads((directory / "metrics.json").read_text())
        assert metrics["train"]["resumed_from_step"] == 51 and metrics["train"]["steps"] == 120
        assert_same_weights(directory, run_dirs(reference)[name])


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["lone", "pack"])
def test_sigterm_during_evaluation_stops_the_run_and_a_relaunch_evaluates(tmp_path, packed):
    """SIGTERM while the evaluation runs (sent at its start, honoured between its metric
    families): no ``done``, no metrics.json, status ``interrupted ... during evaluation`` at the
    last step, exit 143. The re-launch trains no step and evaluates."""
    root = tmp_path / "runs"
    args = ["-m", *PACK] if packed else LONE
    stopped = run_train(root, args, "sae.evaluation.evaluate:evaluate", None, check=False)
    assert ended_by_sigterm(stopped), (stopped.returncode, stopped.stderr[-3000:])
    dirs = run_dirs(root)
    for directory in dirs.values():
        record = status(directory)
        assert record["state"] == "interrupted" and record["step"] == 120, record
        assert "during evaluation" in record["reason"], record
        assert not (directory / "metrics.json").exists()
    run_train(root, args)
    for directory in dirs.values():
        assert status(directory)["state"] == "done"
        metrics = json.loads((directory / "metrics.json").read_text())
        assert metrics["train"]["resumed_from_step"] == 120 and metrics["train"]["steps"] == 120


def test_force_on_a_done_pack_sets_its_outputs_aside_and_retrains(tmp_path, monkeypatch):
    """force=true on a packed slice that is done: each member's previous outputs go to
    ``previous-*/`` and it trains from step 0 (as a lone run does), ending with the same
    weights as the first time."""
    from sae.training.job import run_cells

    monkeypatch.setenv("WANDB_MODE", "disabled")
    first = run_cells([(compose_cell(tmp_path, axes), "cmd") for axes in PACK_CELLS[:2]])
    assert [o["state"] for o in first] == ["done"] * 2
    before = {o["run_id"]: load_file(Path(o["run_dir"]) / "model.safetensors") for o in first}
    again = run_cells([(compose_cell(tmp_path, [*axes, "force=true"]), "cmd")
                      for axes in PACK_CELLS[:2]])
    assert [o["state"] for o in again] == ["done"] * 2
    for outcome in again:
        directory = Path(outcome["run_dir"])
        metrics = json.loads((directory / "metrics.json").read_text())
        assert metrics["train"]["resumed_from_step"] is None, metrics["train"]
        assert metrics["train"]["steps"] == 20
        previous = list(directory.glob("previous-*"))
        assert len(previous) == 1 and (previous[0] / "metrics.json").is_file()
        after = load_file(directory / "model.safetensors")
        for name, value in before[outcome["run_id"]].items():
            assert torch.equal(value, after[name]), name


def test_a_pack_waits_on_a_locked_member_at_most_lock_timeout_and_names_the_holder(
        tmp_path, monkeypatch, caplog):
    from sae.config import validate
    from sae.grid.runs import run_dir, run_lock, write_status
    from sae.identity import run_id
    from sae.runtime.locking import RunLocked
    from sae.training.job import run_cells

    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfgs = [compose_cell(tmp_path, [*axes, "run.lock_timeout_s=0.5"]) for axes in PACK_CELLS[:2]]
    held = run_dir(validate(cfgs[1]), run_id(validate(cfgs[1])))
    held.mkdir(parents=True)
    write_status(held, "running")
    lock = run_lock(held)
    lock.acquire()
    try:
        with pytest.raises(RunLocked, match="still locked by host .* pid .*run.lock_timeout_s"):
            run_cells([(cfg, "cmd") for cfg in cfgs])
    finally:
        lock.release()
    assert "waiting at most 0.5 s" in caplog.text


@pytest.mark.slow
def test_sigterm_during_extraction_is_a_stop_not_a_failure(tmp_path):
    """Issue 20: an extraction stopped by a signal (the shards so far kept) was recorded
    ``failed`` and the signal swallowed. Now the run is ``interrupted ... during extraction``,
    the process ends as the signal asks (under SLURM, USR2 reaches submitit's requeue), and a
    relaunch resumes the cache and finishes."""
    root = tmp_path / "runs"
    args = ["backbone=clip_tiny", "dataset=digits_images", "sae=tiny", "logger=none", "k=8",
            "train.max_steps=5", "train.progress=false", "train.device=cpu",
            "backbone.batch_size=64", "extract.shard_size=64", "eval.probe_epochs=2"]
    stopped = run_train(root, args, "sae.data.embedding:_embed_batch", None, check=False)
    assert ended_by_sigterm(stopped), (stopped.returncode, stopped.stderr[-3000:])
    (directory,) = run_dirs(root).values()
    record = status(directory)
    assert record["state"] == "interrupted" and "during extraction" in record["reason"], record
    run_train(root, args)
    assert status(directory)["state"] == "done"


@pytest.mark.slow
def test_a_task_waiting_on_another_extraction_hears_sigterm(tmp_path):
    """Issue 20: a task waiting on another process's extraction lock survived USR2 and SIGTERM
    and held its GPU. Now the wait ends within a second of the signal, the run is
    ``interrupted ... during extraction``."""

    from filelock import FileLock
    from hydra import compose, initialize_config_dir

    from sae.config import register_configs, validate
    from sae.data.cache import cache_path

    root = tmp_path / "runs"
    args = ["backbone=clip_tiny", "dataset=digits_images", "sae=tiny", "logger=none", "k=8",
            "train.max_steps=5", "train.progress=false", "train.device=cpu",
            "eval.probe_epochs=2", f"paths.root={root}"]
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = validate(compose("train", overrides=args))
    lock = FileLock(str(cache_path(cfg.paths.cache, cfg.backbone, cfg.dataset, "train"))
                    + ".lock")
    with lock:  # another process is extracting this split
        proc = subprocess.Popen([sys.executable, "-m", "sae.train", *args], cwd=REPO,
                                env=cell_env(root), text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        output, seconds = signal_when(
            proc, lambda: bool(list((root / "runs").glob("*/status.json"))), signal.SIGTERM,
            settle_s=2.0)  # into the wait on the lock
    assert "waiting for another process extracting" in output, output[-3000:]
    assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM) and seconds < 10, output
    (directory,) = run_dirs(root).values()
    record = status(directory)
    assert record["state"] == "interrupted" and "during extraction" in record["reason"], record
    # (the relaunch that then extracts and finishes is the test above's)
