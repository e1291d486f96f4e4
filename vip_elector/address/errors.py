"""The VIP's settings and its errors: what every part of vip_elector.address speaks in.

Errors are ``AddressError`` (or a subclass): one sentence an operator can act
on, never a traceback. The subclasses are the causes the election loop and
``--check`` treat apart: the interface (a FAULT, SPEC §12) and the privileges
(the drop-in to enable).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

#: Where the package ships the drop-in that grants the capabilities.
DROP_IN = "/usr/share/vip-elector/manage-vip.conf"
DROP_IN_TARGET = "/etc/systemd/system/vip-elector.service.d/manage-vip.conf"
ENABLE_ADVICE = (f"enable the drop-in that grants it: ln -s {DROP_IN} {DROP_IN_TARGET}; "
                 "systemctl daemon-reload; systemctl restart vip-elector")


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
