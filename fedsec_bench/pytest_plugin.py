"""A pytest fixture for privacy gates in your own test suite (auto-loaded once fedsec-bench is installed).

    def test_dp_defense_still_holds(fedsec_check):
        fedsec_check("results/baselines/my_scenario.json")   # fails, with the table, on any regression
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def fedsec_check():
    """Run a baseline's scenario and fail the test, naming each regressed figure, if any regressed."""
    from .check import check_baseline, format_rows

    def check(baseline: str | Path):
        rows = check_baseline(Path(baseline))
        failed = [f"{r.metric} ({r.verdict.lower()})" for r in rows if r.failed]
        if failed:
            pytest.fail(f"figures regressed: {', '.join(failed)}\n{format_rows(rows)}", pytrace=False)
        return rows

    return check
