"""Run identity as properties (issue 24): every field of the schema, changed alone, changes the
run id exactly when it can change the numbers.

The fields are enumerated from the schema (dataclasses), so a new field is covered without a
new test: it must change the id, unless it is added below to ``RUNS_THE_SAME`` (how and where a
run executes, and how it is logged: DESIGN.md's "never device, paths, logging, launcher or
packing settings") or to ``NO_EFFECT_HERE`` (settings the base cell's choices make inert). The
lists are this test's own statement of the contract, not read from ``sae.identity``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import pytest

from sae.identity import run_id
from tests.helpers import synthetic_cfg

RUNS_THE_SAME = (
    "paths.", "logger.", "extract.", "launcher.", "run.", "sweep_name", "dry_run", "force",
    "pack", "pack_members", "train.device", "train.progress", "train.log_every",
    "train.checkpoint_every", "train.checkpoint_every_s", "train.compile", "train.fast_path",
)
# The base cell trains on generated data without a backbone: the backbone's fields cannot
# change its numbers (its run id names the backbone "none").
NO_EFFECT_HERE = ("backbone.",)
# Values a field takes in the changed cell where "+1" or "not" would be refused by validation.
ALTERNATIVES = {"regularizer.name": "offsupport_l1", "dataset.name": "synthetic2",
                "eval.similarity": "backbone:vit_tiny", "sae.n_latents": 512}


def base_cell():
    return synthetic_cfg(k=4, reg="l1l2", strength=0.05, mask=True, n_latents=256)


def leaves(node: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted name, type, value) of every leaf field of a config dataclass."""
    out = []
    hints = typing.get_type_hints(type(node))
    for field in dataclasses.fields(node):
        value = getattr(node, field.name)
        name = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            out += leaves(value, f"{name}.")
        else:
            out.append((name, hints[field.name], value))
    return out


def changed_value(name: str, kind: Any, value: Any) -> Any:
    if name in ALTERNATIVES:
        return ALTERNATIVES[name]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.125
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, value[-1]] if value else ["x"]
    if isinstance(value, dict):
        return {**value, "extra": 1}
    if value is None:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return {int: 7, float: 0.5, str: "x"}.get(args[0] if args else None)
    return None


def with_field(cfg: Any, dotted: str, value: Any) -> Any:
    head, _, rest = dotted.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: with_field(getattr(cfg, head), rest, value)})


def cases() -> list[tuple[str, Any]]:
    base = base_cell()
    out = []
    for name, kind, value in leaves(base):
        new = changed_value(name, kind, value)
        if new is not None:
            out.append((name, new))
    return out


@pytest.mark.parametrize(("name", "value"), cases(), ids=[c[0] for c in cases()])
def test_a_field_changes_the_run_id_exactly_when_it_can_change_the_numbers(name, value):
    base = base_cell()
    try:
        changed = with_field(base, name, value)
    except Exception as exc:  # noqa: BLE001 -- the schema refuses this value: nothing to name
        pytest.skip(f"{name}={value!r} is refused by the schema ({type(exc).__name__})")
    inert = name.startswith(RUNS_THE_SAME + NO_EFFECT_HERE) or name in RUNS_THE_SAME
    if inert:
        assert run_id(changed) == run_id(base), f"{name} must not change the run id"
    else:  # the hash itself, not only the readable slug (which names k, seed, ...)
        assert digest(changed) != digest(base), f"{name} must change the run id's hash"


def digest(cfg) -> str:
    return run_id(cfg).rsplit("-", 1)[1]


def test_the_enumeration_covers_the_axes():
    """The parametrisation is not empty and holds every grid axis (a broken enumeration would
    make the test above vacuous)."""
    names = {name for name, _ in cases()}
    assert {"k", "mask", "seed", "regularizer.strength", "regularizer.name", "train.lr",
            "sae.n_latents", "dataset.n_train", "train.device", "paths.root"} <= names
    assert len(names) > 60
