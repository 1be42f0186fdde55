"""The README and the packaging stay true: the reference is the schema's, every plugin is documented, every package installs."""

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


def test_every_package_folder_is_listed_for_installation():
    """setuptools installs only the listed packages: a subpackage left out would vanish from a wheel."""
    import tomllib

    config = tomllib.loads((README.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = set()
    for package, folder in config["package-dir"].items():
        for init in (README.parent / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(README.parent / folder).parts
            on_disk.add(".".join((package, *relative)))
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
