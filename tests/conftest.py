"""Shared pytest fixtures and helpers.

SLURM: ``slurm_cluster`` (session scope) starts a real single-node SLURM cluster with
``scripts/slurm_local.sh`` (installing slurm-wlm, slurmdbd, munge and mariadb-server when
missing; its own munged, slurmdbd and MariaDB, so the real ``sacct`` answers), points
``SLURM_CONF`` at it for the session and stops it at the end. It skips only where SLURM cannot
be installed (the script exits 5: not root, or no apt-get); any other failure to start is a test
error, because CI must run the SLURM tests. A cluster that was already running (started by hand
with ``eval "$(scripts/slurm_local.sh start)"``) is reused and left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SLURM_SCRIPT = REPO_ROOT / "scripts" / "slurm_local.sh"
SLURM_CANNOT_INSTALL = 5  # exit status of slurm_local.sh when SLURM cannot be installed here
# `start` may first apt-get install slurm-wlm, slurmdbd, munge and mariadb-server (a minute or
# two on a fresh machine); the cluster itself (munged, MariaDB, slurmdbd, slurmctld, slurmd)
# comes up in a few seconds.
SLURM_START_TIMEOUT_S = 600


def run_with_timeout(args: Sequence[str | os.PathLike], *, timeout: float,
                     env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
                     check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, and fail the test (not hang it) past ``timeout`` s.

    The command runs in its own session; on timeout the whole process group is killed, so a
    Hydra sweep and the children it started do not outlive the test. With ``check``, a non-zero
    exit fails the test with the command's output.
    """
    args = [str(a) for a in args]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=None if env is None else dict(env), cwd=cwd,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        pytest.fail(f"`{' '.join(args)}` did not finish within {timeout} s\n"
                    f"--- stdout ---\n{stdout[-5000:]}\n--- stderr ---\n{stderr[-5000:]}")
    result = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        pytest.fail(f"`{' '.join(args)}` exited with {proc.returncode}\n"
                    f"--- stdout ---\n{stdout[-5000:]}\n--- stderr ---\n{stderr[-5000:]}")
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, the process group this module started (by its id)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def run_cmd():
    """:func:`run_with_timeout`, as a fixture (tests cannot import conftest cleanly)."""
    return run_with_timeout


@dataclass(frozen=True)
class SlurmCluster:
    """What a test needs to use the local cluster."""

    conf: Path  # its slurm.conf (SLURM_CONF)
    partition: str  # its only partition, the default one
    state_dir: Path  # slurm.conf, slurmdbd.conf, logs (log/*.log), spool, munge/, mysql/, pids
    # The exports of `slurm_local.sh start`: SLURM_CONF, and the SAE_SLURM_* values that fit
    # conf/launcher/slurm.yaml to this cluster (partition, no GPU, 1 CPU, 1 GB). Merged into
    # os.environ for subprocesses; os.environ itself only gets SLURM_CONF, so in-process config
    # tests still see the launcher's real defaults.
    exports: dict[str, str] = field(default_factory=dict)
    start_seconds: float = 0.0  # wall time of `slurm_local.sh start` (0 when reused)
    started_here: bool = True  # False: it was already running and is left running

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ + the cluster's exports + ``extra``: the environment of a sweep."""
        return {**os.environ, **self.exports, **extra}

    def logs(self) -> str:
        """The tail of the daemons' logs, for failure messages."""
        parts = []
        for log in sorted((self.state_dir / "log").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-30:]
            parts.append(f"--- {log} ---\n" + "\n".join(lines))
        return "\n".join(parts)


def _parse_exports(stdout: str, base_env: Mapping[str, str]) -> dict[str, str]:
    """``export NAME=value`` lines -> dict; ``$PATH`` is expanded against ``base_env``."""
    exports = {}
    for line in stdout.splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            value = value.strip().strip('"').replace("$PATH", base_env.get("PATH", ""))
            exports[name] = value
    return exports


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    script_env = {**os.environ}
    state_dir = Path(script_env.setdefault("SLURM_LOCAL_DIR", "/tmp/sae-slurm"))
    try:
        status = subprocess.run([str(SLURM_SCRIPT), "status"], env=script_env, text=True,
                                capture_output=True, timeout=60)
        already_running = status.returncode == 0
        started = time.perf_counter()
        start = subprocess.run([str(SLURM_SCRIPT), "start"], env=script_env, text=True,
                               capture_output=True, timeout=SLURM_START_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"scripts/slurm_local.sh did not finish within {exc.timeout} s:\n"
                    f"{exc.stderr}", pytrace=False)
    start_seconds = time.perf_counter() - started
    if start.returncode == SLURM_CANNOT_INSTALL:
        pytest.skip(f"SLURM is not installed and cannot be installed here: {start.stderr.strip()}")
    if start.returncode != 0:
        pytest.fail(f"scripts/slurm_local.sh start failed (exit {start.returncode}):\n"
                    f"{start.stderr}\n{start.stdout}", pytrace=False)
    exports = _parse_exports(start.stdout, os.environ)
    cluster = SlurmCluster(conf=Path(exports["SLURM_CONF"]),
                           partition=exports["SAE_SLURM_PARTITION"], state_dir=state_dir,
                           exports=exports, start_seconds=0.0 if already_running else start_seconds,
                           started_here=not already_running)
    saved = {"SLURM_CONF": os.environ.get("SLURM_CONF")}
    os.environ["SLURM_CONF"] = exports["SLURM_CONF"]
    try:
        yield cluster
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if cluster.started_here:
            subprocess.run([str(SLURM_SCRIPT), "stop"], env=script_env, text=True,
                           capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: OpenMP start-up dominates, 15x slower with 2 threads on a busy machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
