"""Plugins found by name in the ``fedsec_bench.plugins`` entry-point group, loaded only when used.

The built-in attacks and defenses are registered like a third party's::

    [project.entry-points."fedsec_bench.plugins"]
    my_attack = "my_pkg.attack:MyAttack [my-extra]"

Nothing is imported until a scenario (or ``fedsec list``) names a plugin, so a plugin whose
optional dependency is missing breaks only the scenarios that use it. The entry point's
``[extra]`` names the pip extra that brings that dependency; the refusal says how to install it.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from .errors import excerpt
from .plugins import Plugin

ENTRY_POINT_GROUP = "fedsec_bench.plugins"


class PluginUnavailable(Exception):
    """A registered plugin that cannot be imported here: an optional dependency is not installed, or
    (a broken third-party package) its module failed to import. ``reason`` says which, ``fix`` what to do."""

    def __init__(self, name: str, reason: str, fix: str):
        self.name, self.reason, self.fix = name, reason, fix
        super().__init__(f"{name} is unavailable: {reason}; {fix}")


@dataclass(frozen=True)
class Listing:
    """One registered plugin as ``fedsec list`` shows it: its class, or why it cannot load."""

    name: str
    plugin: type[Plugin] | None
    unavailable: PluginUnavailable | None = None


@functools.cache
def entry_points_by_name() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


_loaded: dict[str, type[Plugin]] = {}


def loaded_plugins() -> dict[str, type[Plugin]]:
    """The classes loaded so far, by name. Tests register a plugin class here directly."""
    return _loaded


def refresh() -> None:
    """Forget what was found and loaded: after installing a plugin package into this process."""
    entry_points_by_name.cache_clear()
    _loaded.clear()


def load_plugin(name: str) -> type[Plugin]:
    """The plugin class registered as ``name``; KeyError if none is; PluginUnavailable if it cannot import."""
    if name in _loaded:
        return _loaded[name]
    ep = entry_points_by_name()[name]
    try:
        cls = ep.load()
    except ModuleNotFoundError as exc:
        raise PluginUnavailable(name, f"it needs {exc.name}, which is not installed", install_line(ep)) from exc
    except Exception as exc:  # noqa: BLE001 - a broken plugin package must not break the others
        raise PluginUnavailable(
            name, f"{ep.value} failed to import ({type(exc).__name__}: {exc})", "fix or reinstall the package that registers it"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise TypeError(f"entry point {ep.name} = {ep.value} is not a fedsec_bench Plugin subclass")
    if cls.name != ep.name:
        raise TypeError(f"entry point {ep.name} points to a plugin named {cls.name!r}")
    _loaded[name] = cls
    return cls


def install_line(ep: EntryPoint) -> str:
    """``pip install 'dist[extra]'`` from the entry point's ``[extra]`` (read from its value:
    ``EntryPoint.extras`` splits a hyphenated extra name into words)."""
    distribution = ep.dist.name if ep.dist is not None else "the package that registers it"
    extras = re.search(r"\[(.*)\]", ep.value)
    return f"pip install '{distribution}{f'[{extras.group(1).strip()}]' if extras else ''}'"


def list_plugins() -> list[Listing]:
    """Every registered plugin, sorted by name, each loaded or marked unavailable."""
    out = []
    for name in sorted(set(entry_points_by_name()) | set(_loaded)):
        try:
            out.append(Listing(name, load_plugin(name)))
        except PluginUnavailable as exc:
            out.append(Listing(name, None, exc))
    return out


def get_plugin(name: str, kind: str) -> type[Plugin]:
    """The ``kind`` plugin called ``name``; ValueError with a did-you-mean, or PluginUnavailable."""
    known = name in _loaded or name in entry_points_by_name()
    cls = load_plugin(name) if known else None
    if cls is None or cls.kind != kind:
        names = sorted(item.name for item in list_plugins() if item.plugin is None or item.plugin.kind == kind)
        close = difflib.get_close_matches(excerpt(name, 100), names, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known {kind}s: {', '.join(names) or 'none'}"
        raise ValueError(f"unknown {kind} '{excerpt(name)}' ({hint})")
    return cls
