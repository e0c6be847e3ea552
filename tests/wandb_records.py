"""Read an offline run's ``.wandb`` file back without a server (PITFALLS.md): a LevelDB-style
record log -- a 7-byte file header (``:W&B``, magic, version), then 32 KiB blocks of chunks, each
behind a 7-byte header (CRC32, length, type: full / first / middle / last) -- whose payloads are
the SDK's protobuf ``Record`` messages."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK, HEADER = 32 * 1024, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def payloads(data: bytes) -> Iterator[bytes]:
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # zero padding up to the block end
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def records(run_dir: Path) -> list[Any]:
    """Every protobuf Record of the offline run directory ``run_dir`` (offline-run-*)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("*.wandb")
    parsed = []
    for payload in payloads(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        parsed.append(record)
    return parsed


def of_type(run_dir: Path, kind: str) -> list[Any]:
    return [getattr(r, kind) for r in records(run_dir) if r.WhichOneof("record_type") == kind]


def items(updates: Any) -> dict[str, Any]:
    """``{key: value}`` of config / summary / history items (values are JSON text)."""
    found = {}
    for item in updates:
        key = ".".join(item.nested_key) if item.nested_key else item.key
        found[key] = json.loads(item.value_json)
    return found


def config(run_dir: Path) -> dict[str, Any]:
    """The run record's config, then later config updates."""
    merged = items(run(run_dir).config.update)
    for record in of_type(run_dir, "config"):
        merged |= items(record.update)
    return merged


def summary(run_dir: Path) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for record in of_type(run_dir, "summary"):
        merged |= items(record.update)
    return merged


def history(run_dir: Path) -> list[dict[str, Any]]:
    return [items(record.item) for record in of_type(run_dir, "history")]


def run(run_dir: Path) -> Any:
    (found,) = of_type(run_dir, "run")[:1]
    return found
