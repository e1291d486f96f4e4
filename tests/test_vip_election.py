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

    def settle(self, claiming):
        self.decisions.append(claiming)
        self.with_roles.append((claiming, self.role_of()))
        self.calls.append(f"vip:{claiming}")


def running(consul: FakeConsul) -> tuple[Running, FakeVip]:
    vip = FakeVip(consul.calls)
    r = Running(consul, vip=vip)
    vip.role_of = lambda: r.election.role
    return r, vip


def test_starting_leaves_the_address_then_leading_claims_it():
    consul = FakeConsul()
    r, vip = running(consul)
    with r:
        wait_for(lambda: r.election.role == Role.LEADER)
        assert vip.decisions[0] is None          # starting: nothing decided yet
        assert vip.decisions[-1] is True
        assert False not in vip.decisions        # never removed on the way to leading


def test_a_follower_removes_it_and_takes_it_on_takeover():
    consul = FakeConsul()
    consul.sessions.add("other")
    consul.set_key(KeyState("node-b", LOCK_FLAG, "other", 0))
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
