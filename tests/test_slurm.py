"""SLURM for real: a single-node cluster (scripts/slurm_local.sh), sbatch, submitit arrays, and
the readiness checks a slurm sweep runs before it submits anything.

Every test here uses the session fixture ``slurm_cluster`` (tests/conftest.py), which starts
the cluster once and stops it at the end of the session.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from sae.slurm_checks import SlurmNotReady, check_slurm_ready

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


def test_sbatch_runs_a_job_to_completion(slurm_cluster, run_cmd, tmp_path):
    out = tmp_path / "job.out"
    # --wait: sbatch returns when the job ends, with the job's exit status.
    submit = run_cmd(["sbatch", "--parsable", "--wait", f"--output={out}",
                      f"--partition={slurm_cluster.partition}",
                      "--wrap", "echo hello from job $SLURM_JOB_ID on $SLURMD_NODENAME"],
                     timeout=60)
    job_id = submit.stdout.strip().split(";")[0]
    assert out.read_text().strip() == f"hello from job {job_id} on localhost"
    # The finished job stays in the controller's table (MinJobAge), which the sacct stand-in
    # reads: submitit sees COMPLETED as it would through a real sacct.
    sacct = run_cmd(["sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", job_id],
                    timeout=30)
    assert f"{job_id}|COMPLETED|localhost" in sacct.stdout.splitlines()


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


# -- readiness checks (sae.slurm_checks) ---------------------------------------------------------
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
    """Through the sacct stand-in, submitit learns that a cancelled task ended: it raises
    instead of waiting forever for a result that will never come."""
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
