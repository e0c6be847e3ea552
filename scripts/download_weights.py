#!/usr/bin/env python
"""Pre-download backbone weights on a machine with network (a cluster login node) into the
directory the backbone configs read on compute nodes without network.

    export SAE_WEIGHTS_DIR=/shared/weights            # the same path on every node
    python scripts/download_weights.py clip_vitl14 siglip2 vit_l16
    # then, in the job environment (conf/local or the sbatch script):
    export SAE_WEIGHTS_DIR=/shared/weights HF_HUB_OFFLINE=1

conf/backbone/{clip_vitl14,siglip2,vit_l16}.yaml set ``checkpoint_path: ${oc.env:SAE_WEIGHTS_DIR,
null}``: a directory there is the libraries' own download cache (Hugging Face hub layout), so on
the compute node open_clip / timm resolve the same pretrained tag from it, with the tag's exact
preprocessing. ``--check-offline`` then loads every backbone again in a subprocess with
``HF_HUB_OFFLINE=1``, which proves the directory is enough.

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


def fetch(name: str, weights_dir: Path) -> None:
    from sae.backbones import load_backbone, pretrained_flag

    cfg = backbone_config(name, weights_dir)
    if not pretrained_flag(cfg.pretrained):
        print(f"{name}: random weights (pretrained: null), nothing to download")
        return
    start = time.perf_counter()
    backbone = load_backbone(cfg, "cpu")
    print(f"{name}: {cfg.library} {cfg.model} [{backbone.info['weights']}] -> {backbone.dim}-d, "
          f"ready in {time.perf_counter() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backbones", nargs="+", help="names under conf/backbone/")
    parser.add_argument("--dir", default=os.environ.get("SAE_WEIGHTS_DIR"),
                        help="weights directory (default: $SAE_WEIGHTS_DIR)")
    parser.add_argument("--check-offline", action="store_true",
                        help="afterwards, load each backbone again with HF_HUB_OFFLINE=1")
    args = parser.parse_args()
    if not args.dir:
        raise SystemExit("no weights directory: pass --dir or export SAE_WEIGHTS_DIR")
    weights_dir = Path(args.dir).expanduser().resolve()
    weights_dir.mkdir(parents=True, exist_ok=True)
    for name in args.backbones:
        fetch(name, weights_dir)
    if args.check_offline:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAE_WEIGHTS_DIR": str(weights_dir)}
        subprocess.run([sys.executable, __file__, *args.backbones, "--dir", str(weights_dir)],
                       env=env, check=True)
        print("offline check passed")
    print(f"\nOn compute nodes: export SAE_WEIGHTS_DIR={weights_dir} HF_HUB_OFFLINE=1")


if __name__ == "__main__":
    main()
