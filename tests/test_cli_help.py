"""`--help` is generated from the schema: every field with its doc and default, every group
option, three examples; and shell completion works for the console script."""

from __future__ import annotations

import os
import shutil
import string
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from sae.cli.help import (
    APPS,
    CONF_DIR,
    app_groups,
    documented_fields,
    escape_for_hydra,
    field_docs,
    fields_section,
    group_options,
    group_schemas,
    help_asked,
    leaf_fields,
    registered_schemas,
    yaml_value,
)
from sae.config import ExtractConfig, RootConfig
from tests.helpers import REPO, run_cli

SCHEMAS = {"train": RootConfig, "extract": ExtractConfig}


@pytest.mark.parametrize("app", sorted(SCHEMAS))
def test_every_schema_field_has_a_one_line_doc(app):
    undocumented = [f.key for f in documented_fields(SCHEMAS[app]) if not f.doc]
    assert not undocumented, f"document these fields in sae/config.py: {undocumented}"


def _assert_page_documents(page: str, app: str) -> None:
    lines = page.splitlines()
    for f in documented_fields(SCHEMAS[app]):
        row = [line for line in lines if line.split() and line.split()[0] == f.key]
        assert len(row) == 1, f"{f.key} not listed once in --help"
        assert f"{f.type} = {f.default}" in row[0] and row[0].rstrip().endswith(f.doc), row[0]
    for group in app_groups(CONF_DIR, app):
        options = group_options(CONF_DIR, group)
        assert options, group
        for option in options:
            assert any(line.split()[:1] in ([option], [option + "*"]) for line in lines), option
    for command in APPS[app].examples:
        assert f"  {command}" in lines


@pytest.mark.parametrize("app", sorted(SCHEMAS))
def test_help_lists_groups_options_fields_docs_defaults_and_examples(app):
    result = run_cli(["-m", f"sae.{app}", "--help"], timeout=120)
    assert result.returncode == 0, result.stderr
    _assert_page_documents(result.stdout, app)
    assert "${oc.env:SAE_OUTPUT_ROOT,outputs}" in result.stdout  # printed, not resolved


def test_help_marks_the_default_option_of_each_group():
    result = run_cli(["-m", "sae.train", "--help"], timeout=120)
    for default in ("none*", "synthetic*", "topk*", "wandb*", "local*"):
        assert default in result.stdout.split()


# ---------------------------------------------------------------- rendered only when asked

# Imports an entry point as a start would, with ``argv``, counting the pages rendered.
_COUNT_RENDERS = """
import sys
import sae.cli.help as cli_help
rendered = []
render = cli_help.render_help
cli_help.render_help = lambda name, *args: rendered.append(name) or render(name, *args)
sys.argv = {argv!r}
import sae.train
print("rendered:", ",".join(rendered))
"""


@pytest.mark.parametrize(("argv", "pages"), [
    (["sae-train", "dataset=synthetic", "logger=none", "train.max_steps=2"], ""),
    (["sae-train", "-m", "+sweep=demo"], ""),
    (["sae-train", "--help"], "train,extract"),
    (["sae-train", "-mh"], "train,extract"),
])
def test_an_entry_point_renders_the_help_page_only_when_asked(argv, pages):
    """Every start of a task imports the entry point; only a help request pays for the page."""
    result = run_cli(["-c", _COUNT_RENDERS.format(argv=argv)], timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"rendered: {pages}"


@pytest.mark.parametrize(("argv", "asked"), [
    ([], False), (["dataset=synthetic", "k=32"], False), (["help=true"], False),
    (["--hydra-help"], False), (["--cfg", "job"], False), (["--", "--help"], False),
    (["--help"], True), (["-h"], True), (["-m", "k=8", "--help"], True),
    (["-mh"], True), (["-hm"], True), (["--hel"], True),
    (["--h"], False), (["--cfg", "nothing"], False),  # refused by Hydra's parser
])
def test_help_asked_reads_the_command_line_as_hydra_does(argv, asked):
    assert help_asked(argv) is asked


# ---------------------------------------------------------------- the generator itself

@dataclass
class _ToyBase:
    """A toy schema."""

    alpha: int = 1  # first field
    beta: list[int] = field(default_factory=lambda: [1, 2])  # a list,
    # -- section: what follows --
    gamma: str | None = None  # in a section


@dataclass
class _ToyKind(_ToyBase):
    """A per-kind variant that adds a field."""

    delta: float = (
        0.5)  # spread over two lines


@dataclass
class _ToyMetadata:
    """Docs given as field metadata instead of a comment."""

    eta: int = field(default=3, metadata={"help": "from metadata"})


@dataclass
class _ToyRoot:
    """Root."""

    toy: _ToyBase = field(default_factory=_ToyBase)
    top: bool = True  # a scalar


def test_field_docs_read_comments_sections_and_inherited_fields():
    assert field_docs(_ToyKind) == {"alpha": "first field", "beta": "a list,",
                                    "gamma": "section: in a section",
                                    "delta": "spread over two lines"}
    rows = {f.key: (f.type, f.default) for f in leaf_fields(_ToyRoot)}
    assert rows == {"toy.alpha": ("int", "1"), "toy.beta": ("list[int]", "[1, 2]"),
                    "toy.gamma": ("str | None", "null"), "top": ("bool", "true")}
    assert [(f.key, f.doc) for f in leaf_fields(_ToyMetadata)] == [("eta", "from metadata")]


@dataclass
class _ToyAnyRoot:
    """A root whose group field is untyped: only the registered schemas give its fields."""

    toy: Any = None  # filled by a registered schema


def test_schemas_registered_for_a_group_get_their_extra_fields_listed():
    """Per-kind schemas (e.g. one dataclass per dataset kind) registered in Hydra's
    ConfigStore under the group's name appear with the fields they add, whether the root
    annotates the group with a base dataclass or leaves it untyped."""
    store = ConfigStore.instance()
    store.store(group="toy", name="toy_kind_schema", node=_ToyKind)
    try:
        assert registered_schemas("toy") == [_ToyKind]
        assert group_schemas(_ToyRoot) == {"toy": [_ToyBase, _ToyKind]}
        assert group_schemas(_ToyAnyRoot) == {"toy": [_ToyKind]}
        pages = ["\n".join(fields_section(root)) for root in (_ToyRoot, _ToyAnyRoot)]
        untyped_keys = [f.key for f in documented_fields(_ToyAnyRoot)]
    finally:
        del store.repo["toy"]
    for page in pages:
        assert "toy.delta" in page and "spread over two lines" in page
        assert page.count("toy.alpha") == 1  # a base field is listed once
    assert untyped_keys == ["toy.alpha", "toy.beta", "toy.gamma", "toy.delta"]


def test_escaping_survives_omegaconf_and_string_template():
    text = "root ${oc.env:SAE_OUTPUT_ROOT,outputs} costs $5, $HOME stays, a \\ too"
    stored = OmegaConf.create({"template": escape_for_hydra(text)})
    assert string.Template(stored.template).substitute() == text


# ---------------------------------------------------------------- shell completion

def _completion(line: str, script: Path) -> list[str]:
    """What bash offers for ``line`` after `eval "$(sae-train -sc install=bash)"`."""
    env = {**os.environ, "PATH": f"{script.parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "LINE": line}
    program = ('eval "$(sae-train -sc install=bash)"\n'
               'COMP_LINE="$LINE"; COMP_POINT=${#LINE}; words=($LINE); '
               'COMP_CWORD=$(( ${#words[@]} - 1 )); [[ "$LINE" == *" " ]] && COMP_CWORD=${#words[@]}\n'
               'hydra_bash_completion; printf "%s\\n" "${COMPREPLY[@]}"\n')
    result = subprocess.run(["bash", "-c", program], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.fixture(scope="module")
def sae_train_script() -> Path:
    script = Path(sys.executable).parent / "sae-train"
    if not script.exists() or shutil.which("bash") is None:
        pytest.skip("the sae-train console script is not installed in this environment")
    return script


def test_bash_completion_of_the_console_script_offers_options_and_keys(sae_train_script):
    assert _completion("sae-train regularizer=", sae_train_script) == [
        "regularizer=l1l2", "regularizer=none", "regularizer=offsupport_l1"]
    assert "train.compile=" in _completion("sae-train train.comp", sae_train_script)


def test_bash_completion_offers_nothing_for_python_dash_m(sae_train_script):
    """Hydra's bash hook only recognises `python FILE.py`; the README says to use sae-train."""
    assert _completion("python -m sae.train regularizer=", sae_train_script) == []


# ---------------------------------------------------------------- the YAML holds values only

def _schema_defaults(schema: type) -> dict[str, set[str]]:
    """Each documented key's defaults (several when per-kind schemas disagree)."""
    defaults: dict[str, set[str]] = {}
    for f in documented_fields(schema):
        defaults.setdefault(f.key, set()).add(f.default)
    return defaults


def _repeated_defaults(values: dict, defaults: dict[str, set[str]], prefix: str = "") -> list[str]:
    repeated = []
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and any(k.startswith(f"{dotted}.") for k in defaults):
            repeated += _repeated_defaults(value, defaults, f"{dotted}.")
        elif key != "name" and defaults.get(dotted) == {yaml_value(value)}:
            repeated.append(dotted)
    return repeated


def test_group_and_sweep_files_do_not_repeat_the_schema_defaults():
    """A YAML file sets what differs from the schema (``name`` excepted: it names the option);
    the doc of every field is the schema's, shown by --help."""
    defaults = _schema_defaults(RootConfig)
    found = []
    for group in group_schemas(RootConfig):
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            values = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items()
                      if k != "defaults"}
            found += [f"{path.name}: {key}"
                      for key in _repeated_defaults(values, defaults, f"{group}.")]
    for path in sorted((CONF_DIR / "sweep").glob("*.yaml")):
        values = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items()
                  if k not in ("defaults", "hydra")}
        found += [f"sweeps/{path.name}: {key}" for key in _repeated_defaults(values, defaults)]
    assert not found, f"these values repeat the schema's defaults: {found}"


# ---------------------------------------------------------------- the README's reference

def _readme_reference() -> dict[str, str]:
    """The README's configuration table, row by group (``top level`` for the scalars)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3:
            rows[cells[0].strip("`")] = line
    return rows | {"": section}


def test_readme_configuration_reference_matches_the_schema():
    rows = _readme_reference()
    for group in app_groups(CONF_DIR, "train"):
        for option in group_options(CONF_DIR, group):
            assert f"`{option}`" in rows[group], f"README: option {group}={option} missing"
    for f in documented_fields(RootConfig):
        group, _, key = f.key.rpartition(".")
        row = rows[group.split(".")[0] or "top level"]
        assert f"`{key}`" in row, f"README: key {f.key} missing from the reference table"
    for f in documented_fields(ExtractConfig):
        assert "." in f.key or f"`{f.key}`" in rows[""], f"README: sae-extract's {f.key} missing"
