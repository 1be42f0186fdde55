"""Scenario YAML read within bounds: document size, nesting depth and alias expansion.

YAML aliases let a 500-byte file stand for a value of billions of items (the "billion
laughs"): the loader builds it cheaply out of shared references, and it explodes later in
whatever walks it (pydantic's checks, an error message's repr, a sweep's copy of its matrix).
So the composed document is measured before any Python value is built from it, every alias
counted as the copy it stands for, and refused past the bounds with the field path where
the bound is crossed. Deep nesting is refused while composing, before PyYAML's recursive
composer could hit Python's recursion limit. Values that reach an error message go through
:func:`value_excerpt`, a bounded repr, never their full one.
"""

from __future__ import annotations

import reprlib
from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from .errors import ScenarioError, excerpt

MAX_DOCUMENT_BYTES = 256 * 1024
"""A scenario is a few kilobytes; data belongs in data.path files. (PyYAML's pure-Python parser, the one
that can bound nesting while it composes, reads about 100 KB a second.)"""
MAX_DEPTH = 32
"""Nesting levels, aliases expanded; a scenario nests about seven (matrix → alternatives → plugin options)."""
MAX_EXPANDED_SIZE = 1_000_000
"""Values plus scalar characters once every alias is expanded: room for any document under
:data:`MAX_DOCUMENT_BYTES` written out, not for one that multiplies itself through aliases."""
MAX_INT_DIGITS = 100
"""Characters of an integer scalar: every size bound and seed has at most 20 digits."""
NOT_JSON_TAGS = ("binary", "set", "timestamp", "omap", "pairs")
"""YAML types a scenario refuses: it must stay plain JSON data, as MLflow logs it and a sweep copies it."""
EXCERPT = 80
"""Characters of a value an error message shows."""


class _LimitReached(yaml.YAMLError):
    """Raised inside the loader; :func:`load_yaml` turns it into a ScenarioError line."""

    def __init__(self, path: list, what: str, fix: str):
        super().__init__(what)
        self.path, self.what, self.fix = path, what, fix

    def error(self, source: str) -> ScenarioError:
        return ScenarioError(f"{field_of(self.path)}: {self.what} in {source}; {self.fix}")


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a document that nests deeper than :data:`MAX_DEPTH` or expands,
    through its aliases, past :data:`MAX_EXPANDED_SIZE`, before a value is constructed."""

    def __init__(self, stream):
        super().__init__(stream)
        self._path: list = []

    def compose_node(self, parent, index):
        if len(self._path) >= MAX_DEPTH:
            raise _LimitReached(list(self._path), f"nested more than {MAX_DEPTH} levels deep",
                                "a scenario nests a few levels; flatten it")
        self._path.append(index.value if isinstance(index, ScalarNode) else index)
        try:
            return super().compose_node(parent, index)
        finally:
            self._path.pop()

    def construct_yaml_int(self, node):
        """Refuse an integer too long to be a size, a count or a seed before Python converts it (past
        4,300 digits it refuses, after a quadratic conversion)."""
        if len(node.value) > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {len(node.value):,} characters, over the {MAX_INT_DIGITS} a scenario's "
                "numbers need", node.start_mark)
        return super().construct_yaml_int(node)

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            check_expansion(node)
        return node

    def compose_mapping_node(self, anchor):
        """Refuse a key given twice in one mapping (YAML forbids it; PyYAML would keep the last silently)."""
        node = super().compose_mapping_node(anchor)
        seen = set()
        for key, _ in node.value:
            if isinstance(key, ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"found {value_excerpt(key.value, 40)} a second time; keep one of them", key.start_mark)
                seen.add((key.tag, key.value))
        return node

    def refuse_tag(self, node):
        raise yaml.constructor.ConstructorError(
            None, None, f"a {node.tag.rpartition(':')[2]} ({node.tag}) has no place in a scenario, whose values are "
            "null, true/false, numbers, strings, lists and mappings", node.start_mark)


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)
for _tag in NOT_JSON_TAGS:
    BoundedLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", BoundedLoader.refuse_tag)
BoundedLoader.yaml_implicit_resolvers = {  # 2024-01-01 stays the string it looks like, not a date
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(text: str, source: str, at: list | None = None) -> Any:
    """``text`` parsed as YAML within the bounds; every problem is a ScenarioError naming ``source``
    (a file, or ``--set PATH``) and, for a bound, the field path where it is crossed (under ``at``, the
    field an override sets)."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_DOCUMENT_BYTES:
        raise ScenarioError(f"{source}: {size:,} bytes, over the {MAX_DOCUMENT_BYTES:,} a scenario may have; "
                            "a scenario is a few kilobytes: put data in files named by data.path")
    loader = None
    try:
        loader = BoundedLoader(text)  # its reader refuses control characters already
        loader.name = source  # what PyYAML's messages call the document
        return loader.get_single_data()
    except _LimitReached as exc:
        exc.path = [*(at or []), *exc.path]
        raise exc.error(source) from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{source}: not valid YAML: {yaml_problem(exc)}") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a scalar PyYAML cannot build (a !!timestamp...)
        raise ScenarioError(f"{source}: a value YAML cannot read ({excerpt(str(exc), 200)}); "
                            "write it as a plain number or string") from None
    finally:
        if loader is not None:
            loader.dispose()


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one bounded line: what is wrong and where (its own message spans several lines,
    quoting the document)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return excerpt(" ".join(str(exc).split()), 300)
    mark = exc.problem_mark or exc.context_mark
    text = "; ".join(excerpt(" ".join(part.split()), 200) for part in (exc.context, exc.problem) if part)
    return text + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")


def check_value(value: Any, source: str) -> None:
    """The same bounds for a scenario given as a Python value (shared references count as aliases)."""
    try:
        check_expansion(value)
    except _LimitReached as exc:
        raise exc.error(source) from None


def field_of(path: list) -> str:
    """A node path as the scenario's errors name fields: ``data.canaries.kinds[0]``; ``scenario`` for the root."""
    out = ""
    for part in path[:MAX_PATH_PARTS]:
        if part is None:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + excerpt(str(part), 40)
    return (out or "scenario") + ("…" if len(path) > MAX_PATH_PARTS else "")


MAX_PATH_PARTS = 8
"""Parts of a field path an error shows."""


def _children(value: Any) -> list[tuple[Any, Any]]:
    """(label, child) pairs of a composed node or of a plain Python value; a mapping's keys are children
    too (label None: a path does not name them)."""
    if isinstance(value, SequenceNode):
        return list(enumerate(value.value))
    if isinstance(value, MappingNode):
        return [pair for key, item in value.value
                for pair in ((None, key), (key.value if isinstance(key, ScalarNode) else None, item))]
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in ((None, key), (key, item))]
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(enumerate(value))
    return []


def _size(value: Any) -> int:
    """A scalar's weight: one, plus its characters."""
    text = value.value if isinstance(value, ScalarNode) else value
    return 1 + (len(text) if isinstance(text, (str, bytes)) else 0)


def check_expansion(root: Any) -> None:
    """Weigh every node of a composed document (or every part of a Python value) once, as its aliases
    (shared references) expand it, memoised so the walk costs the document, not its expansion; refuse a
    recursive alias, a depth or a weight past the bounds."""
    weight: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    trail: list = []  # the labels down to the node being walked, for an error's field path
    stack: list[tuple[Any, Any, bool]] = [(root, None, False)]
    while stack:
        node, label, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            trail.pop()
            kids = [child for _, child in _children(node)]
            weight[key] = sum(weight[id(c)] for c in kids) + (1 if kids else _size(node))
            depth[key] = 1 + max((depth[id(c)] for c in kids), default=0)
            continue
        if key in weight:
            continue
        if key in on_path:
            raise _LimitReached(trail + [label], "an alias refers to a value that contains it (a recursive alias)",
                                "a scenario's values are finite: write the value out instead of the alias")
        on_path.add(key)
        trail.append(label)
        stack.append((node, label, True))
        stack.extend((child, name, False) for name, child in _children(node) if id(child) not in weight)
    if depth[id(root)] > MAX_DEPTH:
        raise _LimitReached(_path_down(root, depth, lambda d, level: level < MAX_DEPTH),
                            f"nested more than {MAX_DEPTH} levels deep once its aliases are expanded",
                            "a scenario nests a few levels; flatten it")
    if weight[id(root)] > MAX_EXPANDED_SIZE:
        raise _LimitReached(
            _path_down(root, weight, lambda w, level: w > MAX_EXPANDED_SIZE),
            f"expands to more than {MAX_EXPANDED_SIZE:,} values and characters once its aliases (*name) are expanded",
            "an alias that repeats aliases multiplies; write the value out, or use fewer aliases",
        )


def _path_down(root: Any, measure: dict[int, int], go_on) -> list:
    """The field where a bound is crossed: follow, through mappings, the field with the largest ``measure``
    while ``go_on(its measure, level)``, e.g. ``model.dtype`` for an alias bomb given as model.dtype."""
    path, node = [], root
    while isinstance(node, (MappingNode, dict)):
        fields = [(label, child) for label, child in _children(node) if label is not None]
        if not fields:
            break
        label, child = max(fields, key=lambda item: measure[id(item[1])])
        if not go_on(measure[id(child)], len(path) + 1):
            break
        path.append(label)
        node = child
    return path


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, EXCERPT, EXCERPT, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 4


def value_excerpt(value: Any, limit: int = EXCERPT) -> str:
    """A repr of ``value`` of at most ``limit`` characters, built without the full repr (which, for an
    alias-built value or a huge integer, could be gigabytes or refuse to exist)."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an integer past Python's int-to-str digit limit
        text = f"<an integer of {value.bit_length():,} bits>" if isinstance(value, int) else f"<{type(value).__name__}>"
    return excerpt(text, limit)
