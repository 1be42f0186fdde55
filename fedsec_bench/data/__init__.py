"""Federated data: who holds which examples, the held-out non-members, and the planted canaries."""

from .examples import Example, instruction_example, text_example
from .federated import FederatedData, build_federated_data
from .synthetic import Canary

__all__ = ["Canary", "Example", "FederatedData", "build_federated_data", "instruction_example", "text_example"]
