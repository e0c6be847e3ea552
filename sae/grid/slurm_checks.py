"""Is SLURM ready to take a sweep? Checked before a ``launcher=slurm`` sweep submits anything.

Without these checks, the submitit launcher fails late and obscurely: a missing ``sbatch``
surfaces as a ``FileNotFoundError`` deep in submitit, an unreachable controller as a retrying
``sbatch`` that gives up after minutes, an unknown partition as a bare sbatch error. Each check
here raises a :class:`SlurmNotReady` (a ``RuntimeError``) naming the problem and the fix.

Only the SLURM command-line clients are used (``sbatch``, ``scontrol``, ``sinfo``); this module
imports nothing of submitit or torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess

# A reachable controller answers `scontrol ping` in milliseconds; an unreachable one makes the
# client retry for up to MessageTimeout (10 s by default) before it reports the controller DOWN.
CLIENT_TIMEOUT_S = 30


class SlurmNotReady(RuntimeError):
    """SLURM cannot take jobs; the message names the problem and the fix."""


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise SlurmNotReady(
            f"`{' '.join(args)}` did not answer within {CLIENT_TIMEOUT_S} s: the SLURM "
            f"controller is unreachable. {_controller_fix()}") from exc


def _controller_fix() -> str:
    conf = os.environ.get("SLURM_CONF")
    where = f"SLURM_CONF={conf}" if conf else "the default /etc/slurm/slurm.conf (SLURM_CONF unset)"
    return (f"Fix: submit from a login node of the cluster, check that the controller named in "
            f"{where} is up (`scontrol ping`), or for the local test cluster run "
            f"`eval \"$(scripts/slurm_local.sh start)\"`")


def check_sbatch() -> str:
    """The path of ``sbatch``; raises when it (or the other clients) is not on PATH."""
    missing = [tool for tool in ("sbatch", "scontrol", "sinfo") if shutil.which(tool) is None]
    if missing:
        raise SlurmNotReady(
            f"{', '.join(missing)} not found on PATH: this machine is not a SLURM submission "
            f"host. Fix: run the sweep on a login node of the cluster (or load its module, "
            f"e.g. `module load slurm`), use launcher=local or launcher=submitit_local, or "
            f"start the local test cluster with `eval \"$(scripts/slurm_local.sh start)\"`")
    return str(shutil.which("sbatch"))


def check_controller() -> None:
    """Raises unless ``scontrol ping`` reports a controller UP."""
    result = _run(["scontrol", "ping"])
    output = (result.stdout + result.stderr).strip()
    # `scontrol ping` prints "Slurmctld(primary) at HOST is UP" (or DOWN); a broken config or
    # munge makes it print an error instead. Its exit status is not reliable across versions.
    if result.returncode != 0 or " is UP" not in output:
        raise SlurmNotReady(
            f"the SLURM controller is unreachable (`scontrol ping`: "
            f"{output.splitlines()[0] if output else 'no output'}). " + _controller_fix())


def partitions() -> dict[str, bool]:
    """Partition names -> whether it is the default partition (``sinfo`` marks it with '*')."""
    result = _run(["sinfo", "--noheader", "--format=%P"])
    if result.returncode != 0:
        raise SlurmNotReady(
            f"`sinfo` failed ({result.stderr.strip() or result.stdout.strip()}): the SLURM "
            f"controller is unreachable. " + _controller_fix())
    names: dict[str, bool] = {}
    for line in result.stdout.split():
        name = line.strip()
        if name:
            names[name.rstrip("*")] = name.endswith("*")
    return names


def check_partition(partition: str | None) -> None:
    """Raises when ``partition`` does not exist (or, when None, no default partition exists)."""
    known = partitions()
    listing = ", ".join(f"{n}{' (default)' if d else ''}" for n, d in sorted(known.items()))
    if partition is None:
        if not any(known.values()):
            raise SlurmNotReady(
                f"no partition was given and the cluster has no default partition (partitions: "
                f"{listing or 'none'}). Fix: set SAE_SLURM_PARTITION, hydra.launcher.partition=... "
                f"or hydra.launcher.partition in conf/local/default.yaml")
        return
    if partition not in known:
        raise SlurmNotReady(
            f"SLURM partition {partition!r} does not exist on this cluster (partitions: "
            f"{listing or 'none'}). Fix: set SAE_SLURM_PARTITION or hydra.launcher.partition "
            f"(command line or conf/local/default.yaml) to one of them")


def check_slurm_ready(partition: str | None) -> None:
    """Raise :class:`SlurmNotReady` (a RuntimeError) unless jobs can be submitted to
    ``partition`` (None = the cluster's default partition). Cheap: three client calls."""
    check_sbatch()
    check_controller()
    check_partition(partition)


# ---------------------------------------------------------------- flock on shared folders

# Mount options under which a flock(2) taken on one node is not seen on another: Lustre's
# `localflock` (node-local locks) and `noflock` (flock fails), NFS's `nolock` / `local_lock=all`.
NODE_LOCAL_LOCK_OPTIONS = {"localflock", "noflock", "nolock", "local_lock=all",
                           "local_lock=flock"}
_LOCK_CHILD = ("import fcntl, sys\n"
               "handle = open(sys.argv[1], 'a')\n"
               "fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
               "print('locked', flush=True)\n"
               "sys.stdin.read()\n")


def mount_of(path: str, mounts: str) -> tuple[str, str, list[str]]:
    """(mount point, file system type, options) of the mount holding ``path``, from the text
    of ``/proc/mounts`` (the longest mount point that is a prefix of the path)."""
    best = ("/", "", [])
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point = fields[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fields[2], fields[3].split(","))
    return best


def flock_problem(path: str, key: str, mounts: str) -> str | None:
    """Why ``path`` (the folder of config key ``key``) cannot hold the sweep's locks, from its
    mount options; None when they allow flock across nodes."""
    point, fstype, options = mount_of(path, mounts)
    local = sorted(NODE_LOCAL_LOCK_OPTIONS.intersection(options))
    if not local:
        return None
    return (f"{key}: {path} is on a {fstype} mount ({point}) with {', '.join(local)}: a lock "
            "taken on one node is not seen on another, so two nodes could extract into the same "
            "cache, and a running cell looks free from the login node. Fix: point "
            f"{key} at a folder on a mount with cluster-wide flock (Lustre `-o flock`, GPFS, "
            "NFSv4 with locking), or ask the administrators to remount it")


def check_flock(path: str, key: str) -> None:
    """Before a SLURM sweep: ``path`` supports flock across processes and, from its mount
    options, across nodes. Raises :class:`SlurmNotReady` naming the problem and the fix."""
    import sys
    import tempfile
    from pathlib import Path

    folder = Path(path).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        mounts = Path("/proc/mounts").read_text()
    except OSError:  # not Linux: only the test below
        mounts = ""
    problem = flock_problem(str(folder.resolve()), key, mounts)
    if problem:
        raise SlurmNotReady(problem)
    import fcntl

    with tempfile.NamedTemporaryFile(dir=folder, prefix=".flock-check-") as probe:
        child = subprocess.Popen([sys.executable, "-c", _LOCK_CHILD, probe.name],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            held = child.stdout.readline().strip() == "locked"
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen = False
            except OSError:
                seen = True
        finally:
            child.stdin.close()
            child.wait(timeout=CLIENT_TIMEOUT_S)
    if not (held and seen):
        raise SlurmNotReady(
            f"{key}: {folder} does not support flock between processes (a lock "
            f"{'could not be taken' if not held else 'taken by one process was not seen by another'}"
            f"). Fix: point {key} at a folder on a file system with flock (local disk, Lustre "
            "`-o flock`, GPFS)")
