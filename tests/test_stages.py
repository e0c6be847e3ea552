"""Stage 1 of a sweep (issue 20), without a scheduler: the planner resolves each cache once and
lists each split once; a training task of a SLURM sweep opens the cache it was given without
listing the image tree, never extracts, and checks sizes (checksums on request).
The same on the local SLURM cluster, with real extraction jobs: tests/test_slurm_stages.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import sae.data.images as images_module
from sae.config import ExtractOptions, validate
from sae.data.cache import training_cache
from sae.data.errors import CacheError
from sae.grid.stages import build_caches, plan_caches
from sae.grid.sweep import plan_cells
from tests.test_config import compose_train

GRID = [[f"backbone={b}", f"seed={s}", "dataset=digits_images", "dataset.max_per_split=48"]
        for b in ("clip_tiny", "vit_tiny") for s in (0, 1)]


@pytest.fixture
def planned(tmp_path, monkeypatch):
    """The 4 cells of GRID under a fresh output root, and how often a split was listed."""
    listed = []
    real = images_module.open_split

    def counting(cfg, split):
        listed.append((cfg.name, split))
        return real(cfg, split)

    monkeypatch.setattr(images_module, "open_split", counting)
    cells = plan_cells(GRID, lambda o: compose_train([*o, f"paths.root={tmp_path}"]))
    return cells, plan_caches(cells), listed


def test_the_planner_resolves_each_cache_once(planned, tmp_path):
    cells, builds, listed = planned
    assert sorted(listed) == [("digits_images", "train"), ("digits_images", "val")]
    distinct = {id(b): b for b in builds.values()}.values()
    assert sorted(b.name for b in distinct) == ["digits_images__clip_tiny",
                                                  "digits_images__vit_tiny"]
    for build in distinct:
        assert build.missing == ["train", "eval"]
        assert all(p.startswith(str(tmp_path / "cache")) for p in build.paths.values())
    # both seeds of a backbone read the same build
    assert builds[0] is builds[1] and builds[2] is builds[3] and builds[0] is not builds[2]
    assert "extract.inline=false" in builds[0].training_overrides()


def test_a_training_task_opens_its_cache_without_listing_or_extracting(planned, monkeypatch):
    cells, builds, _ = planned
    build = builds[0]
    cfg = cells[0].config
    options = ExtractOptions(inline=False, train_cache=build.paths["train"],
                             eval_cache=build.paths["eval"])
    # Before stage 1 ran: a clear error naming the fix, and nothing extracted or locked.
    with pytest.raises(CacheError, match=r"does not extract.*python -m sae.extract "
                                         r"backbone=clip_tiny dataset=digits_images"):
        training_cache(cfg.backbone, cfg.dataset, "train", cfg.paths.cache, options=options)
    assert not list(Path(cfg.paths.cache).glob("*.lock"))

    build_caches(build)  # what the extraction job runs

    def no_listing(*args, **kwargs):
        raise AssertionError("a training task listed the image tree")

    monkeypatch.setattr(images_module, "open_split", no_listing)
    for split in ("train", "eval"):
        path = training_cache(cfg.backbone, cfg.dataset, split, cfg.paths.cache,
                              options=options)
        assert str(path) == build.paths[split]


def test_use_checks_sizes_and_checksums_on_request(planned):
    cells, builds, _ = planned
    build_caches(builds[2])
    cfg = cells[2].config
    embeddings = f"{builds[2].paths['train']}/embeddings.npy"
    array = np.load(embeddings, mmap_mode="r+")
    array[0, 0] += 1  # same size, other bytes
    array.flush()
    sizes = ExtractOptions(inline=False, train_cache=builds[2].paths["train"])
    training_cache(cfg.backbone, cfg.dataset, "train", cfg.paths.cache, options=sizes)
    full = ExtractOptions(inline=False, train_cache=builds[2].paths["train"], verify="checksums")
    with pytest.raises(CacheError, match="does not match its sha256"):
        training_cache(cfg.backbone, cfg.dataset, "train", cfg.paths.cache, options=full)


def test_a_generated_image_dataset_plans_on_a_fresh_root(tmp_path):
    """Before: `-m dataset=digits_images` on a fresh output root was refused at planning
    ("dataset.root ... is not a directory"), though a single run writes the folder."""
    from sae.grid.sweep import preflight

    cfg = validate(compose_train(["dataset=digits_images", "backbone=clip_tiny",
                                  f"paths.root={tmp_path / 'fresh'}"]))
    preflight(cfg)


MOUNTS = """/dev/sda1 / ext4 rw,relatime 0 0
10.0.0.1@o2ib:/scratch /scratch lustre rw,localflock,lazystatfs 0 0
10.0.0.1@o2ib:/project /project lustre rw,flock,lazystatfs 0 0
nfs:/home /home nfs4 rw,vers=4.2,local_lock=none 0 0
"""


@pytest.mark.parametrize(("path", "refused"), [
    ("/scratch/me/outputs/cache", "localflock"), ("/project/me/cache", None),
    ("/home/me/cache", None), ("/tmp/cache", None), ("/scratchy/cache", None)])
def test_a_mount_without_cluster_wide_flock_is_refused(path, refused):
    from sae.grid.slurm_checks import flock_problem

    problem = flock_problem(path, "paths.cache", MOUNTS)
    if refused is None:
        assert problem is None
    else:
        assert refused in problem and "paths.cache" in problem and "Fix:" in problem


def test_flock_between_processes_is_checked_here(tmp_path):
    from sae.grid.slurm_checks import check_flock

    check_flock(str(tmp_path / "cache"), "paths.cache")  # a local disk: taken and seen
    assert (tmp_path / "cache").is_dir() and not list((tmp_path / "cache").iterdir())


def test_only_a_slurm_sweep_can_be_left(tmp_path):
    """launcher.wait=false elsewhere would orphan local jobs: refused before any job."""
    from tests.helpers import run_cli

    result = run_cli(["-m", "sae.train", "-m", "dataset=synthetic", "launcher.wait=false",
                      "logger=none"], env_extra={"SAE_OUTPUT_ROOT": str(tmp_path)})
    assert result.returncode != 0
    assert "launcher.wait=false: only a SLURM sweep" in result.stderr and "Fix:" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_an_extraction_job_requeues_itself(planned):
    """At the time limit (USR2) submitit asks the job for its checkpoint: the same job again,
    which resumes from the shards the stopped extraction kept (tests/test_extract_cache.py)."""
    from hydra_plugins.sae_sweeper.launchers import ExtractionJob

    job = ExtractionJob(planned[1][0])
    again = job.checkpoint()
    assert again.function is job and again.args == () and again.kwargs == {}


def test_a_task_whose_extraction_failed_is_not_left_alone():
    """SLURM keeps such a task pending forever: a re-launch cancels and resubmits it, and
    sae-status calls it failed."""
    from sae.grid.scheduler import is_live

    assert is_live("PENDING (Dependency)") and is_live("RUNNING") and is_live("REQUEUED")
    assert not is_live("PENDING (DependencyNeverSatisfied)")
    assert not is_live("COMPLETED") and not is_live("CANCELLED by 0") and not is_live(None)
