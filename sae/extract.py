"""Stage 1: embed image splits with a frozen backbone into the shared cache.

    python -m sae.extract backbone=clip_vitl14 dataset=imagenet             # train and val
    python -m sae.extract backbone=vit_l16 dataset=openimages split=eval
    python -m sae.extract backbone=clip_tiny dataset=digits_images          # offline, CPU
    sae-extract backbone=siglip2 dataset=imagenet backbone.batch_size=256 backbone.num_workers=16

The inference loop is ``sae.data.embedding.embed_split``. Training extracts on a cache miss
as well (``sae.data.cache.load_image_split``); running this
first, once per (backbone, dataset) -- e.g. one GPU job before a sweep -- keeps the extraction
out of the array tasks. The cache layout is documented in ``sae/data/cache.py``, its key in
``sae/data/cache_key.py``. A killed or preempted extraction (SIGTERM / SIGUSR2 save the rows so
far) resumes from its last complete shard when run again (``extract.shard_size`` images each);
in an sbatch script, use ``--requeue`` or run it again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sae.cli.overrides import main_with_checks
from sae.config import ConfigError, ExtractConfig, register_configs, validate
from sae.data.cache import ensure_cache, open_cache

log = logging.getLogger(__name__)
# Absolute, so the console scripts find the config tree as `python -m` does.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_configs()


# ---------------------------------------------------------------- the Hydra app

def run_extract(cfg: ExtractConfig) -> list[Path]:
    """Embed the split(s) of ``cfg`` (a typed config). Returns the cache directories."""
    splits = ("train", "eval") if cfg.split == "both" else (cfg.split,)
    paths = []
    for split in splits:
        path = ensure_cache(cfg.backbone, cfg.dataset, split, cfg.paths.cache,
                            device=cfg.device, progress=cfg.progress, options=cfg.extract)
        manifest = open_cache(path, verify_checksums=False).manifest
        speed = manifest["extraction"].get("images_per_s")
        log.info("%s: %d x %d %s (%s images/s when extracted)", path, manifest["count"],
                 manifest["dim"], manifest["dtype"], speed)
        print(path, flush=True)
        paths.append(path)
    return paths


def validate_extract(node: DictConfig) -> ExtractConfig:
    """Resolve a composed extract config and run its schema and cross-field checks."""
    if OmegaConf.is_missing(node.dataset, "name"):  # no dataset= given: the bare schema
        raise ConfigError("dataset: none chosen. Fix: add dataset=imagenet, dataset=openimages "
                          "or dataset=digits_images")
    return validate(node, ExtractConfig)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="extract")
def main(node: DictConfig) -> None:
    run_extract(validate_extract(node))


def cli() -> None:
    """Console script ``sae-extract`` (same arguments as ``python -m sae.extract``); the
    overrides are checked against the schema first (``sae.cli.overrides``)."""
    main_with_checks(main, CONF_DIR, ExtractConfig)


if __name__ == "__main__":
    cli()
