"""SIGINT and SIGTERM end a run cleanly: as KILLED, with what it measured so far.

Python turns SIGINT into KeyboardInterrupt and lets SIGTERM kill the process outright
(leaving the MLflow run RUNNING forever). While a run is going, both raise
:class:`Interrupted` instead, in the main thread between two Python steps (so a
long torch op finishes first), which the tracker records as KILLED. Further signals
are ignored while the run's record is written, then the previous handlers come back.

A signal must not land inside a write to the tracking store: an exception thrown
through SQLAlchemy's open transaction leaves SQLite locked, and the KILLED status
could then not be written. Such writes run :func:`uninterruptible`: a signal that
arrives meanwhile is held and raised as soon as the write is done.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from functools import wraps

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_held = {"depth": 0, "signum": None}
"""How many uninterruptible sections are open, and the signal that arrived inside one."""


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
        if _held["depth"]:
            _held["signum"] = signum
            return
        raise Interrupted(signum)

    for s in SIGNALS:
        signal.signal(s, interrupt)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def uninterruptible(method):
    """Run ``method`` to its end even if a signal arrives; raise :class:`Interrupted` right after it."""

    @wraps(method)
    def guarded(*args, **kwargs):
        _held["depth"] += 1
        try:
            result = method(*args, **kwargs)
        finally:
            _held["depth"] -= 1
        if not _held["depth"] and _held["signum"] is not None:
            signum, _held["signum"] = _held["signum"], None
            raise Interrupted(signum)
        return result

    return guarded
