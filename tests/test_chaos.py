"""A chaos sweep (issue 13): six cells through launcher=slurm on the real local cluster while the
test breaks them -- `kill -9`, `scancel`, `scontrol requeue`, a SIGTERM and a truncated
checkpoint -- then relaunches until every cell is done. Every cell must end ``done`` with the
weights of an undisturbed run of the same sweep, bit for bit (resume from a checkpoint is exact
on CPU with one thread), and the same metrics (to 1e-6).

Each fault hits its own cell as soon as that cell has written a checkpoint (two, for the
corrupted one), so it always lands mid-training. A cell to be ended by SLURM is frozen first
(SIGSTOP) and killed after the SLURM command, as SLURM does after its grace period: SLURM alone
takes seconds, in which a small cell could finish (see tests/test_slurm.py, INTERRUPTIONS).

The packed chaos sweep does the same to packs (``pack=2``: eight cells, four jobs of two
members): each job gets one of `kill -9`, SIGTERM, `scancel` and `scontrol requeue`, when its
members' checkpoints are at one step (checked with the job frozen, so the fault never lands
between two members' checkpoint writes); every member must end ``done`` with the weights of an
undisturbed packed sweep, bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae.grid.runs import run_state
from tests.test_slurm import (
    CELL,
    REPO,
    SWEEP_TIMEOUT_S,
    flat_numbers,
    logs_under,
    run_dirs,
    status,
    sweep_env,
    train_cmd,
)

pytestmark = pytest.mark.slurm

STEPS = 400
GRID = ["k=4,8", "seed=0,1,2", f"train.max_steps={STEPS}", "train.checkpoint_every=20",
        "train.log_every=20"]
MAX_RELAUNCHES = 3
# (k, seed) -> the fault it gets; (8, 2) is left alone.
FAULTS = {(4, 0): "kill -9", (4, 1): "scancel", (4, 2): "scontrol requeue",
          (8, 0): "SIGTERM", (8, 1): "corrupt checkpoint + kill -9"}


def task_id(state: dict) -> str:
    """``<array job>_<task>``: the bare job id of a task can be the array's (scancel'ing all)."""
    slurm = state["slurm"]
    return f"{slurm['slurm_array_job_id']}_{slurm['slurm_array_task_id']}"


def truncate_newest_checkpoint(run_dir: Path) -> Path:
    """Truncate last.safetensors (prev.safetensors if the frozen cell was rotating them)."""
    for name in ("last.safetensors", "prev.safetensors"):
        path = run_dir / "checkpoints" / name
        if path.exists():
            path.write_bytes(path.read_bytes()[:100])
            return path
    raise AssertionError(f"no checkpoint to corrupt in {run_dir}")


def inject(fault: str, run_dir: Path) -> dict:
    """Apply ``fault`` to the cell training in ``run_dir``; returns what was done."""
    state = status(run_dir)
    assert state.get("state") == "running", f"{run_dir.name} ended before its fault: {state}"
    pid = int(state["pid"])
    assert "submitit" in Path(f"/proc/{pid}/cmdline").read_text(), "not the cell's process"
    record = {"run_dir": run_dir, "step": json.loads(
        (run_dir / "checkpoints" / "last.json").read_text())["step"], "faults": 1}
    if fault == "kill -9":
        os.kill(pid, signal.SIGKILL)
    elif fault == "SIGTERM":
        os.kill(pid, signal.SIGTERM)
    elif fault in ("scancel", "scontrol requeue"):
        os.kill(pid, signal.SIGSTOP)
        subprocess.run([*fault.split(), task_id(state)], check=True, timeout=30)
        os.kill(pid, signal.SIGKILL)
    else:  # the checkpoint is damaged while the cell is frozen, then the cell dies
        os.kill(pid, signal.SIGSTOP)
        record["corrupted"] = truncate_newest_checkpoint(run_dir)
        os.kill(pid, signal.SIGKILL)
        record["faults"] = 2
    return record


def ready_for(fault: str, run_dir: Path) -> bool:
    """A checkpoint exists (for the corruption: two, so an older one can take over)."""
    checkpoints = run_dir / "checkpoints"
    needed = ("last.json", "prev.json") if fault.startswith("corrupt") else ("last.json",)
    return all((checkpoints / name).exists() for name in needed)


def break_cells(root: Path, launch) -> dict[tuple[int, int], dict]:
    """Inject every fault of FAULTS while the first launch runs."""
    done: dict[tuple[int, int], dict] = {}
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    while len(done) < len(FAULTS):
        assert time.monotonic() < deadline, f"faults injected only into {sorted(done)}"
        assert not launch.done() or len(done) == len(FAULTS), launch.result().stdout[-3000:]
        for cell, run_dir in run_dirs(root).items():
            if cell in FAULTS and cell not in done and ready_for(FAULTS[cell], run_dir):
                done[cell] = inject(FAULTS[cell], run_dir)
        time.sleep(0.05)
    return done


def wait_until_no_cell_runs(root: Path) -> None:
    """The launcher returns once SLURM says every task ended; a requeued task may still be
    finishing its status file. Wait until no cell's lock is held."""
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    while any(run_state(d) == "running" for d in run_dirs(root).values()):
        assert time.monotonic() < deadline, "a cell is still running"
        time.sleep(0.5)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in a)


def assert_close(got, expected, where: str) -> None:
    """Numbers to 1e-6 (lists and dicts element by element), everything else equal."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            assert_close(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_close(g, e, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(expected, bool):
        assert math.isclose(got, expected, rel_tol=0, abs_tol=1e-6) or (
            math.isnan(got) and math.isnan(expected)), (where, got, expected)
    else:
        assert got == expected, (where, got, expected)


def relaunch_until_done(root: Path, sweep: list[str], env: dict, run_cmd) -> tuple[list, int]:
    """Wait for the cells to stop, then relaunch the sweep until every cell is done."""
    wait_until_no_cell_runs(root)
    launches, relaunches = [], 0
    while any(run_state(d) != "done" for d in run_dirs(root).values()):
        assert relaunches < MAX_RELAUNCHES, {c: run_state(d) for c, d in run_dirs(root).items()}
        relaunches += 1
        launches.append(run_cmd(sweep, env=env, cwd=REPO, timeout=SWEEP_TIMEOUT_S, check=False))
        wait_until_no_cell_runs(root)
    return launches, relaunches


def assert_same_runs(root: Path, reference_root: Path, count: int) -> float:
    """Every run done with the reference's run id, weights (bit for bit) and metrics (1e-6);
    returns the largest weight difference (0)."""
    runs, reference_runs = run_dirs(root), run_dirs(reference_root)
    assert sorted(runs) == sorted(reference_runs) and len(runs) == count
    worst = 0.0
    for cell, run_dir in runs.items():
        assert status(run_dir)["state"] == "done", (cell, status(run_dir))
        assert reference_runs[cell].name == run_dir.name  # the same run ids
        weights = load_file(run_dir / "model.safetensors")
        expected = load_file(reference_runs[cell] / "model.safetensors")
        worst = max(worst, max_abs_diff(weights, expected))
        for name in expected:
            assert torch.equal(weights[name], expected[name]), (cell, name)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        reference_metrics = json.loads((reference_runs[cell] / "metrics.json").read_text())
        assert_close(flat_numbers(metrics), flat_numbers(reference_metrics), str(cell))
    return worst


def sweep_under_faults(cluster, run_cmd, tmp_path: Path, name: str, grid: list[str],
                       break_them) -> tuple[Path, Path, object, int]:
    """The sweep on SLURM while ``break_them(root, launch)`` breaks it, the same sweep
    undisturbed (launcher=local) beside it, then relaunches until every cell is done. Returns
    (root, reference root, what was broken, relaunches)."""
    root, reference_root = tmp_path / "chaos", tmp_path / "reference"
    sweep = train_cmd("launcher=slurm", f"sweep_name={name}", *CELL, *grid)
    env = {**sweep_env(cluster, root), "HYDRA_FULL_ERROR": "0"}
    with ThreadPoolExecutor(max_workers=2) as pool:
        reference = pool.submit(run_cmd, train_cmd("launcher=local", "sweep_name=reference",
                                                   *CELL, *grid),
                                env=sweep_env(cluster, reference_root), cwd=REPO,
                                timeout=SWEEP_TIMEOUT_S)
        first = pool.submit(run_cmd, sweep, env=env, cwd=REPO, timeout=SWEEP_TIMEOUT_S,
                            check=False)
        injected = break_them(root, first)
        launches = [first.result()]
        reference.result()
    more, relaunches = relaunch_until_done(root, sweep, env, run_cmd)
    output = "\n".join(r.stdout + r.stderr for r in [*launches, *more])
    assert "Traceback" not in output, output[-5000:]
    return root, reference_root, injected, relaunches


def test_a_sweep_under_faults_ends_done_with_the_undisturbed_weights(
        slurm_cluster, run_cmd, tmp_path):
    started = time.perf_counter()
    root, reference_root, injected, relaunches = sweep_under_faults(
        slurm_cluster, run_cmd, tmp_path, "chaos", GRID, break_cells)
    elapsed = time.perf_counter() - started
    worst = assert_same_runs(root, reference_root, 6)
    runs = run_dirs(root)
    for cell, run_dir in runs.items():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        fresh = cell == (8, 1) and injected[cell]["corrupted"].name == "prev.safetensors"
        if cell in FAULTS and not fresh:  # every broken cell resumed from a checkpoint
            assert metrics["train"]["resumed_from_step"] is not None, (cell, metrics["train"])

    # The corrupt checkpoint was set aside with a warning naming it; an older one took over.
    corrupted = injected[(8, 1)]["corrupted"]
    logs = logs_under(root / "sweeps" / "chaos")
    assert f"corrupt checkpoint {corrupted} moved to" in logs, logs[-3000:]
    assert list(corrupted.parent.glob(f"{corrupted.name}.corrupt-*"))
    faults = sum(record["faults"] for record in injected.values())
    print(f"chaos sweep: {faults} faults injected into {len(injected)} of {len(runs)} cells, "
          f"{relaunches} relaunch(es), max |weight difference| vs undisturbed {worst:g}, "
          f"{elapsed:.0f} s")


# ---------------------------------------------------------------- packs
PACK_GRID = ["k=4,8", "seed=0,1,2,3", "pack=2", f"train.max_steps={STEPS}",
             "train.checkpoint_every=20", "train.log_every=20"]
PACK_FAULTS = ("kill -9", "SIGTERM", "scancel", "scontrol requeue")  # one per pack, in the
# order the packs are first seen training


def packs_training(root: Path) -> dict[int, list[Path]]:
    """pid -> the run directories of the pack that process trains (its members' status)."""
    packs: dict[int, list[Path]] = {}
    for run_dir in run_dirs(root).values():
        state = status(run_dir)
        if state.get("state") == "running" and "pid" in state:
            packs.setdefault(int(state["pid"]), []).append(run_dir)
    return packs


def checkpoint_steps(members: list[Path]) -> set[int | None]:
    steps = set()
    for run_dir in members:
        path = run_dir / "checkpoints" / "last.json"
        steps.add(json.loads(path.read_text())["step"] if path.exists() else None)
    return steps


def inject_into_pack(fault: str, pid: int, members: list[Path]) -> dict | None:
    """Freeze the pack's process; when every member's checkpoint is at one step, apply
    ``fault`` and return what was done, else let it go on (None: try again)."""
    try:
        assert "submitit" in Path(f"/proc/{pid}/cmdline").read_text(), "not the pack's process"
        os.kill(pid, signal.SIGSTOP)
    except (FileNotFoundError, ProcessLookupError):  # it ended meanwhile
        return None
    steps = checkpoint_steps(members)
    if len(steps) != 1 or None in steps:
        os.kill(pid, signal.SIGCONT)
        return None
    if fault == "kill -9":
        os.kill(pid, signal.SIGKILL)
    elif fault == "SIGTERM":
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGCONT)
    else:  # SLURM ends the frozen task, then it dies as after SLURM's grace period
        subprocess.run([*fault.split(), task_id(status(members[0]))], check=True, timeout=30)
        os.kill(pid, signal.SIGKILL)
    return {"fault": fault, "step": steps.pop(), "members": members}


def break_packs(root: Path, launch) -> list[dict]:
    """Inject one fault of PACK_FAULTS into each pack while the first launch runs."""
    injected: list[dict] = []
    seen: set[frozenset[Path]] = set()  # packs, by members: a requeued pack has a new pid
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    while len(injected) < len(PACK_FAULTS):
        assert time.monotonic() < deadline, f"faults injected into {len(injected)} packs only"
        assert not launch.done(), launch.result().stdout[-3000:]
        for pid, members in packs_training(root).items():
            if frozenset(members) in seen or len(members) < 2 or None in checkpoint_steps(
                    members):  # freeze a pack only once every member has a checkpoint
                continue
            record = inject_into_pack(PACK_FAULTS[len(injected)], pid, members)
            if record is not None:
                seen.add(frozenset(members))
                injected.append(record)
                break  # the pack list is stale now
        time.sleep(0.05)
    return injected


def test_a_packed_sweep_under_faults_ends_done_with_the_undisturbed_weights(
        slurm_cluster, run_cmd, tmp_path):
    started = time.perf_counter()
    root, reference_root, injected, relaunches = sweep_under_faults(
        slurm_cluster, run_cmd, tmp_path, "packchaos", PACK_GRID, break_packs)
    worst = assert_same_runs(root, reference_root, 8)
    tasks = {cell: task_id(status(d)) for cell, d in run_dirs(root).items()}
    assert len(set(tasks.values())) == 4, tasks  # one array task a pack of two: the grid
    assert all(tasks[(k, s)] == tasks[(k, s + 1)] for k in (4, 8) for s in (0, 2)), tasks
    for record in injected:  # every member of a broken pack resumed from its checkpoint
        assert len({task_id(status(d)) for d in record["members"]}) == 1, record
        for run_dir in record["members"]:
            train = json.loads((run_dir / "metrics.json").read_text())["train"]
            assert train["resumed_from_step"] is not None, (record["fault"], train)
    print(f"packed chaos sweep: {len(injected)} faults injected into {len(injected)} packs of "
          f"2, {relaunches} relaunch(es), max |weight difference| vs undisturbed {worst:g}, "
          f"{time.perf_counter() - started:.0f} s")
