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
"""

from __future__ import annotations

import json
import os
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

        def start(node, vip):
            cfg = tmp_path / ("vip-manager-%s.yml" % node)
            cfg.write_text("dcs-type: consul\ndcs-endpoints: [\"http://%s:8500\"]\ntrigger-key: %s\n"
                           "trigger-value: node-%s\nip: %s\nnetmask: %d\ninterface: eth0\n"
                           % (CONSUL_IP, KEY, node, vip.ip, vip.prefix))
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
