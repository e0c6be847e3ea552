"""Stage 1 of a sweep: the embedding caches its image cells read, resolved once by the planner
and each missing one built by its own extraction job before the training tasks that read it.

On a SLURM cluster the training tasks are submitted with ``--dependency=afterok:`` on their
cache's extraction job, so no GPU idles on an extraction lock; each training task opens the
directory resolved here (``extract.train_cache`` / ``extract.eval_cache``) with
``extract.inline=false``: it never lists the image tree, never extracts and never waits
(``sae.data.cache.training_cache``). A lone ``python -m sae.train`` still extracts inline.

The cells of one (backbone, dataset) share one :class:`CacheBuild`; the images of a split are
listed once for all the backbones that embed them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae.config import RootConfig, to_dict
from sae.data.layout import is_complete

SPLITS = ("train", "eval")


@dataclass(eq=False)  # one object per build: hashable by identity
class CacheBuild:
    """The train and eval caches of one (backbone, dataset): one extraction job builds the
    missing ones."""

    name: str  # "<dataset>__<backbone>": the extraction job's name and its line in cells.json
    paths: dict[str, str]  # split -> the cache directory (absolute), complete or not
    missing: list[str]  # splits whose cache is not complete yet: the job builds these
    job_id: str | None = None  # the extraction job (this launch's, or a live earlier one)
    config: RootConfig | None = field(default=None, repr=False)  # a cell's; not in cells.json

    def training_overrides(self) -> list[str]:
        """What each training task reading these caches gets: the resolved directories, and no
        extraction of its own."""
        return ["extract.inline=false",
                *(f"extract.{split}_cache={hydra_quote(self.paths[split])}" for split in SPLITS)]

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "paths": self.paths, "missing": self.missing,
                "job_id": self.job_id}


def hydra_quote(value: str) -> str:
    """A string as a single-quoted value of Hydra's override grammar."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def plan_caches(cells: Sequence[Any]) -> dict[int, CacheBuild]:
    """The cache build of every image cell (by ``cell.index``), each split's cache key resolved
    once here: a (backbone, dataset) pair once, a dataset's split listed once."""
    from sae.data.cache_key import resolve_cache
    from sae.data.images import open_split

    builds: dict[str, CacheBuild] = {}
    listings: dict[tuple[str, str], Any] = {}
    of_cell: dict[int, CacheBuild] = {}
    for cell in cells:
        cfg: RootConfig = cell.config
        if cfg.dataset.kind != "images":
            continue
        config = to_dict(cfg)
        dataset_key = json.dumps(config["dataset"], sort_keys=True, default=str)
        group = json.dumps([config["backbone"], dataset_key, str(Path(cfg.paths.cache).absolute())],
                           sort_keys=True, default=str)
        if group not in builds:

            def listed(split_name: str, dataset=cfg.dataset, key=dataset_key):
                if (key, split_name) not in listings:
                    listings[key, split_name] = open_split(dataset, split_name)
                return listings[key, split_name]

            paths = {split: str(resolve_cache(cfg.backbone, cfg.dataset, split,
                                              Path(cfg.paths.cache).absolute(), listed).path)
                     for split in SPLITS}
            builds[group] = CacheBuild(
                name=f"{cfg.dataset.name}__{cfg.backbone.name}", paths=paths,
                missing=[s for s in SPLITS if not is_complete(Path(paths[s]))], config=cfg)
        of_cell[cell.index] = builds[group]
    return of_cell


def build_caches(build: CacheBuild) -> dict[str, str]:
    """The extraction job: build the missing caches of ``build`` (resuming from their shards
    after a requeue), each verified against every checksum once built."""
    from sae.data.cache import ensure_cache

    cfg = build.config
    assert cfg is not None
    for split in build.missing:
        built = ensure_cache(cfg.backbone, cfg.dataset, split, cfg.paths.cache,
                             device=cfg.train.device, progress=cfg.train.progress,
                             options=cfg.extract)
        if built.absolute() != Path(build.paths[split]):
            from sae.data.errors import CacheError

            raise CacheError(
                f"the {split} images of {cfg.dataset.name} changed after the sweep was planned: "
                f"built {built}, planned {build.paths[split]}. Fix: re-launch the sweep, which "
                "plans the caches of the images as they are now")
    return build.paths
