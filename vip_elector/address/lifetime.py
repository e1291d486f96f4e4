"""The address's kernel lifetime: the claim window of SPEC §9.3, enforced by the kernel.

A claim says how long this node may still hold the address. The address gets
kernel lifetimes (``valid_lft`` = ``preferred_lft``, whole seconds) that end
before then, and each claim with a later end (a confirmed renewal) renews
them. So the kernel itself removes the address of a process that is frozen,
wedged or dead, with no request from it.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from .netlink import INFINITY_LIFE_TIME

# The kernel removes an address whose lifetime ran out from a delayed work
# (IPv4: devinet.c check_lifetime; IPv6: addrconf.c addrconf_verify), and
# late: the work is scheduled for the earliest expiry, rounded up to a whole
# second when that costs less than ADDRCONF_TIMER_FUZZ (HZ/4: 250 ms), and
# the timer wheel may fire a timer up to 1/8 of its delay late (its
# granularity, LVL_CLK_SHIFT 3). Measured in a netns (Linux 6.x, HZ=250, 8
# tries each): 3-420 ms late for lifetimes of 1-12 s, IPv4 and IPv6 alike.
#: Worst lateness of the kernel's removal: this much, plus EXPIRY_LATE_SHARE of the lifetime.
EXPIRY_LATE = 0.35
EXPIRY_LATE_SHARE = 0.13


def lifetime_for(left: float) -> int:
    """The longest whole-second lifetime the kernel surely ends within ``left`` seconds (0: none).

    With the default TTL 10 s and lock-delay 1 s the claim window is 4 s: a
    leader's address gets 3 s, renewed every 1.33 s; with lock-delay 0 (the
    shortest window, 3 s) it gets 2 s, renewed every second.
    """
    if left <= EXPIRY_LATE:
        return 0
    return max(0, min(INFINITY_LIFE_TIME - 1, int((left - EXPIRY_LATE) / (1 + EXPIRY_LATE_SHARE))))


def expiry_bound(lifetime: int) -> float:
    """How long after it is set a lifetime of ``lifetime`` seconds surely has removed the address."""
    return lifetime * (1 + EXPIRY_LATE_SHARE) + EXPIRY_LATE


class ClaimWindow:
    """Until when this node may hold the address, and the end its kernel lifetime was set for.

    Owned by one VirtualAddress and used under its lock. ``until`` None: no
    limit (a claim without a hold, e.g. a test or --drop-vip): no lifetime.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.until: Optional[float] = None     # held no later than this (clock)
        self._set_for: Optional[float] = None  # the ``until`` the kernel's lifetimes were last set for

    def extend(self, hold: Optional[float]) -> None:
        """The claim now lasts ``hold`` seconds more; None keeps the last limit."""
        if hold is not None:
            self.until = self.clock() + hold

    def end(self) -> None:
        """Released: no claim, no lifetime set."""
        self.until = self._set_for = None

    def lifetime(self) -> Optional[int]:
        """The lifetime to give the address now: None (no limit), 0 (the claim is all but over)."""
        if self.until is None:
            return None
        return lifetime_for(self.until - self.clock())

    def outlasted_by(self, lifetime: int) -> bool:
        """Would a lifetime set now end after the claim? (a request held up on its way)"""
        return self.until is not None and self.clock() + expiry_bound(lifetime) > self.until

    def set(self) -> None:
        """The kernel's lifetime now matches this claim."""
        self._set_for = self.until

    def must_renew(self, valid: int, lifetime: Optional[int]) -> bool:
        """Must an address there with ``valid`` seconds left get ``lifetime``? After each extension
        of the claim, and whenever it would outlive the claim (one left by hand, or by another program)."""
        if lifetime is None:
            return False
        if self._set_for is None or self.until is None or abs(self.until - self._set_for) > 0.05:
            return True  # the claim was extended (a confirmed renewal): so is the lifetime
        return valid == INFINITY_LIFE_TIME or valid > lifetime + 1  # 1: the kernel rounds its age down
