"""Packed cells in the sweep: planning (``sae.grid.packing.assign_packs``), the ``pack_members``
override's round trip, the memory refusal of ``pack=auto``, and a packed sweep against the same
sweep unpacked (same run ids, every member ``done``, metrics within test_packed's tolerance)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from sae.grid.packing import (
    assign_packs,
    member_overrides,
    members_override,
    packs_table,
    unpacked_reason,
)
from sae.grid.sweep import Cell
from tests.helpers import synthetic_cfg
from tests.test_packed import LOSS_RTOL
from tests.test_sweep import sweep


def cell_cfg(seed: int = 0, **kw):
    return dataclasses.replace(synthetic_cfg(**kw), seed=seed)


def planned(cfgs, states=None) -> list[Cell]:
    states = states or ["new"] * len(cfgs)
    return [Cell(i, [f"seed={i}"], f"run{i}", f"/runs/run{i}", state, config=cfg)
            for i, (cfg, state) in enumerate(zip(cfgs, states))]


def test_pack_1_keeps_one_job_a_cell_in_grid_order():
    cells = planned([synthetic_cfg(dim=d, k=4) for d in (32, 64, 32, 64)])
    packs = assign_packs(cells, 1, 8.0)
    assert [[c.index for c in p] for p in packs] == [[0], [1], [2], [3]]
    assert all(c.pack is None for c in cells)


def test_auto_packs_compatible_cells_and_leaves_done_and_unpackable_ones_out():
    tied = synthetic_cfg(k=4)
    tied = dataclasses.replace(tied, sae=dataclasses.replace(tied.sae, tied=True))
    cfgs = [cell_cfg(k=4), cell_cfg(k=8, reg="l1l2", strength=0.01), tied,
            cell_cfg(k=4, seed=1), cell_cfg(k=8, seed=1)]
    cells = planned(cfgs, ["new", "new", "new", "new", "done"])
    packs = assign_packs(cells, "auto", 8.0)
    assert [[c.index for c in p] for p in packs] == [[0, 1, 3], [2]]
    assert [c.pack for c in cells] == [0, 0, None, 0, None]
    assert "tied" in unpacked_reason(tied) and unpacked_reason(cfgs[1]) is None
    assert "pack 0: 3 member(s)" in packs_table(packs)


def test_a_regularizer_without_fused_terms_packs_with_the_others():
    """Before: a registered regularizer not in sae.grid.packing's list trained alone. Now every
    regularizer packs (sae.training.packed differentiates it by autograd,
    tests/test_regularizer_registry.py); what cannot pack is decided by one function."""
    from sae.grid.packing import pack_conflict

    other = cell_cfg(k=4, reg="l1l2", strength=0.01)
    other.regularizer.name = "my_penalty"  # as a registered regularizer without fused terms
    assert unpacked_reason(other) is None
    cells = planned([cell_cfg(k=4), other, cell_cfg(k=4, seed=1)])
    assert [[c.index for c in p] for p in assign_packs(cells, 4, 8.0)] == [[0, 1, 2]]
    assert pack_conflict([c.config for c in cells]) is None
    lr = cell_cfg(k=4)
    lr.train.lr = 0.5
    assert "member 1 has train.lr=0.5" in pack_conflict([cells[0].config, lr])


def test_auto_refuses_a_member_larger_than_the_device():
    big = synthetic_cfg(n_latents=8192, batch=2048)
    with pytest.raises(ValueError, match="gpu_mem_gb"):
        assign_packs(planned([big, big]), "auto", 0.25)
    assert len(assign_packs(planned([big, big]), 2, 0.25)) == 1  # an explicit size is trusted


def test_members_override_round_trips_through_hydras_parser():
    odd = ["+sweep=demo", "k=8", "dataset.root='/data/my data'", 'eval.similarity="a,b"']
    cells = [Cell(0, odd, "a", "/a", "new"), Cell(1, ["seed=1", "pack=auto"], "b", "/b", "new")]
    override = members_override(cells)
    [parsed] = OverridesParser.create().parse_overrides([override])
    assert parsed.key_or_group == "pack_members"
    assert [member_overrides(entry) for entry in parsed.value()] == [odd, cells[1].overrides]


def test_pack_auto_refusal_names_the_fix_before_any_job(tmp_path):
    result = sweep(tmp_path, "pack=auto", "launcher.gpu_mem_gb=0.00001")
    assert result.returncode != 0
    assert "pack=auto" in result.stderr and "launcher.gpu_mem_gb" in result.stderr
    assert not (tmp_path / "runs").exists()


def run_metrics(root: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "metrics.json").read_text())
            for d in sorted((root / "runs").iterdir())}


@pytest.mark.slow  # two subprocess sweeps
def test_packed_sweep_equals_the_unpacked_sweep(tmp_path):
    lone, packed = tmp_path / "lone", tmp_path / "packed"
    for root, pack in ((lone, "1"), (packed, "auto")):
        result = sweep(root, f"pack={pack}")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((packed / "sweeps" / "demo" / "cells.json").read_text())
    cells = record["cells"]
    assert [c["result"] for c in cells].count("done") == 5
    assert {c["pack"] for c in cells if c["result"] == "done"} == {0}  # one job for the 5
    assert len(list((packed / "sweeps" / "demo").glob("pack-0-*"))) == 1
    expected, got = run_metrics(lone), run_metrics(packed)
    assert sorted(got) == sorted(expected)  # the same run ids
    for rid, metrics in got.items():
        assert json.loads((packed / "runs" / rid / "status.json").read_text())["state"] == "done"
        train, reference = metrics["train"], expected[rid]["train"]
        assert train["steps"] == reference["steps"]
        assert train["final_loss"] == pytest.approx(reference["final_loss"], rel=LOSS_RTOL)
        assert metrics["r2"] == pytest.approx(expected[rid]["r2"], abs=1e-3)
    again = sweep(packed, "pack=auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "5 done (skipped)" in again.stdout and ": 0 done, 0 failed" in again.stdout
    assert not list((packed / "sweeps" / "demo").glob("pack-1-*"))  # no all-done pack
    listing = sweep(packed, "pack=auto", "force=true", "dry_run=true")
    assert "pack 0: 5 member(s)" in listing.stdout and "run in pack 0" in listing.stdout


def test_members_resuming_from_different_steps_train_as_separate_packs(tmp_path):
    """A pack killed while writing its members' checkpoints resumes some members one
    checkpoint ahead: each resume step trains as a pack of its own (a pack is lockstep)."""
    import types

    import torch

    from sae.grid.runs import checkpoint_path
    from sae.io.tensors import save_tensors
    from sae.training.job import groups_by_resume_step
    from sae.training.trainer import older_checkpoint

    members = [types.SimpleNamespace(directory=tmp_path / f"m{i}") for i in range(4)]
    for member, step in zip(members, (50, None, 50, 100)):
        if step is not None:
            path = checkpoint_path(member.directory)
            path.parent.mkdir(parents=True)
            save_tensors(path, {"x": torch.zeros(1)}, {"step": step})
    assert groups_by_resume_step(members) == [[0, 2], [1], [3]]
    # A truncated newest checkpoint (a kill while it was written over a damaged disk, as the
    # chaos test does): the member resumes from the one before, as its Trainer will.
    newest = checkpoint_path(members[3].directory)
    save_tensors(newest, {"x": torch.zeros(1)}, {"step": 150}, previous=older_checkpoint(newest))
    newest.write_bytes(newest.read_bytes()[:100])
    assert groups_by_resume_step(members) == [[0, 2], [1], [3]]
    save_tensors(checkpoint_path(members[1].directory), {"x": torch.zeros(1)}, {"step": 100})
    assert groups_by_resume_step(members) == [[0, 2], [1, 3]]
