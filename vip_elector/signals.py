"""Signals: SIGTERM/SIGINT stop, SIGHUP reloads — and none is ever lost.

The daemon blocks these signals in every thread and takes them in one thread
of its own with ``sigwait()``. That thread, unlike a Python signal handler,
runs even while the election loop is blocked in a request, so a stop can
abort that request at once (SPEC §9.2). And because a blocked signal stays
pending across ``exec``, a signal that arrives while the program re-executes
itself for a reload is neither fatal (SIGHUP's default action) nor lost: the
new program's relay receives it (SPEC §8.3).

Child processes (hooks) must not inherit the blocked mask: start them with
``preexec_fn=unblock``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable

HANDLED = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def block() -> None:
    """Block the handled signals in this thread and every thread it starts from now on."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)


def unblock() -> None:
    """For a child process between fork and exec: it starts with no blocked signal."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


class SignalRelay:
    """Waits for the handled signals and passes each to ``deliver(signum)``."""

    def __init__(self, deliver: Callable[[int], None]):
        self._deliver = deliver
        self._lock = threading.Lock()
        self._handing_over = False
        self._thread = threading.Thread(target=self._run, name="signals", daemon=True)

    def start(self) -> "SignalRelay":
        block()
        self._thread.start()
        return self

    def hand_over(self) -> None:
        """Before an exec: from now on a signal taken is raised again, pending for the new program."""
        with self._lock:
            self._handing_over = True

    def _run(self) -> None:
        while True:
            signum = signal.sigwait(HANDLED)
            # Under the lock: a signal is either delivered before hand_over() returns
            # (and the caller then collects it) or raised again after — never dropped.
            with self._lock:
                if self._handing_over:
                    os.kill(os.getpid(), signum)  # blocked everywhere: stays pending across exec
                    return
                try:
                    self._deliver(signum)
                except Exception:  # never lose the relay: later signals still matter
                    logging.getLogger("vip_elector").exception(
                        "internal error while handling signal %s", signum)


__all__ = ["SignalRelay", "block", "unblock", "HANDLED"]
