"""The README stays true: its scenario reference is the schema's, and every plugin is documented."""

from __future__ import annotations

from pathlib import Path

from fedsec_bench.plugins import registry
from fedsec_bench.reference import embed

README = Path(__file__).parent.parent / "README.md"


def test_readme_scenario_reference_matches_the_schema():
    text = README.read_text()
    assert embed(text) == text, "run: python -m fedsec_bench.reference README.md"


def test_every_registered_plugin_has_a_readme_section():
    headings = [line for line in README.read_text().splitlines() if line.startswith("#")]
    missing = [name for name in registry() if not any(f"`{name}`" in h for h in headings)]
    assert not missing, f"README has no heading naming these plugins: {missing}"
