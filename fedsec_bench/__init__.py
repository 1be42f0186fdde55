"""fedsec-bench: measure what federated LLM training leaks and how well each defense holds.

The public names are imported on first use (PEP 562), so that ``fedsec --help`` and other
commands that need no model answer without loading torch and transformers.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedsec-bench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_PUBLIC = {"Result": "runner", "run": "runner", "load_scenario": "plan", "Scenario": "scenario",
           "ScenarioError": "errors"}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fedsec_bench' has no attribute {name!r}")
    value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
