"""Two daemons with --manage-vip hand the VIP over; a silent observer follows (SPEC §12.1, §12.2).

The world of tests/test_vip_address.py (node-a, node-b and an observer in
namespaces of their own on a bridge), plus a Consul dev agent in the
switch's namespace on the bridge (10.91.0.254), which both daemons use and
the test reaches through the agent's unix socket. `ip -o monitor address`
runs in both nodes, so every add and removal of the VIP is seen.

  node-a leads: the VIP is on node-a only; the observer knows it at node-a's MAC
  node-a stops: the VIP leaves node-a, node-b takes the key and the VIP, and
                the observer, which sent nothing, has node-b's MAC from the
                announcement; the VIP was never on both (reported: the gap)

And the VIP's FAULT state (keepalived's word), on a second interface per node
(`vip0`, its own veth to the bridge; Consul stays reachable through eth0):
the leader's `vip0` set down hands the key and the VIP to the other node at
once, and the faulted node competes again once the interface has been back
for the hold-off; the same for an interface deleted and created again.
"""

from __future__ import annotations

import json
import os
import re
import signal

import pytest

from consul_agent import wait_for
from elector_process import PYTHON, REPO, elector_env
from test_vip_address import V4, V6, World

pytestmark = pytest.mark.e2e

CONSUL_IP = "10.91.0.254"
KEY = "service/vip-takeover/leader"


class NetnsRef:
    """What vipnet.spawn needs of a namespace: an open fd."""

    def __init__(self, name):
        self.fd = os.open("/run/netns/" + name, os.O_RDONLY | os.O_CLOEXEC)


@pytest.fixture
def lab(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    from vipnet import CONSUL, ConsulHTTP, spawn
    if not os.access(CONSUL, os.X_OK):
        pytest.skip("no consul binary: run tests/tools/fetch-deps")
    w = World()
    procs = []
    try:
        w.run("switch", "ip", "link", "set", "lo", "up")
        w.run("switch", "ip", "addr", "add", CONSUL_IP + "/24", "dev", "br0")
        sock = str(tmp_path / "consul.sock")
        (tmp_path / "consul.json").write_text(json.dumps({"addresses": {"http": "%s unix://%s" % (CONSUL_IP, sock)}}))
        ns = {n: NetnsRef(w.ns[n]) for n in ("switch", "a", "b")}
        procs.append(spawn("consul", [CONSUL, "agent", "-dev", "-node", "lab", "-bind", "127.0.0.1",
                                     "-client", CONSUL_IP, "-dns-port", "-1", "-grpc-port", "-1",
                                     "-config-file", str(tmp_path / "consul.json")],
                          str(tmp_path / "consul.log"), netns=ns["switch"], cwd=str(tmp_path)))
        consul = ConsulHTTP(sock)
        wait_for(consul.ready, 30, message="Consul on the bridge")
        monitors = {n: spawn("monitor-" + n, ["ip", "-o", "monitor", "address"],
                            str(tmp_path / ("monitor-%s.log" % n)), netns=ns[n]) for n in ("a", "b")}
        procs += monitors.values()

        def start(node, vip, interface="eth0"):
            cfg = tmp_path / ("vip-manager-%s.yml" % node)
            cfg.write_text("dcs-type: consul\ndcs-endpoints: [\"http://%s:8500\"]\ntrigger-key: %s\n"
                           "trigger-value: node-%s\nip: %s\nnetmask: %d\ninterface: %s\n"
                           % (CONSUL_IP, KEY, node, vip.ip, vip.prefix, interface))
            p = spawn("elector-" + node, [PYTHON, "-m", "vip_elector", "--vip-manager-config", str(cfg),
                                         "--manage-vip", "--lock-delay", "1s"],
                     str(tmp_path / ("elector-%s.log" % node)), netns=ns[node], env=elector_env(), cwd=REPO)
            procs.append(p)
            return p

        yield w, consul, monitors, start
    finally:
        for p in reversed(procs):
            p.stop()
        w.close()


def holder(consul):
    entry = consul.kv_get(KEY)
    return entry["Value"].decode() if entry and entry.get("Session") else None


def events(monitor, vip):
    """(time, 'add' | 'del') of the VIP seen by a node's monitor."""
    out = []
    for t, text in zip(monitor.stamps, monitor.lines):
        if " %s/" % vip.ip in text:
            out.append((t, "del" if text.startswith("Deleted") else "add"))
    return out


@pytest.mark.parametrize("vip", [V4, V6], ids=["ipv4", "ipv6"])
def test_planned_stop_hands_the_vip_to_the_standby_and_the_observer_follows(lab, vip):
    w, consul, monitors, start = lab
    a = start("a", vip)
    wait_for(lambda: holder(consul) == "node-a", 30, message="node-a to lead")
    wait_for(lambda: w.addresses("a", vip), 5, message="the VIP on node-a")
    b = start("b", vip)
    b.wait_for_line(r"following: node-a holds", 30)
    assert w.addresses("b", vip) == ""
    w.run("obs", "ip", "neigh", "replace", vip.ip, "lladdr", w.macs["a"], "dev", "eth0", "nud", "stale")
    assert w.macs["a"] in w.neigh("obs", vip.ip)

    a.send(signal.SIGTERM)
    assert a.wait(10) == 0, a.tail()
    wait_for(lambda: holder(consul) == "node-b", 10, message="node-b to take the key")
    wait_for(lambda: w.addresses("b", vip), 5, message="the VIP on node-b")
    assert w.addresses("a", vip) == ""
    wait_for(lambda: w.macs["b"] in w.neigh("obs", vip.ip), 5,
             message="the observer to learn the VIP at node-b's MAC from the announcement")

    removed = [t for t, what in events(monitors["a"], vip) if what == "del"]
    added_b = [t for t, what in events(monitors["b"], vip) if what == "add"]
    assert removed and added_b, (events(monitors["a"], vip), events(monitors["b"], vip))
    print("VIP %s on no node for %.1f ms (node-a's removal to node-b's add, as the monitors read them)"
          % (vip.ip, (added_b[0] - removed[-1]) * 1000))
    log = a.tail(40)
    assert log.index("VIP %s removed" % vip) < log.index("LOCK RELEASED"), log


VIP_IF = "vip0"


def vip_interface(w, node, up=True):
    """A second interface for the VIP: a veth from node's `vip0` to the bridge."""
    port = "q-%s" % node
    w.run("switch", "ip", "link", "add", port, "type", "veth", "peer", "name", VIP_IF,
          "netns", w.ns[node])
    w.run("switch", "ip", "link", "set", port, "master", "br0", "up")
    if up:
        w.run(node, "ip", "link", "set", VIP_IF, "up")


def on(w, node, vip):
    out = w.run(node, "ip", "-o", "addr", "show", "dev", VIP_IF, check=False)
    return " %s/" % vip.ip in out


def session_of(consul, node):
    return [s for s in consul.sessions() if s["Name"] == "vip-elector-node-%s" % node]


def test_a_leader_whose_vip_interface_fails_hands_over_and_competes_again_once_it_is_back(lab):
    """Interface down (ip link set … down), then deleted: the node that cannot hold the VIP
    gives the key up through the planned-handover path (released at once: the other node
    takes it without lock-delay), withdraws its candidacy, and takes part again (follows) once
    the interface has been usable for the hold-off (10 s)."""
    from vip_elector.address import FAULT_HOLD, VipSettings
    w, consul, monitors, start = lab
    vip = VipSettings("10.92.0.100", 24, VIP_IF)      # not the Consul subnet: eth0 stays the path
    for node in ("a", "b"):
        vip_interface(w, node)
    a = start("a", vip, interface=VIP_IF)
    wait_for(lambda: holder(consul) == "node-a", 30, message="node-a to lead")
    wait_for(lambda: on(w, "a", vip), 5, message="the VIP on node-a")
    b = start("b", vip, interface=VIP_IF)
    b.wait_for_line(r"following: node-a holds", 30)

    # 1. node-a's interface down: node-b has the key and the VIP within seconds, not a TTL.
    w.run("a", "ip", "link", "set", VIP_IF, "down")
    fault = a.wait_for_line(r"VIP fault: interface vip0 is down", 5)
    wait_for(lambda: holder(consul) == "node-b", 5, message="node-b to take the key from the faulted node-a")
    wait_for(lambda: on(w, "b", vip), 5, message="the VIP on node-b")
    assert not on(w, "a", vip)
    a.wait_for_line("LOCK RELEASED: this node (node-a) gave up", 5, since=fault.index)
    wait_for(lambda: not session_of(consul, "a"), 5, message="node-a to withdraw its session")
    assert "ip link set vip0 up" in fault.text          # the cause and the fix
    w.run("a", "ip", "link", "set", VIP_IF, "up")
    back = a.wait_for_line(r"interface vip0 is usable", 5, since=fault.index)
    following = a.wait_for_line(r"following: node-b holds", FAULT_HOLD + 10, since=back.index)
    waited = following.t - back.t
    print("node-a competed again %.1fs after its interface came back (hold-off %gs)" % (waited, FAULT_HOLD))
    assert waited >= FAULT_HOLD - 1.0, waited           # not before the hold-off
    assert session_of(consul, "a") and holder(consul) == "node-b" and not on(w, "a", vip)

    # 2. node-b's interface deleted: node-a takes over; node-b is back once it exists again.
    w.run("b", "ip", "link", "del", VIP_IF)
    gone = b.wait_for_line(re.compile(r"VIP fault: .*vip0.*does not exist"), 5)
    wait_for(lambda: holder(consul) == "node-a", 5, message="node-a to take the key from the faulted node-b")
    wait_for(lambda: on(w, "a", vip), 5, message="the VIP on node-a")
    vip_interface(w, "b")
    b.wait_for_line(r"following: node-a holds", FAULT_HOLD + 10, since=gone.index)
    assert session_of(consul, "b") and holder(consul) == "node-a" and not on(w, "b", vip)
    for p in (a, b):
        assert p.alive, p.tail()
