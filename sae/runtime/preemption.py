"""Stop signals: checkpoint within a step, record why, then exit as the signal asks.

SLURM ends a job with SIGTERM (``scancel``, a preemption, the time limit) and, with
``--signal=USR2@N`` (conf/launcher/slurm.yaml: ``signal_delay_s``), warns a task with SIGUSR2
N seconds before its time limit. While a cell (or a pack) runs, :func:`stop_signals` turns
either signal into a request: the training loop honours it after the current step (it saves a
checkpoint and raises :class:`Interrupted`), the evaluation between its metric families, and a
signal that arrives while the outputs are written is honoured once they are (the run is then
``done``). The caller records the status, then :func:`redeliver` hands the signal to the
handler that was there before: submitit's USR2 handler requeues the task (its
checkpoint/requeue protocol; the requeued task resumes from that checkpoint, after training:
the evaluation runs again), the default SIGTERM action ends the process.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class Interrupted(Exception):  # noqa: N818 (a stop, not an error)
    """A run stopped on a signal in ``phase`` (training, evaluation), checkpointed at ``step``."""

    def __init__(self, signum: int, step: int, phase: str = "training") -> None:
        self.signum, self.step, self.phase = signum, step, phase
        where = "" if phase == "training" else f" during {phase}"
        super().__init__(f"stopped by {self.signal_name}{where} at step {step} "
                         "(checkpoint saved)")

    @property
    def signal_name(self) -> str:
        return signal_name(self.signum)

    @property
    def state(self) -> str:
        """``preempted``: SLURM's warning before a time limit or preemption (the task is
        requeued); ``interrupted``: anything else that asked the process to end."""
        return "preempted" if self.signum == signal.SIGUSR2 else "interrupted"


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


@dataclass
class StopRequest:
    """The signal received while training (None: keep going); read once per step."""

    signum: int | None = None
    previous: dict[int, object] | None = None

    def check(self, step: int, phase: str = "training") -> None:
        """Raise :class:`Interrupted` once a stop was requested (after the caller's checkpoint)."""
        if self.signum is not None:
            raise Interrupted(self.signum, step, phase)


@contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """Within the block, SIGTERM and SIGUSR2 only set ``request.signum``. Only the main thread
    can install handlers; elsewhere (a thread of a test) the request never fires."""
    request = StopRequest(previous={})
    if _is_main_thread():
        for signum in STOP_SIGNALS:
            request.previous[signum] = signal.signal(signum, _recorder(request))
    try:
        yield request
    finally:
        for signum, handler in request.previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]


def _recorder(request: StopRequest):
    def record(signum: int, _frame) -> None:
        request.signum = signum

    return record


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def redeliver(signum: int) -> None:
    """Act on the signal as if it arrived now, with the handlers outside training in place.

    A Python handler (submitit's requeue on USR2) runs; the default action ends the process.
    When the previous handler returns without exiting (submitit ignores SIGTERM, expecting a
    USR2 first), exit anyway with the shell's code for a signal, 128 + its number: the run was
    asked to stop and its checkpoint is saved.
    """
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signum)
    raise SystemExit(128 + signum)
