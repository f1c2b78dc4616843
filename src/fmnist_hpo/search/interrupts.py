"""Ctrl-C and SIGTERM always land: each is recorded as it arrives, raised there, and raised again at the
sweep's next safe point (every step report, epoch and trial).

Python raises a signal's exception in whatever frame it is running. When that frame is a garbage-collection
callback (SQLAlchemy's `_collection_gced`, any `__del__`), Python would print "Exception ignored in ..." with
a traceback and carry on as if nothing happened; the recorded request is what stops the sweep then, and
the swallowed exception is not printed (sys.unraisablehook), since it has not been lost.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

from fmnist_hpo.errors import Terminated

_requested: int | None = None  # the signal received while stop_on_signals is active, until it ends


def _exception(signum: int) -> BaseException:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handle(signum: int, frame: object) -> None:
    global _requested
    _requested = signum
    raise _exception(signum)


def _quiet_when_recorded(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """hook, less the interruptions swallowed where they landed: they are on record, nothing to print."""

    def quiet(unraisable: Any) -> None:
        if _requested is None or not isinstance(unraisable.exc_value, KeyboardInterrupt | Terminated):
            hook(unraisable)

    return quiet


def raise_if_requested() -> None:
    """Raise the interruption a signal asked for, if one did (it may have been swallowed where it landed)."""
    if _requested is not None:
        raise _exception(_requested)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt, SIGTERM Terminated, and both are remembered until the block ends."""
    global _requested
    if signal.getsignal(signal.SIGTERM) is _handle:  # nested: the outer block keeps the request
        yield
        return
    _requested = None
    previous = {sig: signal.signal(sig, _handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_when_recorded(previous_hook)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = previous_hook
        _requested = None
