"""``--help`` of the Hydra apps, generated from the schema and the config tree.

Each field is documented once, by the comment beside it in its dataclass (``sae/config.py``;
``field(metadata={"help": ...})`` is read too, for a schema that prefers it).
This module reads those comments from the module source (``tokenize`` + ``ast``, nothing is
imported twice or written twice), walks the registered dataclasses, lists the options of every
config group under ``conf/`` with the first line of each option file, and stores the page as a
``hydra/help`` option (``sae_train``, ``sae_extract``) that the root YAML selects. Hydra then
prints it for ``--help``. No torch.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import re
import sys
import tokenize
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # sae/cli/help.py -> the repository
SECTION = re.compile(r"#\s*--\s*([^:]+?)\s*(?::.*)?--\s*$")  # "# -- synthetic: ... --"


@dataclass(frozen=True)
class App:
    """What a help page says beyond the schema: the app's purpose and example commands."""

    module: str
    script: str
    summary: str
    examples: tuple[str, ...]
    order: str  # where values come from, later wins


APPS = {
    "train": App("sae.train", "sae-train",
                 "one grid cell (extract-if-missing + train + evaluate); with -m, a grid",
                 ("sae-train dataset=synthetic regularizer=l1l2 k=32 mask=true",
                  "sae-train -m +sweep=demo",
                  "sae-train -m +sweep=paper launcher=slurm dry_run=true"),
                 "schema -> groups -> conf/train.yaml -> conf/local -> the sweep file -> "
                 "the command line"),
    "extract": App("sae.extract", "sae-extract",
                   "stage 1 alone: embed image splits with a frozen backbone into the cache",
                   ("sae-extract backbone=clip_vitl14 dataset=imagenet",
                    "sae-extract backbone=vit_l16 dataset=openimages split=eval",
                    "sae-extract backbone=clip_tiny dataset=digits_images device=cpu"),
                   "schema -> groups -> conf/extract.yaml -> the command line"),
}


@dataclass(frozen=True)
class FieldDoc:
    """One leaf field of a schema: its dotted key, type, default and one-line doc."""

    key: str
    type: str
    default: str
    doc: str


# ---------------------------------------------------------------- field docs from the source

@functools.cache
def _module_comments(module: str) -> tuple[ast.Module, dict[int, str], dict[int, str]]:
    """The module's syntax tree, its trailing comments and its section comments, by line."""
    source = inspect.getsource(sys.modules[module])
    trailing: dict[int, str] = {}
    sections: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        line, col = tok.start
        if tok.line[:col].strip():  # code before it: a field's doc
            trailing[line] = tok.string.lstrip("#").strip()
        elif match := SECTION.match(tok.string.strip()):
            sections[line] = match.group(1)
    return ast.parse(source), trailing, sections


def _class_node(tree: ast.Module, name: str) -> ast.ClassDef | None:
    return next((node for node in ast.walk(tree)
                 if isinstance(node, ast.ClassDef) and node.name == name), None)


def _own_field_docs(cls: type) -> dict[str, str]:
    """Docs of the fields annotated in ``cls``'s own body: the comment beside each, prefixed
    with the section (``# -- synthetic: ... --``) it sits under, if any."""
    tree, trailing, sections = _module_comments(cls.__module__)
    node = _class_node(tree, cls.__name__)
    if node is None:
        return {}
    docs: dict[str, str] = {}
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            end = stmt.end_lineno or stmt.lineno
            text = " ".join(trailing[line] for line in range(stmt.lineno, end + 1)
                            if line in trailing)
            above = [sections[line] for line in sorted(sections)
                     if node.lineno < line < stmt.lineno]
            docs[stmt.target.id] = f"{above[-1]}: {text}" if above and text else text
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """The one-line doc of every field of dataclass ``cls``, inherited fields included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


# ---------------------------------------------------------------- walking the schema

def yaml_value(value: Any) -> str:
    """A default as it would be written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "???"


def _type_name(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__",
                                                                   str(annotation))


def nested_schemas(cls: type) -> dict[str, type]:
    """The fields of ``cls`` that are themselves dataclasses (the config groups)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(hints.get(f.name))}


def leaf_fields(cls: type, prefix: str = "", skip: frozenset[str] = frozenset()
                ) -> list[FieldDoc]:
    """Every non-dataclass field of ``cls`` (recursing into dataclass fields), in order."""
    docs, nested = field_docs(cls), nested_schemas(cls)
    rows: list[FieldDoc] = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if f.name in nested:
            rows.extend(leaf_fields(nested[f.name], f"{prefix}{f.name}."))
        else:
            doc = f.metadata.get("help") or docs.get(f.name, "")  # metadata, if a schema uses it
            rows.append(FieldDoc(prefix + f.name, _type_name(f.type), yaml_value(_default(f)),
                                 doc))
    return rows


def registered_schemas(group: str) -> list[type]:
    """Dataclasses stored in Hydra's ConfigStore under ``group`` (e.g. one per dataset kind)."""
    from hydra.core.config_store import ConfigNode, ConfigStore
    from omegaconf import OmegaConf

    entries = ConfigStore.instance().repo.get(group, {})
    found = []
    for entry in entries.values():
        if isinstance(entry, ConfigNode):
            kind = OmegaConf.get_type(entry.node)
            if dataclasses.is_dataclass(kind) and kind not in found:
                found.append(kind)
    return found


def _first_doc_line(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


# ---------------------------------------------------------------- the config tree

def group_options(conf_dir: Path, group: str) -> dict[str, str]:
    """Each option of ``conf/<group>/`` and the first line of its header comment."""
    folder = conf_dir / group
    if not folder.is_dir():
        return {}
    return {path.stem: _header_line(path) for path in sorted(folder.glob("*.yaml"))}


def _header_line(path: Path, limit: int = 96) -> str:
    """The first sentence of the file's header comment, at most ``limit`` characters."""
    words: list[str] = []
    for line in path.read_text().splitlines():
        text = line.lstrip("#").strip()
        if not line.startswith("#") or (not text and words):
            break
        if not text.startswith("@package"):
            words += text.split()
    sentence = re.split(r"(?<=\.)\s", " ".join(words), maxsplit=1)[0]
    if len(sentence) <= limit:
        return sentence
    return sentence[:limit].rsplit(" ", 1)[0] + " ..."


def default_options(conf_dir: Path, config_name: str) -> dict[str, str | None]:
    """The group options chosen by the root config's defaults list (``None`` = none chosen)."""
    root = yaml.safe_load((conf_dir / f"{config_name}.yaml").read_text()) or {}
    chosen: dict[str, str | None] = {}
    for entry in root.get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                if not key.startswith(("override ", "optional ")) and "@" not in key:
                    chosen[key] = value
    return chosen


def app_groups(conf_dir: Path, config_name: str) -> list[str]:
    """The groups this app can compose: those of its defaults list, plus ``sweep`` for train."""
    groups = list(default_options(conf_dir, config_name))
    if config_name == "train" and (conf_dir / "sweep").is_dir():
        groups.append("sweep")
    return groups


# ---------------------------------------------------------------- the page

def _table(rows: list[tuple[str, str, str]], indent: str = "  ") -> list[str]:
    width_a = max((len(a) for a, _, _ in rows), default=0)
    width_b = max((len(b) for _, b, _ in rows), default=0)
    return [f"{indent}{a:<{width_a}}  {b:<{width_b}}  {c}".rstrip() for a, b, c in rows]


def groups_section(conf_dir: Path, config_name: str) -> list[str]:
    chosen = default_options(conf_dir, config_name)
    lines = ["== Config groups (group=option; * = default) =="]
    for group in app_groups(conf_dir, config_name):
        how = "+sweep=NAME with -m" if group == "sweep" else f"{group}=OPTION"
        lines.append(f"{group}  ({how})")
        options = group_options(conf_dir, group)
        lines += _table([(name + ("*" if chosen.get(group) == name else ""), "", header)
                         for name, header in options.items()], indent="    ")
    return lines


def group_schemas(schema: type) -> dict[str, list[type]]:
    """For each field of ``schema`` that is a config group, the dataclasses that can fill it:
    its annotated type when that is a dataclass, then those registered in Hydra's ConfigStore
    under the field's name (e.g. one schema per dataset kind)."""
    nested = nested_schemas(schema)
    groups: dict[str, list[type]] = {}
    for f in dataclasses.fields(schema):
        found = [nested[f.name]] if f.name in nested else []
        found += [cls for cls in registered_schemas(f.name) if cls not in found]
        if found:
            groups[f.name] = found
    return groups


def schema_sections(schema: type) -> list[tuple[str, list[FieldDoc]]]:
    """The page's field sections: the top-level scalars, then each group's fields; a group's
    further schemas add only the fields the earlier ones did not show."""
    groups = group_schemas(schema)
    sections = []
    scalars = leaf_fields(schema, skip=frozenset(groups))
    if scalars:
        sections.append(("top level", scalars))
    for name, classes in groups.items():
        shown: set[str] = set()
        for cls in classes:
            rows = [f for f in leaf_fields(cls, f"{name}.") if f.key not in shown]
            if rows:
                variant = f"({cls.__name__}) " if cls is not classes[0] else ""
                sections.append((f"{name}.*  {variant}{_first_doc_line(cls)}", rows))
            shown |= {f.key for f in rows}
    return sections


def documented_fields(schema: type) -> list[FieldDoc]:
    """Every field the ``--help`` page of ``schema`` lists."""
    return [f for _, rows in schema_sections(schema) for f in rows]


def fields_section(schema: type) -> list[str]:
    lines = ["== Fields (key=value; type = schema default, then what it means) =="]
    for title, rows in schema_sections(schema):
        lines.append(title)
        lines += _field_rows(rows)
    return lines


def _field_rows(rows: list[FieldDoc]) -> list[str]:
    return _table([(f.key, f"{f.type} = {f.default}", f.doc) for f in rows], indent="    ")


def render_help(config_name: str, schema: type, conf_dir: Path = CONF_DIR) -> str:
    """The whole ``--help`` page of the app whose root config is ``conf/<config_name>.yaml``."""
    app = APPS[config_name]
    lines = [f"{app.script} (python -m {app.module}): {app.summary}.", "",
             f"Usage: {app.script} [-m] [group=option ...] [key=value ...]", "",
             "== Examples =="]
    lines += [f"  {command}" for command in app.examples]
    lines += ["", *groups_section(conf_dir, config_name), "", *fields_section(schema), "",
              "Defaults above are the schema's; a group option sets its own values.",
              f"Later wins: {app.order}.",
              f"`{app.script} --cfg job [overrides]` prints the composed config; "
              "`--hydra-help` Hydra's own flags;",
              f"`eval \"$({app.script} -sc install=bash)\"` installs shell completion."]
    return "\n".join(lines) + "\n"


def escape_for_hydra(text: str) -> str:
    """Hydra reads the template through OmegaConf (``${...}`` interpolates), then fills it with
    ``string.Template`` (``$NAME`` substitutes): escape both so the text prints as written."""
    return text.replace("$", "$$").replace("${", "\\${")


def help_asked(argv: list[str] | None = None) -> bool:
    """Whether Hydra will print the app's help for this command line (``sys.argv[1:]`` when
    None). Read with Hydra's own argument parser, so that ``-h``, ``-mh`` and an abbreviation
    such as ``--hel`` count exactly as they count for Hydra; a matching of flag strings here
    would print an empty page for those. A command line the parser refuses is no help request:
    Hydra reports it itself when it parses it."""
    import argparse

    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.error = _refuse  # type: ignore[method-assign]  # no usage printed, no exit
    try:
        known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    except argparse.ArgumentError:
        return False
    return bool(known.help)


def _refuse(message: str) -> None:
    import argparse

    raise argparse.ArgumentError(None, message)


def register_help(config_name: str, schema: type, conf_dir: Path = CONF_DIR,
                  render: bool | None = None) -> None:
    """Store the page as the ``hydra/help`` option ``sae_<config_name>``. The page is rendered
    only when the help is asked for (``render`` None: :func:`help_asked` reads the command
    line); every other start, each SLURM task's included, stores an empty page that nothing
    prints (docs/performance.md, "Start-up of a task")."""
    from hydra.core.config_store import ConfigStore

    render = help_asked() if render is None else render
    page = render_help(config_name, schema, conf_dir) if render else ""
    node = {"app_name": APPS[config_name].script, "header": "", "footer": "",
            "template": escape_for_hydra(page)}
    ConfigStore.instance().store(group="hydra/help", name=f"sae_{config_name}", node=node)
