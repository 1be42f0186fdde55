"""fedsec-bench: measure what federated LLM training leaks and how well each defense holds."""

from importlib.metadata import PackageNotFoundError, version

from .errors import ScenarioError
from .runner import Result, run
from .plan import load_scenario
from .scenario import Scenario

try:
    __version__ = version("fedsec-bench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["Result", "Scenario", "ScenarioError", "load_scenario", "run", "__version__"]
