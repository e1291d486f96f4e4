"""The managed VIP on real interfaces: vip_elector.address in network namespaces (SPEC §12).

The world, built per test module with `ip netns` (the machine's interfaces
are never touched):

    switch   a bridge br0, one port per namespace below
    node-a   eth0 10.91.0.1/24, fd00:91::1/64   (may hold the VIP)
    node-b   eth0 10.91.0.2/24, fd00:91::2/64   (may hold the VIP)
    obs      eth0 10.91.0.250/24                 (an observer: never sends to the VIP)

The VIP is 10.91.0.100/24 and fd00:91::100/64. `VirtualAddress` objects are
made inside a node's namespace (the test's main thread enters it for the
construction: the object's sockets and threads stay there) and used from
the test. The observer's neighbour table is primed with node-a's MAC as a
learned (stale) entry; it must then show node-b's MAC after node-b's claim,
which only node-b's announcement can have told it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from consul_agent import wait_for
from vip_elector.address import (FAULT_HOLD, AddressError, InterfaceMissing, PermissionMissing,
                                 VipSettings, VirtualAddress, expiry_bound, gratuitous_arp,
                                 lifetime_for, unsolicited_na)

pytestmark = pytest.mark.e2e

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
V4 = VipSettings("10.91.0.100", 24, "eth0")
V6 = VipSettings("fd00:91::100", 64, "eth0")


def sh(*argv, check=True):
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


BRIDGE_MAC = "02:91:00:00:00:fe"


class World:
    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.ns = {name: f"h5vip-{tag}-{name}" for name in ("switch", "a", "b", "obs")}
        self.macs = {}
        for name in self.ns.values():
            sh("ip", "netns", "add", name)
        sw = self.ns["switch"]
        # A bridge's MAC follows its lowest port's unless set: a port deleted or added (the
        # VIP-fault tests do both) would change the Consul agent's MAC on br0 under the
        # nodes' ARP caches and cut them off from it for up to a minute (a CI run saw it).
        self.run("switch", "ip", "link", "add", "br0", "address", BRIDGE_MAC, "type", "bridge")
        self.run("switch", "ip", "link", "set", "br0", "up")
        for i, node in enumerate(("a", "b", "obs")):
            port = f"p-{node}"
            self.run("switch", "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0",
                     "netns", self.ns[node])
            self.run("switch", "ip", "link", "set", port, "master", "br0", "up")
            host = 250 if node == "obs" else i + 1
            self.run(node, "ip", "link", "set", "lo", "up")
            self.run(node, "ip", "link", "set", "eth0", "up")
            self.run(node, "ip", "addr", "add", f"10.91.0.{host}/24", "dev", "eth0")
            if node != "obs":
                self.run(node, "ip", "-6", "addr", "add", f"fd00:91::{host}/64", "dev", "eth0", "nodad")
            self.macs[node] = self.run(node, "cat", "/sys/class/net/eth0/address").strip()
        del sw

    def run(self, node, *argv, check=True) -> str:
        return sh("ip", "netns", "exec", self.ns[node], *argv, check=check).stdout

    @contextlib.contextmanager
    def inside(self, node):
        """The calling thread in node's network namespace for the block."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.ns[node]}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            yield
        finally:
            _libc.setns(home, CLONE_NEWNET)
            os.close(home)
            os.close(target)

    def address(self, node, vip, **kw) -> VirtualAddress:
        with self.inside(node):
            return VirtualAddress(vip, **kw)

    def addresses(self, node, vip) -> str:
        """`ip addr` lines of eth0 that carry the VIP."""
        family = "-4" if vip.version == 4 else "-6"
        out = self.run(node, "ip", family, "-o", "addr", "show", "dev", "eth0")
        return "\n".join(ln for ln in out.splitlines() if f" {vip.ip}/" in ln)

    def neigh(self, node, ip) -> str:
        return self.run(node, "ip", "neigh", "show", ip, "dev", "eth0").strip()

    def close(self):
        for name in self.ns.values():
            sh("ip", "netns", "del", name, check=False)


@pytest.fixture(scope="module")
def world():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    w = World()
    yield w
    w.close()


@pytest.fixture
def made(world):
    """Make VirtualAddress objects in a node; at teardown they are closed and the VIPs removed."""
    objects = []

    def make(node, vip, **kw):
        obj = world.address(node, vip, **kw)
        objects.append(obj)
        return obj

    yield make
    for obj in objects:
        try:
            obj.release()
        finally:
            obj.close()


# --- claim, release -----------------------------------------------------------------

def test_the_bridge_keeps_its_mac_when_ports_come_and_go(world):
    """The harness itself: the VIP-fault tests delete and add ports; the nodes reach the
    Consul agent on br0 only while br0 keeps the MAC in their ARP caches."""
    def mac():
        return world.run("switch", "cat", "/sys/class/net/br0/address").strip()
    assert mac() == BRIDGE_MAC
    for n in range(4):          # random MACs: some lower than every port's
        port = "t-%d" % n
        world.run("switch", "ip", "link", "add", port, "type", "veth", "peer", "name", "t-peer-%d" % n)
        world.run("switch", "ip", "link", "set", port, "master", "br0", "up")
    for n in range(4):
        world.run("switch", "ip", "link", "del", "t-%d" % n)
        assert mac() == BRIDGE_MAC


@pytest.mark.parametrize("vip", [V4, V6], ids=["ipv4", "ipv6"])
def test_claim_adds_release_removes_both_idempotent(world, made, vip):
    a = made("a", vip)
    assert not a.present() and world.addresses("a", vip) == ""
    assert a.claim() is True
    line = world.addresses("a", vip)
    assert f"{vip.ip}/{vip.prefix}" in line
    assert a.present()
    assert a.claim() is False                      # already there: kept as it is
    assert world.addresses("a", vip) == line
    assert a.release() is True
    assert world.addresses("a", vip) == "" and not a.present()
    assert a.release() is False                    # not there: still fine


def test_ipv6_is_usable_at_once_not_tentative(world, made):
    """No duplicate address detection: the address is not tentative the moment it is added.

    The control (an address added without NODAD on the same interface is
    tentative right after) shows the check can tell the difference.
    """
    a = made("a", V6)
    a.claim()
    line = world.addresses("a", V6)
    assert line and "tentative" not in line, line
    world.run("a", "ip", "-6", "addr", "add", "fd00:91::200/64", "dev", "eth0")
    try:
        control = world.run("a", "ip", "-6", "-o", "addr", "show", "dev", "eth0")
        assert any("fd00:91::200/64" in ln and "tentative" in ln for ln in control.splitlines()), control
    finally:
        world.run("a", "ip", "-6", "addr", "del", "fd00:91::200/64", "dev", "eth0")


# --- announcements: the observer learns the new holder from them alone ------------

@pytest.mark.parametrize("vip", [V4, V6], ids=["gratuitous-arp", "unsolicited-na"])
def test_takeover_is_announced_to_neighbours(world, made, vip):
    a, b = made("a", vip), made("b", vip)
    a.claim()
    wait_for(lambda: a.announced == a.repeats, 10, message="node-a's announcements")
    # The observer knew the VIP at node-a's MAC (a learned entry, as if it had
    # talked to the VIP before) and never sends anything to it from now on.
    world.run("obs", "ip", "neigh", "replace", vip.ip, "lladdr", world.macs["a"], "dev", "eth0",
              "nud", "stale")
    assert world.macs["a"] in world.neigh("obs", vip.ip)
    a.release()
    b.claim()
    wait_for(lambda: world.macs["b"] in world.neigh("obs", vip.ip), 5,
             message=f"the observer to learn {vip.ip} at node-b's MAC {world.macs['b']}")
    wait_for(lambda: b.announced == b.repeats, 5, message="node-b's announcements (3)")
    assert a.announced == a.repeats  # node-a sent nothing after its release


def test_release_cancels_announcements_still_due(world, made):
    a = made("a", V4, spacing=30.0)                # the 2nd and 3rd frame would be 30 s and 60 s away
    a.claim()
    assert a.announced == 1                       # the first one went out inline
    a.release()
    a.claim()                                     # a new takeover: a new burst
    assert a.announced == 2


def test_frames_are_what_receivers_check():
    mac = bytes.fromhex("02aabbccddee")
    arp = gratuitous_arp(mac, "10.91.0.100")
    assert arp[:6] == b"\xff" * 6 and arp[6:12] == mac and arp[12:14] == b"\x08\x06"
    assert arp[20:22] == b"\x00\x01"                           # a request
    assert arp[28:32] == arp[38:42] == bytes([10, 91, 0, 100])  # sender = target = VIP
    na = unsolicited_na(mac, "fd00:91::100")
    assert na[:6] == bytes.fromhex("333300000001") and na[12:14] == b"\x86\xdd"
    ip6, icmp = na[14:54], na[54:]
    assert ip6[7] == 255 and ip6[6] == 58                       # hop limit 255, ICMPv6
    assert icmp[0] == 136 and icmp[4] & 0x20 and not icmp[4] & 0x40  # NA, override, not solicited
    assert icmp[-8:] == b"\x02\x01" + mac                       # target link-layer address option


# --- level-triggered ------------------------------------------------------------

@pytest.mark.parametrize("vip", [V4, V6], ids=["ipv4", "ipv6"])
def test_enforce_re_adds_and_removes(world, made, vip):
    a = made("a", vip)
    assert a.enforce(True) == "added"
    assert a.enforce(True) is None
    world.run("a", "ip", "addr", "del", vip.cidr, "dev", "eth0")   # someone else removes it
    assert a.enforce(True) == "added" and world.addresses("a", vip)
    assert a.enforce(False) == "removed" and not world.addresses("a", vip)
    world.run("a", "ip", "addr", "add", vip.cidr, "dev", "eth0", *(["nodad"] if vip.version == 6 else []))
    assert a.enforce(False) == "removed" and not world.addresses("a", vip)   # a stale copy
    assert a.enforce(False) is None
    assert a.enforce(None) is None                               # not known yet: nothing happens


def test_keeper_holds_the_level_within_a_second(world, made):
    a = made("a", V4).keep()
    a.settle(True)
    world.run("a", "ip", "addr", "del", V4.cidr, "dev", "eth0")
    wait_for(lambda: world.addresses("a", V4), 2, message="the keeper to put the VIP back")
    a.settle(False)
    assert not world.addresses("a", V4)
    world.run("a", "ip", "addr", "add", V4.cidr, "dev", "eth0")   # a stale copy, by hand
    wait_for(lambda: not world.addresses("a", V4), 2, message="the keeper to remove the stale copy")


def test_a_standby_removes_a_copy_with_another_prefix(world, made):
    a = made("a", V4)
    world.run("a", "ip", "addr", "add", "10.91.0.100/32", "dev", "eth0")
    assert a.present()
    assert a.release() is True and not world.addresses("a", V4)


# --- errors are typed, one sentence ----------------------------------------------

def test_missing_interface(world, made):
    gone = made("a", VipSettings("10.91.0.100", 24, "nope0"))
    with pytest.raises(InterfaceMissing, match="interface nope0"):
        gone.claim()
    assert gone.present() is False
    assert gone.release() is False                 # no interface, no address: nothing to do
    assert gone.settle(True) is None               # the loop's form logs, never raises


def test_interface_that_disappears(world, made):
    world.run("a", "ip", "link", "add", "tmp0", "type", "veth", "peer", "name", "tmp1")
    world.run("a", "ip", "link", "set", "tmp0", "up")
    world.run("a", "ip", "link", "set", "tmp1", "up")   # the peer up: tmp0 has carrier
    t = made("a", VipSettings("10.92.0.100", 24, "tmp0"))
    assert t.claim() is True
    world.run("a", "ip", "link", "del", "tmp0")
    assert t.present() is False and t.release() is False


def _without_caps(world, code, drop):
    """Run Python code in node-a as root with `drop` removed from its capabilities."""
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = (f"import sys; sys.path.insert(0, {src!r})\n"
              "from vip_elector.address import *\n"
              f"V = VipSettings({V4.ip!r}, {V4.prefix}, 'eth0')\n"
              "try:\n"
              f"    {code}\n"
              "except AddressError as e:\n"
              "    print(type(e).__name__, e)\n")
    return world.run("a", "setpriv", f"--bounding-set=-{drop}", f"--inh-caps=-{drop}",
                     sys.executable, "-c", script)


def test_no_cap_net_admin_is_a_typed_error_naming_the_drop_in(world):
    out = _without_caps(world, "VirtualAddress(V, announce=False).claim()", "net_admin")
    assert out.startswith("PermissionMissing"), out
    assert "CAP_NET_ADMIN" in out and "/usr/share/vip-elector/manage-vip.conf" in out


def test_no_cap_net_raw_is_a_typed_error_at_start(world):
    out = _without_caps(world, "VirtualAddress(V)", "net_raw")
    assert out.startswith("PermissionMissing"), out
    assert "CAP_NET_RAW" in out and "manage-vip.conf" in out
    assert issubclass(PermissionMissing, AddressError)


# --- the kernel's lifetime: a process that stops renewing loses the address -----

def lifetimes(line):
    """(valid_lft, preferred_lft) of an `ip -o addr` line, in seconds ('forever' is None)."""
    words = line.split()
    get = lambda name: words[words.index(name) + 1]  # noqa: E731
    return tuple(None if get(n) == "forever" else int(get(n).rstrip("sec")) for n in ("valid_lft", "preferred_lft"))


def test_lifetime_fits_the_claim_window_for_every_setting():
    """Whole seconds that the kernel surely ends inside the window (SPEC §9.3), yet longer than
    the leader's renewal interval, so a healthy leader's address never expires: TTL 10 s..24 h,
    lock-delay 0..60 s."""
    from vip_elector.election.timing import Timing
    timing = Timing()
    for ttl in (10, 15, 30, 86400):
        for lock_delay in (0, 0.5, 1, 2, 5, 15, 60):
            window = timing.claim_window(ttl, lock_delay)
            left = window - 0.05                      # a renewal answered in 50 ms
            lifetime = lifetime_for(left)
            assert lifetime >= 1 and expiry_bound(lifetime) <= left, (ttl, lock_delay, lifetime)
            renew = timing.renew_interval(ttl, lock_delay, leading=True)
            assert renew + 0.5 < lifetime, (ttl, lock_delay, renew, lifetime)
    assert lifetime_for(4.0 - 0.05) == 3 and lifetime_for(3.0 - 0.05) == 2   # the defaults; lock-delay 0
    assert lifetime_for(1.2) == 0                                             # too short for a second


@pytest.mark.parametrize("vip", [V4, V6], ids=["ipv4", "ipv6"])
def test_a_claim_gives_it_lifetimes_inside_the_hold(world, made, vip):
    a = made("a", vip)
    assert a.claim(hold=4.0) is True
    line = world.addresses("a", vip)
    valid, preferred = lifetimes(line)
    assert valid == preferred and 1 <= valid <= 3, line      # IPv6: never deprecated before it ends
    assert "tentative" not in line and "deprecated" not in line, line
    world.run("a", "ip", "addr", "del", vip.cidr, "dev", "eth0")
    world.run("a", "ip", "addr", "add", vip.cidr, "dev", "eth0", *(["nodad"] if vip.version == 6 else []))
    assert lifetimes(world.addresses("a", vip)) == (None, None)
    assert a.claim() is False                                 # there (by hand), but forever: ours now
    assert lifetimes(world.addresses("a", vip))[0] <= 3


def test_too_little_of_the_claim_left_adds_nothing(world, made):
    a = made("a", V4)
    assert a.claim(hold=1.0) is False
    assert world.addresses("a", V4) == "" and a.announced == 0


@pytest.mark.parametrize("vip", [V4, V6], ids=["ipv4", "ipv6"])
def test_renewed_claims_keep_it_and_the_kernel_removes_it_once_they_stop(world, made, vip):
    """A leader whose loop is frozen or wedged: the keeper goes on (it would put back a removed
    address) but never extends the lifetime past the last claim; the kernel removes the address
    before that claim's window ends, with no request from this process."""
    hold = 2.6                                      # a lifetime of 1 s: the shortest there is
    a = made("a", vip, keep_interval=0.1).keep()
    started = time.monotonic()
    while time.monotonic() - started < 3.0:         # the loop's renewals, 0.4 s apart
        a.settle(True, hold)
        assert world.addresses("a", vip), "the address expired while its claim was renewed"
        threading.Event().wait(0.4)
    last = time.monotonic()
    a.settle(True, hold)                            # the last renewal: then the loop freezes
    wait_for(lambda: not world.addresses("a", vip), hold + 2, message="the kernel to remove the VIP")
    print("VIP %s removed by the kernel %.2fs after the last claim (its window: %.1fs)"
          % (vip.ip, time.monotonic() - last, hold))
    # Inside the window the keeper may put it back (with a shorter lifetime); past its end the
    # address is gone and stays gone. 0.3 s: this test's own lag in looking.
    threading.Event().wait(max(0.0, last + hold + 0.3 - time.monotonic()))
    assert not world.addresses("a", vip), "the VIP outlived its claim window"
    threading.Event().wait(0.5)
    assert not world.addresses("a", vip), "the keeper put it back after the claim ended"
    assert a.wanted is True                         # still the decision: only the window ended


def test_a_request_held_up_on_its_way_never_outlasts_the_claim(world, made):
    """The process frozen between computing a lifetime and the kernel taking it (here: the
    request held up 1.5 s on its way, which is all a test can make of that): the lifetime is
    set again, shorter, so that the address still ends before the claim does."""
    a = made("a", V4)
    real = a.netlink.ipr.addr
    held = {"once": True}

    def addr(command, *args, **kw):
        if command == "replace" and held["once"]:
            held["once"] = False
            threading.Event().wait(1.5)
        return real(command, *args, **kw)

    a.netlink.ipr.addr = addr
    started = time.monotonic()
    assert a.claim(hold=3.5) is True                # 2 s asked; 2 s no longer fit once it arrived
    valid, _ = lifetimes(world.addresses("a", V4))
    assert valid is not None and time.monotonic() - started + expiry_bound(valid) <= 3.5, valid


# --- a removal that fails is retried, logged once, counted ---------------------

def test_a_failing_removal_is_retried_logged_once_and_counted(world, made, caplog):
    from pyroute2.netlink.exceptions import NetlinkError
    a = made("a", V4, keep_interval=0.05)
    a.claim(hold=4.0)
    counted = []
    a.on_error = counted.append
    real = a.netlink.ipr.addr
    failures = {"left": 6}

    def addr(command, *args, **kw):                 # the kernel refusing a delete (it cannot be made to)
        if command == "del" and failures["left"] > 0:
            failures["left"] -= 1
            raise NetlinkError(errno.EBUSY)
        return real(command, *args, **kw)

    a.netlink.ipr.addr = addr
    a.keep()
    caplog.set_level("INFO", logger="vip_elector")
    assert a.settle(False) is None                  # the loop's form: logged, never raised
    wait_for(lambda: not world.addresses("a", V4), 5, message="the keeper to retry the removal")
    assert failures["left"] == 0 and a.errors["remove"] == 6 and counted == ["remove"] * 6
    errors = [r.getMessage() for r in caplog.records if "cannot be removed" in r.getMessage()]
    assert len(errors) == 1, errors                 # once per cause, with what to do
    assert "Device or resource busy" in errors[0] and "ip addr del 10.91.0.100/24 dev eth0" in errors[0]
    assert "lifetime" in errors[0]
    assert any("off this node again" in r.getMessage() for r in caplog.records)


# --- faults: the interface missing or down ---------------------------------------

def test_an_interface_down_or_deleted_is_a_fault_until_it_is_back(world, made):
    world.run("a", "ip", "link", "add", "flt0", "type", "veth", "peer", "name", "flt1")
    world.run("a", "ip", "link", "set", "flt0", "up")
    world.run("a", "ip", "link", "set", "flt1", "up")
    probe = made("a", VipSettings("10.93.0.100", 24, "flt0"))   # what --check asks
    assert probe.unusable() is None
    world.run("a", "ip", "link", "set", "flt1", "down")    # the peer down: no carrier
    assert "flt0 has no carrier" in probe.unusable()
    world.run("a", "ip", "link", "set", "flt1", "up")
    wait_for(lambda: probe.unusable() is None, 5, message="the carrier back")
    faults = []
    f = made("a", VipSettings("10.93.0.100", 24, "flt0"), keep_interval=0.05)
    f.on_fault = faults.append
    f.keep()
    f.settle(True, 4.0)
    assert f.fault is None and f.holding_off() is None
    world.run("a", "ip", "link", "set", "flt0", "down")
    wait_for(lambda: faults, 2, message="the keeper to see the interface down")
    assert "flt0 is down" in faults[0] and "ip link set flt0 up" in faults[0]
    assert f.holding_off()[0] == faults[0]
    f.settle(False)                                 # the loop gives up
    world.run("a", "ip", "link", "set", "flt0", "up")
    wait_for(lambda: f.fault is None, 2, message="the fault to end with the interface up")
    why, left = f.holding_off()                     # but the node waits out the hold-off
    assert why == faults[0] and 0 < left <= FAULT_HOLD
    world.run("a", "ip", "link", "del", "flt0")
    wait_for(lambda: len(faults) == 2, 2, message="the keeper to see the interface gone")
    assert "flt0" in faults[1] and "does not exist" in faults[1]
    assert f.settle(True, 4.0) is None              # a claim now fails: logged, a fault still
