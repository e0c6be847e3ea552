#!/usr/bin/env python
"""Pre-download backbone weights on a machine with network (a cluster login node) into the
Hugging Face cache directory the backbone configs read on compute nodes without network.

    export SAE_WEIGHTS_DIR=/shared/weights            # the same path on every node
    python scripts/download_weights.py --dry-run      # what would be fetched, and from where
    python scripts/download_weights.py                # every backbone option with weights
    python scripts/download_weights.py clip_vitl14 siglip2 vit_l16 --check-offline
    # then, in the job environment (conf/local or the sbatch script):
    export SAE_WEIGHTS_DIR=/shared/weights HF_HUB_OFFLINE=1

The pretrained options of conf/backbone/ set ``checkpoint_path: ${oc.env:SAE_WEIGHTS_DIR,null}``:
a directory there is the libraries' own download cache in the Hugging Face hub layout
(``models--org--name/snapshots/<rev>/``). All three libraries fetch from the hub: open_clip
tags through their ``hf_hub`` repository, timm ``pretrained=True`` through ``timm/<model>``,
transformers through the model id. On the compute node each resolves the same files from the
cache, with the checkpoint's exact preprocessing. ``--check-offline`` then loads every backbone
again in a subprocess with ``HF_HUB_OFFLINE=1``, which proves the directory is enough.

Each backbone is built once on the CPU (the weights are loaded, so a corrupt download fails here,
not in the first SLURM job): ViT-L/14 ~1.7 GB, SO400M ~4.5 GB, ViT-L/16 ~1.2 GB of download.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def backbone_config(name: str, weights_dir: Path):
    """conf/backbone/<name>.yaml as a typed config reading weights from ``weights_dir``."""
    from omegaconf import OmegaConf

    from sae.config import BackboneConfig

    path = REPO / "conf" / "backbone" / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise SystemExit(f"{path} does not exist. Choose from {options}")
    node = OmegaConf.merge(OmegaConf.structured(BackboneConfig), OmegaConf.load(path),
                           {"checkpoint_path": str(weights_dir)})
    return OmegaConf.to_object(node)


def pretrained_options() -> list[str]:
    """Every conf/backbone option that names pretrained weights (the random-weight test
    variants and ``none`` have nothing to download)."""
    from omegaconf import OmegaConf

    from sae.backbones import pretrained_flag

    options = []
    for path in sorted((REPO / "conf" / "backbone").glob("*.yaml")):
        node = OmegaConf.load(path)
        if node.get("library", "none") != "none" and pretrained_flag(node.get("pretrained")):
            options.append(path.stem)
    return options


def hub_source(cfg) -> tuple[str, str]:
    """(Hugging Face repository, files) that ``cfg``'s library downloads for its weights (the
    repository is the one whose snapshot names the weights in run ids and cache keys:
    ``sae.io.fingerprint.hub_repository``)."""
    from sae.io.fingerprint import hub_repository

    repo = hub_repository(cfg)
    if repo is None:
        return "?", "(a URL, not the hub: the library's own cache layout)"
    if cfg.library == "transformers":
        return repo, "config.json, preprocessor_config.json, model.safetensors (or the .bin)"
    if cfg.library == "open_clip":
        import open_clip

        filename = (open_clip.get_pretrained_cfg(cfg.model, str(cfg.pretrained))["hf_hub"]
                    + "/").split("/")[2]
        return repo, filename or "open_clip_model.safetensors (or the .bin)"
    from timm.models import get_pretrained_cfg

    return repo, get_pretrained_cfg(cfg.model).hf_hub_filename or "model.safetensors (or the .bin)"


def plan_line(name: str, weights_dir: Path) -> str:
    """What ``fetch`` would download for one option, and where it lands."""
    from sae.backbones import pretrained_flag

    cfg = backbone_config(name, weights_dir)
    if not pretrained_flag(cfg.pretrained):
        return f"{name}: random weights (pretrained: null), nothing to download"
    repo, files = hub_source(cfg)
    folder = weights_dir / f"models--{repo.replace('/', '--')}"
    return f"{name}: {cfg.checkpoint} <- hf-hub {repo} [{files}] -> {folder}"


def fetch(name: str, weights_dir: Path) -> None:
    from sae.backbones import load_backbone, pretrained_flag

    cfg = backbone_config(name, weights_dir)
    if not pretrained_flag(cfg.pretrained):
        print(f"{name}: random weights (pretrained: null), nothing to download")
        return
    start = time.perf_counter()
    backbone = load_backbone(cfg, "cpu")
    print(f"{name}: {cfg.checkpoint} [{backbone.info['weights']}] -> {backbone.dim}-d, "
          f"ready in {time.perf_counter() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backbones", nargs="*",
                        help="names under conf/backbone/ (default: every option with weights)")
    parser.add_argument("--dir", default=os.environ.get("SAE_WEIGHTS_DIR"),
                        help="weights directory (default: $SAE_WEIGHTS_DIR)")
    parser.add_argument("--check-offline", action="store_true",
                        help="afterwards, load each backbone again with HF_HUB_OFFLINE=1")
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would be fetched (repository, files, folder); "
                             "download nothing")
    args = parser.parse_args()
    if not args.dir:
        raise SystemExit("no weights directory: pass --dir or export SAE_WEIGHTS_DIR")
    weights_dir = Path(args.dir).expanduser().resolve()
    backbones = args.backbones or pretrained_options()
    if args.dry_run:
        for name in backbones:
            print(plan_line(name, weights_dir), flush=True)
        return
    weights_dir.mkdir(parents=True, exist_ok=True)
    for name in backbones:
        fetch(name, weights_dir)
    if args.check_offline:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAE_WEIGHTS_DIR": str(weights_dir)}
        subprocess.run([sys.executable, __file__, *backbones, "--dir", str(weights_dir)],
                       env=env, check=True)
        print("offline check passed")
    print(f"\nOn compute nodes: export SAE_WEIGHTS_DIR={weights_dir} HF_HUB_OFFLINE=1")


if __name__ == "__main__":
    main()
