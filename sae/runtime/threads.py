"""Torch's CPU thread count = the CPUs allocated to this task.

torch's default (every core of the machine) oversubscribes shared nodes: two CPU cells at once
on 2 cores ran at 127 steps/s each against 440 with one thread each, and SLURM tasks with
``cpus_per_task=1`` at 6 steps/s against 206 alone (PITFALLS.md, Threads). The count also
changes results slightly (reduction order), so it is recorded in metrics.json and the method
card; it is not part of the run id (where a cell runs does not name it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Set by the submitit_local launcher (hydra_plugins/sae_sweeper/launchers.py): how many cells
# its LocalExecutor runs at once on this machine, all sharing its cores.
PARALLEL_TASKS_ENV = "SAE_PARALLEL_TASKS"


def allocated_threads(env: Mapping[str, str], affinity: int) -> tuple[int, str]:
    """(threads, where the number comes from), in this order: an explicit OMP_NUM_THREADS,
    SLURM's CPUs of the task, the process's CPU affinity shared by the local parallel tasks,
    the affinity alone."""
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        if env.get(name, "").isdigit() and int(env[name]) > 0:
            return int(env[name]), name
    parallel = env.get(PARALLEL_TASKS_ENV, "")
    if parallel.isdigit() and int(parallel) > 1:
        return (max(1, affinity // int(parallel)),
                f"process affinity / {int(parallel)} parallel tasks")
    return max(1, affinity), "process affinity"


def process_affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_torch_threads() -> dict[str, int | str]:
    """Apply the allocation to torch; returns what metrics.json records."""
    import torch

    count, source = allocated_threads(os.environ, process_affinity())
    torch.set_num_threads(count)
    return {"count": count, "source": source}
