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


def signal_when(proc: subprocess.Popen, ready, sig: int, settle_s: float = 0.0,
                timeout: float = 120) -> tuple[str, float]:
    """Send ``sig`` to ``proc`` once ``ready()`` holds (and ``settle_s`` more seconds have
    passed); its output and the seconds from the signal to its exit. Killed if it outlives the
    test."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        time.sleep(settle_s)
        proc.send_signal(sig)
        signalled = time.monotonic()
        output, _ = proc.communicate(timeout=30)
        return output, time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2], ids=["SIGTERM", "SIGUSR2"])
def test_a_stop_signal_checkpoints_records_and_resumes_exactly(tmp_path, sig):
    root, reference_root = tmp_path / "signalled", tmp_path / "reference"
    proc = subprocess.Popen(train_cmd(), cwd=REPO, env=cell_env(root), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def checkpointed() -> bool:
        run_dir = only_run_dir(root)
        return run_dir is not None and (run_dir / "checkpoints" / "last.json").exists()

    output, seconds_to_exit = signal_when(proc, checkpointed, sig)
    run_dir = only_run_dir(root)
    assert seconds_to_exit < 5, output
    print(f"{sig.name}: exited {seconds_to_exit:.2f} s after the signal")
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
    from sae.grid.runs import run_dir, run_lock, write_status
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


def test_a_task_waiting_on_a_run_lock_hears_sigterm(tmp_path, monkeypatch):
    """Issue 20: a task waiting on another process's run lock (up to run.lock_timeout_s, 24 h
    by default) was deaf to SIGTERM and USR2. Now it ends within seconds of the signal, and
    the holder's status is left as it was. The task starts with SIGTERM ignored, as under
    submitit (which acts on USR2 only): before, it slept on in the wait."""
    from sae.config import validate
    from sae.grid.runs import read_status, run_dir, run_lock, write_status
    from tests.test_config import compose_train

    monkeypatch.setenv("SAE_OUTPUT_ROOT", str(tmp_path))
    directory = run_dir(validate(compose_train(CELL)))
    directory.mkdir(parents=True)
    write_status(directory, "running")  # as the lock's holder would have
    with run_lock(directory):
        proc = subprocess.Popen(train_cmd(), cwd=REPO, env=cell_env(tmp_path), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
        waiting: list[str] = []

        def in_the_wait() -> bool:  # the warning line is printed as the wait starts
            waiting.append(proc.stdout.readline())
            return "waiting without limit" in waiting[-1] or "waiting at most" in waiting[-1]

        output, seconds = signal_when(proc, in_the_wait, signal.SIGTERM, settle_s=0.5)
    assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM), "".join(waiting) + output
    assert seconds < 5, seconds
    assert "stopped by SIGTERM while waiting" in output, output
    assert read_status(directory)["state"] == "running"


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

    from sae.training.cell import split_sizes

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


# -- errors before anything runs (issue 13 item 7, issue 16) -------------------------------------
TINY = ["sae=tiny", "logger=none", "train.max_steps=4", "dataset.n_train=300",
        "dataset.n_eval=100", "eval.probe_epochs=1", "train.progress=false"]


def cli(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sae.train", *args], cwd=REPO, text=True,
                          env=cell_env(root, **{"HYDRA_FULL_ERROR": "0", **env}), capture_output=True,
                          timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # (a sweep's planning progress lines come first)
    lines = [x for x in result.stderr.strip().splitlines() if not x.startswith("planning: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def unusable_roots(tmp_path: Path) -> list[Path]:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    return [a_file, a_file / "below", Path("/proc/sae-outputs")]


@pytest.mark.parametrize("multirun", [False, True], ids=["single", "sweep"])
def test_an_unusable_output_root_is_one_line_naming_the_path(tmp_path, multirun):
    for root in unusable_roots(tmp_path):
        grid = ["-m", "k=4,8"] if multirun else []
        line = one_line_error(cli(root, *grid, *TINY))
        assert str(root) in line and "Fix: set SAE_OUTPUT_ROOT" in line, line


def test_a_read_only_output_root_is_refused(tmp_path):
    """Root writes in read-only directories, and CI runs as root: there the command runs
    without root's capabilities (setpriv drops CAP_DAC_OVERRIDE and the rest; still uid 0, so
    the repository and the venv stay readable), where a 0555 directory refuses writes."""
    import shutil

    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    prefix = []
    if os.geteuid() == 0:
        assert shutil.which("setpriv"), "setpriv (util-linux) drops root's capabilities"
        prefix = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
    result = subprocess.run([*prefix, sys.executable, "-m", "sae.train", *TINY], cwd=REPO,
                            text=True, capture_output=True, timeout=300,
                            env=cell_env(read_only / "out", HYDRA_FULL_ERROR="0"))
    line = one_line_error(result)
    assert str(read_only) in line and "cannot write" in line, line


def test_a_config_error_is_one_line_unless_hydra_full_error(tmp_path):
    line = one_line_error(cli(tmp_path, "k=100000", *TINY))
    assert line.startswith("error: k: 100000 exceeds sae.n_latents=512") and "Fix:" in line
    full = cli(tmp_path, "k=100000", *TINY, HYDRA_FULL_ERROR="1")
    assert full.returncode != 0 and "Traceback" in full.stderr
    # No Hydra folder was made for the refused run.
    assert not (tmp_path / "sweeps" / "single").exists() or \
        not any((tmp_path / "sweeps" / "single").iterdir())


def test_dry_run_without_multirun_lists_the_cell_and_runs_nothing(tmp_path):
    result = cli(tmp_path, "dry_run=true", *TINY)
    assert result.returncode == 0, result.stderr
    assert "1 cells -> 1 unique runs" in result.stdout and "synthetic-k64-" in result.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sweeps").exists()


def test_a_failed_single_run_leaves_no_hydra_folder(tmp_path):
    result = cli(tmp_path, "train.lr=1e30", "train.log_every=2", "k=8", *TINY)
    assert result.returncode != 0
    single = tmp_path / "sweeps" / "single"
    assert not single.exists() or list(single.iterdir()) == []
    (run,) = (tmp_path / "runs").iterdir()  # the run directory keeps the reason
    assert json.loads((run / "status.json").read_text())["state"] == "failed"


def test_dry_run_of_a_sweep_ends_with_a_grouped_problem_summary(tmp_path):
    grid = ["-m", "dataset=imagenet", "backbone=clip_vitl14", "k=4,8", "seed=0,1",
            "dry_run=true", "sae=tiny"]
    unset = cli(tmp_path, *grid, IMAGENET_ROOT="", SAE_WEIGHTS_DIR="")
    assert unset.returncode == 2, unset.stderr  # a plan with problems: listed, then exit 2
    assert unset.stdout.count("dataset.root: is empty or not set") == 1, unset.stdout
    assert "4 cells: dataset.root: is empty or not set" in unset.stdout
    assert "4 cells: backbone.checkpoint_path" in unset.stdout and "SAE_WEIGHTS_DIR" in \
        unset.stdout
    empty = tmp_path / "imagenet"
    empty.mkdir()
    found = cli(tmp_path, *grid, IMAGENET_ROOT=str(empty))
    assert f"4 cells: dataset.root: {empty} has no 'train' split directory" in found.stdout, \
        found.stdout


# -- threads (issue 13 item 8) -------------------------------------------------------------------
@pytest.mark.parametrize(("env", "affinity", "expected"), [
    ({}, 8, (8, "process affinity")),
    ({"SLURM_CPUS_PER_TASK": "3"}, 8, (3, "SLURM_CPUS_PER_TASK")),
    ({"SAE_PARALLEL_TASKS": "2"}, 8, (4, "process affinity / 2 parallel tasks")),
    ({"SAE_PARALLEL_TASKS": "16"}, 8, (1, "process affinity / 16 parallel tasks")),
    ({"OMP_NUM_THREADS": "1", "SLURM_CPUS_PER_TASK": "4"}, 8, (1, "OMP_NUM_THREADS")),
])
def test_threads_follow_the_cpus_allocated_to_the_task(env, affinity, expected):
    from sae.runtime.threads import allocated_threads

    assert allocated_threads(env, affinity) == expected


def test_a_run_records_its_threads_and_logs_start_and_final_metrics(tmp_path):
    env = {k: v for k, v in cell_env(tmp_path).items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-m", "sae.train", "k=8", *TINY], cwd=REPO,
                            text=True, env={**env, "SLURM_CPUS_PER_TASK": "1"},
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (run,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["threads"] == {"count": 1, "source": "SLURM_CPUS_PER_TASK"}
    card = json.loads((run / "method_card.json").read_text())
    assert card["cpu_threads"] == "1 (SLURM_CPUS_PER_TASK)"
    assert "threads" not in json.loads((run / "identity.json").read_text())
    log = result.stdout + result.stderr
    assert f"run {run.name} start: device cpu, 4 steps of batch" in log, log
    assert "data synthetic (300 train / 100 eval, d=64), 1 CPU threads" in log, log
    assert f"run {run.name} final metrics: r2 " in log and "steps 4" in log, log


# -- make install (issue 13 item 9) --------------------------------------------------------------
def test_make_install_refuses_another_python_before_creating_the_venv(tmp_path):
    """A stand-in for a Python 3.12 `python3`: it answers version queries and would create a
    venv. The Makefile must stop before that, naming the interpreter to pass."""
    import shutil

    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    fake = tmp_path / "python3.12"
    fake.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then echo 3.12.1; exit 0; fi\n'
                    'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; touch "$3/bin/python";'
                    ' exit 0; fi\nexit 1\n')
    fake.chmod(0o755)
    result = subprocess.run(["make", "install", f"PYTHON={fake}"], cwd=tmp_path, text=True,
                            capture_output=True, timeout=60)
    assert result.returncode != 0
    assert "Python 3.12.1" in result.stderr and "make install PYTHON=python3.11" in \
        result.stderr, result.stderr
    assert not (tmp_path / ".venv").exists()


# -- the launcher's summary (issue 13 item 3; the SLURM end to end is in test_slurm.py) -----------
def test_scheduler_states_and_the_outcome_summary():
    from sae.grid.sweep import Cell, outcome_summary, scheduler_end

    assert [scheduler_end(s) for s in ("CANCELLED by 1000", "TIMEOUT", "NODE_FAIL",
                                       "OUT_OF_MEMORY", "INTERRUPTED", "")] == [
        "cancelled", "timeout", "node_fail", "failed", "cancelled", "failed"]
    ends = [("done", None), ("failed", "DivergedError: loss became nan"),
            ("failed", "DivergedError: loss became inf"),
            ("failed", "task ended in state OUT_OF_MEMORY (job 7_1; log x)"),
            ("cancelled", "task ended in state CANCELLED by 0 (job 7_2; log y)"),
            ("timeout", "task ended in state TIMEOUT (job 7_3; log z)"), ("skipped", None)]
    cells = [Cell(i, [], f"r{i}", f"/runs/r{i}", "new", result=result, reason=reason)
             for i, (result, reason) in enumerate(ends)]
    assert outcome_summary("s", cells, "/sw") == (
        "sweep s: 1 done, 3 failed (DivergedError x2, OUT_OF_MEMORY x1), 1 cancelled, "
        "1 timeout, 1 skipped; plan and results in /sw/cells.json")


def test_a_slurm_sweep_without_a_cluster_is_one_line(tmp_path):
    result = cli(tmp_path, "-m", "launcher=slurm", "k=4,8", *TINY, PATH="/nonexistent")
    line = one_line_error(result)
    assert "sbatch" in line and "Fix:" in line, line
