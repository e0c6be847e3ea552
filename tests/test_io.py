"""Atomic, fsynced writes and checkpoint files (sae.io)."""

import json
import os

import pytest
import torch

from sae.io.files import atomic_write, atomic_write_json
from sae.io.tensors import CHECKPOINT_SCHEMA_VERSION, load_tensors, save_tensor_file, save_tensors


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "status.json"
    atomic_write_json(path, {"state": "running"})

    def half_write(tmp):
        tmp.write_text('{"state": "do')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_write)
    assert json.loads(path.read_text()) == {"state": "running"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_every_write_is_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    atomic_write_json(tmp_path / "a.json", {"x": torch.tensor([1.0, 2.0])})
    save_tensor_file(tmp_path / "b.safetensors", {"w": torch.ones(3)})
    save_tensors(tmp_path / "c.safetensors", {"w": torch.ones(3)}, {"step": 1})
    assert len(synced) == 4  # a.json, b, c and c's sidecar
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1.0, 2.0]}


def test_checkpoint_round_trip_and_schema_check(tmp_path):
    path = tmp_path / "ck.safetensors"
    save_tensors(path, {"w": torch.arange(4.0)}, {"step": 7})
    tensors, meta = load_tensors(path)
    torch.testing.assert_close(tensors["w"], torch.arange(4.0))
    assert meta["step"] == 7 and meta["schema_version"] == CHECKPOINT_SCHEMA_VERSION
    assert json.loads(path.with_suffix(".json").read_text())["step"] == 7
    save_tensor_file(path, {"w": torch.zeros(1)})  # no sidecar: not a checkpoint
    with pytest.raises(ValueError, match="schema version None"):
        load_tensors(path)
