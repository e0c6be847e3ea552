"""The cluster in stages (issue 20), on the local SLURM cluster with real accounting:

- an image sweep builds each embedding cache once, in its own extraction job, and every training
  task starts after its cache's job ended, without waiting on an extraction lock;
- a launcher killed mid-sweep and launched again re-attaches: every run has exactly one training
  task, and ``sae-status`` shows them all done.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.test_slurm import REPO, SWEEP_TIMEOUT_S, sweep_env, train_cmd

pytestmark = pytest.mark.slurm

IMAGE_CELL = ["dataset=digits_images", "dataset.max_per_split=80", "sae=tiny", "k=8",
              "logger=none", "train.progress=false", "train.max_steps=20", "eval.probe_epochs=2",
              "backbone.batch_size=32"]


def accounting(job_ids: list[str] | None = None, name: str | None = None,
               settle_s: float = 30.0) -> dict[str, dict[str, str]]:
    """sacct's name, state, start and end of each job or array task (of ``job_ids``, or of
    every job called ``name`` today). slurmctld sends job records to slurmdbd in the
    background: ask again until every job has an end (at most ``settle_s``)."""
    select = (["-j", ",".join(sorted({j.split("_")[0] for j in job_ids}))] if job_ids
              else [f"--name={name}", "-S", "now-1days"])
    deadline = time.monotonic() + settle_s
    while True:
        out = subprocess.run(["sacct", "-n", "-P", "-X", *select, "-o",
                              "JobID,JobName,State,Start,End"], capture_output=True, text=True,
                             check=True, timeout=60).stdout
        rows = {}
        for line in out.splitlines():
            job, job_name, state, start, end = line.split("|")
            rows[job] = {"name": job_name, "state": state, "start": start, "end": end}
        settled = all(row["end"] not in ("Unknown", "") for row in rows.values()) and (
            job_ids is None or set(job_ids) <= set(rows))
        if settled or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def task_logs(sweep_dir: Path, job_id: str) -> str:
    folder = sweep_dir / ".submitit" / job_id
    return "".join(p.read_text(errors="replace") for p in sorted(folder.glob("*_log.*")))


def status_cmd(sweep_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sae.status", str(sweep_dir), *extra]


def test_an_image_sweep_extracts_each_cache_once_before_its_training_tasks(
        slurm_cluster, run_cmd, tmp_path):
    """Before: every task of a (backbone, dataset) group held a GPU while the first one
    extracted, waiting on the cache's file lock. The cells of a backbone train as one pack
    (pack=auto: two training jobs, whose members each open the cache the planner resolved)."""
    sweep_dir = tmp_path / "sweeps" / "stages"
    result = run_cmd(train_cmd("launcher=slurm", "sweep_name=stages",
                               "backbone=clip_tiny,vit_tiny", "regularizer=none,l1l2",
                               "seed=0,1", "pack=auto", *IMAGE_CELL),
                     env=sweep_env(slurm_cluster, tmp_path), cwd=REPO, timeout=SWEEP_TIMEOUT_S)
    record = json.loads((sweep_dir / "cells.json").read_text())
    caches = record["caches"]
    assert sorted(c["name"] for c in caches) == ["digits_images__clip_tiny",
                                                 "digits_images__vit_tiny"], result.stdout
    cells = [c for c in record["cells"] if c["duplicate_of"] is None]
    assert len(cells) == 8 and {c["result"] for c in cells} == {"done"}, cells
    assert len({c["job_id"] for c in cells}) == 2 and len({c["pack"] for c in cells}) == 2
    jobs = accounting([c["job_id"] for c in cells] + [c["job_id"] for c in caches])
    extraction = {c["name"]: jobs[c["job_id"]] for c in caches}
    for job in extraction.values():
        assert "extract" in job["name"] and job["state"] == "COMPLETED", job
    for cell in cells:
        task = jobs[cell["job_id"]]
        assert "extract" not in task["name"] and task["state"] == "COMPLETED", task
        assert when(task["start"]) >= when(extraction[cell["cache"]]["end"]), (cell, extraction)
        logs = task_logs(sweep_dir, cell["job_id"])
        assert f"run {cell['run_id']} done" in logs
        assert "waiting for another process extracting" not in logs, logs
        assert "extracting " not in logs, logs
    # Each cache was built once: two splits in each extraction job, none anywhere else.
    built = [line for c in caches for line in task_logs(sweep_dir, c["job_id"]).splitlines()
             if "cache complete:" in line]
    assert len(built) == 4, built
    shown = run_cmd(status_cmd(sweep_dir), env=sweep_env(slurm_cluster, tmp_path), cwd=REPO,
                    timeout=120)
    assert shown.stdout.strip().endswith("8 runs: 8 done"), shown.stdout
    print(shown.stdout)


def test_a_killed_launcher_is_relaunched_and_reattaches(slurm_cluster, run_cmd, tmp_path):
    """Before: a re-launch after `kill -9` of the launcher resubmitted every cell not done,
    pending and running ones too (12 training tasks for 8 runs)."""
    from tests.test_slurm import CELL

    name = f"leave{time.time_ns() % 10**8}"  # jobs of earlier test sessions stay in sacct
    sweep_dir = tmp_path / "sweeps" / name
    sweep = train_cmd("launcher=slurm", f"sweep_name={name}", "k=4,8", "seed=0,1", *CELL,
                      "train.max_steps=20")
    env = sweep_env(slurm_cluster, tmp_path)
    # Submitted held (sbatch --hold), the tasks stay pending until released below: the relaunch
    # then finds every one of them still queued (else some might be done by then).
    held = [*sweep, "+hydra.launcher.additional_parameters.hold=true"]
    launcher = subprocess.Popen(held, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    try:
        while True:  # every job id is in cells.json as soon as the array is submitted
            assert time.monotonic() < deadline and launcher.poll() is None
            record = json.loads((sweep_dir / "cells.json").read_text()) \
                if (sweep_dir / "cells.json").is_file() else {"cells": []}
            if record["cells"] and all(c["job_id"] for c in record["cells"]):
                break
            time.sleep(0.2)
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.communicate(timeout=30)
    arrays = sorted({c["job_id"].split("_")[0] for c in record["cells"]})
    try:
        again = run_cmd([*sweep, "launcher.wait=false"], env=env, cwd=REPO,
                        timeout=SWEEP_TIMEOUT_S)
        pending = run_cmd(status_cmd(sweep_dir), env=env, cwd=REPO, timeout=120, check=False)
    finally:
        subprocess.run(["scontrol", "release", *arrays], check=True, timeout=30)
    output = again.stdout + again.stderr
    assert "re-attached: 4 cells left alone" in output, output
    assert pending.returncode == 3 and "4 pending" in pending.stdout, pending.stdout
    watched = run_cmd(status_cmd(sweep_dir, "--watch", "1"), env=env, cwd=REPO,
                      timeout=SWEEP_TIMEOUT_S)
    assert watched.stdout.strip().endswith("4 runs: 4 done"), watched.stdout
    trained = accounting(name=f"sae-{name}")
    assert len(trained) == 4, trained  # one training task a run, none submitted twice
    print("\n".join(line for line in output.splitlines() if "re-attached" in line
                    or f"sweep {name}" in line))
    print(watched.stdout.splitlines()[-1])
