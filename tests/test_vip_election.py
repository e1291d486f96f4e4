"""The election loop tells the managed VIP what it claims (SPEC §12.1), against the in-memory Consul.

`Election(..., vip=)` (given by cli._run_daemon; the Reporter tells it) gets `settle(True)` when the node
takes or resumes the key, `settle(False)` whenever it claims nothing —
follower, cut off, session lost, planned stop — and `settle(None)` while it
starts (a restarted leader keeps its address until it knows). A planned
stop takes the address off before the key's CAS delete.
"""

from __future__ import annotations

from vip_elector.consul import LOCK_FLAG, KeyState
from vip_elector.election import Role

from fake_consul import FakeConsul
from test_election_unit import Running, wait_for


class FakeVip:
    """Records the loop's decisions, in the FakeConsul's call log (to order them against it)."""

    def __init__(self, calls: list):
        self.calls = calls
        self.decisions: list = []
        self.with_roles: list = []   # (decision, the role the node is in as it is made)
        self.role_of = lambda: None
        self.holds: list = []        # the claim window left, for each claim (the address's lifetime)
        self.fault = None            # what holding_off() answers
        self.on_fault = lambda why: None
        self.looked = 0              # holding_off() calls: the loop looking before it competes

    def settle(self, claiming, hold=None):
        self.decisions.append(claiming)
        self.with_roles.append((claiming, self.role_of()))
        self.calls.append(f"vip:{claiming}")
        if claiming:
            self.holds.append(hold)

    def holding_off(self):
        self.looked += 1
        return self.fault


def running(consul: FakeConsul) -> tuple[Running, FakeVip]:
    vip = FakeVip(consul.calls)
    r = Running(consul, vip=vip)
    vip.role_of = lambda: r.election.role
    return r, vip


def held_by_node_b() -> FakeConsul:
    """A Consul whose key node-b's live session holds: the elector under test follows."""
    consul = FakeConsul()
    consul.sessions.add("other")
    consul.set_key(KeyState("node-b", LOCK_FLAG, "other", 0))
    return consul


def test_starting_leaves_the_address_then_leading_claims_it():
    consul = FakeConsul()
    r, vip = running(consul)
    with r:
        wait_for(lambda: r.election.role == Role.LEADER)
        assert vip.decisions[0] is None          # starting: nothing decided yet
        assert vip.decisions[-1] is True
        assert False not in vip.decisions        # never removed on the way to leading


def test_a_follower_removes_it_and_takes_it_on_takeover():
    consul = held_by_node_b()
    r, vip = running(consul)
    with r:
        wait_for(lambda: r.election.role == Role.FOLLOWER)
        assert vip.decisions[-1] is False        # a standby removes a stale copy
        consul.set_key(None)
        wait_for(lambda: r.election.role == Role.LEADER)
        assert vip.decisions[-1] is True


def test_losing_the_session_removes_it():
    consul = FakeConsul()
    r, vip = running(consul)
    with r:
        wait_for(lambda: r.election.role == Role.LEADER)
        before = len(vip.decisions)
        consul.invalidate(r.election.session)
        # Off at once; then (the key being free) a new session takes it again: on.
        wait_for(lambda: False in vip.decisions[before:],
                 what=lambda: f"the VIP off after the session was lost: {vip.decisions}")
        # The claim and the address go together: on only while the role is leader
        # (a turn that confirmed the lead just before the loop learnt of the loss may
        # still say so once: that is the claim, not a lag of the address).
        assert all((claiming is True) == (role == Role.LEADER)
                   for claiming, role in vip.with_roles if claiming is not None), vip.with_roles


def test_planned_stop_removes_it_before_the_key_is_released():
    consul = FakeConsul()
    r, vip = running(consul)
    with r:
        wait_for(lambda: r.election.role == Role.LEADER)
        wait_for(lambda: consul.key is not None and consul.key.session == r.election.session)
        consul.calls.clear()
        r.stop()
    assert consul.key is None
    assert "vip:False" in consul.calls
    assert consul.calls.index("vip:False") < consul.calls.index("delete_if_unchanged"), consul.calls


def test_every_claim_carries_the_claim_window_left_and_renewals_extend_it():
    """The address's kernel lifetime follows the claim (SPEC §9.3): each claim says how much
    of the window is left, and each confirmed renewal claims again (the lifetime is renewed)."""
    consul = FakeConsul()
    r, vip = running(consul)
    window = r.election.lease.claim_window
    with r:
        wait_for(lambda: r.election.role == Role.LEADER)
        first = len(vip.holds)
        wait_for(lambda: len(vip.holds) >= first + 3, what=lambda: f"renewals to claim again: {vip.holds}")
    assert all(hold is not None and 0 < hold <= window for hold in vip.holds), (window, vip.holds)


def test_a_leader_that_cannot_hold_the_vip_hands_the_key_over_and_waits_out_the_fault():
    """keepalived's FAULT state: the key is released at once (a CAS delete, no lock-delay for
    the standby), the session with it; no acquire while the fault lasts; back afterwards."""
    consul = FakeConsul()
    r, vip = running(consul)
    with r:
        wait_for(lambda: r.election.role == Role.LEADER)
        session = r.election.session
        consul.calls.clear()
        vip.fault = ("interface eth0 is down: bring it up (ip link set eth0 up)", 10.0)
        vip.on_fault(vip.fault[0])                     # what the VIP's keeper thread does
        wait_for(lambda: r.election.role == Role.WAITING and consul.key is None,
                 what=lambda: f"the key released: {r.election.role}, {consul.key}")
        assert session not in consul.sessions          # candidacy withdrawn with the session
        assert consul.calls.index("vip:False") < consul.calls.index("delete_if_unchanged"), consul.calls
        wait_for(lambda: any("VIP fault: interface eth0 is down" in s for s in r.recorder.statuses()))
        consul.calls.clear()
        looked = vip.looked
        wait_for(lambda: vip.looked >= looked + 3, what="the loop to look at the fault again")
        assert "create_session" not in consul.calls and "acquire" not in consul.calls, consul.calls
        vip.fault = None                               # the interface is back and the hold-off over
        wait_for(lambda: r.election.role == Role.LEADER, what="leading again after the fault")
        assert r.election.session != session


def test_a_follower_with_a_fault_withdraws_its_candidacy():
    consul = held_by_node_b()
    r, vip = running(consul)
    with r:
        wait_for(lambda: r.election.role == Role.FOLLOWER)
        vip.fault = ("interface eth0 does not exist", 10.0)
        vip.on_fault(vip.fault[0])
        wait_for(lambda: r.election.role == Role.WAITING and r.election.session is None)
        consul.set_key(None)                           # the key is free: not for this node now
        looked = vip.looked
        wait_for(lambda: vip.looked >= looked + 3, what="the loop to look at the fault again")
        assert consul.key is None and r.election.session is None


def test_a_withdrawal_consul_does_not_answer_is_retried_until_it_does():
    """The faulted interface may be the way to Consul too: the release and the destroy are
    tried again until Consul answers, so the session never waits out its TTL holding the key."""
    consul = FakeConsul()
    r, vip = running(consul)
    with r:
        wait_for(lambda: r.election.role == Role.LEADER)
        session = r.election.session
        consul.reachable = False
        vip.fault = ("interface eth0 has no carrier", 10.0)
        vip.on_fault(vip.fault[0])
        wait_for(lambda: r.election.role == Role.WAITING)
        assert vip.decisions[-1] is False                # the VIP off at once, Consul or not
        assert consul.key is not None and session in consul.sessions
        consul.reachable = True
        wait_for(lambda: consul.key is None and session not in consul.sessions,
                 what=lambda: f"the withdrawal to be retried: {consul.key}, {consul.sessions}")
        assert r.election.session is None and r.election.role == Role.WAITING
