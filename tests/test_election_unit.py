"""The state machine against an in-memory Consul, with timings shrunk to milliseconds.

These cover the paths a real agent cannot be made to take on demand (an
acquire refused N times, renewals failing for exactly a TTL, Consul vanishing
mid-leadership); the real-agent suite proves the rest.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from vip_elector.config import ConfigError, Settings
from vip_elector.consul import LOCK_FLAG, KeyState
from vip_elector.election import Backoff, Election, Outcome, Role, Timing
from vip_elector.systemd import ElectionContext, Notifier

from fake_consul import FakeConsul

FAST = Timing(backoff_min=0.05, backoff_max=0.2, health_poll=0.05, lock_delay_retry=0.01,
              watch_wait=0.5, renew_retry=0.05, shutdown_timeout=0.2, stop_budget=1.0,
              release_reserve=0.4, turn_budget=1.5)


def settings(**kw) -> Settings:
    base = dict(config_path="/etc/vip-manager.yml", trigger_key="service/pg/leader", value="node-a",
                scheme="http", host="127.0.0.1", port=8500, ttl=0.6, lock_delay=0.2)
    base.update(kw)
    return Settings(**base)


class Recorder:
    """A Notifier's send function that keeps what it was told."""

    def __init__(self):
        self.messages: list[str] = []
        self.calls = None                 # the FakeConsul's call log, to order READY=1 against it
        self.ready_after_calls = None

    def __call__(self, message: str) -> None:
        if message == "READY=1" and self.ready_after_calls is None and self.calls is not None:
            self.ready_after_calls = len(self.calls)
        self.messages.append(message)

    def statuses(self) -> list[str]:
        return [m[len("STATUS="):] for m in self.messages if m.startswith("STATUS=")]


def wait_for(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


class Running:
    """An Election running in a thread, stopped and joined at the end."""

    def __init__(self, consul: FakeConsul, env=None, timing: Timing = FAST, saved=None,
                 reload_settings=None, vip=None, **kw):
        self.consul = consul
        self.recorder = Recorder()
        self.recorder.calls = consul.calls
        env = {"NOTIFY_SOCKET": "/fake"} if env is None else env
        self.notifier = Notifier(env=env, send=self.recorder)
        self.context = ElectionContext("service/pg/leader", consul.value)
        self.election = Election(settings(value=consul.value, **kw), consul, self.notifier, self.context,
                                 timing, saved=saved, reload_settings=reload_settings, vip=vip)
        self.result: list = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        self.consul.main_thread = threading.get_ident()
        try:
            self.result.append(self.election.run())
        except BaseException as e:  # surfaced by stop()
            self.result.append(e)

    def __enter__(self):
        self.thread.start()
        return self

    def stop(self):
        self.election.request_stop()
        self.thread.join(5)
        assert not self.thread.is_alive(), "the election did not stop"
        return self.result[0]

    def __exit__(self, *exc):
        if self.thread.is_alive():
            self.stop()


def test_leads_when_the_key_is_free_and_says_so():
    consul = FakeConsul()
    with Running(consul) as r:
        wait_for(lambda: r.election.role == Role.LEADER, what="leadership")
        assert consul.key.session in consul.sessions and consul.key.flags == LOCK_FLAG
        assert consul.key.value == "node-a"
        wait_for(lambda: "leader: holding service/pg/leader as node-a" in r.recorder.statuses())
    assert r.result == [Outcome.STOPPED]


@pytest.mark.parametrize("reachable", [True, False], ids=["reached", "unreachable"])
def test_ready_is_sent_once_the_first_attempt_to_reach_consul_has_finished(reachable):
    """SPEC §6: READY=1 after the configuration is valid and the first Consul attempt."""
    consul = FakeConsul()
    consul.reachable = reachable
    with Running(consul) as r:
        wait_for(lambda: "READY=1" in r.recorder.messages, what="READY=1")
    ready_at = r.recorder.ready_after_calls
    assert ready_at is not None and ready_at >= 1, "READY=1 came before any Consul request"
    assert consul.calls[0] == "read_key"
    statuses_before = r.recorder.messages[:r.recorder.messages.index("READY=1")]
    assert any(m.startswith("STATUS=leader" if reachable else "STATUS=waiting for Consul")
               for m in statuses_before), statuses_before


def test_stop_ends_within_its_budget_when_consul_hangs():
    """A silent Consul: the release and the destroy wait for nothing past the stop budget."""
    consul = FakeConsul()
    with Running(consul) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        consul.hang = True
        time.sleep(0.05)
        t0 = time.monotonic()
        assert r.stop() == Outcome.STOPPED
        took = time.monotonic() - t0
    assert took < FAST.stop_budget + 0.3, f"stop took {took:.2f}s with a hanging Consul"
    assert consul.count("delete_if_unchanged") + consul.count("read_key") >= 1


def test_ready_is_sent_even_when_consul_is_unreachable_and_retries_back_off():
    consul = FakeConsul()
    consul.reachable = False
    with Running(consul) as r:
        wait_for(lambda: "READY=1" in r.recorder.messages, what="READY=1")
        time.sleep(0.6)
        attempts = consul.count("read_key")
        # 0.05, 0.1, 0.2, 0.2 … (±20 %): a handful in 0.6 s, never a busy loop
        assert 2 <= attempts <= 8, attempts
        assert any(s.startswith("waiting for Consul at 127.0.0.1:8500: connection refused")
                   for s in r.recorder.statuses())
        consul.reachable = True
        wait_for(lambda: r.election.role == Role.LEADER, what="leadership after Consul came back")


def test_critical_check_means_no_session_until_it_passes():
    consul = FakeConsul()
    consul.checks["vip-http"] = "critical"
    with Running(consul, check_id="vip-http") as r:
        wait_for(lambda: "waiting: check 'vip-http' is critical" in r.recorder.statuses())
        time.sleep(0.2)
        assert consul.count("create_session") == 0 and consul.key is None
        polls = consul.count("check_details")
        assert polls >= 2, "the check must be looked at again, regularly"
        consul.checks["vip-http"] = "passing"
        wait_for(lambda: r.election.role == Role.LEADER, what="leadership once the check passes")


def test_unregistered_check_is_reported_as_such():
    consul = FakeConsul()
    with Running(consul, check_id="nope") as r:
        wait_for(lambda: "waiting: check 'nope' is not registered on the local agent" in r.recorder.statuses())
        # The agent's list may hide a check from this token: Consul judges (and refuses) it.
        assert not consul.sessions and r.election.session is None


def test_a_plain_key_at_start_is_a_configuration_error_and_stays_untouched():
    consul = FakeConsul()
    consul.set_key(KeyState("someone", 0, None, 0))
    before = consul.key
    with Running(consul) as r:
        r.thread.join(5)
    assert isinstance(r.result[0], ConfigError)
    assert "consul kv delete service/pg/leader" in str(r.result[0])
    assert consul.key == before and consul.count("acquire") == 0


def test_follower_takes_over_when_the_leader_releases():
    consul = FakeConsul()
    consul.sessions.add("other")
    consul.set_key(KeyState("node-b", LOCK_FLAG, "other", 0))
    with Running(consul) as r:
        wait_for(lambda: "follower: leader is node-b" in r.recorder.statuses())
        assert r.election.role != Role.LEADER
        consul.set_key(None)  # node-b's planned stop: CAS delete
        wait_for(lambda: r.election.role == Role.LEADER, what="takeover")


def test_acquire_refused_by_lock_delay_is_retried_promptly():
    consul = FakeConsul()
    consul.refuse_acquires = 5  # the key looks free, Consul says false: lock-delay
    with Running(consul) as r:
        started = time.monotonic()
        wait_for(lambda: r.election.role == Role.LEADER, what="leadership after lock-delay")
        elapsed = time.monotonic() - started
        assert consul.count("acquire") >= 6
        assert elapsed < 2.0, f"retries must be prompt, took {elapsed:.2f}s"


def test_session_invalidated_by_a_failing_check_loses_leadership(caplog):
    consul = FakeConsul()
    with caplog.at_level(logging.INFO, logger="vip_elector"), Running(consul) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        consul.checks["serfHealth"] = "critical"
        consul.invalidate(r.election.session)
        wait_for(lambda: r.election.role != Role.LEADER, what="loss of leadership")
        wait_for(lambda: any("waiting: check 'serfHealth' is critical" == s for s in r.recorder.statuses()))
    lost = [rec for rec in caplog.records if "LOCK LOST" in rec.getMessage()]
    assert lost and lost[0].MESSAGE_ID == "4da94490216148db9573bb18f3304344"
    assert lost[0].levelno == logging.WARNING


def test_renewals_failing_for_a_whole_ttl_lose_leadership():
    consul = FakeConsul()
    with Running(consul) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        consul.renew_fails = True
        t0 = time.monotonic()
        wait_for(lambda: r.election.role != Role.LEADER, timeout=5, what="loss after a TTL of failed renewals")
        assert time.monotonic() - t0 >= 0.3  # not before the TTL (0.6 s) minus the renew interval
        consul.renew_fails = False


def test_renewal_happens_before_half_the_ttl():
    consul = FakeConsul()
    with Running(consul) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        n0 = consul.count("renew_session")
        time.sleep(1.2)
        renewals = consul.count("renew_session") - n0
        # TTL 0.6 s: renew at least every 0.3 s → ≥ 4 in 1.2 s
        assert renewals >= 4, renewals


def test_planned_stop_deletes_our_key_by_cas_then_destroys_the_session():
    consul = FakeConsul()
    with Running(consul) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        wait_for(lambda: r.election.key.held_by(r.election.session) and r.election.key.state.modify_index,
                 what="the key read after the acquire")
        consul.calls.clear()
        assert r.stop() == Outcome.STOPPED
    assert consul.key is None and not consul.sessions
    assert consul.calls.index("delete_if_unchanged") < consul.calls.index("destroy_session")
    assert "STOPPING=1" in r.recorder.messages


def test_planned_stop_with_consul_gone_still_exits_promptly():
    consul = FakeConsul()
    with Running(consul) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        consul.reachable = False
        t0 = time.monotonic()
        assert r.stop() == Outcome.STOPPED
        assert time.monotonic() - t0 < 2


def test_watch_news_older_than_our_own_acquire_is_ignored():
    """The watcher's first answer (key absent) may arrive after we acquired: not a loss."""
    consul = FakeConsul()
    with Running(consul) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        time.sleep(0.1)
        assert r.election.role == Role.LEADER
        assert consul.count("acquire") == 1


def test_watchdog_is_pinged_from_the_loop_at_half_the_interval():
    consul = FakeConsul()
    env = {"NOTIFY_SOCKET": "/fake", "WATCHDOG_USEC": "200000"}
    with Running(consul, env=env) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        time.sleep(0.55)
        pings = r.recorder.messages.count("WATCHDOG=1")
        assert 3 <= pings <= 8, pings


def test_no_systemd_means_no_notifications():
    consul = FakeConsul()
    with Running(consul, env={}) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
    assert r.recorder.messages == []


@pytest.mark.parametrize("raw", ["garbage", "0", "-5", ""])
def test_bad_watchdog_usec_is_ignored(raw):
    n = Notifier(env={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": raw}, send=lambda m: None)
    assert n.watchdog_interval is None


def test_watchdog_for_another_pid_is_not_ours():
    n = Notifier(env={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"},
                 send=lambda m: None)
    assert n.watchdog_interval is None


def test_notify_socket_that_fails_is_logged_once_and_used_again(caplog):
    """A transient error must not end notifications: the watchdog would then kill us."""
    sent, failing = [], [True]

    def flaky(message):
        if failing[0]:
            raise FileNotFoundError(2, "No such file or directory")
        sent.append(message)
    n = Notifier(env={"NOTIFY_SOCKET": "/nowhere"}, send=flaky)
    with caplog.at_level(logging.INFO, logger="vip_elector"):
        n.ready()
        n.status("leader")
        n.stopping()
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        failing[0] = False
        n.status("follower")
    assert sent == ["STATUS=follower"] and n.active
    assert "works again" in caplog.records[-1].getMessage()


def test_backoff_grows_jittered_between_one_and_thirty_seconds():
    rng = iter([0.0, 1.0, 0.5] * 20).__next__
    b = Backoff(1.0, 30.0, rng)
    delays = [b.next() for _ in range(12)]
    assert all(1.0 <= d <= 30.0 for d in delays)
    assert delays[0] == 1.0 and delays[-1] >= 24
    assert delays[3] > delays[1]
    b.reset()
    assert b.next() <= 1.2


# --- SPEC §8, §9: honest claims, the guard, resume, reload -----------------------

def test_cut_off_leader_stops_claiming_then_leads_again_with_the_key_unchanged(caplog):
    """§8.7 and the stray destroys of a troubled Consul: same key value, never free, a new session."""
    consul = FakeConsul()
    with caplog.at_level(logging.INFO, logger="vip_elector"), Running(consul) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        key_before = consul.key
        consul.renew_fails = True
        wait_for(lambda: r.election.role == Role.CUT_OFF, what="cut off")
        assert any(s.startswith("cut off: ") for s in r.recorder.statuses())
        assert r.election.session == key_before.session, "the session is kept while Consul fails (§8.7)"
        assert consul.count("create_session") == 1, "never a second session while Consul fails"
        consul.renew_fails = False
        wait_for(lambda: r.election.role == Role.LEADER, what="leading again")
        new = r.election.session
        assert new != key_before.session and consul.key.session == new
        assert (consul.key.value, consul.key.flags) == (key_before.value, key_before.flags)
        assert consul.count("acquire") == 1 and consul.count("delete_if_unchanged") == 0, \
            "the key moved to the new session in one step, never free"
        wait_for(lambda: consul.sessions == {new}, what="the old session destroyed")
    messages = [rec.getMessage() for rec in caplog.records]
    assert any("LOCK LOST" in m and "cannot confirm" in m for m in messages)
    assert any(f"replaced by {new}" in m for m in messages)


def test_a_slow_renewal_replaces_the_session_of_a_follower_too():
    consul = FakeConsul()
    consul.key_name = "service/pg/leader"
    consul.set_key(KeyState("node-b", LOCK_FLAG, "session-b", 0))
    consul.sessions.add("session-b")
    timing = Timing(**{**FAST.__dict__, "doubt_latency": 0.0})  # every renewal counts as slow
    with Running(consul, timing=timing) as r:
        wait_for(lambda: r.election.role == Role.FOLLOWER)
        first = r.election.session
        wait_for(lambda: r.election.session != first, what="a replaced session")
        assert consul.key.session == "session-b", "a follower's replacement never touches the key"
        assert first not in consul.sessions


#: A leader reads the raft leader with every renewal: a change of it replaces the session.
RAFT_FAST = Timing(**{**FAST.__dict__, "raft_poll": 0.05})


def replace_soon(consul):
    """Consul has had trouble (its raft leader changed): a leader on RAFT_FAST replaces its session
    after its next renewal. Waits for two reads first, so the first one set the baseline."""
    wait_for(lambda: consul.count("raft_leader") >= 2, what="the raft leader read as a baseline")
    host, port = consul.leader.rsplit(":", 1)
    consul.leader = f"{host}{consul.count('raft_leader')}:{port}"


def test_a_replacement_refused_the_lock_keeps_the_old_session():
    """Consul will not give the lock to the new session (its check failed just then): keep the old."""
    consul = FakeConsul()
    with Running(consul, timing=RAFT_FAST) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        old = r.election.session
        real_move = consul.move_lock
        consul.move_lock = lambda a, b: False
        replace_soon(consul)
        wait_for(lambda: consul.count("destroy_session") >= 1, what="the refused replacement destroyed")
        assert r.election.session == old and consul.key.session == old
        assert r.election.lease.replacement is None
        consul.move_lock = real_move
        wait_for(lambda: r.election.session != old, what="the replacement at the next renewal")
        assert consul.key.session == r.election.session


def test_claim_window_ends_before_another_node_could_hold_the_key():
    """min(TTL, lock-delay + 3 s): TTL-bound for short TTLs, serfHealth-bound otherwise (§9.3)."""
    consul = FakeConsul()
    with Running(consul) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        lease = r.election.lease
        assert lease.claim_window == pytest.approx(0.6)
        assert lease.claim_until == pytest.approx(lease.confirmed_at + 0.6)
        # A leader confirms at least three times per window.
        assert lease.renew_interval(leading=True) <= 0.6 / 3 + 1e-9
    assert FAST.claim_window(ttl=10.0, lock_delay=1.0) == pytest.approx(1.0 + FAST.claim_margin)


def test_an_unexpected_exception_is_logged_as_internal_error_and_retried(caplog):
    consul = FakeConsul()
    real = consul.check_details
    calls = [0]

    def buggy(ids):
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("a bug")
        return real(ids)
    consul.check_details = buggy
    with caplog.at_level(logging.ERROR, logger="vip_elector"), Running(consul) as r:
        wait_for(lambda: r.election.role == Role.LEADER, what="leadership despite the bug")
    errors = [rec for rec in caplog.records if "internal error" in rec.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info is not None


def test_watcher_survives_a_bug_and_an_index_of_zero(caplog):
    consul = FakeConsul()
    real = consul.read_key
    state = {"n": 0}

    def odd(index=None, wait=None, key=None):
        state["n"] += 1
        if state["n"] == 3:
            raise ValueError("a bug in the watcher's path")
        idx, k = real(index, wait, key)
        return (0, k) if index else (idx, k)   # blocking answers without an index
    consul.read_key = odd
    with caplog.at_level(logging.ERROR, logger="vip_elector"), Running(consul) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        n0 = state["n"]
        time.sleep(0.5)
        assert state["n"] - n0 < 25, "the watch spins on an index of 0"
        assert r.election.watcher.alive


def test_follower_whose_session_vanishes_says_so_at_once():
    consul = FakeConsul()
    consul.sessions.add("other")
    consul.set_key(KeyState("node-b", LOCK_FLAG, "other", 0))
    with Running(consul) as r:
        wait_for(lambda: r.election.role == Role.FOLLOWER)
        sid = r.election.session
        consul.sessions.discard(sid)                # destroyed by an operator
        wait_for(lambda: any(s.startswith("waiting: session gone") for s in r.recorder.statuses()),
                 what="the follower noticing")
        wait_for(lambda: r.election.session not in (None, sid), what="a new session")


def test_resume_of_a_saved_session_leads_without_writing_the_key():
    from vip_elector.state import SavedSession
    consul = FakeConsul()
    consul.sessions.add("session-old")
    consul.checks_of["session-old"] = ("serfHealth",)
    consul.set_key(KeyState("node-a", LOCK_FLAG, "session-old", 0))
    before = consul.key
    saved = SavedSession("session-old", "node1", "vip-elector-node-a", "service/pg/leader", "node-a",
                         ("serfHealth",), 0.6, 0.2)
    with Running(consul, saved=saved) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        assert r.election.session == "session-old"
        assert consul.key == before and consul.count("acquire") == 0
        assert consul.count("create_session") == 0


def test_resume_of_a_session_for_another_configuration_releases_it():
    from vip_elector.state import SavedSession
    consul = FakeConsul()
    consul.sessions.add("session-old")
    consul.checks_of["session-old"] = ("serfHealth", "old-check")
    consul.set_key(KeyState("node-a", LOCK_FLAG, "session-old", 0))
    saved = SavedSession("session-old", "node1", "vip-elector-node-a", "service/pg/leader", "node-a",
                         ("serfHealth", "old-check"), 0.6, 0.2)
    with Running(consul, saved=saved) as r:
        wait_for(lambda: r.election.role == Role.LEADER and r.election.session != "session-old")
        assert "session-old" not in consul.sessions
        assert consul.calls.index("delete_if_unchanged") < consul.calls.index("destroy_session")


def test_reload_with_a_bad_configuration_keeps_running():
    consul = FakeConsul()
    def bad():
        raise ConfigError("/etc/vip-manager.yml sets dcs-type to 'etcd'")
    with Running(consul, reload_settings=bad) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        r.election.request_reload()
        wait_for(lambda: "RELOADING=1" in r.recorder.messages)
        wait_for(lambda: r.recorder.messages.count("READY=1") == 2, what="READY after the failed reload")
        assert r.election.role == Role.LEADER
        assert "reload failed: /etc/vip-manager.yml" in r.recorder.statuses()[-1]


def test_valid_reload_returns_reexec_without_releasing():
    consul = FakeConsul()
    r = Running(consul, reload_settings=lambda: None)
    with r:
        wait_for(lambda: r.election.role == Role.LEADER)
        key = consul.key
        r.election.request_reload()
        r.thread.join(5)
    from vip_elector.election import Outcome as O
    assert r.result == [O.REEXEC]
    assert consul.key == key and key.session in consul.sessions
    assert r.election.saved_session().session == key.session


def test_every_step_runs_within_the_turn_budget():
    consul = FakeConsul()
    with Running(consul) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
    assert consul.time_limits and max(consul.time_limits) <= FAST.turn_budget


def test_leader_cut_off_while_its_check_fails_stops_claiming_within_half_a_lock_delay(caplog):
    """A partition during a check flap: the servers free the key at once (the agent told
    them), the key's watch cannot see it, a renewal hangs — only the local agent knows."""
    consul = FakeConsul()
    consul.checks["vip-http"] = "passing"
    with caplog.at_level(logging.INFO, logger="vip_elector"), Running(consul, check_id="vip-http") as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        consul.hang = True                       # cut off: the loop's requests hang
        time.sleep(0.05)
        t0 = time.monotonic()
        consul.checks["vip-http"] = "critical"   # the local agent still answers about its checks
        wait_for(lambda: r.election.role != Role.LEADER, timeout=2, what="the claim to end")
        took = time.monotonic() - t0
        assert took < 0.2 / 2 + 0.1, f"{took:.3f}s: later than half the lock-delay (0.2 s)"
        # (Which words the status ends on depends on what the aborted request was doing;
        # that the claim ended within half the lock-delay, not the 0.6 s window, is the point.)
        consul.hang = False
    assert any("LOCK LOST" in rec.getMessage() for rec in caplog.records)


def test_health_watch_that_meets_a_consul_error_keeps_the_claim_and_tries_again(caplog):
    """The local agent answering 500 (or nothing) to the check read is no reason to stop claiming:
    the renewals judge Consul; the watch reads the check again next time."""
    from vip_elector.consul import ConsulError
    consul = FakeConsul()
    consul.checks["vip-http"] = "passing"
    real, reads = consul.check_states, []

    def flaky(ids):
        if threading.get_ident() != consul.main_thread:
            reads.append(ids)
            if len(reads) <= 3:
                raise ConsulError("HTTP 500: rpc error")
        return real(ids)
    consul.check_states = flaky
    with caplog.at_level(logging.INFO, logger="vip_elector"), Running(consul, check_id="vip-http") as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        wait_for(lambda: len(reads) >= 5, what="the health watch reading again after errors")
        assert r.election.role == Role.LEADER and r.election.reporter.watching_health
    assert not [rec for rec in caplog.records if "internal error" in rec.getMessage()]


def test_stop_before_the_saved_session_is_resumed_releases_it(caplog):
    """A SIGTERM that reaches a re-executed daemon while it is still connecting (SPEC §4.5, §8.3)."""
    from vip_elector.state import SavedSession
    consul = FakeConsul()
    consul.sessions.add("session-old")
    consul.set_key(KeyState("node-a", LOCK_FLAG, "session-old", 0))
    saved = SavedSession("session-old", "node1", "vip-elector-node-a", "service/pg/leader", "node-a",
                         ("serfHealth",), 0.6, 0.2)
    consul.hang = True                           # its first read of the key hangs
    r = Running(consul, saved=saved)
    with caplog.at_level(logging.DEBUG, logger="vip_elector"), r:
        wait_for(lambda: "read_key" in consul.calls, what="the first request")
        consul.hang = False                      # the stop's own requests are answered
        assert r.stop() == Outcome.STOPPED
    assert consul.key is None, "the key is still held by the previous run's session"
    assert "session-old" not in consul.sessions
    assert "create_session" not in consul.calls
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert not warnings, warnings                # a request ended by the stop is not trouble
    assert any("LOCK RELEASED" in rec.getMessage() for rec in caplog.records)


def test_a_reload_and_a_stop_together_stop_or_pass_the_stop_on(caplog):
    consul = FakeConsul()
    r = Running(consul, reload_settings=lambda: None)
    with r:
        wait_for(lambda: r.election.role == Role.LEADER)
        r.election.request_reload()
        r.election.request_stop()
        r.thread.join(5)
    if r.result == [Outcome.REEXEC]:  # the reload began first: the stop goes to the new program
        import signal
        assert signal.SIGTERM in r.election.pending_signals()
    else:
        assert r.result == [Outcome.STOPPED]
        assert consul.key is None and not consul.sessions


def test_a_move_applied_but_unanswered_is_recognised_from_the_key():
    """REFERENCE §8: no answer is not "no". The key says the move happened: the new session is ours."""
    from vip_elector.consul import ConsulUnreachable
    consul = FakeConsul()
    with Running(consul, timing=RAFT_FAST) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        old = r.election.session
        real_move = consul.move_lock

        def applied_then_lost(a, b):
            real_move(a, b)
            raise ConsulUnreachable("no answer (timed out)")
        consul.move_lock = applied_then_lost
        replace_soon(consul)
        wait_for(lambda: r.election.session != old, what="the replacement adopted")
        wait_for(lambda: consul.key.session == r.election.session and consul.sessions == {r.election.session},
                 what="the key on the new session, and the old one destroyed")
        assert r.election.role == Role.LEADER


def test_a_raft_leader_change_replaces_the_session_in_place():
    """A frozen raft leader can go unnoticed by renewals; its change of leader cannot."""
    consul = FakeConsul()
    with Running(consul, timing=RAFT_FAST) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        old, key = r.election.session, consul.key
        replace_soon(consul)
        wait_for(lambda: r.election.session != old, what="the session replaced")
        assert consul.key.session == r.election.session and consul.key.value == key.value
        assert consul.count("acquire") == 1 and r.election.role == Role.LEADER
        sessions, reads = consul.count("create_session"), consul.count("raft_leader")
        wait_for(lambda: consul.count("raft_leader") >= reads + 3, what="more reads of the raft leader")
        assert consul.count("create_session") == sessions, "an unchanged leader replaced the session"


def fail_once(consul, name, error):
    """Make the fake's `name` raise `error` on its next call only; returns the list of failures."""
    real, failed = getattr(consul, name), []

    def call(*args, **kwargs):
        if not failed:
            failed.append(name)
            consul.calls.append(name)
            raise error
        return real(*args, **kwargs)
    setattr(consul, name, call)
    return failed


def test_consul_errors_in_a_replacement_keep_the_lead_and_it_finishes_later(caplog):
    """A 500 on the new session's creation, then on the move: still leading, nothing
    leaked, the move done at a later renewal with the replacement already made."""
    from vip_elector.consul import ConsulError
    consul = FakeConsul()
    with caplog.at_level(logging.DEBUG, logger="vip_elector"), Running(consul, timing=RAFT_FAST) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        old = r.election.session
        created = fail_once(consul, "create_session", ConsulError("HTTP 500: rpc error"))
        moved = fail_once(consul, "move_lock", ConsulError("HTTP 500: rpc error"))
        replace_soon(consul)
        wait_for(lambda: created and moved, what="both failures")
        wait_for(lambda: r.election.session != old, what="the replacement at a later renewal")
        # The old session is destroyed just after the new one is taken up: wait for that.
        wait_for(lambda: consul.key.session == r.election.session and consul.sessions == {r.election.session},
                 what="the key on the new session, and the old one destroyed")
        assert consul.count("create_session") == 3, "one failed, one made, and the first session"
        wait_for(lambda: r.election.role == Role.LEADER, what="leading")
    assert not [rec for rec in caplog.records if "internal error" in rec.getMessage()]


def test_raft_leader_that_cannot_be_read_changes_nothing():
    from vip_elector.consul import ConsulError
    consul = FakeConsul()

    def broken():
        consul.calls.append("raft_leader")
        raise ConsulError("HTTP 500")
    consul.raft_leader = broken
    with Running(consul, timing=RAFT_FAST) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        old = r.election.session
        wait_for(lambda: consul.count("raft_leader") >= 3, what="reads of the raft leader")
        assert r.election.session == old and r.election.role == Role.LEADER


def test_stop_before_resume_with_consul_gone_exits_and_says_what_is_left(caplog):
    from vip_elector.state import SavedSession
    consul = FakeConsul()
    consul.sessions.add("session-old")
    consul.set_key(KeyState("node-a", LOCK_FLAG, "session-old", 0))
    consul.hang = True
    r = Running(consul, saved=SavedSession("session-old", "node1", "vip-elector-node-a", "service/pg/leader",
                                           "node-a", ("serfHealth",), 0.6, 0.2))
    with caplog.at_level(logging.INFO, logger="vip_elector"), r:
        wait_for(lambda: "read_key" in consul.calls, what="the first request")
        consul.hang, consul.reachable = False, False   # Consul refuses everything from now on
        assert r.stop() == Outcome.STOPPED
    assert any("could not release session session-old of the previous run" in rec.getMessage()
               for rec in caplog.records)


# --- The parts alone: the lease, the key, the reporter, the inbox, the timing rules ------------

from vip_elector.election.key import HeldByOther, RefusedByLockDelay, Release, TriggerKey, Won  # noqa: E402
from vip_elector.election.lease import Confirmed, Created, Failing, Gone, Lease, Replaced  # noqa: E402
from vip_elector.election import Inbox, KeyChanged, Reporter, Stop  # noqa: E402
from vip_elector.hooks import Hooks  # noqa: E402
from vip_elector.state import StateStore  # noqa: E402


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def a_lease(consul, clock, **kw) -> Lease:
    return Lease(consul, settings(**kw), FAST, clock, StateStore(None), on_session=lambda sid: None)


def test_lease_renewals_answer_confirmed_failing_or_gone_and_the_claim_counts_from_one_timestamp():
    consul, clock = FakeConsul(), Clock()
    lease = a_lease(consul, clock)
    created = lease.create()
    assert isinstance(created, Created)
    lease.adopt(created.session, created.sent, created=True)
    assert lease.claim_until == pytest.approx(1000.0 + 0.6)

    clock.now = 1000.1
    assert lease.renew(leading=True, cut_off=False) == Confirmed(recovered=False, replace=False)
    assert lease.claim_until == pytest.approx(1000.1 + 0.6)

    consul.renew_fails, clock.now = True, 1000.2
    assert lease.renew(leading=True, cut_off=False) == Failing("connection refused")
    assert lease.claim_until == pytest.approx(1000.1 + 0.6), "a failed renewal confirms nothing"
    assert lease.renew_due(leading=True) == pytest.approx(1000.2 + FAST.renew_retry)

    consul.renew_fails, clock.now = False, 1000.3
    assert lease.renew(leading=True, cut_off=False) == Confirmed(recovered=True, replace=True), \
        "a session that went through failed renewals is replaced (§9.4)"
    assert lease.doubt.startswith("renewals failed")

    consul.invalidate(lease.session)
    assert isinstance(lease.renew(leading=True, cut_off=False), Gone)


def test_lease_replaced_in_place_moves_the_lock_and_destroys_the_old_session():
    consul, clock = FakeConsul(), Clock()
    lease = a_lease(consul, clock)
    created = lease.create()
    lease.adopt(created.session, created.sent)
    key = TriggerKey(consul, settings(), FAST, clock)
    key.read()
    assert isinstance(key.acquire(created.session), Won)
    consul.renew_fails = True
    lease.renew(leading=True, cut_off=False)
    consul.renew_fails = False
    assert lease.renew(leading=True, cut_off=False).replace
    before = consul.key
    replaced = lease.replace()
    assert isinstance(replaced, Replaced) and replaced.key.session == lease.session != created.session
    assert (consul.key.value, consul.key.flags) == (before.value, before.flags)
    assert consul.sessions == {lease.session} and lease.doubt is None
    assert consul.count("delete_if_unchanged") == 0 and consul.count("acquire") == 1


def test_key_ignores_older_news_and_answers_acquires_in_types():
    consul, clock = FakeConsul(), Clock()
    key = TriggerKey(consul, settings(), FAST, clock)
    key.read()
    assert key.observe(key.index + 5, None)
    assert not key.observe(key.index - 1, KeyState("node-b", LOCK_FLAG, "x", 3)), "older news is stale"
    assert key.state is None

    session = consul.create_session(["serfHealth"])
    consul.refuse_acquires = 1
    refused = key.acquire(session)
    assert isinstance(refused, RefusedByLockDelay)
    assert refused.retry_at == key.retry_at == pytest.approx(clock.now + FAST.lock_delay_retry)
    assert isinstance(key.acquire(session), Won) and key.retry_at is None
    key.read()
    assert key.held_by(session)
    assert key.release(session) == Release.RELEASED and consul.key is None

    consul.sessions.add("other")
    consul.set_key(KeyState("node-b", LOCK_FLAG, "other", 0))
    key.read()
    assert key.acquire(session) == HeldByOther(key.state)
    assert key.release(session) == Release.NOT_OURS and consul.key.session == "other"


def test_key_that_is_not_a_lock_key_is_named_foreign():
    consul = FakeConsul()
    key = TriggerKey(consul, settings(), FAST, Clock())
    plain = KeyState("10.0.0.1", 0, None, 4)
    assert "consul kv delete service/pg/leader" in key.foreign(plain)
    assert key.foreign(KeyState("node-a", LOCK_FLAG, None, 4)) is None and key.foreign(None) is None


def test_reporter_says_each_situation_once_without_reading_its_status_back(caplog):
    recorder = Recorder()
    context = ElectionContext("service/pg/leader", "node-a")
    reporter = Reporter(settings(), Notifier(env={"NOTIFY_SOCKET": "/fake"}, send=recorder), context,
                        Hooks(None, 0, "service/pg/leader", "node-a"), FakeConsul(), lambda check: None)
    plain, b, c = (KeyState("x", 0, None, 1), KeyState("node-b", LOCK_FLAG, "sb", 1),
                   KeyState("node-c", LOCK_FLAG, "sc", 1))
    with caplog.at_level(logging.INFO, logger="vip_elector"):
        reporter.not_a_lock_key(plain, "trigger-key is not a lock key")
        reporter.not_a_lock_key(plain, "trigger-key is not a lock key")
        reporter.consul_trouble("waiting for Consul at 127.0.0.1:8500: refused", "refused", False)
        reporter.not_a_lock_key(plain, "trigger-key is not a lock key")
        reporter.follows(b)
        reporter.follows(b)
        reporter.follows(c)
        reporter.leads()
        reporter.follows(b)
    messages = [rec.getMessage() for rec in caplog.records]
    assert messages.count("trigger-key is not a lock key.") == 2, "once per situation"
    assert [m for m in messages if m.startswith("following")] == [
        "following: node-b holds service/pg/leader", "following: node-c holds service/pg/leader",
        "following: node-b holds service/pg/leader"]
    acquired = [rec for rec in caplog.records if "LOCK ACQUIRED" in rec.getMessage()]
    lost = [rec for rec in caplog.records if "LOCK LOST" in rec.getMessage()]
    assert len(acquired) == 1 and acquired[0].MESSAGE_ID == "5167235c50a3439b965b74c3cb0102bc"
    assert len(lost) == 1 and "node-b holds it now" in lost[0].getMessage()
    assert context.role == "follower" and recorder.statuses()[-1] == "follower: leader is node-b"


def test_inbox_takes_events_while_other_threads_post():
    """The watcher, the health watch and the signal relay post while the loop reads."""
    inbox, posters, each = Inbox(), 3, 20000
    for i in range(20000):
        inbox.put(KeyChanged(0, i, None))

    def post(n):
        for i in range(each):
            inbox.put(KeyChanged(n, i, None))
    threads = [threading.Thread(target=post, args=(n + 1,)) for n in range(posters)]
    for t in threads:
        t.start()
    got: dict[int, list[int]] = {}
    deadline = time.monotonic() + 30
    while sum(map(len, got.values())) < 20000 + posters * each and time.monotonic() < deadline:
        event = inbox.get(0.01)
        if event is not None:
            got.setdefault(event.generation, []).append(event.index)
    for t in threads:
        t.join()
    assert {n: len(v) for n, v in got.items()} == {0: 20000, **{n + 1: each for n in range(posters)}}
    assert all(v == sorted(v) for v in got.values()), "each thread's events in the order posted"
    inbox.put(KeyChanged(9, 1, None))
    inbox.put(Stop(1.0))
    assert inbox.get(0) == Stop(1.0) and inbox.get(0) is None, "a stop overtakes the rest"


def test_a_bug_in_a_step_is_an_internal_error_not_consul_trouble(caplog):
    """Logged with its traceback and tried again; the role and the status stay what they are."""
    consul = FakeConsul()
    with caplog.at_level(logging.INFO, logger="vip_elector"), Running(consul) as r:
        wait_for(lambda: r.election.role == Role.LEADER)
        wait_for(lambda: r.recorder.statuses()[-1].startswith("leader: "))
        shown = len(r.recorder.statuses())
        failed = fail_once(consul, "renew_session", RuntimeError("a bug"))
        wait_for(lambda: failed, what="the bug")
        renewals = consul.count("renew_session")
        wait_for(lambda: consul.count("renew_session") >= renewals + 3, what="renewals after the bug")
        assert r.election.role == Role.LEADER
        assert r.recorder.statuses()[shown:] == [], "the status changed for a bug"
    errors = [rec for rec in caplog.records if "internal error" in rec.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert not [rec for rec in caplog.records if "Consul at" in rec.getMessage() and
                rec.levelno >= logging.WARNING], "a bug reported as Consul trouble"


def test_the_stop_is_timed_on_the_loops_own_clock():
    clock = Clock(5.0)
    election = Election(settings(), FakeConsul(), Notifier(env={}), ElectionContext(), FAST, clock=clock)
    election.request_stop()
    assert election.events.drain() == [Stop(5.0)]


def test_a_stop_keeps_its_budget_on_a_clock_that_is_not_time_monotonic():
    consul = FakeConsul()
    r = Running(consul)
    r.election = Election(settings(), consul, r.notifier, r.context, FAST,
                          clock=lambda: time.monotonic() + 1e6)
    with r:
        wait_for(lambda: r.election.role == Role.LEADER)
        consul.hang = True
        t0 = time.monotonic()
        assert r.stop() == Outcome.STOPPED
    assert time.monotonic() - t0 < FAST.stop_budget + 0.3


@pytest.mark.parametrize("bad", [dict(stop_budget=5.0), dict(release_reserve=1.0, stop_budget=1.0),
                                 dict(shutdown_timeout=1.0), dict(turn_budget=8.0), dict(claim_margin=4.0),
                                 dict(health_poll=2.5), dict(backoff_min=0.0), dict(backoff_min=40.0),
                                 dict(renew_retry=-1.0)])
def test_timing_rules_are_checked_where_timing_is_built(bad):
    with pytest.raises(ValueError, match="inconsistent Timing"):
        Timing(**bad)


def test_the_shipped_and_the_test_timings_keep_the_rules():
    Timing()
    assert FAST.stop_budget < 5.0 and RAFT_FAST.raft_poll < FAST.raft_poll
