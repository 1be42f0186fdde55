"""The scenario reference in docs/scenarios.md, generated from the schema so the two cannot drift apart.

    python -m fedsec_bench.reference                      # print the Markdown table docs/scenarios.md embeds
    python -m fedsec_bench.reference docs/scenarios.md    # rewrite the page's table in place

The table sits between the BEGIN and END markers; tests/test_docs.py fails when it differs
from what :func:`markdown` generates.
"""

from __future__ import annotations

import json
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .scenario import PluginSpec, Scenario

BEGIN, END = "<!-- scenario-reference:begin -->", "<!-- scenario-reference:end -->"


def section_model(annotation) -> type[BaseModel] | None:
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel) and candidate.model_fields:
            if candidate is not PluginSpec:
                return candidate
    return None


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        nested = section_model(field.annotation)
        if nested is not None:
            out += rows(nested, f"{path}.")
            continue
        if field.default is PydanticUndefined and field.default_factory is None:
            default = "required"
        else:
            value = field.default_factory() if field.default_factory else field.default
            value = value.model_dump() if isinstance(value, BaseModel) else value
            default = f"`{json.dumps(value)}`"
        kind = _type_name(field.annotation)
        out.append(f"| `{path}` | {kind} | {default} | {(field.description or '').replace('|', '/')} |")
    return out


def _type_name(annotation) -> str:
    """int, `a` / `b`, list of str, ... or null: how a YAML author reads a type."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin in (Union, UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if annotation is type(None):
        return "null"
    if annotation is PluginSpec:
        return "{name, ...options}"
    return getattr(annotation, "__name__", str(annotation))


def markdown() -> str:
    header = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    return "\n".join([BEGIN, *header, *rows(Scenario), END])


def embed(page: str) -> str:
    """The page's text with its reference block (BEGIN ... END) replaced by the current one."""
    head, begin, rest = page.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not (begin and end):
        raise ValueError(f"no scenario reference block: the page needs the lines {BEGIN} and {END}")
    return head + markdown() + tail


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if len(sys.argv) > 1:
        path = Path(sys.argv[1])
        path.write_text(embed(path.read_text()))
    else:
        print(markdown())
