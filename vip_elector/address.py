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
  process that is frozen, wedged or dead (see ``lifetime_for``); a claim
  whose window is too short for one whole second adds nothing, and no
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

Netlink, through Debian's python3-pyroute2, does the address: it is what
iproute2 and vip-manager use (no ``ip`` process per change, errors come back
as errno values we can turn into sentences, and a dump of one interface's
addresses is cheap enough to repeat twice a second).

The announcements are built here and sent on one AF_PACKET socket, opened
once at start: a gratuitous ARP request (sender and target address both the
VIP, broadcast; RFC 5227's announcement, what ``arping -U`` and keepalived
send) for IPv4, and an unsolicited neighbour advertisement to ff02::1 with
the override flag and the target link-layer address option (RFC 4861 §7.2.6,
what keepalived's vrrp_ndisc.c and ndisc6's ``ndsend`` send) for IPv6. Why
not run ``arping``/``ndsend``: that is a process per packet and a dependency
per family, each needing CAP_NET_RAW anyway (the daemon would hand it on as
an ambient capability); keepalived, the field's reference for takeovers,
writes these frames itself on a packet socket too. A frame is ~70 bytes
of fixed layout, and a raw socket gives full control of what a receiver
checks (hop limit 255, no solicited flag, the source MAC) without relying
on the address having finished any kernel state machine. The socket needs
CAP_NET_RAW, the address CAP_NET_ADMIN: both come only with the
``manage-vip.conf`` drop-in (the default unit keeps its sandbox).

Each takeover is announced ``repeats`` times (0, 0.5, 1 s by default) from
one long-lived thread; the first frame goes out inline (a non-blocking
``send``), so the caller never waits.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

log = logging.getLogger("vip_elector")

#: Where the package ships the drop-in that grants the capabilities.
DROP_IN = "/usr/share/vip-elector/manage-vip.conf"
DROP_IN_TARGET = "/etc/systemd/system/vip-elector.service.d/manage-vip.conf"
ENABLE_ADVICE = (f"enable the drop-in that grants it: ln -s {DROP_IN} {DROP_IN_TARGET}; "
                 "systemctl daemon-reload; systemctl restart vip-elector")

IFA_F_NODAD = 0x02
IFF_UP, IFF_RUNNING = 0x1, 0x40
INFINITY_LIFE_TIME = 0xFFFFFFFF
IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08
ETH_P_ARP, ETH_P_IPV6 = 0x0806, 0x86DD
BROADCAST_MAC = b"\xff" * 6
ALL_NODES = ipaddress.IPv6Address("ff02::1")
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"


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


#: After a fault (the interface missing or down, adding failed), a node competes again only
#: once there has been none for this long; repeated failures to add double it, up to FAULT_HOLD_MAX.
FAULT_HOLD = 10.0
FAULT_HOLD_MAX = 300.0


@dataclass(frozen=True)
class VipSettings:
    """vip-manager's ``ip``/``netmask``/``interface``, validated (config.vip_settings)."""

    ip: str                  # normalised: ipaddress's own text
    prefix: int              # prefix length: 1..32 (IPv4), 1..128 (IPv6)
    interface: str

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.ip).version

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{self.prefix}"

    def __str__(self) -> str:
        return f"{self.cidr} on {self.interface}"


class AddressError(Exception):
    """The address could not be added, removed or read; the message is one sentence."""


class PermissionMissing(AddressError):
    """CAP_NET_ADMIN (the address) or CAP_NET_RAW (the announcements) is missing."""


class InterfaceMissing(AddressError):
    """The interface does not exist (any more)."""


class InterfaceDown(AddressError):
    """The interface exists but is down (administratively, or without carrier)."""


class LibraryMissing(AddressError):
    """python3-pyroute2 is not installed."""


def _iproute():
    """A netlink socket of the network namespace this thread is in."""
    try:
        from pyroute2 import IPRoute
    except ImportError as e:
        if (e.name or "pyroute2").split(".")[0] == "pyroute2":
            raise LibraryMissing("python3-pyroute2 is not installed: apt install python3-pyroute2") from None
        raise LibraryMissing(f"python3-pyroute2 cannot be loaded ({e}): reinstall it with "
                             "apt install --reinstall python3-pyroute2") from None
    try:
        return IPRoute()
    except OSError as e:
        if e.errno == errno.EAFNOSUPPORT:  # systemd's RestrictAddressFamilies= without AF_NETLINK
            raise PermissionMissing("this process may not open a netlink socket (AF_NETLINK), which "
                                    f"managing the address needs: {ENABLE_ADVICE}") from None
        raise AddressError(f"cannot open a netlink socket: {e.strerror or e}") from None


CAP_NET_ADMIN = 12


def has_capability(bit: int) -> bool:
    """Is the capability in this process's effective set (/proc/self/status CapEff)?"""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError):
        pass
    return True  # cannot tell: let the kernel answer


def _netlink_code(e: BaseException) -> Optional[int]:
    code = getattr(e, "code", None)
    return code if isinstance(code, int) else None


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
        self.family = socket.AF_INET if vip.version == 4 else socket.AF_INET6
        self.repeats, self.spacing, self.keep_interval = max(1, repeats), spacing, keep_interval
        self.clock = clock
        self._lock = threading.RLock()         # the netlink socket and the decision
        self._ipr = _iproute()
        self.wanted: Optional[bool] = None     # the loop's last decision; None: none yet
        self.until: Optional[float] = None     # claiming: held no later than this (clock); None: no limit
        self._set_for: Optional[float] = None  # the ``until`` the kernel's lifetimes were last set for
        self.announced = 0                     # frames sent (for tests and the log)
        self._claimed_before = False           # a claim since the last release: no new takeover
        self._generation = 0                   # bumped by release: cancels pending frames
        self._burst: list[float] = []          # when the next frames are due (monotonic)
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._last_error: Optional[str] = None  # logged once per cause (settle and the keeper)
        self._last_error_claiming: Optional[bool] = None
        self.errors: dict[str, int] = {"add": 0, "remove": 0}  # failed netlink changes, by action
        self.on_error: Callable[[str], None] = lambda action: None  # the metrics sink
        # FAULT (keepalived's word): the interface missing or down, or adding failed.
        self.fault: Optional[str] = None      # the fault now, if any
        self._fault_why = ""                   # the last one (for the hold-off's words)
        self.on_fault: Callable[[str], None] = lambda why: None
        self._fault_seen_at = float("-inf")    # clock: a fault was last seen
        self._fault_hold = FAULT_HOLD          # doubled by each failed add in a row
        self._packet: Optional[socket.socket] = None
        self._keeper: Optional[threading.Thread] = None
        self._announcer: Optional[threading.Thread] = None
        if announce:
            try:
                self._packet = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
                self._packet.setblocking(False)
            except (PermissionError, OSError) as e:
                self._ipr.close()
                if not isinstance(e, PermissionError) and e.errno != errno.EAFNOSUPPORT:
                    raise AddressError(f"cannot open a packet socket to announce {vip.ip}: "
                                       f"{e.strerror or e}") from None
                raise PermissionMissing(
                    f"announcing {vip.ip} (gratuitous ARP / neighbour advertisement) needs "
                    f"CAP_NET_RAW and a packet socket (AF_PACKET): {ENABLE_ADVICE}") from None
            self._announcer = threading.Thread(target=self._announce_loop, daemon=True,
                                               name="vip-announce")
            self._announcer.start()

    # ------------------------------------------------------------------
    # What the loop calls

    def present(self) -> bool:
        """Is the VIP on the interface now (with whatever prefix)? False if the interface is gone."""
        with self._lock:
            link = self._link(missing_ok=True)
            return link is not None and self._find(link[0]) is not None

    def unusable(self) -> Optional[str]:
        """Why the interface cannot carry the VIP now (missing, down, no carrier), or None."""
        with self._lock:
            try:
                self._usable(self._link())
            except (InterfaceMissing, InterfaceDown) as e:
                return str(e)
            return None

    def claim(self, hold: Optional[float] = None) -> bool:
        """Put the VIP on the interface and announce the takeover; True if it was added now.

        ``hold``: seconds this node may still hold it (its claim window left);
        None keeps the limit of the last claim (none: no lifetime).
        """
        with self._lock:
            if hold is not None:
                self.until = self.clock() + hold
            self.wanted = True
            added = self._hold()
            if added is None:
                return False  # too little of the claim left to add it for a whole second
            if added or not self._claimed_before:
                self._start_announcing()
            self._claimed_before = True
            return added

    def release(self) -> bool:
        """Take the VIP off the interface, cancel announcements; True if it was removed now."""
        with self._lock:
            self.wanted = False
            self.until = self._set_for = None
            self._claimed_before = False
            self._generation += 1
            self._burst = []
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
            if self.fault is not None:
                return self.fault, self._fault_hold
            left = self._fault_seen_at + self._fault_hold - self.clock()
            return (self._fault_why, left) if left > 0 else None

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
            self._generation += 1
            self._burst = []
            self._wake.notify_all()
        for thread in (self._keeper, self._announcer):
            if thread is not None and thread is not threading.current_thread():
                thread.join(2)
        with self._lock:
            if self._packet is not None:
                self._packet.close()
                self._packet = None
            self._ipr.close()

    def __enter__(self) -> "VirtualAddress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------
    # Faults and errors: said once per cause

    def _failed(self, claiming: Optional[bool], e: AddressError) -> None:
        action = "add" if claiming else "remove"
        self.errors[action] += 1
        try:
            self.on_error(action)
        except Exception:  # a sink never stops the address's keeper
            log.debug("the VIP error sink failed", exc_info=True)
        text = str(e)
        if claiming:
            self._fault(text, add_failed=not isinstance(e, (InterfaceMissing, InterfaceDown)))
        if text != self._last_error:
            self._last_error, self._last_error_claiming = text, claiming
            if claiming:
                log.error("VIP %s cannot be added: %s", self.vip, text)
            else:
                log.error("VIP %s cannot be removed: %s; retrying every %gs (it also ends by itself "
                          "once its lifetime runs out: see 'ip addr show dev %s'; by hand: ip addr "
                          "del %s dev %s)", self.vip, text, self.keep_interval, self.vip.interface,
                          self.vip.cidr, self.vip.interface)

    def _succeeded(self, claiming: Optional[bool]) -> None:
        if claiming is None:
            return
        if self._last_error is not None and self._last_error_claiming == claiming:
            log.info("VIP %s %s again", self.vip, "held" if claiming else "off this node")
        self._last_error = None
        if claiming:
            self._fault_hold = FAULT_HOLD  # it could be added: a new fault starts from the first hold-off

    def _fault(self, why: str, add_failed: bool = False) -> None:
        """A fault seen now: the loop is told when one begins (it gives up and stops competing)."""
        now = self.clock()
        began = self.fault is None
        if began and add_failed and now - self._fault_seen_at < 2 * self._fault_hold + 60:
            self._fault_hold = min(FAULT_HOLD_MAX, 2 * self._fault_hold)  # failing again soon after
        self.fault, self._fault_why, self._fault_seen_at = why, why, now
        if began:
            try:
                self.on_fault(why)
            except Exception:
                log.exception("internal error while reporting the VIP's fault")

    def _watch_link(self) -> None:
        """The keeper's look at the interface, on every node: a fault while it is missing or
        down; the fault ends when it is usable again (and this node no longer tries to add)."""
        try:
            self._usable(self._link())
        except (InterfaceMissing, InterfaceDown) as e:
            self._fault(str(e))
            return
        except AddressError:
            return  # cannot tell: the next look, or a claim, decides
        if self.fault is not None and self.wanted is not True:
            log.info("VIP %s: interface %s is usable; this node competes again once it has had no "
                     "fault for %gs", self.vip, self.vip.interface, self._fault_hold)
            self.fault = None

    # ------------------------------------------------------------------
    # Netlink

    def _netlink(self, what: str, call: Callable, tolerate: tuple[int, ...] = ()):
        """Run one netlink request; errno values become one-sentence AddressErrors."""
        try:
            return call()
        except Exception as e:  # pyroute2's NetlinkError, or OSError from the socket
            code = _netlink_code(e) or getattr(e, "errno", None)
            if code in tolerate:
                return None
            if code == errno.EPERM or code == errno.EACCES:
                raise PermissionMissing(f"{what} needs CAP_NET_ADMIN: {ENABLE_ADVICE}") from None
            if code == errno.ENODEV:
                raise InterfaceMissing(f"{what}: interface {self.vip.interface} does not exist") from None
            text = os.strerror(code) if isinstance(code, int) else str(e)
            raise AddressError(f"{what} failed: {text}") from None

    def _link(self, missing_ok: bool = False) -> Optional[tuple[int, int]]:
        """(index, flags) of the interface; None (missing_ok) or InterfaceMissing when it is gone."""
        name = self.vip.interface
        links = self._netlink(f"looking up interface {name}",
                              lambda: self._ipr.link("get", ifname=name), tolerate=(errno.ENODEV,))
        if not links:
            if missing_ok:
                return None
            raise InterfaceMissing(f"interface {name} (vip-manager's interface) does not exist "
                                   "on this node: create it, or set the interface the VIP belongs on")
        return links[0]["index"], links[0]["flags"]

    def _index(self, missing_ok: bool = False) -> Optional[int]:
        link = self._link(missing_ok)
        return None if link is None else link[0]

    def _usable(self, link: Optional[tuple[int, int]]) -> int:
        """The interface's index if it can carry the VIP (up, with carrier), else InterfaceDown."""
        assert link is not None
        index, flags = link
        if not flags & IFF_UP:
            raise InterfaceDown(f"interface {self.vip.interface} is down: bring it up "
                                f"(ip link set {self.vip.interface} up)")
        if not flags & IFF_RUNNING:
            raise InterfaceDown(f"interface {self.vip.interface} has no carrier (cable, switch "
                                f"port or peer down): it cannot carry the VIP")
        return index

    def _find(self, index: int):
        """The VIP's address message on the interface, or None."""
        msgs = self._netlink(f"reading the addresses of {self.vip.interface}",
                             lambda: self._ipr.addr("dump", family=self.family, index=index))
        want = ipaddress.ip_address(self.vip.ip)
        for msg in msgs or ():
            if msg["index"] != index:
                continue
            for attr in ("IFA_LOCAL", "IFA_ADDRESS"):
                value = msg.get_attr(attr)
                if value is not None and ipaddress.ip_address(value) == want:
                    return msg
        return None

    def _lifetime(self) -> Optional[int]:
        """The lifetime to give the address now: None (no limit), 0 (the claim is all but over)."""
        if self.until is None:
            return None
        return lifetime_for(self.until - self.clock())

    def _hold(self) -> Optional[bool]:
        """The VIP on the interface with the lifetime the claim allows: True if added now, False
        if it was there (its lifetime renewed when the claim was extended), None if the claim
        has too little left to add it (an address there already keeps its shorter lifetime)."""
        index = self._usable(self._link())
        found = self._find(index)
        lifetime = self._lifetime()
        if lifetime == 0:
            return None
        if found is not None and found["prefixlen"] != self.vip.prefix:
            self._delete(index, found)  # another prefix (by hand): ours replaces it, lifetime and all
            found = None
        if found is not None and not self._stale_lifetime(found, lifetime):
            return False
        added = found is None
        for _ in range(3):
            self._put(index, lifetime, replace=not added)
            if lifetime is None or self.until is None:
                break
            # The kernel stamped the lifetime before now: a request held up (the process
            # frozen in between, a busy kernel) must not make it outlast the claim.
            if self.clock() + expiry_bound(lifetime) <= self.until:
                break
            lifetime = self._lifetime()
            if not lifetime:
                self._delete(index, self._find(index))
                return None
        self._set_for = self.until
        if added:
            log.info("VIP %s added%s", self.vip,
                     f" (lifetime {lifetime}s, renewed while the claim lasts)" if lifetime else "")
        return added

    def _stale_lifetime(self, found, lifetime: Optional[int]) -> bool:
        """Must the address there get our lifetime? After each extension of the claim, and
        whenever it would outlive the claim (one left by hand, or by another program)."""
        if lifetime is None:
            return False
        if self._set_for is None or self.until is None or abs(self.until - self._set_for) > 0.05:
            return True  # the claim was extended (a confirmed renewal): so is the lifetime
        info = found.get_attr("IFA_CACHEINFO")
        valid = info["ifa_valid"] if info is not None else INFINITY_LIFE_TIME
        return valid == INFINITY_LIFE_TIME or valid > lifetime + 1  # 1: the kernel rounds its age down

    def _put(self, index: int, lifetime: Optional[int], replace: bool) -> None:
        """Add the address, or renew its lifetime (``RTM_NEWADDR`` with ``NLM_F_REPLACE``)."""
        what = f"adding {self.vip.cidr} to {self.vip.interface}"
        extra: dict = {"flags": IFA_F_NODAD} if self.family == socket.AF_INET6 else {}
        if lifetime is not None:
            extra["cacheinfo"] = {"preferred": lifetime, "valid": lifetime}
        self._netlink(what, lambda: self._ipr.addr("replace" if replace or lifetime is not None else "add",
                                                   index=index, address=self.vip.ip,
                                                   prefixlen=self.vip.prefix, family=self.family,
                                                   **extra),
                      tolerate=(errno.EEXIST,))

    def _remove(self) -> bool:
        index = self._index(missing_ok=True)
        if index is None:
            return False  # no interface, no address
        found = self._find(index)
        if found is None:
            return False
        self._delete(index, found)
        log.info("VIP %s removed", self.vip)
        return True

    def _delete(self, index: int, found) -> None:
        if found is None:
            return
        what = f"removing {self.vip.ip} from {self.vip.interface}"
        self._netlink(what, lambda: self._ipr.addr("del", index=index, address=self.vip.ip,
                                                   prefixlen=found["prefixlen"], family=self.family),
                      tolerate=(errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT, errno.ESRCH))

    def _mac(self) -> Optional[bytes]:
        links = self._netlink(f"reading the MAC address of {self.vip.interface}",
                              lambda: self._ipr.link("get", ifname=self.vip.interface),
                              tolerate=(errno.ENODEV,))
        text = links[0].get_attr("IFLA_ADDRESS") if links else None
        if not text:
            return None
        mac = bytes.fromhex(text.replace(":", ""))
        return mac if len(mac) == 6 else None  # not Ethernet: nothing to announce

    # ------------------------------------------------------------------
    # Announcements

    def _start_announcing(self) -> None:
        if self._packet is None:
            return
        now = time.monotonic()
        self._burst = [now + i * self.spacing for i in range(self.repeats)]
        self._send_due()
        self._wake.notify_all()

    def _send_due(self) -> None:
        """Send the frames that are due (under the lock, so release() cancels what is left)."""
        now = time.monotonic()
        while self._burst and self._burst[0] <= now:
            self._burst.pop(0)
            if self.until is not None and self.clock() >= self.until:
                self._burst = []  # the claim ended (frozen mid-burst): never announce what we may not hold
                return
            try:
                self._send_frame()
            except (AddressError, OSError) as e:
                log.warning("could not announce VIP %s: %s", self.vip,
                            getattr(e, "strerror", None) or e)

    def _announce_loop(self) -> None:
        with self._lock:
            while not self._closed:
                if self._burst:
                    self._wake.wait(max(0.0, self._burst[0] - time.monotonic()))
                else:
                    self._wake.wait()
                if not self._closed:
                    self._send_due()

    def _send_frame(self) -> None:
        mac = self._mac()
        if mac is None or self._packet is None:
            return
        if self.family == socket.AF_INET:
            frame, proto = gratuitous_arp(mac, self.vip.ip), ETH_P_ARP
        else:
            frame, proto = unsolicited_na(mac, self.vip.ip), ETH_P_IPV6
        try:
            self._packet.sendto(frame, (self.vip.interface, proto))
        except BlockingIOError:
            return  # a full queue: the next repetition goes out
        self.announced += 1

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


# ----------------------------------------------------------------------
# Frames


def gratuitous_arp(mac: bytes, ip: str) -> bytes:
    """An ARP request for our own address (sender = target = the VIP), broadcast."""
    addr = ipaddress.IPv4Address(ip).packed
    ether = BROADCAST_MAC + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + addr + b"\x00" * 6 + addr
    return ether + arp


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def unsolicited_na(mac: bytes, ip: str) -> bytes:
    """A neighbour advertisement for the VIP to all nodes: override set, solicited not, our MAC."""
    src = ipaddress.IPv6Address(ip).packed
    dst = ALL_NODES.packed
    flags = 0x20000000  # O (override); R and S clear
    body = struct.pack("!I", flags) + src + struct.pack("!BB", 2, 1) + mac  # target, TLLA option
    pseudo = src + dst + struct.pack("!I3xB", 4 + len(body), socket.IPPROTO_ICMPV6)
    csum = _checksum(pseudo + struct.pack("!BBH", 136, 0, 0) + body)
    icmp = struct.pack("!BBH", 136, 0, csum) + body
    ipv6 = struct.pack("!IHBB", 6 << 28, len(icmp), socket.IPPROTO_ICMPV6, 255) + src + dst
    return ALL_NODES_MAC + mac + struct.pack("!H", ETH_P_IPV6) + ipv6 + icmp


# ----------------------------------------------------------------------
# The unit's ExecStopPost=: is a restart coming?


def restart_coming(env) -> Optional[str]:
    """Why systemd will start the daemon again right away (keep the VIP), or None (drop it).

    systemd gives ExecStopPost= ``SERVICE_RESULT``, ``EXIT_CODE`` and
    ``EXIT_STATUS``. With ``Restart=on-failure`` a result other than
    ``success`` is restarted, and so is death by SIGHUP (clean for systemd,
    but ``RestartForceExitStatus=SIGHUP``); exit 2 and 78 are not
    (``RestartPreventExitStatus=``). A failure that will not be restarted
    (the start limit, a stop that timed out) puts the unit in the failed
    state: ``OnFailure=`` then runs ``vip-elector-drop-vip@``, which drops it.
    Outside ExecStopPost= (no ``SERVICE_RESULT``): None, drop it.
    """
    result = env.get("SERVICE_RESULT")
    if not result:
        return None
    code, status = env.get("EXIT_CODE", ""), env.get("EXIT_STATUS", "")
    if code == "killed" and status in ("HUP", "SIGHUP", "1"):
        return "the daemon died of SIGHUP (a reload gone wrong): systemd restarts it"
    if result == "success":
        return None
    if code == "exited" and status in ("2", "78"):
        return None
    return (f"the daemon ended with {result} ({code or '?'} {status or '?'}): systemd restarts "
            "it and it resumes its session; if it does not, OnFailure= drops the VIP")


__all__ = ["VipSettings", "VirtualAddress", "AddressError", "PermissionMissing", "InterfaceMissing",
           "InterfaceDown", "LibraryMissing", "lifetime_for", "expiry_bound", "FAULT_HOLD", "restart_coming", "gratuitous_arp", "unsolicited_na", "DROP_IN"]
