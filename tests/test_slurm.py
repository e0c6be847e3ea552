"""SLURM for real: a single-node cluster (scripts/slurm_local.sh), sbatch, submitit arrays, and
the readiness checks a slurm sweep runs before it submits anything.

Every test here uses the session fixture ``slurm_cluster`` (tests/conftest.py), which starts
the cluster once and stops it at the end of the session.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae.grid.runs import read_status, run_state
from sae.grid.slurm_checks import SlurmNotReady, check_slurm_ready

pytestmark = pytest.mark.slurm
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "slurm_local.sh"


def wait_for(jobs, timeout: float) -> None:
    """Wait for submitit jobs, failing (and cancelling them) instead of hanging past timeout."""
    deadline = time.monotonic() + timeout
    while not all(job.done() for job in jobs):
        if time.monotonic() > deadline:
            for job in jobs:
                job.cancel(check=False)
            pytest.fail(f"submitit jobs {[j.job_id for j in jobs]} not done in {timeout} s")
        time.sleep(0.5)


def wait_for_state(job, state: str, timeout: float) -> None:
    """Poll SLURM (through sacct, forcing submitit past its cache) until ``job`` is in ``state``."""
    deadline = time.monotonic() + timeout
    while not (current := job.get_info(mode="force").get("State", "UNKNOWN")).startswith(state):
        if time.monotonic() > deadline:
            pytest.fail(f"job {job.job_id} is {current}, not {state}, after {timeout} s")
        time.sleep(0.3)


# -- the cluster itself -------------------------------------------------------------------------
def test_cluster_is_up_and_start_is_idempotent(slurm_cluster, run_cmd):
    sinfo = run_cmd(["sinfo", "--noheader", "--format=%P %t"], timeout=30)
    assert f"{slurm_cluster.partition}* idle" in sinfo.stdout, sinfo.stdout
    # A second start finds the running cluster and reuses it.
    again = run_cmd([SCRIPT, "start"], timeout=60,
                    env=slurm_cluster.env(SLURM_LOCAL_DIR=str(slurm_cluster.state_dir)))
    assert "already running" in again.stdout
    assert f"export SLURM_CONF={slurm_cluster.conf}" in again.stdout
    status = run_cmd([SCRIPT, "status"], timeout=60,
                     env=slurm_cluster.env(SLURM_LOCAL_DIR=str(slurm_cluster.state_dir)))
    assert status.returncode == 0


def test_a_second_cluster_comes_and_goes_without_disturbing_the_first(slurm_cluster, run_cmd):
    """Each cluster has its own state directory, ports, munged, MariaDB and slurmdbd: a second
    one runs jobs with its own accounting, and stopping it leaves the first one working."""
    ports = []
    for _ in range(3):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(str(sock.getsockname()[1]))
    # Under /tmp, not tmp_path: short socket paths, and a parent the munge and mysql users can
    # search (pytest's base directory is private).
    state = Path(tempfile.mkdtemp(prefix="sae-slurm-2nd-", dir="/tmp"))
    script_env = {**os.environ, "SLURM_LOCAL_DIR": str(state), "SLURM_LOCAL_CTLD_PORT": ports[0],
                  "SLURM_LOCAL_SLURMD_PORT": ports[1], "SLURM_LOCAL_DBD_PORT": ports[2]}
    second = {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    try:
        run_cmd([SCRIPT, "start"], timeout=120, env=script_env)
        job_id = run_cmd(["sbatch", "--parsable", "--wait", "--output=/dev/null", "--wrap", "true"],
                         timeout=60, env=second).stdout.strip().split(";")[0]
        deadline = time.monotonic() + 30
        while f"{job_id}|COMPLETED" not in (sacct := run_cmd(
                ["sacct", "-o", "JobID,State", "--parsable2", "-j", job_id], timeout=30,
                env=second)).stdout.splitlines():
            assert time.monotonic() < deadline, sacct.stdout
            time.sleep(0.3)
    finally:
        run_cmd([SCRIPT, "stop"], timeout=120, env=script_env)
    assert not state.exists()
    # The first cluster (its munged, slurmdbd, controller) is untouched.
    run_cmd(["sbatch", "--wait", "--output=/dev/null", "--wrap", "true"], timeout=60)
    run_cmd(["sacctmgr", "-n", "list", "cluster"], timeout=30)


def test_sbatch_runs_a_job_to_completion(slurm_cluster, run_cmd, tmp_path):
    out = tmp_path / "job.out"
    # --wait: sbatch returns when the job ends, with the job's exit status.
    submit = run_cmd(["sbatch", "--parsable", "--wait", f"--output={out}",
                      f"--partition={slurm_cluster.partition}",
                      "--wrap", "echo hello from job $SLURM_JOB_ID on $SLURMD_NODENAME"],
                     timeout=60)
    job_id = submit.stdout.strip().split(";")[0]
    assert out.read_text().strip() == f"hello from job {job_id} on localhost"
    # The accounting database (slurmdbd) has the job: the real sacct answers the query submitit
    # makes. slurmctld hands job records to slurmdbd asynchronously, hence the short wait.
    deadline = time.monotonic() + 30
    while True:
        sacct = run_cmd(["sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", job_id],
                        timeout=30)
        if f"{job_id}|COMPLETED|localhost" in sacct.stdout.splitlines():
            break
        assert time.monotonic() < deadline, sacct.stdout
        time.sleep(0.3)


def test_a_gpu_request_is_rejected_on_this_gpu_less_cluster(slurm_cluster, run_cmd):
    # Why conf/launcher/slurm.yaml must be told gpus_per_node=0 here (SAE_SLURM_GPUS_PER_NODE).
    submit = run_cmd(["sbatch", "--gpus-per-node=1", "--wrap", "true"], timeout=30, check=False)
    assert submit.returncode != 0
    assert "gres" in submit.stderr.lower()


def test_submitit_slurm_array_returns_results(slurm_cluster, tmp_path):
    import submitit

    # Name the executor: AutoExecutor alone would also pick SLURM here, but only because sbatch
    # is on PATH (see PITFALLS); the test must not depend on that.
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(timeout_min=5, cpus_per_task=1, mem_gb=1,
                               slurm_partition=slurm_cluster.partition)

    def square_in_array_task(x: int) -> tuple[int, str, str]:
        import os

        return x * x, os.environ["SLURM_ARRAY_JOB_ID"], os.environ["SLURM_ARRAY_TASK_ID"]

    jobs = executor.map_array(square_in_array_task, [3, 4])
    wait_for(jobs, timeout=90)
    results = [job.result() for job in jobs]
    array_id = jobs[0].job_id.split("_")[0]
    assert results == [(9, array_id, "0"), (16, array_id, "1")], slurm_cluster.logs()
    # The result file is written just before the task exits; SLURM then records COMPLETED.
    for job in jobs:
        wait_for_state(job, "COMPLETED", timeout=30)


# -- readiness checks (sae.grid.slurm_checks) ---------------------------------------------------------
def test_check_slurm_ready_accepts_the_running_cluster(slurm_cluster):
    check_slurm_ready(slurm_cluster.partition)
    check_slurm_ready(None)  # the default partition


def test_check_slurm_ready_names_a_missing_sbatch(slurm_cluster, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without any SLURM client
    with pytest.raises(RuntimeError, match=r"sbatch.*not found on PATH.*Fix:"):
        check_slurm_ready(slurm_cluster.partition)


def test_check_slurm_ready_names_an_unreachable_controller(slurm_cluster, monkeypatch, tmp_path):
    # The same cluster config, but pointing at a port where no controller listens.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    lines = [f"SlurmctldPort={free_port}" if line.startswith("SlurmctldPort=") else line
             for line in slurm_cluster.conf.read_text().splitlines()]
    conf = tmp_path / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    with pytest.raises(SlurmNotReady, match=r"controller is unreachable.*DOWN.*Fix:") as error:
        check_slurm_ready(slurm_cluster.partition)
    assert str(conf) in str(error.value)  # says which config it tried


def test_check_slurm_ready_names_a_missing_partition(slurm_cluster):
    with pytest.raises(RuntimeError, match=r"partition 'no-such-partition' does not exist") as error:
        check_slurm_ready("no-such-partition")
    assert slurm_cluster.partition in str(error.value)  # lists the ones that do exist


def test_scancel_of_a_running_task_is_seen_by_submitit(slurm_cluster, tmp_path):
    """Through sacct (the cluster's accounting), submitit learns that a cancelled task ended: it
    raises instead of waiting forever for a result that will never come."""
    import submitit

    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(timeout_min=5, cpus_per_task=1, mem_gb=1,
                               slurm_partition=slurm_cluster.partition)
    job = executor.submit(time.sleep, 120)
    wait_for_state(job, "RUNNING", timeout=60)
    subprocess.run(["scancel", job.job_id], check=True, timeout=30)
    wait_for([job], timeout=60)
    wait_for_state(job, "CANCELLED", timeout=30)
    job._results_timeout_s = 0  # do not wait 15 s for a result file (as submitit's own tests)
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        job.result()


# -- end to end: sweeps of `python -m sae.train` through launcher=slurm ---------------------------
REPO = Path(__file__).resolve().parent.parent
# A cell on a small planted dictionary. Processes are pinned to one thread: results must not
# depend on how many cores a process happened to see, so that a resumed cell can be compared
# bit for bit with an uninterrupted one.
CELL = ["dataset=synthetic", "sae=tiny", "sae.n_latents=64", "logger=none",
        "train.progress=false", "train.batch_size=256", "train.epochs=1000",
        "dataset.n_train=2048", "dataset.n_eval=512", "eval.probe_max_train=512",
        "eval.probe_epochs=2",
        # The local cluster shares one disk: a task's result file shows at once, so a task that
        # ended without one has none (the default waits 15 s for a slow shared filesystem).
        "launcher.result_grace_s=1"]
QUICK = ["train.max_steps=20"]
# Long enough to be interrupted between its first checkpoint (step 50) and its end (the test
# reacts within ~0.1 s; ~70 steps/s on a loaded 2-core machine, a few hundred when idle).
LONG_STEPS = 400
LONG = [f"train.max_steps={LONG_STEPS}", "train.checkpoint_every=50", "train.log_every=50",
        "train.progress=true"]
SWEEP_TIMEOUT_S = 240  # a hung launcher fails the test instead of the whole suite


def sweep_env(cluster, root: Path) -> dict[str, str]:
    return cluster.env(SAE_OUTPUT_ROOT=str(root), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                       WANDB_MODE="disabled", HYDRA_FULL_ERROR="1")


def train_cmd(*overrides: str, multirun: bool = True) -> list[str]:
    return [sys.executable, "-m", "sae.train", *(["-m"] if multirun else []), *overrides]


def run_dirs(root: Path) -> dict[tuple[int, int], Path]:
    """(k, seed) -> run directory, for the runs under ``root`` that have started."""
    found = {}
    for identity in (root / "runs").glob("*/identity.json"):
        semantic = json.loads(identity.read_text())
        found[(semantic["k"], semantic["seed"])] = identity.parent
    return found


def status(run_dir: Path) -> dict:
    return read_status(run_dir) or {}


def test_sweep_of_four_cells_runs_each_as_an_array_task(slurm_cluster, run_cmd, tmp_path):
    started = time.perf_counter()
    result = run_cmd(train_cmd("launcher=slurm", "sweep_name=slurm4", "k=4,8", "seed=0,1",
                               *CELL, *QUICK),
                     env=sweep_env(slurm_cluster, tmp_path), cwd=REPO, timeout=SWEEP_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    runs = run_dirs(tmp_path)
    assert sorted(runs) == [(4, 0), (4, 1), (8, 0), (8, 1)], result.stdout
    statuses = {cell: status(d) for cell, d in runs.items()}
    assert {cell: s.get("state") for cell, s in statuses.items()} == dict.fromkeys(runs, "done")
    for run_dir in runs.values():
        assert (run_dir / "metrics.json").is_file() and (run_dir / "model.safetensors").is_file()
    # One SLURM job array for the sweep, one task per cell, recorded in each run's status.
    slurm = [s["slurm"] for s in statuses.values()]
    assert len({s["slurm_array_job_id"] for s in slurm}) == 1, slurm
    assert sorted(int(s["slurm_array_task_id"]) for s in slurm) == [0, 1, 2, 3]
    assert len({s["slurm_job_id"] for s in slurm}) == 4
    # Each run names its task's log files, and links the log beside its outputs (issue 23).
    for run_dir, state in zip(runs.values(), statuses.values()):
        log_file = Path(state["logs"]["stdout"])
        assert log_file.is_file() and (run_dir / "slurm.out").resolve() == log_file.resolve()
        logged = log_file.read_text() + Path(state["logs"]["stderr"]).read_text()
        assert f"run {run_dir.name} done" in logged
    print(f"4-cell SLURM sweep: {elapsed:.1f} s")


@pytest.fixture(scope="module")
def interrupted_sweep(slurm_cluster, run_cmd, tmp_path_factory):
    """A 3-cell sweep through launcher=slurm. As soon as each cell has written a checkpoint:
    seed 0 is cancelled (`scancel`), seed 1 requeued (`scontrol requeue`), and seed 2 preempted
    the way a time limit or a preemption does it (USR2: submitit calls the launcher's
    checkpoint() and requeues the task itself). When all have ended, the sweep is launched
    again. Beside it, seed 1 runs uninterrupted (launcher=local) as the reference.
    Returns what the tests below check."""
    root = tmp_path_factory.mktemp("interrupted")
    reference_root = tmp_path_factory.mktemp("reference")
    sweep = train_cmd("launcher=slurm", "sweep_name=interrupted", "k=8", "seed=0,1,2", *CELL,
                      *LONG)
    env = sweep_env(slurm_cluster, root)
    story: dict = {"root": root, "reference_root": reference_root,
                   "sweep_dir": root / "sweeps" / "interrupted"}
    with ThreadPoolExecutor(max_workers=2) as pool:
        reference = pool.submit(run_cmd, train_cmd("seed=1", "k=8", *CELL, *LONG,
                                                    multirun=False),
                                env=sweep_env(slurm_cluster, reference_root), cwd=REPO,
                                timeout=SWEEP_TIMEOUT_S)
        first = pool.submit(run_cmd, sweep, env=env, cwd=REPO, timeout=SWEEP_TIMEOUT_S,
                            check=False)
        story.update(interrupt_after_first_checkpoint(
            root, {"cancelled": (8, 0), "requeued": (8, 1), "preempted": (8, 2)},
            timeout=SWEEP_TIMEOUT_S))
        story["first"] = first.result()
        story["reference"] = reference.result()
    # The launcher waits for every task (the cancelled one included); make sure all ended.
    for name in ("requeued", "preempted"):
        run_dir = story[name]["run_dir"]
        deadline = time.monotonic() + SWEEP_TIMEOUT_S
        while status(run_dir).get("state") not in ("done", "failed"):
            assert time.monotonic() < deadline, f"{name} cell never ended: {status(run_dir)}"
            time.sleep(0.5)
    cancelled_dir = story["cancelled"]["run_dir"]
    story["cancelled_state_before_relaunch"] = run_state(cancelled_dir)
    story["cancelled_had_metrics"] = (cancelled_dir / "metrics.json").exists()
    story["relaunch"] = run_cmd(sweep, env=env, cwd=REPO, timeout=SWEEP_TIMEOUT_S, check=False)
    return story


# How each interruption is delivered. scancel / scontrol requeue: SLURM ends the task's
# processes itself, but only seconds later (SIGTERM, which submitit ignores, then SIGKILL;
# measured ~5 s on a loaded machine even with KillWait=0) -- long enough for a small cell to
# finish, which would make the test meaningless on a fast machine. So the test freezes the cell
# (SIGSTOP) the moment its checkpoint appears, issues the SLURM command, then kills the cell's
# process (its pid is in status.json) as SLURM would after its grace period. USR2 needs no help:
# submitit's handler checkpoints the job, runs `scontrol requeue` and exits at once.
INTERRUPTIONS = {
    "cancelled": (["scancel"], True),
    "requeued": (["scontrol", "requeue"], True),
    "preempted": (["scancel", "--signal=USR2"], False),
}


def interrupt_after_first_checkpoint(root: Path, targets: dict[str, tuple[int, int]],
                                     timeout: float) -> dict[str, dict]:
    """Watch the run directories of the (k, seed) ``targets``; as soon as one has written a
    checkpoint, interrupt its SLURM task as INTERRUPTIONS says. Returns, per target: run dir,
    SLURM ids, and the checkpoint step at the interruption."""
    done: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(done) < len(targets):
        assert time.monotonic() < deadline, f"no checkpoint to interrupt at within {timeout} s"
        runs = run_dirs(root)
        for name, cell in targets.items():
            run_dir = runs.get(cell)
            if name in done or run_dir is None:
                continue
            sidecar = run_dir / "checkpoints" / "last.json"
            if not sidecar.exists():
                continue
            state = status(run_dir)
            assert state.get("state") == "running", (
                f"cell {cell} ended ({state}) before it could be interrupted: raise LONG_STEPS")
            command, kill = INTERRUPTIONS[name]
            pid = int(state["pid"])
            assert "submitit" in Path(f"/proc/{pid}/cmdline").read_text(), "not the cell's process"
            if kill:
                os.kill(pid, signal.SIGSTOP)
            step = json.loads(sidecar.read_text())["step"]
            # `<array job>_<task>`: the bare SLURM_JOB_ID of one task can equal the array's id,
            # and `scancel <array id>` would cancel every task of the sweep.
            slurm = state["slurm"]
            job_id = f"{slurm['slurm_array_job_id']}_{slurm['slurm_array_task_id']}"
            subprocess.run([*command, job_id], check=True, timeout=30)
            if kill:
                os.kill(pid, signal.SIGKILL)
            done[name] = {"run_dir": run_dir, "job_id": job_id, "step": step, "slurm": slurm}
        time.sleep(0.1)
    return done


def logs_under(directory: Path) -> str:
    """Every log the sweep wrote: Hydra's job logs and submitit's per-task stdout/stderr."""
    texts = [p.read_text(errors="replace") for p in directory.rglob("*")
             if p.is_file() and p.suffix in (".log", ".out", ".err")]
    return "\n".join(texts)


def flat_numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The metrics as {dotted key: value}, without wall-clock times and the resume marker."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if key == "resumed_from_step" or key.endswith("seconds") or "time" in key:
            continue
        if isinstance(value, dict):
            flat.update(flat_numbers(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def test_requeued_cell_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(
        interrupted_sweep):
    requeued = interrupted_sweep["requeued"]
    run_dir = requeued["run_dir"]
    final = status(run_dir)
    assert final["state"] == "done", final
    # Same SLURM task, second start (SLURM counts requeues in SLURM_RESTART_COUNT).
    assert final["slurm"]["slurm_job_id"] == requeued["slurm"]["slurm_job_id"]
    assert final["slurm"].get("slurm_restart_count") == "1", final["slurm"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    resumed = metrics["train"]["resumed_from_step"]
    assert resumed is not None and requeued["step"] <= resumed < LONG_STEPS, metrics["train"]
    assert metrics["train"]["steps"] == LONG_STEPS
    task_logs = logs_under(interrupted_sweep["sweep_dir"] / ".submitit" / requeued["job_id"])
    assert f"at step {resumed}" in task_logs, "the task's log does not show the resumed step"
    # The interrupted cell ends exactly where the uninterrupted reference ends.
    reference_dir = run_dirs(interrupted_sweep["reference_root"])[(8, 1)]
    assert reference_dir.name == run_dir.name  # same run id: the same cell
    reference_metrics = json.loads((reference_dir / "metrics.json").read_text())
    assert reference_metrics["train"]["resumed_from_step"] is None
    weights = load_file(run_dir / "model.safetensors")
    reference_weights = load_file(reference_dir / "model.safetensors")
    assert weights.keys() == reference_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], reference_weights[name]), name
    assert flat_numbers(metrics) == flat_numbers(reference_metrics)


def test_preempted_cell_is_requeued_by_submitit_and_resumes(interrupted_sweep):
    """USR2 is what SLURM sends signal_delay_s before a time limit (and what a preemption
    looks like to submitit): the launcher's checkpoint() resubmits the same cell, submitit
    requeues the task, and the cell resumes from its checkpoint."""
    preempted = interrupted_sweep["preempted"]
    final = status(preempted["run_dir"])
    assert final["state"] == "done", final
    assert final["slurm"]["slurm_job_id"] == preempted["slurm"]["slurm_job_id"]
    assert final["slurm"].get("slurm_restart_count") == "1", final["slurm"]
    metrics = json.loads((preempted["run_dir"] / "metrics.json").read_text())
    resumed = metrics["train"]["resumed_from_step"]
    assert resumed is not None and preempted["step"] <= resumed < LONG_STEPS, metrics["train"]
    assert metrics["train"]["steps"] == LONG_STEPS
    task_logs = logs_under(interrupted_sweep["sweep_dir"] / ".submitit" / preempted["job_id"])
    assert "this job is preempted" in task_logs
    assert f"Requeued job {preempted['job_id']}" in task_logs
    assert f"at step {resumed}" in task_logs


def test_cancelled_cell_is_never_done_and_the_relaunch_reruns_it(interrupted_sweep):
    cancelled = interrupted_sweep["cancelled"]
    # Killed mid-training: the status file still says running (nothing could write more) but
    # nobody holds the run's lock, so the run reads as interrupted; no metrics exist, never a
    # `done` with partial results.
    assert interrupted_sweep["cancelled_state_before_relaunch"] in ("new", "interrupted")
    assert not interrupted_sweep["cancelled_had_metrics"]
    # The first launch did not hang on the cancelled task: it exited non-zero, naming its state.
    first = interrupted_sweep["first"]
    assert first.returncode != 0
    assert "CANCELLED" in first.stdout + first.stderr
    # The relaunch re-ran the cancelled cell and skipped the two that had finished.
    relaunch = interrupted_sweep["relaunch"]
    assert relaunch.returncode == 0, relaunch.stdout + relaunch.stderr
    plan = json.loads((interrupted_sweep["sweep_dir"] / "cells.json").read_text())["cells"]
    outcome = {Path(c["run_dir"]).name: (c["state"], c["result"]) for c in plan}
    assert outcome == {
        cancelled["run_dir"].name: ("interrupted", "done"),
        interrupted_sweep["requeued"]["run_dir"].name: ("done", "skipped"),
        interrupted_sweep["preempted"]["run_dir"].name: ("done", "skipped"),
    }
    final = status(cancelled["run_dir"])
    assert final["state"] == "done", final
    # A new SLURM job (submitit submits a lone cell as a plain job, not an array).
    assert final["slurm"]["slurm_job_id"] != cancelled["slurm"]["slurm_job_id"]
    metrics = json.loads((cancelled["run_dir"] / "metrics.json").read_text())
    assert metrics["train"]["steps"] == LONG_STEPS
    assert cancelled["step"] <= metrics["train"]["resumed_from_step"] < LONG_STEPS


# -- the launcher configs (no cluster needed) ------------------------------------------------------
def launcher_params(*overrides: str) -> dict:
    """hydra.launcher of `python -m sae.train <overrides>`, resolved as the launcher sees it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sae.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_slurm_launcher_defaults_hold_no_cluster_facts(monkeypatch):
    for name in ("PARTITION", "ACCOUNT", "QOS", "GPUS_PER_NODE", "CPUS_PER_TASK", "MEM_GB"):
        monkeypatch.delenv(f"SAE_SLURM_{name}", raising=False)
    params = launcher_params("launcher=slurm", "sweep_name=paper")
    assert params["_target_"].endswith("SlurmLauncher")
    assert params["partition"] is None and params["account"] is None and params["qos"] is None
    assert params["gpus_per_node"] == 1
    # Never the plugin's 60 minutes; timed-out tasks are requeued and resume (max_num_timeout).
    assert params["timeout_min"] > 60 and params["max_num_timeout"] >= 1
    assert params["additional_parameters"] == {"requeue": True}
    assert params["submitit_folder"].endswith("sweeps/paper/.submitit/%j")


def test_slurm_launcher_takes_cluster_facts_from_env_and_command_line(monkeypatch):
    monkeypatch.setenv("SAE_SLURM_PARTITION", "gpu-a100")
    monkeypatch.setenv("SAE_SLURM_ACCOUNT", "proj42")
    monkeypatch.setenv("SAE_SLURM_GPUS_PER_NODE", "0")
    monkeypatch.setenv("SAE_SLURM_MEM_GB", "2")
    params = launcher_params("launcher=slurm")
    assert (params["partition"], params["account"]) == ("gpu-a100", "proj42")
    assert (params["gpus_per_node"], params["mem_gb"]) == (0, 2)  # ints, as sbatch needs
    params = launcher_params("launcher=slurm", "hydra.launcher.gpus_per_node=2",
                             "hydra.launcher.partition=debug")
    assert (params["gpus_per_node"], params["partition"]) == (2, "debug")


def test_submitit_local_launcher_never_times_out_after_an_hour(monkeypatch):
    monkeypatch.delenv("SAE_LOCAL_GPUS", raising=False)
    params = launcher_params("launcher=submitit_local")
    assert params["_target_"].endswith("LocalLauncher")
    assert params["timeout_min"] >= 24 * 60 and params["gpus_per_node"] == 1


# -- the launcher survives any task outcome (issue 13 item 3) -------------------------------------
def test_a_cancelled_task_does_not_crash_the_launcher(slurm_cluster, run_cmd, tmp_path):
    """One quick cell and one long cell in one array; the long one is `scancel`ed while it
    trains. The launcher waits for both, records each end in cells.json, prints a summary and
    exits non-zero without a traceback; the relaunch runs exactly the cancelled cell."""
    sweep = train_cmd("launcher=slurm", "sweep_name=survive", "k=8", "seed=0",
                      "train.max_steps=20,100000", *CELL)
    env = {**sweep_env(slurm_cluster, tmp_path), "HYDRA_FULL_ERROR": "0"}
    sweep_dir = tmp_path / "sweeps" / "survive"
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(run_cmd, sweep, env=env, cwd=REPO, timeout=SWEEP_TIMEOUT_S,
                            check=False)
        deadline = time.monotonic() + SWEEP_TIMEOUT_S
        long_dir = None
        while long_dir is None:
            assert time.monotonic() < deadline and not first.done(), "the long cell never ran"
            for identity in (tmp_path / "runs").glob("*/identity.json"):
                if json.loads(identity.read_text())["train"]["max_steps"] == 100000 and \
                        status(identity.parent).get("state") == "running":
                    long_dir = identity.parent
            time.sleep(0.2)
        slurm = status(long_dir)["slurm"]
        subprocess.run(["scancel", f"{slurm['slurm_array_job_id']}_{slurm['slurm_array_task_id']}"],
                       check=True, timeout=30)
        result = first.result()
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output and "UncompletedJobError" not in output, output
    assert "sweep survive: 1 done, 0 failed, 1 cancelled" in output, output
    print("\n".join(line for line in output.splitlines() if "sweep survive:" in line
                    or "did not finish" in line or "cancelled: task ended" in line))
    cells = json.loads((sweep_dir / "cells.json").read_text())["cells"]
    results = {Path(c["run_dir"]).name: c["result"] for c in cells}
    assert results[long_dir.name] == "cancelled", cells
    assert sorted(results.values()) == ["cancelled", "done"], cells
    assert run_state(long_dir) == "interrupted"
    # The relaunch picks up exactly the unfinished cell (cut short: it is a long one).
    relaunch = run_cmd([*sweep, "dry_run=true"], env=env, cwd=REPO, timeout=SWEEP_TIMEOUT_S)
    assert "1 done (skipped)" in relaunch.stdout and "1 interrupted (resumed)" in relaunch.stdout
