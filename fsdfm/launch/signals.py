"""The driver's signals: SIGTERM, SIGHUP and Ctrl-C (SIGINT) all raise one exception while a study executes.

Knows signals only. The driver (`execute`) runs under `signals_interrupt`, so the local executor cancels its jobs,
kills what they started and breaks their locks, and an inline stage unwinds and releases its lock.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class DriverInterrupted(KeyboardInterrupt):
    """SIGTERM, SIGHUP or SIGINT reached the driver (`signum`; the command line prints one line for each). A KeyboardInterrupt, so that it is handled exactly like Ctrl-C: the
    local executor cancels its jobs, an inline stage unwinds (releasing its lock), no `except Exception` eats it."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


INTERRUPT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# SIGINT too, but only where it is not ignored: a driver started in the background (`cmd &` in a script) inherits
# SIG_IGN for it, and a Ctrl-C meant for the foreground must not stop it
OPTIONAL_SIGNALS = (signal.SIGINT,)


@contextlib.contextmanager
def signals_interrupt():
    """While the block runs, SIGTERM and SIGHUP raise `DriverInterrupted` (Python's default for them is to die
    on the spot, skipping every cleanup: the local jobs trained on unsupervised and locks stayed behind). A
    second signal during the cleanup is ignored, so it cannot cut the cleanup short. A no-op off the main
    thread (only it may set signal handlers); the previous handlers are restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise DriverInterrupted(signum)

    sigs = INTERRUPT_SIGNALS + tuple(s for s in OPTIONAL_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN)
    old = {sig: signal.signal(sig, handler) for sig in sigs}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
