"""Resume and reload under a least-privilege token, against an in-memory Consul (issue 19).

What a token from examples/consul-acl-policy.hcl cannot do is read the
agent's own node name; these prove the daemon learns it from its own
session instead, that a reload changing the session's parameters moves the
lock in place, and that a reload Consul would refuse keeps what runs.
"""

from __future__ import annotations

import logging
import threading

from vip_elector.consul import LOCK_FLAG, ConsulUnreachable, KeyState
from vip_elector.election import Election, Outcome, Role
from vip_elector.state import SavedSession, StateStore
from vip_elector.systemd import ElectionContext, Notifier

from fake_consul import FakeConsul
from test_election_unit import FAST, settings, wait_for

class Severable:
    """The fake Consul as one daemon sees it; ``sever()`` cuts that daemon off for good."""

    KEEP = ("abort", "reset_abort", "time_limit", "close")

    def __init__(self, consul: FakeConsul):
        self._consul, self._severed = consul, False

    def sever(self) -> None:
        self._severed = True

    def __getattr__(self, name):
        attr = getattr(self._consul, name)
        if not callable(attr) or name in self.KEEP:
            return attr

        def call(*args, **kwargs):
            if self._severed:
                raise ConsulUnreachable("this daemon is dead")
            return attr(*args, **kwargs)
        return call


class Daemon:
    """One run of the daemon (an Election in a thread) with a state directory."""

    def __init__(self, consul: FakeConsul, state_dir, saved=None, **kw):
        self.consul = consul
        self.link = Severable(consul)
        self.statuses: list[str] = []
        self.verdicts: list = []
        notifier = Notifier(env={"NOTIFY_SOCKET": "/fake"},
                            send=lambda m: self.statuses.append(m[7:]) if m.startswith("STATUS=") else None)
        self.store = StateStore(str(state_dir))
        self.election = Election(settings(value=consul.value, **kw), self.link, notifier,
                                 ElectionContext("service/pg/leader", consul.value), FAST,
                                 state=self.store, saved=saved, reload_verdict=self.verdicts.append)
        self.result: list = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.consul.main_thread = threading.get_ident()
        self.result.append(self.election.run())

    def crash(self) -> SavedSession:
        """What a SIGKILL leaves: the session and the key in Consul, the state file's content.

        The dead daemon's requests fail from now on, so its stop can release nothing.
        """
        saved = self.store.load({})
        self.link.sever()
        self.election.request_stop()
        self.thread.join(5)
        assert not self.thread.is_alive()
        return saved

    def stop(self):
        self.election.request_stop()
        self.thread.join(5)
        assert not self.thread.is_alive()
        return self.result[0]


def test_a_token_without_agent_read_still_resumes_after_a_crash(tmp_path, caplog):
    """The node is learned from the session Consul made, never compared with an empty name."""
    consul = FakeConsul()
    consul.agent_node = None                     # no agent:read in the least-privilege policy
    a = Daemon(consul, tmp_path)
    wait_for(lambda: a.election.role == Role.LEADER, what="leadership")
    saved = a.store.load({})
    assert saved is not None and saved.node == "node1", saved
    held = consul.key
    assert a.crash() == saved
    with caplog.at_level(logging.INFO, logger="vip_elector"):
        b = Daemon(consul, tmp_path, saved=saved)
        wait_for(lambda: b.election.role == Role.LEADER, what="the restarted daemon leading")
    assert consul.key == held, "the key was written again"
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"resumed session {saved.session}: it still holds" in m for m in messages), messages
    assert not any("not this daemon's" in m for m in messages), messages
    assert b.stop() == Outcome.STOPPED


def test_a_state_file_of_0_2_with_no_node_is_resumed(tmp_path):
    """0.2 under such a token saved "node": ""; an upgrade's reload must still resume it."""
    consul = FakeConsul()
    consul.agent_node = None
    sid = consul.create_session(["serfHealth"])
    consul.set_key(KeyState("node-a", LOCK_FLAG, sid, 0))
    saved = SavedSession(session=sid, node="", name="vip-elector-node-a", key="service/pg/leader",
                         value="node-a", checks=("serfHealth",), ttl=0.6, lock_delay=0.2)
    index = consul.key.modify_index
    a = Daemon(consul, tmp_path, saved=saved)
    wait_for(lambda: a.election.role == Role.LEADER, what="leadership resumed")
    assert consul.key.session == sid and consul.key.modify_index == index
    assert a.store.load({}).node == "node1", "the node is learned from the resumed session"
    a.stop()


def test_a_resumed_leadership_is_not_logged_as_acquired(tmp_path, caplog):
    consul = FakeConsul()
    a = Daemon(consul, tmp_path)
    wait_for(lambda: a.election.role == Role.LEADER)
    saved = a.crash()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vip_elector"):
        b = Daemon(consul, tmp_path, saved=saved)
        wait_for(lambda: b.election.role == Role.LEADER)
    b.stop()
    messages = [r for r in caplog.records if r.name == "vip_elector"]
    assert not [r for r in messages if "LOCK ACQUIRED" in r.getMessage()]
    assert [r for r in messages if r.getMessage().startswith("resumed leadership")]
    assert not [r for r in messages if getattr(r, "MESSAGE_ID", None)
                and "LOCK ACQUIRED" in r.getMessage()]


def test_reload_that_changes_the_ttl_moves_the_lock_in_place(tmp_path):
    consul = FakeConsul()
    a = Daemon(consul, tmp_path)
    wait_for(lambda: a.election.role == Role.LEADER)
    old = consul.key.session
    a.election.reload_settings = lambda: settings(ttl=0.9)
    deletes_before = consul.count("delete_if_unchanged")
    a.election.request_reload()
    a.thread.join(5)
    assert a.result == [Outcome.REEXEC]
    assert a.verdicts == [None]
    new = consul.key.session
    assert new != old and new in consul.sessions and old not in consul.sessions
    assert consul.key.value == "node-a", "the key's value never changes: vip-manager sees nothing"
    assert consul.count("acquire") == 1 and consul.count("delete_if_unchanged") == deletes_before
    assert consul.params_of[new][0] == 0.9
    saved = a.store.load({})
    assert saved.session == new and saved.ttl == 0.9, "the new program resumes the new session"


def test_reload_naming_a_check_that_is_not_registered_keeps_the_old_configuration(tmp_path):
    consul = FakeConsul()
    a = Daemon(consul, tmp_path)
    wait_for(lambda: a.election.role == Role.LEADER)
    held = consul.key
    a.election.reload_settings = lambda: settings(check_id="vip-nope")
    a.election.request_reload()
    wait_for(lambda: a.verdicts, what="the reload's verdict")
    assert "check 'vip-nope'" in a.verdicts[0] and "not registered" in a.verdicts[0], a.verdicts
    assert a.thread.is_alive(), "a refused reload keeps running"
    assert a.election.role == Role.LEADER and consul.key == held
    assert consul.sessions == {held.session}, "the refused session is not left behind"
    wait_for(lambda: any("reload failed" in s for s in a.statuses), what="the status saying so")
    assert a.stop() == Outcome.STOPPED


def test_reload_with_a_critical_new_check_is_refused(tmp_path):
    consul = FakeConsul()
    consul.checks["vip-http"] = "critical"
    a = Daemon(consul, tmp_path)
    wait_for(lambda: a.election.role == Role.LEADER)
    a.election.reload_settings = lambda: settings(check_id="vip-http")
    a.election.request_reload()
    wait_for(lambda: a.verdicts)
    assert "'vip-http', which is critical" in a.verdicts[0], a.verdicts
    assert a.election.role == Role.LEADER
    a.stop()


def test_a_key_held_with_our_own_value_by_another_session_says_so(tmp_path, caplog):
    """A second instance on this host (or a clone with our name) is not 'the leader node-a'."""
    consul = FakeConsul()
    other = consul.create_session(["serfHealth"])
    consul.session_names[other] = "vip-elector-node-a"
    consul.set_key(KeyState("node-a", LOCK_FLAG, other, 0))
    with caplog.at_level(logging.INFO, logger="vip_elector"):
        a = Daemon(consul, tmp_path)
        wait_for(lambda: a.election.role == Role.FOLLOWER)
        wait_for(lambda: any("this node's own value" in s for s in a.statuses))
    a.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert any("second vip-elector for the same key on this host" in m for m in messages), messages
    assert not any("following: node-a holds" in m for m in messages), messages
    assert not any("leader is node-a" in s for s in a.statuses), a.statuses


def test_waiting_for_a_critical_check_shows_its_output(tmp_path):
    consul = FakeConsul()
    consul.checks["vip-http"] = "critical"
    consul.check_output["vip-http"] = "HTTP GET http://127.0.0.1:8404/healthz: 503 Service Unavailable"
    a = Daemon(consul, tmp_path, check_id="vip-http")
    wait_for(lambda: any("503 Service Unavailable" in s for s in a.statuses),
             what="the check's output in the status")
    assert a.election.role == Role.WAITING
    a.stop()


def test_a_reload_whose_move_and_the_read_after_it_go_unanswered_puts_the_lock_back(tmp_path, caplog):
    """The move applied, its answer and the read after it lost: nobody knows which session
    holds the key. The reload is refused; the loop, first thing, moves the lock back to the
    session it runs with (one txn: never free) and destroys the other. It never stops leading."""
    from vip_elector.consul import ConsulTimeout
    consul = FakeConsul()
    a = Daemon(consul, tmp_path)
    wait_for(lambda: a.election.role == Role.LEADER)
    old = consul.key.session
    real_move, real_read = consul.move_lock, consul.read_key

    def lost_read(*args, **kwargs):
        consul.read_key = real_read
        raise ConsulTimeout("no answer (timed out)")

    def lost_move(o, n):
        consul.move_lock = real_move
        real_move(o, n)
        consul.read_key = lost_read
        raise ConsulTimeout("no answer (timed out)")
    consul.move_lock = lost_move
    a.election.reload_settings = lambda: settings(ttl=0.9)
    caplog.set_level(logging.INFO, logger="vip_elector")
    a.election.request_reload()
    wait_for(lambda: a.verdicts, what="the verdict")
    assert "nor the read after it" in a.verdicts[0], a.verdicts
    wait_for(lambda: consul.key.session == old and consul.sessions == {old},
             what="the lock back on the old session, the other destroyed")
    assert consul.key.value == "node-a"
    assert any("had been applied after all: moved back" in r.getMessage() for r in caplog.records)
    assert a.election.role == Role.LEADER
    assert not [s for s in a.statuses if s.startswith(("follower", "cut off", "waiting"))], a.statuses
    assert a.stop() == Outcome.STOPPED
