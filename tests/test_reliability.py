"""Reliability of one cell (issue 13): stop signals, locks, labels, output roots, threads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO

# A small cell that trains long enough to be signalled between checkpoints.
CELL = ["dataset=synthetic", "sae=tiny", "sae.n_latents=64", "logger=none",
        "train.batch_size=256", "train.epochs=1000", "dataset.n_train=2048",
        "dataset.n_eval=512", "eval.probe_max_train=512", "eval.probe_epochs=2", "k=8",
        "train.max_steps=3000", "train.checkpoint_every=100", "train.log_every=50",
        "train.progress=false"]


def cell_env(root: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "SAE_OUTPUT_ROOT": str(root), "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **extra}


def train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "sae.train", *CELL, *overrides]


def only_run_dir(root: Path) -> Path:
    runs = list((root / "runs").glob("*/identity.json"))
    return runs[0].parent if runs else None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2], ids=["SIGTERM", "SIGUSR2"])
def test_a_stop_signal_checkpoints_records_and_resumes_exactly(tmp_path, sig):
    root, reference_root = tmp_path / "signalled", tmp_path / "reference"
    proc = subprocess.Popen(train_cmd(), cwd=REPO, env=cell_env(root), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while (run_dir := only_run_dir(root)) is None or \
                not (run_dir / "checkpoints" / "last.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        proc.send_signal(sig)
        signalled = time.monotonic()
        output, _ = proc.communicate(timeout=30)
        seconds_to_exit = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    assert seconds_to_exit < 5, output
    assert proc.returncode != 0
    status = json.loads((run_dir / "status.json").read_text())
    expected = "preempted" if sig == signal.SIGUSR2 else "interrupted"
    assert (status["state"], status["signal"]) == (expected, sig.name), status
    step = json.loads((run_dir / "checkpoints" / "last.json").read_text())["step"]
    assert status["step"] == step and 0 < step < 3000, (status, step)
    assert f"at step {step}" in status["reason"]
    # The re-launch resumes from that checkpoint and ends where an uninterrupted run ends.
    subprocess.run(train_cmd(), cwd=REPO, env=cell_env(root), check=True, capture_output=True,
                   timeout=300)
    subprocess.run(train_cmd(), cwd=REPO, env=cell_env(reference_root), check=True,
                   capture_output=True, timeout=300)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["resumed_from_step"] == step
    reference = load_file(only_run_dir(reference_root) / "model.safetensors")
    resumed = load_file(run_dir / "model.safetensors")
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name


def test_a_locked_run_says_whose_lock_and_gives_up_after_lock_timeout(tmp_path, monkeypatch):
    from sae.config import validate
    from sae.runs import run_dir, run_lock, write_status
    from tests.test_config import compose_train

    monkeypatch.setenv("SAE_OUTPUT_ROOT", str(tmp_path))
    directory = run_dir(validate(compose_train(CELL)))
    directory.mkdir(parents=True)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    write_status(directory, "running")  # as the lock's holder would have
    with run_lock(directory):
        started = time.monotonic()
        result = subprocess.run(train_cmd("run.lock_timeout_s=2"), cwd=REPO, text=True,
                                env=cell_env(tmp_path), capture_output=True, timeout=120)
        waited = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0 and waited < 60, output
    owner = f"locked by host {os.uname().nodename} pid {os.getpid()} (SLURM job 4242) since"
    assert owner in output and "waiting at most 2 s" in output, output
    assert "still locked" in output and "run.lock_timeout_s" in output, output


# -- labels (issue 13 item 6) ----------------------------------------------------------------------
def labelled_files(tmp_path: Path, labels, class_names: list[str] | None = None):
    """A files dataset of 12 embeddings with ``labels`` (saved as .npy), no held-out split."""
    import numpy as np

    from sae.data import load_splits
    from tests.test_config import files_cfg

    x = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "xe.npy", x)
    label_path = tmp_path / "y.npy"
    if isinstance(labels, bytes):
        label_path.write_bytes(labels)
    else:
        np.save(label_path, labels, allow_pickle=True)
    extra = {}
    if class_names is not None:
        (tmp_path / "classes.txt").write_text("\n".join(class_names) + "\n")
        extra["class_names"] = str(tmp_path / "classes.txt")
    return load_splits(files_cfg(tmp_path, train_path=tmp_path / "x.npy",
                                 eval_path=tmp_path / "xe.npy", train_labels=label_path,
                                 **extra))


def test_integral_float_labels_are_class_ids(tmp_path):
    import numpy as np

    train, _ = labelled_files(tmp_path, np.array([0, 1, 2, -1] * 3, dtype=np.float64))
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == [0, 1, 2, -1] * 3


def test_other_float_labels_are_refused_naming_the_row(tmp_path):
    import numpy as np

    from sae.data import DataError

    labels = np.arange(12, dtype=np.float32)
    labels[5] = 2.5
    with pytest.raises(DataError, match=r"row 5 .*2\.5.*Fix"):
        labelled_files(tmp_path, labels)
    labels[5] = np.nan
    with pytest.raises(DataError, match=r"row 5"):
        labelled_files(tmp_path, labels)


def test_negative_ids_are_unlabelled_and_counted_in_the_card(tmp_path):
    import numpy as np

    from sae.train import split_sizes

    train, held = labelled_files(tmp_path, np.array([0, 1, -1, -3] * 3))
    sizes = split_sizes(train, held)
    assert sizes["train_unlabelled"] == 6 and sizes["eval_unlabelled"] is None


def test_string_labels_need_the_class_list(tmp_path):
    import numpy as np

    from sae.data import DataError

    names = np.array(["cat", "dog", "cat", "bird"] * 3)
    with pytest.raises(DataError, match=r"strings.*Fix: .*dataset\.class_names"):
        labelled_files(tmp_path, names)
    train, _ = labelled_files(tmp_path, names, class_names=["bird", "cat", "dog"])
    assert train.labels.tolist() == [1, 2, 1, 0] * 3
    assert train.class_names == ["bird", "cat", "dog"]
    with pytest.raises(DataError, match=r"row 1 .*'dog'.* not in .*classes\.txt"):
        labelled_files(tmp_path, names, class_names=["bird", "cat"])


def test_object_and_garbage_label_files_are_refused_as_such(tmp_path):
    import numpy as np

    from sae.data import DataError

    with pytest.raises(DataError, match=r"Python objects \(dtype object\)"):
        labelled_files(tmp_path, np.array([{"a": 1}] * 12, dtype=object))
    with pytest.raises(DataError, match=r"not a \.npy array file"):
        labelled_files(tmp_path, b"garbage, not numpy")
