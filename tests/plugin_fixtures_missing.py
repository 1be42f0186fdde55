"""A plugin module whose optional dependency is not installed (registered as ``needs_missing``)."""

import fedsec_test_dependency_that_is_not_installed  # noqa: F401

from fedsec_bench.plugins import Plugin


class NeedsMissing(Plugin):
    name = "needs_missing"
    kind = "attack"
