"""The faults of SPEC §9.6, run on a ClusterLab, measured and checked against the invariants.

    faults = Faults(lab)
    result = faults.run("partition")      # fault, heal, settle, measure
    result.errors                         # invariants broken (empty: all held)
    print(result.row())                   # kind, detection, new holder, overlap, leaderless, VIP double

Shared by tests/test_cluster.py (one test per fault) and tests/tools/chaos
(random faults and combinations for minutes).

Invariants (§9.6), checked over the fault's whole window:
  * no elector exits unasked, and none logs an internal error;
  * at most one elector claims leadership at any moment (STATUS starting with
    `leader:`), up to CLAIM_JITTER of measurement error;
  * once the fault heals, exactly one elector leads within
    2×TTL + lock-delay + 2 s (+ LOAD_SLACK), it is the one the key names, and
    the sessions are one per running elector.
Measured, not asserted (without fencing): how long the VIP sat on two nodes.
"""

import random
import signal
import time
from dataclasses import dataclass, field
from typing import List, Optional

from cluster import gaps

TTL = 10.0                  # vip-elector's defaults, used by the lab
LOCK_DELAY = 1.0
# §9.6: a healed fault has one leader within 2×TTL + lock-delay + 2 s.
SETTLE_BOUND = 2 * TTL + LOCK_DELAY + 2
# This machine has 2 cores shared with other work: processes can be scheduled
# late by a second or more under load. Granted on the settle bound only.
LOAD_SLACK = 3.0
# Claims are timed when the test process reads each elector's STATUS datagram,
# one reader thread per elector: a reader scheduled late stamps a STATUS late.
# A handover is causal (the old leader says it stopped leading before the key
# can be acquired, the new one says it leads after), so any measured overlap
# above this is the daemon's, not the measurement's.
CLAIM_JITTER = 0.05

# SPEC §9.2: SIGTERM ends the daemon within 5 s whatever is in flight. The
# exit is seen when the test's reader thread gets EOF on the daemon's output.
STOP_BUDGET = 5.0
STOP_SLACK = 0.5

KINDS = ("partition", "raft_kill", "raft_stall", "quorum_loss", "agent_restart", "check_flap",
         "frozen_elector", "failover_raft_stalled", "elector_kill", "planned_stop")
COMBINATIONS = ("partition_flap", "raft_stall_failover", "quorum_loss_with_leader")
# Faults that leave the holder's node, checks and elector as they were: leadership has no
# reason to move at all (SPEC §11.4: a move then is a needless one). Every other fault
# (the leader's node partitioned, its check failed, its elector frozen, killed or stopped,
# its agent restarted) may move it once; a second move (e.g. back on the heal) is needless.
NO_MOVE_NEEDED = ("raft_kill", "raft_stall", "quorum_loss", "quorum_loss_with_leader")


@dataclass
class FaultResult:
    kind: str
    leader: str                               # the node leading before the fault
    t_fault: float
    t_heal: float = 0.0
    t_settled: Optional[float] = None
    old_session: Optional[str] = None         # the session holding the key before the fault
    old_value: Optional[str] = None           # the node it named
    detection: Optional[float] = None         # s from the fault to the key leaving the old node (freed or renamed)
    replaced: Optional[float] = None          # s from the fault to the leader moving the key to a new session of its own
    new_holder: Optional[str] = None          # the next node the key named with a session
    t_new_holder: Optional[float] = None      # s from the fault
    old_stops: Optional[float] = None         # s from the fault to the old leader's claim ending
    claim_overlap: float = 0.0                # longest time two electors claimed at once, s
    leaderless: float = 0.0                   # longest time after the heal with no claimer, s
    vip_double: float = 0.0                   # longest time the VIP was on two nodes, s
    vip_none: float = 0.0                     # longest time the VIP was on no node, s
    moves: int = 0                            # times the key named another node with a session
    needless_moves: int = 0                   # moves beyond what the fault called for (SPEC §11.4)
    notes: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)

    HEADER = "%-24s %-6s %9s %9s %14s %10s %10s %9s %8s" % (
        "fault", "leader", "unclaim_s", "detect_s", "new_holder", "overlap_ms", "leaderless", "vip2_ms", "vip0_s")

    def row(self):
        holder = "%s@%.1fs" % (self.new_holder, self.t_new_holder) if self.new_holder else "-"
        return "%-24s %-6s %9s %9s %14s %10.0f %10.1f %9.0f %8.1f%s" % (
            self.kind, self.leader, _secs(self.old_stops), _secs(self.detection), holder,
            self.claim_overlap * 1000, self.leaderless, self.vip_double * 1000, self.vip_none,
            "  FAILED" if self.errors else "")


def _secs(value):
    return "-" if value is None else "%.1f" % value


def _longest(intervals):
    return max((b - a for a, b, *_ in intervals), default=0.0)


class Faults:
    """Runs one fault at a time on a settled lab; the lab is settled again afterwards."""

    def __init__(self, lab, log=print):
        self.lab = lab
        self.log = log

    def run(self, kind, **options) -> FaultResult:
        lab = self.lab
        leader = lab.settle(SETTLE_BOUND + LOAD_SLACK)
        r = FaultResult(kind, leader, time.time())
        _, r.old_value, r.old_session = (lab.watcher.current() or (None, None, None))[:3]
        getattr(self, "_" + kind)(r, **options)
        self._finish(r)
        return r

    # --- measuring ----------------------------------------------------------------

    def _finish(self, r):
        lab = self.lab
        try:
            lab.settle(max(0.0, r.t_heal + SETTLE_BOUND + LOAD_SLACK - time.time()))
            r.t_settled = time.time()
        except TimeoutError as e:
            r.errors.append("not settled within %.0fs of the heal: %s" % (SETTLE_BOUND + LOAD_SLACK, e))
        end = time.time()
        for t, value, session, _ in lab.watcher.history:
            if t < r.t_fault:
                continue
            if r.detection is None:
                if session is None or value != r.old_value:
                    r.detection = t - r.t_fault
                elif session != r.old_session and r.replaced is None:
                    # The leader replaced its session after Consul trouble: the key moved to the
                    # new session in one step, never free, its value unchanged (not a move).
                    r.replaced = t - r.t_fault
                    r.notes.append("the leader's session replaced %.1fs after the fault, the key "
                                   "unchanged" % r.replaced)
            if r.detection is not None and session:
                r.new_holder, r.t_new_holder = lab.node_of_value(value), t - r.t_fault
                break
        holders = [r.old_value]
        for t, value, session, _ in lab.watcher.history:
            if r.t_fault <= t <= end and session and value != holders[-1]:
                holders.append(value)
        r.moves = len(holders) - 1
        allowed = 0 if r.kind in NO_MOVE_NEEDED or r.kind.startswith("partition(follower") else 1
        r.needless_moves = max(0, r.moves - allowed)
        if r.needless_moves:
            r.notes.append("needless move%s: the key went %s" % ("s" if r.needless_moves > 1 else "",
                                                                  " -> ".join(str(h) for h in holders)))
        ends = [b for a, b in lab.claim_intervals(end)[r.leader] if r.t_fault <= b < end]
        r.old_stops = ends[0] - r.t_fault if ends else None
        overlaps = lab.claim_overlaps(r.t_fault, end)
        r.claim_overlap = _longest(overlaps)
        r.leaderless = _longest(lab.leaderless(r.t_heal, end))
        if lab.tracks_vip:
            r.vip_double = _longest(lab.vip_monitor.overlaps(r.t_fault, end))
            r.vip_none = _longest(_vip_gaps(lab, r.t_fault, end))
        for name, status, tail in lab.crashes(r.t_fault):
            r.errors.append("%s exited unasked with status %s:\n%s" % (name, status, tail))
        for name, line in lab.log_errors(r.t_fault):
            r.errors.append("%s logged: %s" % (name, line))
        for a, b, who in overlaps:
            if b - a > CLAIM_JITTER:
                r.errors.append("%s claimed leadership at once for %.0f ms (%.1fs..%.1fs after the fault)"
                                % (" and ".join(sorted(who)), (b - a) * 1000, a - r.t_fault, b - r.t_fault))

    # --- faults: each does its harm and its heal, and sets r.t_heal ------------------

    def _sleep_until(self, t):
        time.sleep(max(0.0, t - time.time()))

    def _partition(self, r, hold=15.0, node=None):
        """The leader node's link down for `hold` seconds, then up."""
        node = node or r.leader
        if node != r.leader:
            r.kind = "partition(follower %s)" % node
        self.lab.partition(node)
        self._sleep_until(r.t_fault + hold)
        self._heal_link(r, node)

    def _heal_link(self, r, node):
        """Link up; the fault is healed once Consul sees the node again."""
        t_up = self.lab.heal_link(node)
        try:
            r.t_heal = self.lab.wait_rejoined(node)
            r.notes.append("node-%s back in the cluster %.1fs after its link came up" % (node, r.t_heal - t_up))
        except TimeoutError as e:
            r.t_heal = time.time()
            r.errors.append(str(e))

    def _partition_flap(self, r, hold=15.0):
        """A partition of the leader node while another node's check flaps."""
        lab = self.lab
        other = random.choice([n for n in lab.nodes if n != r.leader])
        lab.partition(r.leader)
        while time.time() < r.t_fault + hold - 2:
            lab.fail_check(other)
            time.sleep(random.uniform(0.3, 1.5))
            lab.pass_check(other)
            time.sleep(random.uniform(0.3, 1.5))
        self._sleep_until(r.t_fault + hold)
        self._heal_link(r, r.leader)

    def _raft_kill(self, r, down=5.0):
        """SIGKILL of the raft leader server; restarted `down` seconds later."""
        lab = self.lab
        server = lab.raft_leader() or lab.wait_raft_leader(15)
        r.notes.append("raft leader %s killed" % server)
        lab.kill_agent(server)
        try:
            new = lab.wait_raft_leader(30, exclude=(server,))
            r.notes.append("new raft leader %s after %.1fs" % (new, time.time() - r.t_fault))
        except TimeoutError as e:
            r.errors.append(str(e))
        self._sleep_until(r.t_fault + down)
        r.t_heal = lab.restart_agent(server)

    def _raft_stall(self, r, stall=10.0):
        """SIGSTOP of the raft leader server for `stall` seconds."""
        server = self.lab.raft_leader() or self.lab.wait_raft_leader(15)
        r.notes.append("raft leader %s stalled %.0fs" % (server, stall))
        self.lab.pause_agent(server)
        self._sleep_until(r.t_fault + stall)
        r.t_heal = self.lab.resume_agent(server)

    def _quorum_loss(self, r, hold=2 * TTL + 5, with_leader=False):
        """Two servers SIGSTOPped longer than 2×TTL: by default two followers
        (the raft leader steps down, and the leader elected after the heal
        resets every session's timer); with_leader: the raft leader and a
        follower, which wake together — the old leader may then still lead,
        with the session timers that ran out while it was stopped: Consul
        expires the sessions, so the key may move (measured, not a fault of
        the election)."""
        lab = self.lab
        leader = lab.raft_leader() or lab.wait_raft_leader(15)
        followers = [s for s in lab.servers if s != leader]
        stopped = [leader, random.choice(followers)] if with_leader else followers
        r.notes.append("servers %s stopped %.0fs%s" % (" and ".join(stopped), hold,
                                                       " (the raft leader among them)" if with_leader else ""))
        for server in stopped:
            lab.pause_agent(server)
        self._sleep_until(r.t_fault + hold)
        for server in reversed(stopped):
            r.t_heal = lab.resume_agent(server)

    def _quorum_loss_with_leader(self, r):
        self._quorum_loss(r, with_leader=True)

    def _agent_restart(self, r):
        """`systemctl restart consul` on the leader node: SIGTERM (a graceful leave), start."""
        lab = self.lab
        lab.kill_agent(r.leader, sig=signal.SIGTERM)
        r.t_heal = lab.restart_agent(r.leader)

    def _check_flap(self, r, flips=4, period=1.0):
        """The leader's check critical and passing again, `flips` times, `period` apart."""
        for _ in range(flips):
            self.lab.fail_check(r.leader)
            time.sleep(period / 2)
            r.t_heal = self.lab.pass_check(r.leader)
            time.sleep(period / 2)

    def _frozen_elector(self, r, hold=2 * TTL + LOCK_DELAY + 2):
        """SIGSTOP of the leader's elector past its session's expiry, then SIGCONT."""
        self.lab.pause_elector(r.leader)
        self._sleep_until(r.t_fault + hold)
        r.t_heal = self.lab.resume_elector(r.leader)

    def _failover_raft_stalled(self, r, stall=10.0):
        """A planned stop of the leader's elector while the raft leader is stalled.

        The healed state has the other two electors only (one of them must
        have taken over); the stopped one starts again once that is settled,
        and the lab must settle once more with it as a follower."""
        lab = self.lab
        server = lab.raft_leader() or lab.wait_raft_leader(15)
        lab.pause_agent(server)
        time.sleep(1.0)
        t_term, t_exit, status = lab.stop_elector(r.leader)
        r.notes.append("raft leader %s stalled %.0fs; elector-%s stopped in %.1fs (status %s)"
                       % (server, stall, r.leader, t_exit - t_term, status))
        if status != 0:
            r.errors.append("elector-%s exited with status %s on SIGTERM" % (r.leader, status))
        if t_exit - t_term > STOP_BUDGET + STOP_SLACK:
            r.errors.append("elector-%s took %.1fs to exit on SIGTERM (SPEC §9.2: %.0fs)"
                            % (r.leader, t_exit - t_term, STOP_BUDGET))
        self._sleep_until(r.t_fault + stall)
        r.t_heal = lab.resume_agent(server)
        try:
            lab.settle(max(0.0, r.t_heal + SETTLE_BOUND + LOAD_SLACK - time.time()))
        except TimeoutError as e:
            r.errors.append("no leader among the other nodes within %.0fs of the heal: %s"
                            % (SETTLE_BOUND + LOAD_SLACK, e))
        lab.start_elector(r.leader)

    def _stop_leader_elector(self, r):
        """SIGTERM to the leader's elector; its exit status and time checked (§9.2)."""
        lab = self.lab
        t_term, t_exit, status = lab.stop_elector(r.leader)
        r.notes.append("elector-%s stopped in %.1fs (status %s)" % (r.leader, t_exit - t_term, status))
        if status != 0:
            r.errors.append("elector-%s exited with status %s on SIGTERM" % (r.leader, status))
        if t_exit - t_term > STOP_BUDGET + STOP_SLACK:
            r.errors.append("elector-%s took %.1fs to exit on SIGTERM (SPEC §9.2: %.0fs)"
                            % (r.leader, t_exit - t_term, STOP_BUDGET))

    def _planned_stop(self, r):
        """`systemctl stop vip-elector` on the leader node: another node leads (and,
        with --manage-vip, holds the VIP) with two electors; the stopped one starts
        again once that is settled and must settle as a follower."""
        lab = self.lab
        self._stop_leader_elector(r)
        try:
            lab.settle(SETTLE_BOUND + LOAD_SLACK)
        except TimeoutError as e:
            r.errors.append("no leader among the other nodes within %.0fs of the stop: %s"
                            % (SETTLE_BOUND + LOAD_SLACK, e))
        lab.start_elector(r.leader)
        r.t_heal = time.time()

    def _raft_stall_failover(self, r):
        """Combination for chaos: the same with a random stall."""
        self._failover_raft_stalled(r, stall=random.uniform(4, 12))

    def _elector_kill(self, r, down=1.0):
        """SIGKILL of the leader's elector, restarted (same --state-dir) `down` seconds later."""
        self.lab.stop_elector(r.leader, sig=signal.SIGKILL)
        self._sleep_until(r.t_fault + down)
        self.lab.start_elector(r.leader)
        r.t_heal = time.time()


def _vip_gaps(lab, start, end):
    """Intervals within [start, end] with the VIP on no node."""
    by_iface = {}
    holding = {}
    with lab.vip_monitor._cond:
        events = sorted(lab.vip_monitor.events, key=lambda e: e[0])
    for t, ifname, added in events:
        if added and ifname not in holding:
            holding[ifname] = t
        elif not added and ifname in holding:
            by_iface.setdefault(ifname, []).append((holding.pop(ifname), t))
    for ifname, t in holding.items():
        by_iface.setdefault(ifname, []).append((t, end))
    return gaps(by_iface, start, end)
