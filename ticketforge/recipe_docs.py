"""The recipe reference (docs/recipes.md), generated from the schema in ticketforge/recipe.py.

    python -m ticketforge.recipe_docs > docs/recipes.md

Every key, its type, default, allowed values and help text come from the dataclasses hanging off
`Recipe` (a field whose type is a dataclass is a section, walked recursively), so the page cannot
drift from the schema; tests/test_docs.py checks that the file equals `render()`. The built-in
recipes, search methods and structures are read from their registries. Imports no torch.
"""
from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any

from ticketforge import recipe as _recipe

_CMD = "python -m ticketforge.recipe_docs > docs/recipes.md"


def _cell(text: Any) -> str:
    """Text for one markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(value: str) -> str:
    return f"`{value}`"


def _unwrap_optional(tp) -> tuple[Any, bool]:
    """(the type inside Optional[...], whether it was optional)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    inner, optional = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(inner))
        name = f"{getattr(origin, '__name__', str(origin))}[{args}]" if args else getattr(origin, "__name__", str(origin))
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name


def _yaml_value(value: Any) -> str:
    """A default as it would be written in a recipe."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        short = f"{value:.6g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value if value else '""'
    return str(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _allowed(meta: dict, tp) -> str:
    choices = _recipe.choices_of(meta)
    if choices:
        inner, _ = _unwrap_optional(tp)
        each = "each one of " if inner in (list, tuple) or typing.get_origin(inner) in (list, tuple) else "one of "
        return each + ", ".join(_code(_yaml_value(c)) for c in choices)
    if meta.get("lo") is not None or meta.get("hi") is not None:
        if meta.get("lo") is None:  # _range() expects a lower bound
            return f"must be {'<' if meta.get('hi_open') else '<='} {meta.get('hi')}"
        return _recipe._range(meta)
    return ""


def _section_class(tp):
    """The dataclass a field's type names (through Optional), or None."""
    inner, _ = _unwrap_optional(tp)
    return inner if isinstance(inner, type) and dataclasses.is_dataclass(inner) else None


def _sections(cls, prefix: str = "") -> list[tuple[str, type, list]]:
    """[(key path of the section, its class, [(key path, field, type)])], depth first, schema order."""
    hints = typing.get_type_hints(cls)
    own, nested = [], []
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints.get(f.name, f.type)
        sub = _section_class(tp)
        if sub is not None:
            nested.extend(_sections(sub, path))
        else:
            own.append((path, f, tp))
    return [(prefix, cls, own)] + nested


def _doc(cls) -> str:
    doc = cls.__doc__ or ""
    # A dataclass without a docstring gets a generated signature as its __doc__: not documentation.
    if not doc or doc.startswith(cls.__name__ + "("):
        return ""
    return " ".join(doc.split())


def _schema() -> list[str]:
    out = []
    for path, cls, fields in _sections(_recipe.Recipe):
        if not fields:
            continue
        out.append(f"## {path}" if path else "## Top level")
        out.append("")
        doc = _doc(cls)
        where = f"`{cls.__name__}` in `ticketforge/recipe.py`"
        out.append(f"{doc} ({where})." if doc else f"{where}.")
        out.append("")
        out.append("| key | type | default | allowed | help |")
        out.append("|---|---|---|---|---|")
        for key, f, tp in fields:
            meta = dict(f.metadata)
            default = _default(f)
            default_text = "(required)" if default is dataclasses.MISSING else _code(_yaml_value(default))
            if default is None:
                default_text = "`null` (unset)"
            out.append("| " + " | ".join([
                _code(key), _cell(_type_name(tp)), _cell(default_text), _cell(_allowed(meta, tp)),
                _cell(meta.get("help", "")),
            ]) + " |")
        out.append("")
    return out


def _builtins() -> list[str]:
    default_structure = getattr(getattr(_recipe.Recipe(), "convert", None), "structure", "")
    out = ["## Built-in recipes", "",
           "`ticketforge recipes` lists them, `ticketforge recipes NAME` prints one; the YAML files are in "
           "`recipes/`.", "",
           "| recipe | search.method | convert.structure | description |", "|---|---|---|---|"]
    for name in _recipe.builtin_names():
        data = _recipe.load_raw(name)
        method = (data.get("search") or {}).get("method", "")
        structure = (data.get("convert") or {}).get("structure", "")
        structure_text = _code(structure) if structure else (f"{_code(default_structure)} (default)"
                                                             if default_structure else "")
        out.append("| " + " | ".join([
            _code(name), _code(method) if method else "", structure_text,
            _cell(data.get("description", "")),
        ]) + " |")
    aliases = getattr(_recipe, "ALIASES", {})
    if aliases:
        out.append("")
        out.append("Other names: " + "; ".join(f"{_code(a)} is {_code(b)}" for a, b in sorted(aliases.items())) + ".")
    out.append("")
    return out


def _keys(keys) -> str:
    return ", ".join(_code(k) for k in keys) if keys else "-"


def _methods() -> list[str]:
    from ticketforge import search

    common = getattr(search, "COMMON_KEYS", ())
    out = ["## Search methods", "",
           "`search.method`, from the registry in `ticketforge/search/__init__.py`. Every method reads "
           + _keys(common) + "; the table lists the other `search` keys each reads (the structure's budget "
           "keys come on top). A key the method and structure do not read is an error. A method scores single "
           "weights with its own search; `units` are the kinds of structure units it also scores (N:M weights, "
           "channels, blocks), with the keys it then reads, from the trained weights only.", "",
           "| method | summary | search keys | starts | units | keys with units |", "|---|---|---|---|---|---|"]
    for name, m in search.METHODS.items():
        out.append("| " + " | ".join([
            _code(name), _cell(m.summary), _keys(m.keys), _keys(m.starts), _keys(m.units),
            _keys(m.unit_keys) if m.units else "-",
        ]) + " |")
    out.append("")
    return out


def _budget_keys(s) -> str:
    fixed = set(s.fixed_keys)
    keys = s.budget_keys
    return ", ".join(_code(k) + (" (fixed)" if k in fixed else "") for k in keys) if keys else "-"


def _structures() -> list[str]:
    from ticketforge import structures

    out = ["## Structures", "",
           "`convert.structure`, from the registry in `ticketforge/structures/__init__.py`. A run sets exactly "
           "one of its budget keys; a key marked fixed is accepted but has one allowed value.", "",
           "| structure | summary | units | budget keys | tuning keys | convert keys | search methods |",
           "|---|---|---|---|---|---|---|"]
    for name, s in structures.STRUCTURES.items():
        out.append("| " + " | ".join([
            _code(name), _cell(s.summary), _code(s.units) if s.units else "the method's weight ticket",
            _budget_keys(s), _keys(s.tuning_keys), _keys(s.convert_keys), _keys(s.methods()),
        ]) + " |")
    out.append("")
    return out


def render() -> str:
    """docs/recipes.md, as text."""
    lines = [
        "# Recipe reference",
        "",
        f"Generated from the schema in `ticketforge/recipe.py` by `{_CMD}`; do not edit by hand.",
        "A recipe is YAML; unknown keys, wrong types and out-of-range values are errors that name the key "
        "and the allowed values. Any key can be set on the command line with `--set key.path=value` "
        "(the value is read as YAML). See [concepts](concepts.md) for the words used here.",
        "",
    ]
    lines += _schema()
    lines += _builtins()
    lines += _methods()
    lines += _structures()
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
