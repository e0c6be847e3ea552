"""Config mistakes on the command line end in one line, exit 2, with the closest valid name
(issue 22, item 3), before Hydra composes anything or any folder is made."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import run_cli

CASES = [
    (["train.lrr=1e-3"], "train.lrr is not a setting (did you mean train.lr?)"),
    (["+train.lrr=1e-3"], "train.lrr is not a setting (did you mean train.lr?)"),
    (["k=abc"], "k takes an integer, not 'abc'"),
    (["regularizer=l1_l2"], "regularizer has no option 'l1_l2' (did you mean l1l2?)"),
    (["-m", "regularizer=none,l1_l2"], "no option 'l1_l2'"),
    (["-m", "k=8,abc"], "k takes an integer, not 'abc'"),
    (["dataset.trian_path=x.npy"], "dataset.trian_path is not a setting (did you mean "
                                   "dataset.train_path?)"),
    (["mask=maybe"], "mask takes true or false"),
]


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_a_config_mistake_is_refused_naming_the_closest_valid_name(args, message):
    """In-process: the check the command runs before Hydra (one process per case would cost
    two seconds each)."""
    from sae.cli.overrides import OverrideError, check_overrides
    from sae.config import RootConfig
    from sae.train import CONF_DIR

    with pytest.raises(OverrideError) as refused:
        check_overrides(args, Path(CONF_DIR), RootConfig)
    assert message in str(refused.value)


@pytest.mark.parametrize("args", [["train.lrr=1e-3"], ["-m", "regularizer=none,l1_l2"]])
def test_a_config_mistake_exits_2_with_one_line_and_no_folder(tmp_path, args):
    result = run_cli(["-m", "sae.train", *args], env_extra={"SAE_OUTPUT_ROOT": str(tmp_path)},
                     timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "did you mean" in lines[0]
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "runs").exists()


def test_valid_overrides_pass_the_check(tmp_path):
    """Sweeps, ranges, optional fields, dataset fields of another kind, dict fields and
    Hydra's own keys go through to the dry run."""
    result = run_cli(["-m", "sae.train", "-m", "+sweep=demo", "k=8,16", "seed=range(0,2)",
                      "train.max_steps=null", "mask=true", "dataset=digits",
                      "backbone.model_kwargs={}", "hydra.job.chdir=false", "dry_run=true"],
                     env_extra={"SAE_OUTPUT_ROOT": str(tmp_path)}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "problems: none found" in result.stdout


def test_extract_checks_its_own_schema(tmp_path):
    result = run_cli(["-m", "sae.extract", "backbone=clip_tiyn", "dataset=digits_images"],
                     env_extra={"SAE_OUTPUT_ROOT": str(tmp_path)}, timeout=120)
    assert result.returncode == 2 and "did you mean clip_tiny?" in result.stderr, result.stderr
