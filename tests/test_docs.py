"""The README, the docs and the packaging stay true: the scenario reference is the schema's, the
plugin table lists every registered plugin and each has a section, every link resolves, every
package installs."""

from __future__ import annotations

import re
from pathlib import Path

from fedsec_bench.registry import entry_points_by_name
from fedsec_bench.reference import embed

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SCENARIO_REFERENCE = DOCS / "scenarios.md"
PLUGIN_TABLE_HEADING = "## Attacks, defenses and aggregation rules"


def test_docs_scenario_reference_matches_the_schema():
    text = SCENARIO_REFERENCE.read_text()
    assert embed(text) == text, "run: python -m fedsec_bench.reference docs/scenarios.md"


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans kept (headings name plugins in them)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _headings(text: str) -> list[str]:
    return [line for line in _prose(text) if re.match(r"#{1,6} ", line)]


def _plugin_table() -> dict[str, str]:
    """The README's plugin table: each plugin name in a row's first cell -> the page the row links to."""
    lines = _prose(README.read_text())
    assert PLUGIN_TABLE_HEADING in lines, f"README has no section {PLUGIN_TABLE_HEADING!r}"
    start = lines.index(PLUGIN_TABLE_HEADING) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    rows = [line for line in lines[start:end] if line.startswith("| `")]
    table: dict[str, str] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        links = re.findall(r"\]\(([^)#]+)", cells[-1])
        assert len(links) == 1, f"plugin table row links no single page: {row}"
        for name in re.findall(r"`([a-z0-9_]+)`", cells[0]):
            assert name not in table, f"{name} is listed twice in the README's plugin table"
            table[name] = links[0]
    return table


def test_readme_plugin_table_lists_exactly_the_registered_plugins_and_docs_name_each():
    registered = {name for name, ep in entry_points_by_name().items() if ep.dist is None or ep.dist.name == "fedsec-bench"}
    table = _plugin_table()
    assert not registered - table.keys(), f"README's plugin table lacks: {sorted(registered - table.keys())}"
    assert not table.keys() - registered, f"README's plugin table lists unregistered: {sorted(table.keys() - registered)}"
    for name, page in table.items():
        headings = _headings((README.parent / page).read_text())
        assert any(f"`{name}`" in h for h in headings), f"{page} has no heading naming `{name}`"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _headings(page.read_text()):
        slug = _slug(heading)
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_every_relative_link_in_readme_and_docs_resolves_inside_the_repository():
    pages = [README, *sorted(DOCS.glob("*.md"))]
    assert len(pages) > 1, "docs/ has no pages"
    broken = []
    for page in pages:
        text = "\n".join(_prose(page.read_text()))
        assert "../shared" not in text and "DESIGN.md" not in text, f"{page.name} points outside the repository"
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", text)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.is_relative_to(ROOT.resolve()) or not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file in the repository)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


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


def test_every_built_in_plugin_says_what_it_does_with_instruction_data(capsys):
    """``fedsec list`` prints it under each plugin; an empty line would leave users guessing."""
    from fedsec_bench.cli import main
    from fedsec_bench.registry import load_plugin

    built_in = [name for name, ep in entry_points_by_name().items() if ep.dist is None or ep.dist.name == "fedsec-bench"]
    silent = [name for name in built_in if not load_plugin(name).on_instruction_data]
    assert not silent, f"plugins without on_instruction_data: {silent}"
    main(["list"])
    assert capsys.readouterr().out.count("instruction data: ") == len(built_in)
