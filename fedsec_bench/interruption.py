"""SIGINT and SIGTERM end a run cleanly: as KILLED, with what it measured so far.

Python turns SIGINT into KeyboardInterrupt and lets SIGTERM kill the process outright
(leaving the MLflow run RUNNING forever). While a run is going, both raise
:class:`Interrupted` instead, in the main thread between two Python steps (so a
long torch op finishes first), which the tracker records as KILLED. Further signals
are ignored while the run's record is written, then the previous handlers come back.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A signal asked the run to stop. BaseException, like KeyboardInterrupt, so ``except Exception``
    in a plugin does not swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (130, 143)."""
        return 128 + self.signum


@contextmanager
def stop_on_signals():
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` (main thread only: signal handlers
    can only be set there; elsewhere, e.g. in a Ray task, the block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}

    def interrupt(signum, frame):
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)  # the first signal stops the run; its record must get written
        raise Interrupted(signum)

    for s in SIGNALS:
        signal.signal(s, interrupt)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
