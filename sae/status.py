"""``python -m sae.status SWEEP_DIR`` (console script ``sae-status``): every run of a sweep with
its state, merged from the runs' status files and what SLURM says of their jobs
(``sae.grid.status``), then a one-line summary. Works from any shell, whether the launcher still
runs, returned at once (``launcher.wait=false``) or died.

    sae-status outputs/sweeps/paper
    sae-status outputs/sweeps/paper --watch        # again every 30 s until nothing is queued

Exit status: 0 when every run is done, 1 when some failed or did not finish, 3 while some are
still pending or running.
"""

from __future__ import annotations

import argparse
import sys
import time

STILL_GOING_EXIT = 3


def main(argv: list[str] | None = None) -> int:
    from sae.grid.status import sweep_status

    parser = argparse.ArgumentParser(prog="sae-status", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="the sweep directory (paths.sweeps/<sweep_name>)")
    parser.add_argument("--watch", nargs="?", type=float, const=30.0, default=None,
                        metavar="SECONDS", help="repeat every SECONDS (30) until no run is "
                        "pending or running; the summary line each time, the table at the end")
    args = parser.parse_args(argv)
    try:
        status = sweep_status(args.sweep_dir)
        if args.watch is not None:
            while not status.finished:
                print(f"{time.strftime('%H:%M:%S')} {status.summary()}", flush=True)
                time.sleep(args.watch)
                status = sweep_status(args.sweep_dir)
    except FileNotFoundError as exc:
        print(f"sae-status: {exc}", file=sys.stderr)
        return 2
    print(status.table(), flush=True)
    if not status.finished:
        return STILL_GOING_EXIT
    return 0 if all(r.state == "done" for r in status.runs) else 1


def cli() -> None:
    """Console script ``sae-status``."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
