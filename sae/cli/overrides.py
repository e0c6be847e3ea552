"""The command line's overrides checked against the schema before Hydra composes anything.

Hydra refuses an unknown key with a multi-line message (exit 1) whose advice, ``+train.lrr=...``,
adds a key that nothing reads: the run then trains with the default. Here, before Hydra starts:

* ``group=option`` (``regularizer=l1_l2``): the option must be a file of ``conf/<group>/``;
* ``a.b.c=value`` (``train.lrr=1e-3``, with or without ``+``/``++``): every part must be a field
  of the schema (a ``dataset.`` field of any dataset kind); past a dict or ``Any`` field
  anything goes;
* a number or boolean field's values must convert (``k=abc``), each value of a sweep too.

A refusal is one line, naming the override, the closest valid name ("did you mean train.lr?")
and the choices, with exit status 2 (``sae.cli.checks.CONFIG_ERROR_EXIT``).
``HYDRA_FULL_ERROR=1`` skips the check and lets Hydra report. Command lines with Hydra's own
flags (``--cfg``, ``--info``, ``--help``, ...) are left to Hydra.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sae.config import ConfigError
from sae.dataset_schemas import DatasetConfig

PLAIN_FLAGS = {"-m", "--multirun"}


class OverrideError(ConfigError):
    """An override names no setting, or gives a value its setting cannot take."""


def check_command_line(args: Sequence[str], conf_dir: Path, schema: type) -> None:
    """Exit 2 with one line on the first override the schema refuses (see the module doc)."""
    from sae.cli.checks import one_line_errors

    with one_line_errors():
        check_overrides(args, conf_dir, schema)


def check_overrides(args: Sequence[str], conf_dir: Path, schema: type) -> None:
    import os

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    if any(a.startswith("-") and a not in PLAIN_FLAGS for a in args):
        return  # Hydra's own flags: its help, config printing, completion
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        overrides = OverridesParser.create().parse_overrides(
            [a for a in args if a not in PLAIN_FLAGS])
    except HydraException:
        return  # a syntax error: Hydra's parser message is the one to read
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    for override in overrides:
        key = override.key_or_group
        if override.is_delete() or key.split(".")[0].split("/")[0] == "hydra":
            continue
        text = override.input_line or key
        values = _values(override)
        if key in groups:
            _check_options(text, key, values, conf_dir / key)
        else:
            _check_key(text, key, values, schema)


def _values(override) -> list[str] | None:
    """The override's values as strings; None where they cannot be listed (globs,
    interpolations): no value check."""
    from hydra.core.override_parser.types import ValueType

    if override.is_sweep_override():
        if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
            return None
        values = list(override.sweep_string_iterator())
    else:
        values = [override.get_value_element_as_str()]
    return None if any("${" in v for v in values) else values


def _check_options(text: str, group: str, values: list[str] | None, folder: Path) -> None:
    options = sorted(p.stem for p in folder.glob("*.yaml"))
    for value in values or []:
        if value not in options and value != "null":
            raise OverrideError(f"{text}: {group} has no option {value!r}{_did_you_mean(value, options)}"
                                f"; choose from {', '.join(options)}")


def _check_key(text: str, key: str, values: list[str] | None, schema: type) -> None:
    kind: Any = schema
    walked: list[str] = []
    for part in key.split("."):
        fields = _fields(kind, walked)
        if fields is None:
            return  # a dict, a list or Any: free-form below here
        if part not in fields:
            where = ".".join(walked)
            names = [f"{where}.{name}" if where else name for name in fields]
            wrong = ".".join([*walked, part])
            raise OverrideError(
                f"{text}: {wrong} is not a setting{_did_you_mean(wrong, names)}. A `+` in front "
                "would add a key that nothing reads; `python -m sae.train --help` lists the "
                "settings")
        walked.append(part)
        kind = fields[part]
    if values is not None:
        for value in values:
            _check_value(text, key, kind, value)


def _fields(kind: Any, walked: list[str]) -> dict[str, Any] | None:
    """Field name -> type of a schema dataclass (every dataset kind's fields under
    ``dataset``); None when ``kind`` is no dataclass."""
    if walked == ["dataset"] or kind is DatasetConfig:
        classes = [DatasetConfig, *_subclasses(DatasetConfig)]
    elif dataclasses.is_dataclass(kind):
        classes = [kind]
    else:
        return None
    fields: dict[str, Any] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        fields |= {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return fields


def _subclasses(cls: type) -> Iterable[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _check_value(text: str, key: str, kind: Any, value: str) -> None:
    optional = False
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(kind) if a is not type(None)]
        optional = len(members) < len(typing.get_args(kind))
        if len(members) != 1:
            return
        kind = members[0]
    if optional and value.lower() in ("null", "none"):
        return
    expected = {bool: "true or false", int: "an integer", float: "a number"}.get(kind)
    if expected is None:
        return
    if kind is bool:  # OmegaConf's spellings of a boolean
        ok = value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0")
    else:
        try:
            (int if kind is int else float)(value)
            ok = True
        except ValueError:
            ok = False
    if not ok:
        raise OverrideError(f"{text}: {key} takes {expected}, not {value!r}")


def _did_you_mean(wrong: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(wrong, list(names), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def main_with_checks(main, conf_dir: str, schema: type) -> None:
    """Run a Hydra ``main`` after checking ``sys.argv``'s overrides."""
    check_command_line(sys.argv[1:], Path(conf_dir), schema)
    main()
