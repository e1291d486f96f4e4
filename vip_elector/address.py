"""The virtual IP this node holds while it leads (``--manage-vip``, SPEC §12).

``VirtualAddress`` puts vip-manager's ``ip``/``netmask`` on ``interface`` and
takes it off again; the election loop says when. What the loop may rely on:

* ``claim()`` adds the address (IPv6 with ``IFA_F_NODAD``: usable at once, never
  "tentative") and announces it. Idempotent: an address already there is
  kept as it is.
* ``release()`` removes it and cancels announcements not yet sent: once it
  returns, this node sends nothing more for the VIP. Idempotent: "not
  there" is success. It never waits for anything but one netlink request.
* ``enforce(claiming)`` is the level-triggered form of the two, cheap enough
  for every loop turn (one netlink request when nothing changes). ``keep()``
  runs it every 0.5 s in a thread of its own, on the last decision the loop
  made, so a leader puts back an address someone removed within a second
  and a standby removes a stale copy, however long the loop sleeps.
* Errors are ``AddressError`` (or a subclass), one sentence an operator can
  act on: ``PermissionMissing`` names the drop-in that grants the
  capability, ``InterfaceMissing`` the interface.

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
IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08
ETH_P_ARP, ETH_P_IPV6 = 0x0806, 0x86DD
BROADCAST_MAC = b"\xff" * 6
ALL_NODES = ipaddress.IPv6Address("ff02::1")
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"


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
                 spacing: float = 0.5, keep_interval: float = 0.5, manage: bool = True):
        """``announce``: open the packet socket (CAP_NET_RAW). ``manage``: check now that
        CAP_NET_ADMIN is there, so a daemon without it fails at start, not at its first
        takeover (``--check`` only reads: manage=False)."""
        self.vip = vip
        if manage and not has_capability(CAP_NET_ADMIN):
            raise PermissionMissing(f"managing {vip.ip} on {vip.interface} needs CAP_NET_ADMIN, "
                                    f"which this process does not have: {ENABLE_ADVICE}")
        self.family = socket.AF_INET if vip.version == 4 else socket.AF_INET6
        self.repeats, self.spacing, self.keep_interval = max(1, repeats), spacing, keep_interval
        self._lock = threading.RLock()         # the netlink socket and the decision
        self._ipr = _iproute()
        self.wanted: Optional[bool] = None     # the loop's last decision; None: none yet
        self.announced = 0                     # frames sent (for tests and the log)
        self._claimed_before = False           # a claim since the last release: no new takeover
        self._generation = 0                   # bumped by release: cancels pending frames
        self._burst: list[float] = []          # when the next frames are due (monotonic)
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._last_error: Optional[str] = None
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
            index = self._index(missing_ok=True)
            return index is not None and self._find(index) is not None

    def claim(self) -> bool:
        """Put the VIP on the interface and announce the takeover; True if it was added now."""
        with self._lock:
            self.wanted = True
            added = self._add()
            if added or not self._claimed_before:
                self._start_announcing()
            self._claimed_before = True
            return added

    def release(self) -> bool:
        """Take the VIP off the interface, cancel announcements; True if it was removed now."""
        with self._lock:
            self.wanted = False
            self._claimed_before = False
            self._generation += 1
            self._burst = []
            return self._remove()

    def enforce(self, claiming: Optional[bool]) -> Optional[str]:
        """Make the interface agree with ``claiming``: 'added', 'removed', or None (nothing to do).

        ``None`` leaves everything as it is (the node does not know yet, e.g. while
        starting: a restarted leader keeps the address until it knows).
        """
        if claiming is None:
            return None
        with self._lock:
            if claiming:
                return "added" if self.claim() else None
            if self.wanted is not False or self.present():
                return "removed" if self.release() else None
            return None

    def settle(self, claiming: Optional[bool]) -> Optional[str]:
        """``enforce`` for the election loop: an AddressError is logged (once per cause), never raised.

        The decision is recorded first, so the keeper thread goes on trying it.
        """
        try:
            done = self.enforce(claiming)
        except AddressError as e:
            if claiming is not None:
                self.wanted = claiming
            if str(e) != self._last_error:
                log.error("VIP %s: %s", self.vip, e)
                self._last_error = str(e)
            return None
        self._last_error = None
        return done

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

    def _index(self, missing_ok: bool = False) -> Optional[int]:
        name = self.vip.interface
        links = self._netlink(f"looking up interface {name}",
                              lambda: self._ipr.link("get", ifname=name), tolerate=(errno.ENODEV,))
        if not links:
            if missing_ok:
                return None
            raise InterfaceMissing(f"interface {name} (vip-manager's interface) does not exist "
                                   "on this node: set the interface the VIP belongs on")
        return links[0]["index"]

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

    def _add(self) -> bool:
        index = self._index()
        if self._find(index) is not None:
            return False
        what = f"adding {self.vip.cidr} to {self.vip.interface}"
        extra = {"flags": IFA_F_NODAD} if self.family == socket.AF_INET6 else {}
        self._netlink(what, lambda: self._ipr.addr("add", index=index, address=self.vip.ip,
                                                   prefixlen=self.vip.prefix, family=self.family,
                                                   **extra),
                      tolerate=(errno.EEXIST,))
        log.info("VIP %s added", self.vip)
        return True

    def _remove(self) -> bool:
        index = self._index(missing_ok=True)
        if index is None:
            return False  # no interface, no address
        found = self._find(index)
        if found is None:
            return False
        what = f"removing {self.vip.ip} from {self.vip.interface}"
        self._netlink(what, lambda: self._ipr.addr("del", index=index, address=self.vip.ip,
                                                   prefixlen=found["prefixlen"], family=self.family),
                      tolerate=(errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT, errno.ESRCH))
        log.info("VIP %s removed", self.vip)
        return True

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
                wanted = self.wanted
                try:
                    if wanted is not None:
                        done = self.enforce(wanted)
                        if done == "added":
                            log.warning("VIP %s was missing while this node leads: put back", self.vip)
                        elif done == "removed":
                            log.warning("VIP %s was on this node while it does not lead: removed",
                                        self.vip)
                except AddressError as e:
                    log.warning("cannot keep VIP %s as it should be: %s", self.vip, e)


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
           "LibraryMissing", "restart_coming", "gratuitous_arp", "unsolicited_na", "DROP_IN"]
