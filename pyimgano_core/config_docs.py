"""The config reference (``docs/config.md``), generated from the pydantic models.

Walks :class:`~pyimgano_core.config.ExperimentConfig` and every registered detector's parameter
model and writes one table row per field: path, type, default, allowed values, description.
A nested model adds its fields under a dotted path (``calibration.holdout_fraction``); each member
of a union of models (``dataset: {type: folder, ...}``, discriminated or not) gets a table of its
own. Descriptions come from ``Field(description=...)``, else from the numpy-style ``Attributes``
section of the model's docstring. Nothing here knows a field by name, so a new or restructured
model is documented by regenerating:

    python -m pyimgano_core.config_docs            # rewrite docs/config.md
    python -m pyimgano_core.config_docs --check    # exit 1 if docs/config.md is stale

Importing this module imports pydantic only; :func:`render` imports the config and the detector
registry (and with them torch).
"""
from __future__ import annotations

import inspect
import json
import re
import sys
import types
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python
from .config import ExperimentConfig

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "config.md"
COMMAND = "python -m pyimgano_core.config_docs"
NONE = type(None)
_CONSTRAINTS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "multiple_of": "multiple of",
                "min_length": "length >=", "max_length": "length <=", "pattern": "matches"}

HEADER = f"""# Config reference

<!-- Generated from the pydantic models by `{COMMAND}`; do not edit by hand. -->

Every key an experiment YAML accepts. Unknown keys are errors that name the allowed keys; any key
can be overridden on the command line with `--set path=value` (e.g. `--set dataset.category=[bottle,cable]`).
Relative paths are resolved against the directory you run `pyimgano` from. `null` is YAML's null
(Python `None`). Types: `A | B` is either; `tuple[int, int]` is a two-element list in YAML; a
*section* is a nested mapping whose keys follow in the rows below it.
"""


# ------------------------------------------------------------------------------ annotations
def _bare(ann: Any) -> Any:
    """``Annotated[X, ...]`` -> ``X``."""
    while get_origin(ann) is Annotated:
        ann = get_args(ann)[0]
    return ann


def _members(ann: Any) -> list[Any]:
    """The members of a (nested) union, or ``[ann]``."""
    ann = _bare(ann)
    if get_origin(ann) in (Union, types.UnionType):
        return [m for a in get_args(ann) for m in _members(a)]
    return [ann]


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _models(ann: Any, suffix: str = "") -> tuple[str, list[type[BaseModel]]]:
    """Models a field holds and the path suffix to reach them ('' itself, '[]' list items)."""
    found, where = [], suffix
    for m in _members(ann):
        origin, args = get_origin(m), get_args(m)
        if _is_model(m):
            found.append(m)
        elif origin in (list, set, frozenset) or (origin is tuple and args[-1:] == (Ellipsis,)):
            where, inner = _models(args[0], suffix + "[]")
            found += inner
        elif origin is dict:
            where, inner = _models(args[1], suffix + ".<key>")
            found += inner
    return where, found


def _show(value: Any) -> str:
    return json.dumps(to_jsonable_python(value), ensure_ascii=False)


def type_name(ann: Any) -> str:
    """``int | tuple[int, int] | "auto" | null``-style names (literals as their values)."""
    ann = _bare(ann)
    origin, args = get_origin(ann), get_args(ann)
    if ann is NONE:
        return "null"
    if ann is Any:
        return "any"
    if origin in (Union, types.UnionType):
        return " | ".join(dict.fromkeys(type_name(a) for a in args))
    if origin is Literal:
        return " | ".join(_show(v) for v in args)
    if _is_model(ann):
        return "section"
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if isinstance(ann, type) and issubclass(ann, Path):
        return "path"
    return getattr(ann, "__name__", str(ann))


def _literal_values(ann: Any) -> list[Any] | None:
    """The values of a field whose type is literals or enums only (``null`` allowed too), else None."""
    members = [m for m in _members(ann) if m is not NONE]
    values = []
    for m in members:
        if get_origin(m) is Literal:
            values += get_args(m)
        elif isinstance(m, type) and issubclass(m, Enum):
            values += [e.value for e in m]
        else:
            return None
    return values or None


def _discriminator(info: FieldInfo) -> str | None:
    """The tag field of a discriminated union (None for a callable discriminator or none)."""
    disc = info.discriminator
    for meta in info.metadata:
        disc = disc or getattr(meta, "discriminator", None)
    disc = getattr(disc, "discriminator", disc)  # pydantic.Discriminator(...) wraps a str or a callable
    return disc if isinstance(disc, str) else None


# ------------------------------------------------------------------------------ docstrings
def _summary(obj: Any, inherit: bool = False) -> str:
    """First paragraph of an object's docstring (a class's own unless ``inherit``)."""
    own = obj.__dict__.get("__doc__") if isinstance(obj, type) and not inherit else inspect.getdoc(obj)
    return " ".join(inspect.cleandoc(own or "").split("\n\n")[0].split())


def _docstring_fields(cls: type) -> dict[str, str]:
    """``name : type`` entries of a numpy-style Attributes/Parameters section."""
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
    match = re.search(r"^(?:Attributes|Parameters)\n-+\n(.*?)(?=\n\S[^\n]*\n-+\n|\Z)", doc, re.S | re.M)
    entries: dict[str, list[str]] = {}
    current = None
    for line in match.group(1).splitlines() if match else []:
        if line[:1].strip():
            current = line.split(":")[0].strip()
            entries[current] = []
        elif current and line.strip():
            entries[current].append(line.strip())
    return {k: " ".join(v) for k, v in entries.items()}


def _description(model: type[BaseModel], name: str, info: FieldInfo, nested: list[type[BaseModel]]) -> str:
    """The field's own description, else the nearest base class's (a field redeclared with a new
    default keeps its meaning), else its docstring entry, else the nested model's summary."""
    bases = [c for c in model.__mro__ if isinstance(c, type) and issubclass(c, BaseModel) and c is not BaseModel]
    for text in [info.description] + [c.model_fields[name].description for c in bases if name in c.model_fields]:
        if text:
            return text
    for cls in bases:
        text = _docstring_fields(cls).get(name)
        if text:
            return text
    return _summary(nested[0]) if len(nested) == 1 else ""


# ------------------------------------------------------------------------------ tables
@dataclass
class Table:
    """One Markdown table: a heading, a sentence, rows, and the tables of union members below it."""

    anchor: str
    title: str
    intro: str
    rows: list[tuple[str, ...]] = field(default_factory=list)
    children: list[Table] = field(default_factory=list)


def _default(info: FieldInfo, disc: str | None) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):  # a section: its fields' defaults (a union member: named by its tag)
        return f"`{{{disc}: {getattr(value, disc)}}}`" if disc in type(value).model_fields else "(section defaults)"
    return f"`{_show(value)}`"


def _allowed(info: FieldInfo, ann: Any) -> list[str]:
    values = _literal_values(ann)
    out = [", ".join(f"`{_show(v)}`" for v in values)] if values else []
    for meta in info.metadata:
        for attr, op in _CONSTRAINTS.items():
            bound = getattr(meta, attr, None)
            if bound is not None:
                out.append(f"{op} `{bound}`")
    return out


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class _Walker:
    def __init__(self) -> None:
        self.seen: dict[tuple[str, type], str] = {}  # (path, member model) -> anchor of its table

    def rows(self, model: type[BaseModel], prefix: str, table: Table, skip: frozenset[str] = frozenset(),
             notes: dict[str, tuple[str, str]] | None = None, first: str | None = None) -> None:
        """Append a row per field of ``model`` (and its nested fields) to ``table``; ``first``: the
        field listed first (a union member's tag)."""
        notes = notes or {}
        for name in sorted(model.model_fields, key=lambda n: n != first):
            info = model.model_fields[name]
            if name in skip:
                continue
            path = prefix + name
            suffix, nested = _models(info.annotation)
            disc = _discriminator(info)
            values = _literal_values(info.annotation)  # a choice: the type of its values, the values under "allowed"
            kind = " | ".join(dict.fromkeys(type(v).__name__ for v in values)) if values else type_name(info.annotation)
            if values and NONE in _members(info.annotation):
                kind += " | null"
            kind = f"`{kind}`"
            allowed = _allowed(info, info.annotation)
            desc = _description(model, name, info, nested)
            if len(nested) > 1 or disc:
                links = [self.member(m, path + suffix, disc, table) for m in nested]
                kind = "one of the sections below" + (f", chosen by `{disc}`" if disc else "")
                allowed = [", ".join(links)]
            extra_allowed, extra_desc = notes.get(path, ("", ""))
            allowed += [extra_allowed] if extra_allowed else []
            desc = " ".join(filter(None, [desc, extra_desc]))
            table.rows.append((f"`{path}`", kind, _default(info, disc), "; ".join(allowed), desc))
            if len(nested) == 1 and not disc:
                self.rows(nested[0], path + suffix + ".", table, notes=notes)

    def member(self, model: type[BaseModel], path: str, disc: str | None, parent: Table) -> str:
        """A table for one member of a union of models; returns a Markdown link to it."""
        tag = get_args(_bare(model.model_fields[disc].annotation)) if disc and disc in model.model_fields else ()
        label = f"{disc}: {tag[0]}" if len(tag) == 1 else model.__name__
        key = (path, model)
        if key not in self.seen:
            self.seen[key] = _anchor(f"{path} {label}")
            child = Table(self.seen[key], f"`{path}` with `{label}`", _summary(model))
            parent.children.append(child)
            self.rows(model, path + ".", child, first=disc)
        return f"[`{tag[0] if len(tag) == 1 else model.__name__}`](#{self.seen[key]})"


def _render_table(table: Table, level: int) -> list[str]:
    lines = [f'<a id="{table.anchor}"></a>', "", f"{'#' * level} {table.title}", ""]
    if table.intro:
        lines += [table.intro.replace("``", "`"), ""]
    lines += ["| path | type | default | allowed | description |", "| --- | --- | --- | --- | --- |"]
    for row in table.rows:
        cells = (" ".join(c.replace("``", "`").split()).replace("|", "\\|") for c in row)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for child in table.children:
        lines += _render_table(child, level + 1)
    return lines


def render() -> str:
    """The whole reference as Markdown (the content of docs/config.md)."""
    from .detectors import get_detector_class, list_detectors  # torch: only when the reference is rendered

    names = list_detectors()
    groups: dict[type, list[str]] = {}
    for name in names:
        groups.setdefault(get_detector_class(name).Params, []).append(name)
    walker = _Walker()
    top = Table("experiment-config", "Experiment config", _summary(ExperimentConfig))
    notes = {"detector.name": (", ".join(f"`{n}`" for n in names), "the registered detector (`pyimgano detectors`)"),
             "detector.params": ("", "that detector's parameters: one table per detector below")}
    walker.rows(ExperimentConfig, "", top, notes=notes)
    tables, anchors = [top], {}
    for params, group in groups.items():
        title = "`detector.params` for " + ", ".join(f"`{n}`" for n in group)
        intro = (_summary(get_detector_class(group[0]), inherit=True) + " `seed` comes from the top-level `seed`"
                 + (", `category` from `dataset.category`." if "category" in params.model_fields else "."))
        table = Table(_anchor("detector params " + group[0]), title, intro.strip())
        walker.rows(params, "detector.params.", table, skip=frozenset({"seed", "category"}))
        tables.append(table)
        anchors.update(dict.fromkeys(group, table.anchor))
    lines = [HEADER, "Detector parameters: " + ", ".join(f"[`{n}`](#{anchors[n]})" for n in names) + ".", ""]
    for table in tables:
        lines += _render_table(table, 2)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog=COMMAND, description="Write the config reference (docs/config.md).")
    parser.add_argument("--out", type=Path, default=DOC_PATH, help=f"output file (default: {DOC_PATH})")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is stale: regenerate it with `{COMMAND}`", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
