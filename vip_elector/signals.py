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
#: Wakes the relay for hand_over(); blocked like the others, so never fatal,
#: and ignored by a relay that is not handing over (one left pending by the
#: previous program, or an operator's stray ``kill -USR2``).
WAKE = signal.SIGUSR2
_WAITED = HANDLED | {WAKE}

log = logging.getLogger("vip_elector")


def block() -> None:
    """Block the handled signals in this thread and every thread it starts from now on."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)


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

    def hand_over(self, timeout: float = 2.0) -> bool:
        """Before an exec: stop taking signals, so that each one stays pending for the new program.

        Returns once the relay thread has ended (False if it did not within
        ``timeout``). It must have ended, not merely agreed to: a signal it had
        taken from the kernel but not yet raised again would die with it in the
        exec — a SIGTERM sent just after a SIGHUP would be lost (SPEC §8.3).
        """
        with self._lock:
            self._handing_over = True
        if not self._thread.is_alive():
            return True
        # Process-directed, so never aimed at a thread that has just ended; if the
        # relay ends first (on another signal), it stays pending and the new
        # program's relay ignores it.
        os.kill(os.getpid(), WAKE)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            signum = signal.sigwait(_WAITED)
            # Under the lock: a signal is either delivered before hand_over() sets the
            # flag (and the caller then collects it) or raised again after — never dropped.
            with self._lock:
                if self._handing_over:
                    if signum != WAKE:
                        os.kill(os.getpid(), signum)  # blocked everywhere: stays pending across exec
                    return
                if signum == WAKE:
                    continue
                try:
                    self._deliver(signum)
                except Exception:  # never lose the relay: later signals still matter
                    log.exception("internal error while handling signal %s", signum)


__all__ = ["SignalRelay", "block", "unblock", "HANDLED", "WAKE"]
