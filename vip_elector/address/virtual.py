"""The virtual IP this node holds while it leads (``--manage-vip``, SPEC §12).

``VirtualAddress`` puts vip-manager's ``ip``/``netmask`` on ``interface`` and
takes it off again; the election loop says when. What the loop may rely on:

* ``claim(hold)`` adds the address (IPv6 with ``IFA_F_NODAD``: usable at once,
  never "tentative") and announces it. Idempotent: an address already there
  is kept. ``hold`` is how long this node may still hold it (the claim
  window of SPEC §9.3 left): the address gets kernel lifetimes
  (``valid_lft`` = ``preferred_lft``, whole seconds) that end before then,
  and each claim with a later end (a confirmed renewal) renews them with an
  ``RTM_NEWADDR`` replace. So the kernel itself removes the address of a
  process that is frozen, wedged or dead (see ``lifetime.lifetime_for``); a
  claim whose window is too short for one whole second adds nothing, and no
  announcement goes out once the window has ended (a process frozen in
  the middle of a burst).
* ``release()`` removes it and cancels announcements not yet sent: once it
  returns, this node sends nothing more for the VIP. Idempotent: "not
  there" is success. It never waits for anything but one netlink request.
* ``enforce(claiming)`` is the level-triggered form of the two, cheap enough
  for every loop turn (three small netlink requests when nothing changes). ``keep()``
  runs it every 0.5 s in a thread of its own, on the last decision the loop
  made, so a leader puts back an address someone removed within a second
  and a standby removes a stale copy, however long the loop sleeps.
* Errors are ``AddressError`` (or a subclass), one sentence an operator can
  act on: ``PermissionMissing`` names the drop-in that grants the
  capability, ``InterfaceMissing``/``InterfaceDown`` the interface. The
  keeper retries whatever failed (a removal too) and logs each cause once.
* ``fault``: why this node cannot hold the address now (the interface is
  missing or down, or adding failed), or None. The keeper watches the
  interface on every node; ``on_fault`` is called when a fault begins, so
  the loop gives up leadership and stops competing (SPEC §12, keepalived's
  FAULT state); ``holding_off()`` says how long it must still wait.

The parts, one object each, owned here and used under this object's lock:
``Netlink`` (the interface and the address, netlink.py), ``ClaimWindow``
(the kernel lifetime, lifetime.py), ``Announcer`` (the frames and their
thread, announce.py), ``Fault`` and ``Failures`` (health.py). This class
decides what to ask of them, and runs the keeper thread.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from .announce import Announcer
from .errors import (ENABLE_ADVICE, AddressError, InterfaceDown, InterfaceMissing, PermissionMissing,
                     VipSettings)
from .health import Failures, Fault
from .lifetime import ClaimWindow
from .netlink import CAP_NET_ADMIN, Netlink, has_capability

log = logging.getLogger("vip_elector")


class VirtualAddress:
    """The VIP on this node's interface: claim, release, enforce, announce."""

    def __init__(self, vip: VipSettings, announce: bool = True, repeats: int = 3,
                 spacing: float = 0.5, keep_interval: float = 0.5, manage: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        """``announce``: open the packet socket (CAP_NET_RAW). ``manage``: check now that
        CAP_NET_ADMIN is there, so a daemon without it fails at start, not at its first
        takeover (``--check`` only reads: manage=False)."""
        self.vip = vip
        if manage and not has_capability(CAP_NET_ADMIN):
            raise PermissionMissing(f"managing {vip.ip} on {vip.interface} needs CAP_NET_ADMIN, "
                                    f"which this process does not have: {ENABLE_ADVICE}")
        self.keep_interval = keep_interval
        self._lock = threading.RLock()         # the decision, and the parts below
        self._wake = threading.Condition(self._lock)
        self.netlink = Netlink(vip)
        self.window = ClaimWindow(clock)
        self.faults = Fault(vip, clock)
        self.failures = Failures(vip, keep_interval)
        self.wanted: Optional[bool] = None     # the loop's last decision; None: none yet
        self._claimed_before = False           # a claim since the last release: no new takeover
        self._closed = False
        self._keeper: Optional[threading.Thread] = None
        self._announcer: Optional[Announcer] = None
        if announce:
            try:
                self._announcer = Announcer(vip, self.netlink.mac, repeats, spacing, clock)
            except AddressError:
                self.netlink.close()
                raise

    # ------------------------------------------------------------------
    # What others read and plug in (the parts' own faces)

    @property
    def announced(self) -> int:
        """Frames sent so far (for tests and the log)."""
        return self._announcer.announced if self._announcer is not None else 0

    @property
    def repeats(self) -> int:
        """Frames per takeover."""
        return self._announcer.repeats if self._announcer is not None else 0

    @property
    def fault(self) -> Optional[str]:
        """Why this node cannot hold the address now, or None."""
        return self.faults.now

    @property
    def on_fault(self) -> Callable[[str], None]:
        """Called (from the keeper's thread, or the caller's) when a fault begins."""
        return self.faults.on_fault

    @on_fault.setter
    def on_fault(self, sink: Callable[[str], None]) -> None:
        self.faults.on_fault = sink

    @property
    def errors(self) -> dict[str, int]:
        """Failed netlink changes so far, by action ('add', 'remove')."""
        return self.failures.errors

    @property
    def on_error(self) -> Callable[[str], None]:
        """The metrics sink: called with the action of each failed change."""
        return self.failures.on_error

    @on_error.setter
    def on_error(self, sink: Callable[[str], None]) -> None:
        self.failures.on_error = sink

    # ------------------------------------------------------------------
    # What the loop calls

    def present(self) -> bool:
        """Is the VIP on the interface now (with whatever prefix)? False if the interface is gone."""
        with self._lock:
            link = self.netlink.link(missing_ok=True)
            return link is not None and self.netlink.find(link.index) is not None

    def unusable(self) -> Optional[str]:
        """Why the interface cannot carry the VIP now (missing, down, no carrier), or None."""
        with self._lock:
            try:
                self.netlink.usable()
            except (InterfaceMissing, InterfaceDown) as e:
                return str(e)
            return None

    def claim(self, hold: Optional[float] = None) -> bool:
        """Put the VIP on the interface and announce the takeover; True if it was added now.

        ``hold``: seconds this node may still hold it (its claim window left);
        None keeps the limit of the last claim (none: no lifetime).
        """
        with self._lock:
            self.window.extend(hold)
            self.wanted = True
            added = self._hold()
            if self._announcer is not None:
                self._announcer.extend(self.window.until)
            if added is None:
                return False  # too little of the claim left to add it for a whole second
            if self._announcer is not None and (added or not self._claimed_before):
                self._announcer.takeover(self.window.until)
            self._claimed_before = True
            return added

    def release(self) -> bool:
        """Take the VIP off the interface, cancel announcements; True if it was removed now."""
        with self._lock:
            self.wanted = False
            self.window.end()
            self._claimed_before = False
            if self._announcer is not None:
                self._announcer.cancel()
            return self._remove()

    def enforce(self, claiming: Optional[bool], hold: Optional[float] = None) -> Optional[str]:
        """Make the interface agree with ``claiming``: 'added', 'removed', or None (nothing to do).

        ``None`` leaves everything as it is (the node does not know yet, e.g. while
        starting: a restarted leader keeps the address until it knows, and its
        lifetime ends it if that takes too long).
        """
        if claiming is None:
            return None
        with self._lock:
            if claiming:
                return "added" if self.claim(hold) else None
            if self.wanted is not False or self.present():
                return "removed" if self.release() else None
            return None

    def settle(self, claiming: Optional[bool], hold: Optional[float] = None) -> Optional[str]:
        """``enforce`` for the election loop: an AddressError is logged (once per cause), never raised.

        The decision is recorded first, so the keeper thread goes on trying it.
        A claim that cannot be made is a fault (``on_fault``).
        """
        with self._lock:
            if claiming is not None:
                self.wanted = claiming
            try:
                done = self.enforce(claiming, hold)
            except AddressError as e:
                self._failed(claiming, e)
                return None
            self._succeeded(claiming)
            return done

    def holding_off(self) -> Optional[tuple[str, float]]:
        """(why, seconds left) while this node must not compete: a fault now, or one seen less
        than the hold-off ago (FAULT_HOLD, doubled by each failed add in a row, so a node that
        cannot add the VIP never takes the key in a loop); None when it may compete."""
        with self._lock:
            return self.faults.holding_off()

    def keep(self) -> "VirtualAddress":
        """Enforce the last decision every ``keep_interval`` seconds, in a thread, until close()."""
        if self._keeper is None:
            self._keeper = threading.Thread(target=self._keep_loop, daemon=True, name="vip-keeper")
            self._keeper.start()
        return self

    def close(self) -> None:
        """Stop the threads and close the sockets; the address stays as it is."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        if self._announcer is not None:
            self._announcer.close()
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join(2)
        with self._lock:
            self.netlink.close()

    def __enter__(self) -> "VirtualAddress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------
    # The address

    def _hold(self) -> Optional[bool]:
        """The VIP on the interface with the lifetime the claim allows: True if added now, False
        if it was there (its lifetime renewed when the claim was extended), None if the claim
        has too little left to add it (an address there already keeps its shorter lifetime)."""
        index = self.netlink.usable()
        found = self.netlink.find(index)
        lifetime = self.window.lifetime()
        if lifetime == 0:
            return None
        if found is not None and found.prefixlen != self.vip.prefix:
            self.netlink.delete(index, found)  # another prefix (by hand): ours replaces it, lifetime and all
            found = None
        if found is not None and not self.window.must_renew(found.valid, lifetime):
            return False
        added = found is None
        for _ in range(3):
            self.netlink.put(index, lifetime, replace=not added)
            # The kernel stamped the lifetime before now: a request held up (the process
            # frozen in between, a busy kernel) must not make it outlast the claim.
            if lifetime is None or not self.window.outlasted_by(lifetime):
                break
            lifetime = self.window.lifetime()
            if not lifetime:
                self.netlink.delete(index, self.netlink.find(index))
                return None
        self.window.set()
        if added:
            log.info("VIP %s added%s", self.vip,
                     f" (lifetime {lifetime}s, renewed while the claim lasts)" if lifetime else "")
        return added

    def _remove(self) -> bool:
        link = self.netlink.link(missing_ok=True)
        if link is None:
            return False  # no interface, no address
        found = self.netlink.find(link.index)
        if found is None:
            return False
        self.netlink.delete(link.index, found)
        log.info("VIP %s removed", self.vip)
        return True

    # ------------------------------------------------------------------
    # Faults and errors: said once per cause

    def _failed(self, claiming: Optional[bool], e: AddressError) -> None:
        self.failures.failed(bool(claiming), e)
        if claiming:
            self.faults.seen(str(e), add_failed=not isinstance(e, (InterfaceMissing, InterfaceDown)))

    def _succeeded(self, claiming: Optional[bool]) -> None:
        if claiming is None:
            return
        self.failures.succeeded(claiming)
        if claiming:
            self.faults.added()

    # ------------------------------------------------------------------
    # The keeper

    def _keep_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                self._wake.wait(self.keep_interval)
                if self._closed:
                    return
                self._keep_once()

    def _keep_once(self) -> None:
        """One look: the interface (faults), then the last decision, retried until it holds."""
        wanted = self.wanted
        self._watch_link()
        if wanted is None:
            return
        try:
            done = self.enforce(wanted)
        except AddressError as e:
            self._failed(wanted, e)
            return
        self._succeeded(wanted)
        if done == "added":
            log.warning("VIP %s was missing while this node leads: put back", self.vip)
        elif done == "removed":
            log.warning("VIP %s was on this node while it does not lead: removed", self.vip)

    def _watch_link(self) -> None:
        """The keeper's look at the interface, on every node: a fault while it is missing or
        down; the fault ends when it is usable again (and this node no longer tries to add)."""
        try:
            self.netlink.usable()
        except (InterfaceMissing, InterfaceDown) as e:
            self.faults.seen(str(e))
            return
        except AddressError:
            return  # cannot tell: the next look, or a claim, decides
        if self.wanted is not True:
            self.faults.usable()
