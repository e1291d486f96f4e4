"""The managed VIP (``--manage-vip``, SPEC §12), one module per part.

    virtual.py   VirtualAddress: what the election loop calls (claim, release,
                 settle, keep); its docstring is the contract
    netlink.py   the interface and the address through python3-pyroute2
    lifetime.py  the kernel lifetime that keeps the address inside the claim window
    announce.py  gratuitous ARP / unsolicited NA after a takeover
    health.py    faults (keepalived's FAULT) and failed changes, said once
    restart.py   the unit's ExecStopPost=: is a restart coming?
    errors.py    VipSettings and the typed errors

Importing this package is cheap: pyroute2 is loaded only when a
VirtualAddress is made.
"""

from .announce import gratuitous_arp, unsolicited_na
from .errors import (DROP_IN, DROP_IN_TARGET, AddressError, InterfaceDown, InterfaceMissing,
                     LibraryMissing, PermissionMissing, VipSettings)
from .health import FAULT_HOLD, FAULT_HOLD_MAX
from .lifetime import expiry_bound, lifetime_for
from .restart import restart_coming
from .virtual import VirtualAddress

__all__ = ["VipSettings", "VirtualAddress", "AddressError", "PermissionMissing", "InterfaceMissing",
           "InterfaceDown", "LibraryMissing", "lifetime_for", "expiry_bound", "FAULT_HOLD",
           "FAULT_HOLD_MAX", "restart_coming", "gratuitous_arp", "unsolicited_na", "DROP_IN",
           "DROP_IN_TARGET"]
