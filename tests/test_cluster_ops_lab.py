"""Stickiness in the cluster lab (issue 16, SPEC §11.4): three Consul servers, a client
agent per node, vip-elector and vip-manager 1.0.1 on nodes a, b, c (tests/cluster.py).

When Consul frees the key without its holder asking while the holder is healthy, the
key (and the VIP) come back to the same node. Provoked two ways:

  * the holder's session destroyed by the servers out of the blue — what a stale
    "failed" from gossip after a partition heals does, and a server's stray destroy
    after a raft leader change (§9.4) — three rounds; without stickiness each is a
    two-in-three chance of moving;
  * a partition of the leader node and its heal: the one move the partition calls
    for, and none on the heal (needless_moves, as `make chaos` counts them).

Run under the shared lock: flock /tmp/vip-heavy.lock pytest tests/test_cluster_ops_lab.py
(about 2 minutes on a 2-core machine).
"""

import time

import pytest

import cluster
from cluster_faults import LOAD_SLACK, SETTLE_BOUND, FaultResult, Faults

pytestmark = [pytest.mark.cluster, pytest.mark.consul, pytest.mark.e2e]


@pytest.fixture(scope="module")
def lab():
    with cluster.running_lab() as lab:
        yield lab


def holders_since(lab, t0):
    """The distinct values the key named with a session since t0, the one before included."""
    seen = []
    history = list(lab.watcher.history)
    before = [h for h in history if h[0] < t0 and h[2]][-1:]
    for t, value, session, _ in before + [h for h in history if h[0] >= t0]:
        if session and (not seen or seen[-1] != value):
            seen.append(value)
    return seen


def test_a_healthy_holder_whose_session_the_servers_end_gets_the_key_and_the_vip_back(lab):
    for _ in range(3):
        leader = lab.settle(SETTLE_BOUND + LOAD_SLACK + 30)
        _, value, session = lab.watcher.current()[:3]
        t0 = time.time()
        lab.consul.destroy_session(session)
        lab.watcher.wait(lambda st: st[2] and st[2] != session, 15, since=t0, message="a new holder")
        again = lab.settle(SETTLE_BOUND + LOAD_SLACK)
        assert again == leader, "the key moved from %s to %s" % (leader, again)
        assert holders_since(lab, t0) == [value], lab.watcher.history[-5:]
        lab.wait_vip_on(leader, timeout=15)
    assert not lab.crashes(0)


def test_a_partition_heal_does_not_move_the_vip_a_second_time(lab):
    r = Faults(lab).run("partition", hold=12.0)
    print(FaultResult.HEADER + "\n" + r.row() + "".join("\n    " + n for n in r.notes))
    assert not r.errors, r.errors
    assert r.needless_moves == 0, r.notes
