"""Consul erring (SPEC §4.8): said once per distinct reason, retried with a jittered backoff.

The loop asks how long to wait and what the status says; once Consul answers
again, the watcher is restarted, since its query in flight may sit on a dead
connection.
"""

from __future__ import annotations

import logging
from typing import Optional

from ..config import Settings
from ..consul import ConsulError, PermissionDenied
from .timing import Backoff
from .watch import KeyWatcher

log = logging.getLogger("vip_elector")


class ConsulTrouble:
    """Consul erring (§4.8): logged once per distinct reason, retried with a jittered backoff."""

    def __init__(self, settings: Settings, backoff: Backoff, watcher: KeyWatcher):
        self.settings, self.backoff, self.watcher = settings, backoff, watcher
        self.reason: Optional[str] = None        # the last Consul error, logged once

    def failed(self, error: ConsulError) -> tuple[float, str]:
        """Log it (once per distinct reason): how long to wait, and what the status says."""
        delay = self.backoff.next()
        s = self.settings
        if isinstance(error, PermissionDenied):
            status = f"waiting: Consul refused the ACL token ({s.token_words}): {error}"
            text = (f"Consul at {s.address} refused the ACL token ({s.token_words}): {error}; give "
                    f"it the rules of examples/consul-acl-policy.hcl (key write on "
                    f"{s.trigger_key}, session write on this node, read on the check's service "
                    f"or node) — 'vip-elector --check' names the missing rule; retrying in "
                    f"{delay:.0f}s")
        else:
            status = f"waiting for Consul at {s.address}: {error}"
            text = f"cannot use Consul at {s.address}: {error}; retrying in {delay:.0f}s"
        if str(error) != self.reason:
            log.warning("%s", text)
        self.reason = str(error)
        return delay, status

    def over(self) -> None:
        """Consul answered."""
        if self.reason is not None:
            log.info("Consul at %s answers again", self.settings.address)
            self.watcher.restart()  # its query in flight may sit on a dead connection
        self.reason = None
        self.backoff.reset()


__all__ = ["ConsulTrouble"]
