"""--manage-vip on the real Consul cluster (tests/cluster.py): the VIP is never on two nodes.

Issue 17 item 6, SPEC §12.1: the cluster lab of tests/test_cluster.py (three
Consul servers with production raft timing, a client agent per node, each
in a network namespace of its own on a bridge) with no vip-manager at all:
every elector runs with `--manage-vip` and puts the VIP 10.77.1.100 on its
node's bridge interface itself. The lab's VIP sampler (the same as in
vip-manager mode: cluster.OrderedVipMonitor, one `ip monitor address
all-nsid` in the bridge's namespace) records every add and removal of the
VIP on every node in the kernel's order, so a handover a few ms long cannot
be seen inverted.

Two faults, each on a settled lab (one leader, the key naming it, the VIP on
it alone), checked against the invariants of §9.6 (tests/cluster_faults.py)
and, over the fault's whole window:

  * the VIP was never on two nodes (0 ms: unlike vip-manager without the
    fencing hook, the cut-off leader drops it before its session can expire);
  * once settled, it is on exactly one node, the one the key names, by the
    monitors and by a fresh `ip -o addr` in every node's namespace.

  partition    the leader node's link down 15 s, then up (the key moves)
  planned stop SIGTERM to the leader's elector, another node takes over, the
               stopped one starts again and follows

The module takes about two minutes on a 2-core machine.
"""

import pytest

import cluster
from cluster_faults import FaultResult, Faults, SETTLE_BOUND, LOAD_SLACK

pytestmark = [pytest.mark.cluster, pytest.mark.consul, pytest.mark.e2e]

RESULTS = []


@pytest.fixture(scope="module")
def lab(request):
    try:
        with cluster.running_lab(manage_vip=True) as lab:
            yield lab
    finally:
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print("\n--manage-vip on the cluster lab\n" + FaultResult.HEADER)
            for r in RESULTS:
                print(r.row())
                for note in r.notes:
                    print("    " + note)


@pytest.fixture
def faults(lab):
    lab.heal_all()
    lab.settle(SETTLE_BOUND + LOAD_SLACK + 30)
    return Faults(lab)


def run(faults, kind, **options):
    r = faults.run(kind, **options)
    RESULTS.append(r)
    lab = faults.lab
    print(FaultResult.HEADER + "\n" + r.row() + "".join("\n    " + n for n in r.notes))
    assert not r.errors, "%s: invariants of SPEC §9.6 broken:\n  %s\nlab directory (kept when VIP_ELECTOR_KEEP_LAB=1): %s" % (
        kind, "\n  ".join(r.errors), lab.dir)
    doubles = lab.vip_monitor.overlaps(r.t_fault)
    assert r.vip_double == 0 and not doubles, "%s: the VIP was on two nodes with --manage-vip: %s" % (
        kind, ["%s for %.0f ms" % (sorted(who), (b - a) * 1000) for a, b, who in doubles])
    holder = lab.leader()
    assert lab.vip_nodes() == {holder}, "%s: the monitors see the VIP on %s, the key names %s" % (
        kind, sorted(lab.vip_nodes()) or "no node", holder)
    assert lab.vip_holders_now() == {holder}, "%s: `ip addr` shows the VIP on %s, the key names %s" % (
        kind, sorted(lab.vip_holders_now()) or "no node", holder)
    return r


def test_partition_of_leader_node_never_puts_the_vip_on_two_nodes(faults):
    r = run(faults, "partition")
    assert r.new_holder not in (None, r.leader), "the key never moved off the partitioned leader"
    lab = faults.lab
    assert not lab.vip_monitor.ever_on(lab.iface(r.leader), r.t_heal), (
        "the VIP came back to node-%s after the heal although it did not win the key" % r.leader)


def test_planned_stop_hands_the_vip_over_never_on_two_nodes(faults):
    r = run(faults, "planned_stop")
    assert r.new_holder not in (None, r.leader), "the key never moved off the stopped leader"
    lab = faults.lab
    removed = [t for t, ifname, added in lab.vip_monitor.events
               if t >= r.t_fault and ifname == lab.iface(r.leader) and not added]
    assert removed, "the stopped leader's VIP was never seen removed"
    taken = lab.vip_monitor.first_add(lab.iface(r.new_holder), r.t_fault)
    assert taken is not None and taken >= min(removed), (removed, taken)
    print("planned stop: the VIP on no node for %.1f ms (node-%s's removal to node-%s's add, as the "
          "kernel reported them)" % ((taken - min(removed)) * 1000, r.leader, r.new_holder))
