"""scripts/download_weights.py without network: its arguments and its plan (``--dry-run``).

The plan must name the repositories that the libraries read offline: the same ids under which
tests/test_backbones_reference.py writes its fake hub cache and checks each library's recipe.
"""

from __future__ import annotations

from tests.helpers import run_cli
from tests.test_backbones_reference import OPEN_CLIP_HUB, TIMM_HUB

SCRIPT = "scripts/download_weights.py"
EXPECTED_REPOS = {**OPEN_CLIP_HUB, **TIMM_HUB,
                  "siglip2": "google/siglip2-so400m-patch14-384",
                  "vit_l16": "google/vit-large-patch16-224"}


def test_dry_run_plans_every_pretrained_option_and_writes_nothing(tmp_path):
    weights = tmp_path / "weights"
    result = run_cli([SCRIPT, "--dry-run", "--dir", str(weights)], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    assert sorted(lines) == sorted(EXPECTED_REPOS)  # no random-weight variant, no `none`
    for option, repo in EXPECTED_REPOS.items():
        folder = weights / f"models--{repo.replace('/', '--')}"
        assert f"<- hf-hub {repo} [" in lines[option] and lines[option].endswith(str(folder))
    assert lines["siglip2"].startswith("transformers google/siglip2-so400m-patch14-384 <-")
    assert lines["clip_vitl14"].startswith("open_clip ViT-L-14 / datacomp_xl_s13b_b90k <-")
    assert not weights.exists()


def test_arguments_are_checked(tmp_path):
    named = run_cli([SCRIPT, "clip_tiny", "vit_l16", "--dry-run", "--dir", str(tmp_path)],
                    timeout=120)
    assert named.returncode == 0, named.stderr[-3000:]
    assert named.stdout.splitlines()[0] == (
        "clip_tiny: random weights (pretrained: null), nothing to download")
    unknown = run_cli([SCRIPT, "vit_l17", "--dry-run", "--dir", str(tmp_path)], timeout=120)
    assert unknown.returncode != 0 and "vit_l17.yaml does not exist. Choose from" in unknown.stderr
    no_dir = run_cli([SCRIPT, "--dry-run"], env_extra={"SAE_WEIGHTS_DIR": ""}, timeout=120)
    assert no_dir.returncode != 0 and "pass --dir or export SAE_WEIGHTS_DIR" in no_dir.stderr
