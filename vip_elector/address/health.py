"""What goes wrong with the VIP: faults (keepalived's FAULT state) and failed changes.

A fault is why this node cannot hold the address now: the interface missing
or down, or adding failed. The loop is told when one begins, gives up
leadership and stops competing until there has been none for a hold-off
(SPEC §12), so a node that cannot add the VIP never takes the key in a loop.
A failed change (add or remove) is counted for the metrics and logged once
per cause; the keeper retries it.

Both objects are owned by one VirtualAddress and used under its lock.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from .errors import AddressError, VipSettings

log = logging.getLogger("vip_elector")

#: After a fault (the interface missing or down, adding failed), a node competes again only
#: once there has been none for this long; repeated failures to add double it, up to FAULT_HOLD_MAX.
FAULT_HOLD = 10.0
FAULT_HOLD_MAX = 300.0


class Fault:
    """The fault now (``now``), the hold-off after it, and ``on_fault`` when one begins."""

    def __init__(self, vip: VipSettings, clock: Callable[[], float] = time.monotonic):
        self.vip, self.clock = vip, clock
        self.now: Optional[str] = None         # the fault now, if any
        self.on_fault: Callable[[str], None] = lambda why: None
        self._why = ""                         # the last one (for the hold-off's words)
        self._seen_at = float("-inf")          # clock: a fault was last seen
        self._hold = FAULT_HOLD                # doubled by each failed add in a row

    def seen(self, why: str, add_failed: bool = False) -> None:
        """A fault seen now: the loop is told when one begins (it gives up and stops competing)."""
        now = self.clock()
        began = self.now is None
        if began and add_failed and now - self._seen_at < 2 * self._hold + 60:
            self._hold = min(FAULT_HOLD_MAX, 2 * self._hold)  # failing again soon after
        self.now, self._why, self._seen_at = why, why, now
        if began:
            try:
                self.on_fault(why)
            except Exception:
                log.exception("internal error while reporting the VIP's fault")

    def usable(self) -> None:
        """The interface can carry the VIP again (and this node no longer tries to add): the fault
        ends; the hold-off still runs from when it was last seen."""
        if self.now is not None:
            log.info("VIP %s: interface %s is usable; this node competes again once it has had no "
                     "fault for %gs", self.vip, self.vip.interface, self._hold)
            self.now = None

    def added(self) -> None:
        """The VIP could be added: a new fault starts from the first hold-off."""
        self._hold = FAULT_HOLD

    def holding_off(self) -> Optional[tuple[str, float]]:
        """(why, seconds left) while this node must not compete: a fault now, or one seen less
        than the hold-off ago (FAULT_HOLD, doubled by each failed add in a row); None when it may."""
        if self.now is not None:
            return self.now, self._hold
        left = self._seen_at + self._hold - self.clock()
        return (self._why, left) if left > 0 else None


class Failures:
    """Failed netlink changes: counted by action (``errors``, ``on_error``: the metrics sink),
    logged once per cause, and said again when the same decision holds once more."""

    def __init__(self, vip: VipSettings, retry_every: float):
        self.vip, self.retry_every = vip, retry_every
        self.errors: dict[str, int] = {"add": 0, "remove": 0}
        self.on_error: Callable[[str], None] = lambda action: None
        self._last: Optional[str] = None       # the cause logged last
        self._last_claiming: Optional[bool] = None

    def failed(self, claiming: bool, e: AddressError) -> None:
        action = "add" if claiming else "remove"
        self.errors[action] += 1
        try:
            self.on_error(action)
        except Exception:  # a sink never stops the address's keeper
            log.debug("the VIP error sink failed", exc_info=True)
        text = str(e)
        if text == self._last:
            return
        self._last, self._last_claiming = text, claiming
        if claiming:
            log.error("VIP %s cannot be added: %s", self.vip, text)
        else:
            log.error("VIP %s cannot be removed: %s; retrying every %gs (it also ends by itself "
                      "once its lifetime runs out: see 'ip addr show dev %s'; by hand: ip addr "
                      "del %s dev %s)", self.vip, text, self.retry_every, self.vip.interface,
                      self.vip.cidr, self.vip.interface)

    def succeeded(self, claiming: bool) -> None:
        if self._last is not None and self._last_claiming == claiming:
            log.info("VIP %s %s again", self.vip, "held" if claiming else "off this node")
        self._last = None

