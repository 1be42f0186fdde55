"""Federated data: who holds which text, the held-out non-members, and the planted canaries."""

from .federated import FederatedData, build_federated_data
from .synthetic import Canary

__all__ = ["Canary", "FederatedData", "build_federated_data"]
