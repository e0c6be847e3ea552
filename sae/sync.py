"""Upload a sweep's offline W&B runs, as ``wandb sync`` would, and say what was sent.

    python -m sae.sync outputs/sweeps/demo            # every offline run of the sweep
    python -m sae.sync outputs/sweeps/demo --dry-run  # list them only
    sae-sync SWEEP_DIR                                 # the same, as a console script

The runs are found from the sweep's ``cells.json`` (each cell's run directory holds
``wandb/offline-run-*``) and the report's run (``report/wandb/offline-run-*``). A run that
``wandb sync`` already uploaded (it leaves ``<run>.wandb.synced``) is skipped unless
``--again``. Each upload is the W&B CLI's own ``wandb sync RUN_DIR`` (a subprocess with a
timeout), so the credentials and server are W&B's usual ones (``WANDB_API_KEY``,
``WANDB_BASE_URL``). Exit status: 0 when every run was sent, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sae.grid.runs import is_synced, wandb_offline_runs
from sae.tracking import DEFAULT_BASE_URL, reachable

PROBE_TIMEOUT_S = 5.0  # before uploading: is the server there at all?


@dataclass
class Sent:
    run: Path
    ok: bool
    detail: str  # "sent", "already synced", or the last line W&B printed on failure


def run_dirs(sweep_dir: Path) -> list[Path]:
    """The run directories of the sweep's cells (each once), then the report directory."""
    try:
        cells = json.loads((sweep_dir / "cells.json").read_text())["cells"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"sae-sync: {sweep_dir}/cells.json is missing or unreadable ({exc}). "
                         "Fix: pass the directory of a launched sweep") from exc
    dirs = list(dict.fromkeys(Path(c["run_dir"]) for c in cells if c.get("run_dir")))
    return [*dirs, sweep_dir / "report"]


def offline_runs(sweep_dir: Path) -> list[Path]:
    """Every ``offline-run-*`` directory of the sweep, oldest first within a run."""
    return [run for directory in run_dirs(Path(sweep_dir))
            for run in wandb_offline_runs(directory)]


def sync_command(run: Path, project: str | None = None, entity: str | None = None
                 ) -> list[str]:
    """``wandb sync RUN``, with ``--project`` / ``--entity`` overriding the runs' own."""
    command = [sys.executable, "-m", "wandb", "sync", str(run)]
    if project:
        command += ["--project", project]
    if entity:
        command += ["--entity", entity]
    return command


def upload(run: Path, timeout_s: float, project: str | None = None,
           entity: str | None = None) -> Sent:
    command = sync_command(run, project, entity)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Sent(run, False, f"timed out after {timeout_s:g} s")
    lines = (done.stdout + done.stderr).strip().splitlines()
    if done.returncode == 0 and is_synced(run):
        return Sent(run, True, "sent")
    return Sent(run, False, lines[-1] if lines else f"wandb sync exited {done.returncode}")


def sync_sweep(sweep_dir: Path, again: bool = False, timeout_s: float = 600.0,
               project: str | None = None, entity: str | None = None) -> list[Sent]:
    return [Sent(run, True, "already synced") if is_synced(run) and not again
            else upload(run, timeout_s, project, entity) for run in offline_runs(sweep_dir)]


def save_sweep_dashboard(sweep_dir: Path, project: str | None, entity: str | None) -> bool:
    """Save the spec the report wrote (with ``--project`` / ``--entity`` when given)."""
    import json

    from sae.reporting.dashboard import SPEC_FILE
    from sae.tracking import save_dashboard

    path = Path(sweep_dir) / "report" / SPEC_FILE
    if not path.is_file():
        print(f"- FAIL dashboard: {path} does not exist (run `sae-report {sweep_dir}` first)")
        return False
    spec = json.loads(path.read_text())
    spec |= {k: v for k, v in (("project", project), ("entity", entity)) if v}
    try:
        print(f"- ok   dashboard: {save_dashboard(spec)}")
        return True
    except Exception as exc:  # noqa: BLE001 -- reported, the exit status says it
        print(f"- FAIL dashboard: {exc}")
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sae-sync", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory (holds cells.json)")
    parser.add_argument("--dry-run", action="store_true", help="list the offline runs only")
    parser.add_argument("--again", action="store_true", help="also re-send synced runs")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds allowed per run (default %(default)s)")
    parser.add_argument("-p", "--project", help="upload into this W&B project (as wandb sync's "
                        "--project; default: each run's own)")
    parser.add_argument("-e", "--entity", help="upload under this W&B entity (as wandb sync's "
                        "--entity; default: each run's own)")
    parser.add_argument("--dashboard", action="store_true",
                        help="also save the sweep's W&B workspace view (report/"
                        "wandb_dashboard.json, written by sae-report)")
    args = parser.parse_args(argv)
    runs = offline_runs(args.sweep_dir)
    print(f"{len(runs)} offline W&B runs in {args.sweep_dir}")
    if args.dry_run:
        print("\n".join(f"- {run}{' (synced)' if is_synced(run) else ''}" for run in runs))
        return 0
    url = os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)
    if (runs or args.dashboard) and not reachable(url, PROBE_TIMEOUT_S):
        print(f"sae-sync: W&B server {url} unreachable within {PROBE_TIMEOUT_S:g} s: nothing "
              "sent (run again where the server can be reached)")
        return 1
    results = sync_sweep(args.sweep_dir, args.again, args.timeout, args.project, args.entity)
    for result in results:
        print(f"- {'ok  ' if result.ok else 'FAIL'} {result.run}: {result.detail}")
    failed = sum(not r.ok for r in results)
    if args.dashboard:
        failed += not save_sweep_dashboard(args.sweep_dir, args.project, args.entity)
    print(f"sent {sum(r.detail == 'sent' for r in results)}, already synced "
          f"{sum(r.detail == 'already synced' for r in results)}, failed {failed}")
    return 1 if failed else 0


def cli() -> None:
    """Console script ``sae-sync``."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
