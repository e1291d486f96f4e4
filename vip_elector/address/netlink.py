"""The VIP's interface and address through netlink (Debian's python3-pyroute2).

Netlink is what iproute2 and vip-manager use: no ``ip`` process per change,
errors come back as errno values we can turn into sentences, and a dump of
one interface's addresses is cheap enough to repeat twice a second.
``Netlink`` is the only code that talks to pyroute2; it answers with small
typed values (``Link``, ``Assigned``) and raises only ``AddressError``s.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import threading
from typing import Callable, NamedTuple, Optional

from .errors import (ENABLE_ADVICE, AddressError, InterfaceDown, InterfaceMissing, LibraryMissing,
                     PermissionMissing, VipSettings)

IFA_F_NODAD = 0x02
IFF_UP, IFF_RUNNING = 0x1, 0x40
INFINITY_LIFE_TIME = 0xFFFFFFFF
IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08
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


def _netlink_code(e: BaseException) -> Optional[int]:
    code = getattr(e, "code", None)
    return code if isinstance(code, int) else None


class Link(NamedTuple):
    """The interface as the kernel reports it."""

    index: int
    flags: int


class Assigned(NamedTuple):
    """The VIP as it is on the interface now: its prefix and its valid lifetime (seconds)."""

    prefixlen: int
    valid: int               # INFINITY_LIFE_TIME: forever


class Netlink:
    """The VIP's interface through one netlink socket, opened in the caller's network namespace.

    Its own lock serialises the requests: the socket is not thread-safe, and the
    announcer's thread reads the MAC while the loop or the keeper changes the
    address. ``ipr`` is the pyroute2 socket (tests wrap its methods to make the
    kernel refuse or delay a request).
    """

    def __init__(self, vip: VipSettings):
        self.vip = vip
        self.family = socket.AF_INET if vip.version == 4 else socket.AF_INET6
        self._lock = threading.Lock()
        self.ipr = _iproute()

    def close(self) -> None:
        with self._lock:
            self.ipr.close()

    def link(self, missing_ok: bool = False) -> Optional[Link]:
        """The interface; None (missing_ok) or InterfaceMissing when it is gone."""
        name = self.vip.interface
        links = self._request(f"looking up interface {name}",
                              lambda: self.ipr.link("get", ifname=name), tolerate=(errno.ENODEV,))
        if not links:
            if missing_ok:
                return None
            raise InterfaceMissing(f"interface {name} (vip-manager's interface) does not exist "
                                   "on this node: create it, or set the interface the VIP belongs on")
        return Link(links[0]["index"], links[0]["flags"])

    def usable(self) -> int:
        """The interface's index if it can carry the VIP (up, with carrier), else InterfaceMissing
        or InterfaceDown."""
        index, flags = self.link()
        if not flags & IFF_UP:
            raise InterfaceDown(f"interface {self.vip.interface} is down: bring it up "
                                f"(ip link set {self.vip.interface} up)")
        if not flags & IFF_RUNNING:
            raise InterfaceDown(f"interface {self.vip.interface} has no carrier (cable, switch "
                                f"port or peer down): it cannot carry the VIP")
        return index

    def find(self, index: int) -> Optional[Assigned]:
        """The VIP on the interface (with whatever prefix), or None."""
        msgs = self._request(f"reading the addresses of {self.vip.interface}",
                             lambda: self.ipr.addr("dump", family=self.family, index=index))
        want = ipaddress.ip_address(self.vip.ip)
        for msg in msgs or ():
            if msg["index"] != index:
                continue
            for attr in ("IFA_LOCAL", "IFA_ADDRESS"):
                value = msg.get_attr(attr)
                if value is not None and ipaddress.ip_address(value) == want:
                    info = msg.get_attr("IFA_CACHEINFO")
                    valid = info["ifa_valid"] if info is not None else INFINITY_LIFE_TIME
                    return Assigned(msg["prefixlen"], valid)
        return None

    def put(self, index: int, lifetime: Optional[int], replace: bool) -> None:
        """Add the address, or renew its lifetime (``RTM_NEWADDR`` with ``NLM_F_REPLACE``).

        IPv6 with ``IFA_F_NODAD``: usable at once, never "tentative". ``lifetime``
        None: forever; else ``valid_lft`` = ``preferred_lft`` (never deprecated first)."""
        what = f"adding {self.vip.cidr} to {self.vip.interface}"
        extra: dict = {"flags": IFA_F_NODAD} if self.family == socket.AF_INET6 else {}
        if lifetime is not None:
            extra["cacheinfo"] = {"preferred": lifetime, "valid": lifetime}
        self._request(what, lambda: self.ipr.addr("replace" if replace or lifetime is not None else "add",
                                                  index=index, address=self.vip.ip,
                                                  prefixlen=self.vip.prefix, family=self.family,
                                                  **extra),
                      tolerate=(errno.EEXIST,))

    def delete(self, index: int, found: Optional[Assigned]) -> None:
        """Remove the address as ``find`` found it; gone already (or never there) is success."""
        if found is None:
            return
        what = f"removing {self.vip.ip} from {self.vip.interface}"
        self._request(what, lambda: self.ipr.addr("del", index=index, address=self.vip.ip,
                                                  prefixlen=found.prefixlen, family=self.family),
                      tolerate=(errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT, errno.ESRCH))

    def mac(self) -> Optional[bytes]:
        """The interface's MAC address; None if it is gone or not Ethernet (nothing to announce)."""
        links = self._request(f"reading the MAC address of {self.vip.interface}",
                              lambda: self.ipr.link("get", ifname=self.vip.interface),
                              tolerate=(errno.ENODEV,))
        text = links[0].get_attr("IFLA_ADDRESS") if links else None
        if not text:
            return None
        mac = bytes.fromhex(text.replace(":", ""))
        return mac if len(mac) == 6 else None

    def _request(self, what: str, call: Callable, tolerate: tuple[int, ...] = ()):
        """Run one netlink request; errno values become one-sentence AddressErrors."""
        try:
            with self._lock:
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
