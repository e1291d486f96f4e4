"""Leadership hooks (SPEC §10): tell an operator's program when this node leads.

INTERFACE STUB — the election loop calls exactly this; the real runner
replaces the bodies (keeping the signatures).
"""

from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger("vip_elector")

LEADER = "leader"
STANDBY = "standby"


def validate_hook(path: str) -> str:
    """The hook's absolute path, or ConfigError naming --hook (SPEC §10.1)."""
    return path


class Hooks:
    """Runs the hook for each state change, never blocking the caller.

    ``announce`` is level-triggered: a state equal to the last one announced is
    ignored; calls never overlap and run in order; a state superseded before
    its call started is skipped. With ``path`` None every method is a no-op.
    """

    def __init__(self, path: Optional[str], timeout: float, key: str, value: str):
        self.path, self.timeout, self.key, self.value = path, timeout, key, value

    def announce(self, state: str, reason: str, session: str = "") -> None:
        """Queue a call for ``state`` (LEADER or STANDBY); returns at once."""

    def finish(self, deadline: float) -> None:
        """Let queued calls run until ``deadline`` (time.monotonic()); then kill what runs."""

    def close(self) -> None:
        """Stop the worker; a running hook is killed."""
