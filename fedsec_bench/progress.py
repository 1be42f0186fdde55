"""Progress bars for long work inside a run (pretraining, say), shown only where someone watches.

The CLI turns them on (``fedsec run`` without ``--quiet``); the Python API and worker processes
leave them off, so a library call or a sweep child prints nothing it was not asked to. Each bar
goes to standard error, below the run's own bar of rounds.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

_shown = False


@contextmanager
def shown(enabled: bool = True):
    """Bars of long steps on (``enabled``) for the work inside the block, then off again."""
    global _shown
    before, _shown = _shown, enabled
    try:
        yield
    finally:
        _shown = before


@contextmanager
def bar(total: int, desc: str, unit: str):
    """A tqdm bar of ``total`` units, closed when the work is done; a no-op bar when progress is off."""
    from tqdm import tqdm

    progress = tqdm(total=total, desc=desc, unit=unit, disable=not _shown, file=sys.stderr, leave=False)
    try:
        yield progress
    finally:
        progress.close()
