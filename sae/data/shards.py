"""Resumable extraction: embeddings written in shards, each atomic, recorded in a progress file.

An extraction in progress lives in ``.partial-<cache dir name>/`` beside the cache (used only
under the cache's lock)::

    progress.json        the complete shards in order: image range, rows, skipped images, bytes
    shard-000000.npy     (rows, d) embeddings of the kept images of one image range

A shard file is written, fsynced and renamed (:func:`sae.io.files.atomic_write`) before
``progress.json`` names it, so after a kill the progress file lists only whole shards, and the
next extraction of the key resumes after the last one. Shard boundaries are multiples of the
batch size, so a resumed extraction runs the same batches as an uninterrupted one and the
assembled array is byte-identical (given the same device, batch size and threads).

:class:`StopSignals` turns SIGTERM and SIGUSR2 (SLURM preemption, time limit, ``scancel``) into
a request to stop after the current batch: the rows so far become a shard, are recorded, and the
signal then takes its usual effect (the default handler ends the process; a launcher's own
handler, e.g. submitit's requeue, runs).
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from sae.io.files import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


@dataclass
class Shard:
    """One complete shard: the images [start, stop) of the split, minus the skipped ones."""

    start: int
    stop: int
    file: str
    rows: int
    bytes: int
    skipped: list[int] = field(default_factory=list)


def partial_dir(cache_dir: Path) -> Path:
    """Where the extraction of ``cache_dir`` keeps its shards until the cache is assembled."""
    return cache_dir.parent / f".partial-{cache_dir.name}"


class ShardLog:
    """The progress file of one extraction: the complete shards, and what they were made with.

    ``identity`` (the cache key, dtype, ...) must match for a resume: a progress file of other
    settings is discarded with its shards.
    """

    def __init__(self, folder: Path, identity: dict[str, Any]) -> None:
        self.folder = folder
        self.identity = identity
        self.shards: list[Shard] = []
        self.backbone: dict[str, Any] = {}  # dim and info of the backbone that made the rows
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".*.tmp"):  # an atomic write cut short by a kill
            stale.unlink(missing_ok=True)
        self._load()

    @property
    def next_image(self) -> int:
        return self.shards[-1].stop if self.shards else 0

    def _load(self) -> None:
        import json

        progress = self.folder / PROGRESS_FILE
        if not progress.is_file():
            return
        record = json.loads(progress.read_text())
        if record.get("identity") != self.identity:
            log.warning("%s was made with other settings: starting afresh", self.folder)
            self._reset()
            return
        self.backbone = record.get("backbone", {})
        for entry in record["shards"]:
            shard = Shard(**entry)
            file = self.folder / shard.file
            if not file.is_file() or file.stat().st_size != shard.bytes:
                log.warning("%s is missing or truncated: resuming before it", file)
                break
            self.shards.append(shard)

    def _reset(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.shards, self.backbone = [], {}

    def add(self, start: int, stop: int, rows: np.ndarray, skipped: list[int],
            backbone: dict[str, Any]) -> None:
        """Write one shard atomically, then record it (the record is what makes it count)."""
        name = f"shard-{len(self.shards):06d}.npy"
        atomic_write(self.folder / name, lambda tmp: _save_npy(tmp, rows))
        self.shards.append(Shard(start, stop, name, len(rows),
                                 (self.folder / name).stat().st_size, sorted(skipped)))
        self.backbone = backbone
        atomic_write_json(self.folder / PROGRESS_FILE, {
            "identity": self.identity, "backbone": backbone,
            "shards": [asdict(s) for s in self.shards]})

    def assemble(self, out_file: Path, n_images: int) -> tuple[list[int], list[int]]:
        """Concatenate the shards into one (N_kept, d) .npy; return (kept, skipped) indices."""
        covered = [(s.start, s.stop) for s in self.shards]
        expected = list(zip([0] + [stop for _, stop in covered[:-1]], [s for _, s in covered]))
        if covered != expected or self.next_image != n_images:
            raise RuntimeError(f"{self.folder}: shards cover {covered}, not 0..{n_images} "
                               "contiguously. Fix: delete the directory and extract again")
        skipped = [i for s in self.shards for i in s.skipped]
        skip = set(skipped)
        kept = [i for i in range(n_images) if i not in skip]
        first = np.load(self.folder / self.shards[0].file, mmap_mode="r")
        array = np.lib.format.open_memmap(out_file, mode="w+", dtype=first.dtype,
                                          shape=(len(kept), int(self.backbone["dim"])))
        row = 0
        for shard in self.shards:
            rows = np.load(self.folder / shard.file, mmap_mode="r")
            array[row:row + len(rows)] = rows
            row += len(rows)
        array.flush()
        del array
        return kept, skipped


def _save_npy(path: Path, rows: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append .npy to a path
        np.save(f, np.ascontiguousarray(rows), allow_pickle=False)


class StopSignals:
    """Within ``with``: SIGTERM / SIGUSR2 set :attr:`requested` instead of ending the process;
    :meth:`resend` then restores the previous handlers and raises the signal again."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal() works only there
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.warning("signal %s: stopping after the current batch (the shard is kept)",
                    signal.Signals(signum).name)
        self.requested = signum

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def resend(self) -> None:
        """Give the received signal its usual effect, now that the work is saved."""
        self._restore()
        if self.requested is not None:
            signal.raise_signal(self.requested)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers outlive a stop signal until the main process has
    saved its shard (SLURM signals every process of the job; a dead worker would raise)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
