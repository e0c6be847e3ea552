"""Pack planning: compatible cells group, done cells join no pack, auto obeys the memory bound."""

import dataclasses

import pytest

from sae.grid.packing import member_bytes, pack_capacity, pack_key, packs_table, plan_packs
from sae.grid.sweep import Cell
from tests.helpers import synthetic_cfg


def cells_and_cfgs():
    cfgs = []
    for dim in (32, 64):  # two datasets (different dim): never in one pack
        for k in (4, 8):
            for reg in ("none", "l1l2"):
                cfgs.append(synthetic_cfg(dim=dim, k=k, reg=reg, strength=0.01))
    cells = [Cell(i, [f"cell{i}"], f"run{i}", f"/runs/run{i}", "new") for i in range(len(cfgs))]
    return cells, cfgs


def test_compatible_cells_group_in_grid_order_and_done_ones_are_left_out():
    cells, cfgs = cells_and_cfgs()
    cells[1].state = "done"
    cells[2].duplicate_of = 0
    packs = plan_packs(cells, lambda c: cfgs[c.index], lambda cfg: 2)
    assert [[c.index for c in p] for p in packs] == [[0, 3], [4, 5], [6, 7]]
    for p in packs:
        assert len({pack_key(cfgs[c.index]) for c in p}) == 1
    for c in cells[4:6]:
        c.state = "done"
    packs = plan_packs(cells, lambda c: cfgs[c.index], lambda cfg: 8)
    assert [[c.index for c in p] for p in packs] == [[0, 3], [6, 7]]  # no all-done pack
    assert "pack 1: 2 member(s)" in packs_table(packs)


def test_train_preset_splits_packs():
    a = synthetic_cfg(k=4)
    b = dataclasses.replace(a, train=dataclasses.replace(a.train, lr=1e-4))
    assert pack_key(a) != pack_key(b)
    assert pack_key(a) == pack_key(dataclasses.replace(a, k=8, seed=3, mask=False))


def test_auto_capacity_follows_the_memory_bound():
    cfg = synthetic_cfg(n_latents=8192, batch=2048)
    per_member = member_bytes(cfg, 1024)
    assert per_member == 512 * 2**20  # the docstring's arithmetic for the ImageNet size
    assert pack_capacity("auto", per_member, 80 * 2**30, shared_bytes=5 * 2**30) == 150
    assert pack_capacity(4, per_member, 1.0) == 4  # an explicit size is taken as given
    with pytest.raises(ValueError, match="gpu_mem_gb"):
        pack_capacity("auto", per_member, 2**28)
