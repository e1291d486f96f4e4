"""Takeover announcements: gratuitous ARP / unsolicited neighbour advertisement (SPEC §12).

The frames are built here and sent on one AF_PACKET socket, opened once at
start: a gratuitous ARP request (sender and target address both the VIP,
broadcast; RFC 5227's announcement, what ``arping -U`` and keepalived send)
for IPv4, and an unsolicited neighbour advertisement to ff02::1 with the
override flag and the target link-layer address option (RFC 4861 §7.2.6,
what keepalived's vrrp_ndisc.c and ndisc6's ``ndsend`` send) for IPv6. Why
not run ``arping``/``ndsend``: that is a process per packet and a dependency
per family, each needing CAP_NET_RAW anyway (the daemon would hand it on as
an ambient capability); keepalived, the field's reference for takeovers,
writes these frames itself on a packet socket too. A frame is ~70 bytes of
fixed layout, and a raw socket gives full control of what a receiver checks
(hop limit 255, no solicited flag, the source MAC) without relying on the
address having finished any kernel state machine. The socket needs
CAP_NET_RAW: it comes only with the ``manage-vip.conf`` drop-in.

Each takeover is announced ``repeats`` times (0, 0.5, 1 s by default) from
one long-lived thread; the first frame goes out inline (a non-blocking
``send``), so the caller never waits.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
import threading
import time
from typing import Callable, Optional

from .errors import ENABLE_ADVICE, AddressError, PermissionMissing, VipSettings

log = logging.getLogger("vip_elector")

ETH_P_ARP, ETH_P_IPV6 = 0x0806, 0x86DD
BROADCAST_MAC = b"\xff" * 6
ALL_NODES = ipaddress.IPv6Address("ff02::1")
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"


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


def _packet_socket(vip: VipSettings) -> socket.socket:
    """The AF_PACKET socket, non-blocking; PermissionMissing without CAP_NET_RAW or AF_PACKET."""
    try:
        packet = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    except (PermissionError, OSError) as e:
        if not isinstance(e, PermissionError) and e.errno != errno.EAFNOSUPPORT:
            raise AddressError(f"cannot open a packet socket to announce {vip.ip}: "
                               f"{e.strerror or e}") from None
        raise PermissionMissing(
            f"announcing {vip.ip} (gratuitous ARP / neighbour advertisement) needs "
            f"CAP_NET_RAW and a packet socket (AF_PACKET): {ENABLE_ADVICE}") from None
    packet.setblocking(False)
    return packet


class Announcer:
    """Bursts of announcements for one VIP, from one thread, never past the claim.

    ``takeover(until)`` starts a burst (the first frame inline), ``extend(until)``
    moves the end of the claim, ``cancel()`` drops what is still due: once it
    returns, nothing more goes out (a frame being sent holds the lock). No frame
    goes out once ``until`` has passed (a process frozen mid-burst must not
    announce what it may no longer hold). ``mac`` reads the interface's MAC for
    each frame (None: nothing to announce).
    """

    def __init__(self, vip: VipSettings, mac: Callable[[], Optional[bytes]], repeats: int = 3,
                 spacing: float = 0.5, clock: Callable[[], float] = time.monotonic):
        self.vip = vip
        self.repeats, self.spacing, self.clock = max(1, repeats), spacing, clock
        self.announced = 0                     # frames sent (for tests and the log)
        self._mac = mac
        self._frame, self._proto = ((gratuitous_arp, ETH_P_ARP) if vip.version == 4
                                    else (unsolicited_na, ETH_P_IPV6))
        self._packet: Optional[socket.socket] = _packet_socket(vip)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._burst: list[float] = []          # when the next frames are due (monotonic)
        self._until: Optional[float] = None    # the claim's end (clock); None: no limit
        self._closed = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name="vip-announce")
        self._thread.start()

    def takeover(self, until: Optional[float]) -> None:
        """Announce a takeover: ``repeats`` frames ``spacing`` apart, the first one now."""
        with self._lock:
            self._until = until
            now = time.monotonic()
            self._burst = [now + i * self.spacing for i in range(self.repeats)]
            self._send_due()
            self._wake.notify_all()

    def extend(self, until: Optional[float]) -> None:
        """The claim now ends at ``until`` (a confirmed renewal): frames still due may go out till then."""
        with self._lock:
            self._until = until

    def cancel(self) -> None:
        """Drop the frames still due; none goes out after this returns."""
        with self._lock:
            self._burst = []
            self._until = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._burst = []
            self._wake.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(2)
        with self._lock:
            if self._packet is not None:
                self._packet.close()
                self._packet = None

    def _loop(self) -> None:
        with self._lock:
            while not self._closed:
                if self._burst:
                    self._wake.wait(max(0.0, self._burst[0] - time.monotonic()))
                else:
                    self._wake.wait()
                if not self._closed:
                    self._send_due()

    def _send_due(self) -> None:
        """Send the frames that are due (under the lock, so cancel() stops what is left)."""
        now = time.monotonic()
        while self._burst and self._burst[0] <= now:
            self._burst.pop(0)
            if self._until is not None and self.clock() >= self._until:
                self._burst = []  # the claim ended (frozen mid-burst): never announce what we may not hold
                return
            try:
                self._send_frame()
            except (AddressError, OSError) as e:
                log.warning("could not announce VIP %s: %s", self.vip,
                            getattr(e, "strerror", None) or e)

    def _send_frame(self) -> None:
        mac = self._mac()
        if mac is None or self._packet is None:
            return
        try:
            self._packet.sendto(self._frame(mac, self.vip.ip), (self.vip.interface, self._proto))
        except BlockingIOError:
            return  # a full queue: the next repetition goes out
        self.announced += 1
