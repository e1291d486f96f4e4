"""SPEC §11 in the state machine, against the in-memory Consul: deferral on a free key
(priority, stickiness), the leader's side of a switchover, preemption requests.

The other nodes are candidate keys a test writes (held by sessions the fake knows);
the real-agent suite (test_cluster_ops_consul.py) proves the same with real daemons.
"""

from __future__ import annotations

import contextlib
import json
import time

from vip_elector.cluster import candidate_key, request_key
from vip_elector.consul import LOCK_FLAG, KeyState
from vip_elector.election import Role

from fake_consul import FakeConsul
from test_election_unit import Running, fail_once, wait_for

KEY = "service/pg/leader"


def other(consul: FakeConsul, name: str, priority: int = 100, ready: int = 0,
          checks: tuple = ("serfHealth", "vip-haproxy")) -> str:
    """Another node's candidate key (its node named like it, its session bound to `checks`),
    held by a live session of its own; returns the session."""
    with consul.cond:
        consul._next_session += 1
        sid = f"other-{consul._next_session}"
        consul.sessions.add(sid)
    consul.put_entry(candidate_key(KEY, name), json.dumps({"priority": priority, "node": name,
                                                           "ready": ready,
                                                           "checks": {c: "passing" for c in checks}}), sid)
    return sid


def holds(consul: FakeConsul, name: str, sid: str) -> None:
    consul.set_key(KeyState(name, LOCK_FLAG, sid, 0))


def record(consul: FakeConsul, name: str) -> dict:
    e = consul.entries.get(candidate_key(KEY, name))
    return json.loads(e.value) if e is not None else {}


# ------------------------------------------------------------------ our candidate key

def test_the_candidate_key_follows_the_role_and_goes_with_the_session():
    consul = FakeConsul()
    with Running(consul, priority=42) as r:
        wait_for(lambda: record(consul, "node-a").get("role") == "leader", what="a leader's record")
        rec = record(consul, "node-a")
        assert rec["priority"] == 42 and rec["checks"] == {"serfHealth": "passing"}
        assert consul.entries[candidate_key(KEY, "node-a")].session == r.election.session
        writes = consul.count("put_candidate")
        time.sleep(0.5)  # idle: renewals only, no candidate writes
        assert consul.count("put_candidate") == writes
    assert candidate_key(KEY, "node-a") not in consul.entries
    # Deleted before the session's destroy, which would put it under lock-delay for the next run.
    assert consul.calls.index("delete_candidate") < consul.calls.index("destroy_session"), consul.calls


def test_a_stop_whose_candidate_key_delete_fails_still_ends_the_session():
    """Consul answers the planned stop's candidate-key delete with a 500: the session's destroy
    still removes the key (under lock-delay), and the stop is as quick as ever."""
    from vip_elector.consul import ConsulError
    consul = FakeConsul()
    with Running(consul) as r:
        wait_for(lambda: record(consul, "node-a").get("role") == "leader", what="a leader's record")
        fail_once(consul, "delete_candidate", ConsulError("Unexpected response code: 500 (rpc error)"))
    assert "delete_candidate" in consul.calls and "destroy_session" in consul.calls
    assert not consul.sessions and candidate_key(KEY, "node-a") not in consul.entries
    assert consul.key is None


# ------------------------------------------------------------------ a free key: priorities

def test_a_free_key_waits_for_a_higher_priority_for_a_bounded_time():
    consul = FakeConsul()
    other(consul, "node-b", priority=200)
    with Running(consul) as r:
        wait_for(lambda: r.election.session is not None, what="a session")
        time.sleep(1.0)
        assert consul.key is None, "acquired although node-b outranks us"
        assert any("deferring: node-b has priority 200" in s for s in r.recorder.statuses())
        wait_for(lambda: r.election.role == Role.LEADER, timeout=5, what="leadership once the wait ends")


def test_a_higher_priority_that_takes_the_key_is_followed():
    consul = FakeConsul()
    sid = other(consul, "node-b", priority=200)
    with Running(consul) as r:
        wait_for(lambda: r.election.session is not None, what="a session")
        holds(consul, "node-b", sid)
        wait_for(lambda: r.election.role == Role.FOLLOWER and r.election.key.held_by(sid), what="following b")
        assert consul.count("acquire") == 0


def test_a_leaving_higher_priority_holder_is_not_waited_for():
    """A planned stop: the key is deleted while the leaver's candidate key is still there."""
    consul = FakeConsul()
    sid = other(consul, "node-b", priority=200)
    holds(consul, "node-b", sid)
    with Running(consul) as r:
        wait_for(lambda: r.election.role == Role.FOLLOWER, what="following b")
        t0 = time.monotonic()
        consul.set_key(None)  # b's CAS delete; its session (and candidate key) end a moment later
        wait_for(lambda: r.election.role == Role.LEADER, timeout=1.5, what="leadership at once")
        assert time.monotonic() - t0 < 1.0


# ------------------------------------------------------------------ stickiness

@contextlib.contextmanager
def b_freed_by_consul(consul: FakeConsul, priority: int = 100):
    """node-b leads and we follow; then Consul ends b's session (stale gossip, a failed check,
    its TTL: the key is under lock-delay, our acquires are refused three times). Yields the
    running elector and when b's session ended."""
    sid = other(consul, "node-b", priority=priority)
    holds(consul, "node-b", sid)
    with Running(consul) as r:
        wait_for(lambda: r.election.role == Role.FOLLOWER, what="following b")
        consul.refuse_acquires = 3
        t0 = time.monotonic()
        consul.invalidate(sid)        # key and candidate key go together
        yield r, t0


def test_a_holder_freed_by_consul_that_comes_back_healthy_gets_the_key_back():
    consul = FakeConsul()
    with b_freed_by_consul(consul) as (r, t0):
        wait_for(lambda: consul.count("acquire") >= 1, what="an acquire refused by lock-delay")
        new = other(consul, "node-b")  # b, healthy again: a new session
        wait_for(lambda: any("held it until Consul freed it" in s for s in r.recorder.statuses()),
                 what="deferring to b")
        time.sleep(0.5)
        assert consul.key is None or consul.key.value != "node-a"
        holds(consul, "node-b", new)
        wait_for(lambda: r.election.key.held_by(new), what="following b again")
        assert r.election.role == Role.FOLLOWER


def test_a_holder_whose_node_passes_again_is_deferred_to_before_it_is_back():
    """The heal of a partition: b's node was marked failed for ~50 ms and its session ended;
    the catalog says it passes again, so the key waits for b's new session."""
    consul = FakeConsul()
    with b_freed_by_consul(consul) as (r, t0):
        wait_for(lambda: any("its node and checks pass again" in s for s in r.recorder.statuses()),
                 what="deferring to b because its node passes")
        assert consul.count("catalog_checks") == 1
        assert consul.key is None, "took the key from a holder that is healthy again"
        new = other(consul, "node-b")
        holds(consul, "node-b", new)
        wait_for(lambda: r.election.key.held_by(new), what="following b again")
        assert r.election.role == Role.FOLLOWER and consul.count("catalog_checks") == 1


def test_a_killed_holder_whose_node_passes_costs_only_the_grace():
    """SIGKILL: the TTL ran out, the node and its checks pass, the elector never comes back:
    the grace (0.5 s past the lock-delay), not the whole deferral of a holder that is back."""
    consul = FakeConsul()
    with b_freed_by_consul(consul) as (r, t0):
        wait_for(lambda: r.election.role == Role.LEADER, timeout=5, what="leadership")
        took = time.monotonic() - t0
        assert consul.count("catalog_checks") == 1
        assert took < r.election.settings.lock_delay + 1.5, "waited like for a holder that is back: %.2fs" % took


def test_a_node_without_a_session_still_learns_who_holds_the_key():
    """The partition lab's needless move: a node that was cut off (or waits for its check, or
    sits out a VIP fault) held the key before; the key moved to c meanwhile. When Consul then
    frees c's key, the node must defer to c, not take it as the key it remembered holding."""
    consul = FakeConsul()
    consul.checks["serfHealth"] = "critical"       # no session: the node only watches
    sid = other(consul, "node-a")                  # our own name held it (before our restart)
    holds(consul, "node-a", sid)
    with Running(consul) as r:
        wait_for(lambda: consul.count("create_session") >= 1, what="a refused session")
        c = other(consul, "node-c")
        holds(consul, "node-c", c)                 # the key moved while we had no session
        wait_for(lambda: r.election.cluster.holder_name == "node-c", what="c seen as the holder")
        consul.refuse_acquires = 3
        consul.invalidate(c)                       # stale 'failed' gossip ends c's session
        consul.checks["serfHealth"] = "passing"
        wait_for(lambda: any("node-c held it until Consul freed it" in s for s in r.recorder.statuses()),
                 what="deferring to c")
        new = other(consul, "node-c")
        holds(consul, "node-c", new)
        wait_for(lambda: r.election.key.held_by(new), what="following c again")
        assert r.election.role == Role.FOLLOWER


def test_a_holder_whose_check_failed_is_not_waited_for():
    """A real failover (b's check went critical, or b is cut off): no grace at all."""
    consul = FakeConsul()
    consul.node_checks["node-b"] = {"serfHealth": "passing", "vip-haproxy": "critical"}
    with b_freed_by_consul(consul, priority=200) as (r, t0):
        wait_for(lambda: r.election.role == Role.LEADER, timeout=3, what="leadership")
        assert consul.count("catalog_checks") == 1
        assert not any("pass again" in s or "past the lock-delay" in s for s in r.recorder.statuses()), \
            "deferred to a holder whose check is critical"


def test_a_holder_whose_node_cannot_be_read_costs_only_the_grace():
    consul = FakeConsul()
    consul.catalog_fails = True
    with b_freed_by_consul(consul, priority=200) as (r, t0):
        wait_for(lambda: any("waiting 0.5s past the lock-delay" in s for s in r.recorder.statuses()),
                 what="the grace, for want of b's node")
        wait_for(lambda: r.election.role == Role.LEADER, timeout=3, what="leadership")
        assert time.monotonic() - t0 < 1.5 + r.election.settings.lock_delay


# ------------------------------------------------------------------ switchover: the leader's side

def _leading(consul: FakeConsul, r: Running) -> None:
    wait_for(lambda: r.election.role == Role.LEADER and record(consul, "node-a").get("role") == "leader",
             what="leadership")


def ask(consul: FakeConsul, target: str, timeout: float = 5.0) -> int:
    consul.put_entry(request_key(KEY), json.dumps({"target": target, "source": "node-a", "timeout": timeout,
                                                   "requested": time.time(), "by": "test"}))
    return consul.entries[request_key(KEY)].modify_index


def test_the_leader_hands_over_in_one_transaction_as_a_standby():
    consul = FakeConsul()
    roles = []
    real = consul.hand_over
    with Running(consul) as r:
        consul.hand_over = lambda old, new, value: (roles.append(r.election.role), real(old, new, value))[1]
        _leading(consul, r)
        sid = other(consul, "node-b")
        index = ask(consul, "node-b")
        time.sleep(0.3)
        assert consul.count("hand_over") == 0, "moved before the target said it is ready"
        other_ready = consul.entries[candidate_key(KEY, "node-b")]
        consul.put_entry(other_ready.key, json.dumps({"ready": index}), sid)
        wait_for(lambda: consul.key.session == sid, what="the lock moved to node-b")
        assert consul.key.value == "node-b" and consul.key.flags == LOCK_FLAG
        assert roles == [Role.FOLLOWER], "standby (the hook) must come before the lock leaves us"
        wait_for(lambda: request_key(KEY) not in consul.entries, what="the request deleted")
        time.sleep(0.3)
        assert r.election.role == Role.FOLLOWER and consul.key.session == sid  # stays a standby


def test_a_refused_move_leaves_the_leader_leading_and_tells_the_author():
    consul = FakeConsul()
    with Running(consul) as r:
        _leading(consul, r)
        sid = other(consul, "node-b")
        index = ask(consul, "node-b")
        consul.sessions.discard(sid)  # its session ends just before the move
        consul.put_entry(candidate_key(KEY, "node-b"), json.dumps({"ready": index}), sid)
        wait_for(lambda: consul.count("hand_over") == 1, what="the move tried")
        wait_for(lambda: "refused" in json.loads(consul.entries[request_key(KEY)].value).get("error", "")
                 or "Consul refused" in consul.entries[request_key(KEY)].value, what="the refusal written")
        wait_for(lambda: r.election.role == Role.LEADER, what="leading again")
        assert consul.key.value == "node-a"


def test_an_unknown_target_or_a_silent_one_is_refused():
    consul = FakeConsul()
    with Running(consul) as r:
        _leading(consul, r)
        ask(consul, "node-x")
        wait_for(lambda: "not a live candidate" in consul.entries[request_key(KEY)].value, what="refusal")
        consul.entries.pop(request_key(KEY))
        other(consul, "node-b")
        ask(consul, "node-b", timeout=1.0)  # node-b never says it is ready: refused after 0.5 s
        wait_for(lambda: "did not answer" in consul.entries[request_key(KEY)].value, timeout=3,
                 what="refusal of a silent target")
        assert consul.count("hand_over") == 0 and r.election.role == Role.LEADER


def test_a_stale_request_is_dropped_by_the_leader():
    consul = FakeConsul()
    with Running(consul) as r:
        _leading(consul, r)
        ask(consul, "node-x", timeout=0.1)
        wait_for(lambda: request_key(KEY) not in consul.entries, timeout=5, what="the stale request dropped")
        assert r.election.role == Role.LEADER


# ------------------------------------------------------------------ preemption

def test_preemption_asks_once_the_checks_have_passed_for_the_delay_and_never_on_equal_priority():
    consul = FakeConsul()
    sid = other(consul, "node-b", priority=100)
    holds(consul, "node-b", sid)
    with Running(consul, priority=100, preempt_delay=0.2) as r:
        wait_for(lambda: r.election.role == Role.FOLLOWER and record(consul, "node-a"), what="following")
        time.sleep(0.8)
        assert consul.count("put_request") == 0, "preempted an equal priority"
    consul = FakeConsul()
    sid = other(consul, "node-b", priority=100)
    holds(consul, "node-b", sid)
    with Running(consul, priority=150, preempt_delay=0.3) as r:
        t0 = time.monotonic()
        wait_for(lambda: request_key(KEY) in consul.entries, what="a preemption request")
        assert time.monotonic() - t0 >= 0.3
        req = json.loads(consul.entries[request_key(KEY)].value)
        assert req["target"] == "node-a" and req["source"] == "node-b" and "preemption" in req["by"]
        consul.entries.pop(request_key(KEY))  # refused, say: not asked again at once
        time.sleep(0.5)
        assert consul.count("put_request") == 1


# ------------------------------------------------------------------ the command line

def test_new_flags_and_commands_parse_and_refuse_in_one_line(tmp_path):
    from vip_elector import cli
    from vip_elector.config import build_settings
    config = tmp_path / "vm.yml"
    config.write_text("dcs-type: consul\ntrigger-key: service/pg/leader\n")
    args = cli.parse_args(["--vip-manager-config", str(config), "--check-id", "a", "--check-id=b",
                           "--check-id", "a", "--priority", "7", "--preempt-delay", "1m30s"])
    s = build_settings(cli.options_from(args), {}, kernel_hostname="node-a")
    assert s.checks == ["serfHealth", "a", "b"] and s.check_ids == ("a", "b")
    assert s.priority == 7 and s.preempt_delay == 90.0
    assert cli.parse_args(["list", "--json", "--vip-manager-config", "x"]).command == "list"
    assert cli.parse_args(["--vip-manager-config", "x", "switchover", "--to", "b"]).to == "b"
    # In processes of their own: main() sets up logging and blocks signals, as a daemon must.
    from elector_process import run_elector
    for argv, status, words in (
            (["--vip-manager-config", str(config), "--priority", "256"], 78, "--priority 256 is out of range"),
            (["--vip-manager-config", str(config), "--preempt-delay", "soon"], 78, "--preempt-delay"),
            (["--vip-manager-config", str(config), "--json"], 2, "--json goes with the list command"),
            (["list", "--to", "b", "--vip-manager-config", str(config)], 2, "--to goes with the switchover"),
            (["switchover", "--timeout", "0s", "--vip-manager-config", str(config)], 78, "--timeout")):
        res = run_elector(argv)
        assert res.returncode == status, (argv, res.stderr)
        assert words in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_the_commands_take_the_services_options_from_its_defaults_file(tmp_path):
    from vip_elector.config import ConfigError
    from vip_elector.service import service_options
    defaults = tmp_path / "vip-elector"
    defaults.write_text('# as systemd reads it\nVIP_ELECTOR_OPTS="--vip-manager-config=/etc/vip-manager.yml \\\n'
                        '  --priority=5"\nCONSUL_HTTP_TOKEN=secret\n')
    assert service_options(path=str(defaults)) == (["--vip-manager-config=/etc/vip-manager.yml", "--priority=5"],
                                                   {"CONSUL_HTTP_TOKEN": "secret"})
    defaults.write_text("CONSUL_HTTP_TOKEN=secret\n")
    try:
        service_options(path=str(defaults))
    except ConfigError as e:
        assert "the service is not configured yet" in str(e)
    else:
        raise AssertionError("no error without VIP_ELECTOR_OPTS")


def test_a_thread_reusing_an_ended_threads_ident_does_not_inherit_its_abort(monkeypatch):
    """The watcher restarts (SPEC §11's recursive watch restarts after a recovered renewal):
    the old thread is aborted and ends, the new one often gets the same pthread ident. It
    must start with a clean state, or every request of its is 'abandoned' (a deaf follower,
    found by make chaos: a key freed after a raft stall that no follower took for 26 s)."""
    import threading
    from vip_elector.config import Settings
    from vip_elector.consul import ConsulUnreachable, _Transport
    transport = _Transport(Settings(config_path="x", trigger_key="k", value="v", scheme="http",
                                    host="127.0.0.1", port=1))
    seen = {}

    def old():
        seen["ident"] = threading.get_ident()
        transport._state()
        transport.abort(seen["ident"])  # what KeyWatcher.stop() does to it
    t = threading.Thread(target=old)
    t.start()
    t.join()
    monkeypatch.setattr(threading, "get_ident", lambda: seen["ident"])  # a new thread, same ident
    state = transport._state()
    assert not state.aborted and state.owner is threading.current_thread()
    try:  # and its requests go out (here: refused by the closed port, not "abandoned")
        transport.get(lambda r: r, "/v1/kv/k")
    except ConsulUnreachable as e:
        assert "abandoned" not in str(e)


def _failing_move(consul: FakeConsul, error: Exception, apply: bool, roles: list, r: Running) -> None:
    """hand_over raises `error` once (after applying the move when `apply`)."""
    real = consul.hand_over

    def move(old, new, value):
        roles.append(r.election.role)
        consul.hand_over = real
        if apply:
            real(old, new, value)
        raise error
    consul.hand_over = move


def test_a_move_that_fails_unapplied_is_refused_and_the_key_kept_without_a_new_leadership(caplog):
    """A 500 on the hand_over txn: the key, read afresh, is still ours: refused with the cause,
    leading again ('kept leadership'), never 'LOCK ACQUIRED' for a key that never left."""
    import logging
    from vip_elector.consul import ConsulServerError
    consul = FakeConsul()
    roles: list = []
    with caplog.at_level(logging.INFO, logger="vip_elector"), Running(consul) as r:
        _leading(consul, r)
        sid = other(consul, "node-b")
        _failing_move(consul, ConsulServerError("HTTP 500: rpc error"), False, roles, r)
        index = ask(consul, "node-b")
        consul.put_entry(candidate_key(KEY, "node-b"), json.dumps({"ready": index}), sid)
        wait_for(lambda: "Consul did not move the lock (HTTP 500: rpc error); node-a keeps the key"
                 in json.loads(consul.entries[request_key(KEY)].value).get("error", ""),
                 what="the refusal, with the cause")
        wait_for(lambda: r.election.role == Role.LEADER, what="leading again")
        assert roles == [Role.FOLLOWER] and consul.key.value == "node-a"
    messages = [rec.getMessage() for rec in caplog.records]
    assert any("kept leadership" in m for m in messages), messages
    assert sum("LOCK ACQUIRED" in m for m in messages) == 1, "only the first leadership"


def test_a_move_applied_but_unanswered_leaves_the_old_leader_a_standby():
    """No answer to the txn, which Consul applied: the key read afterwards names the target;
    the old leader never claims again, and deletes the request."""
    from vip_elector.consul import ConsulTimeout
    consul = FakeConsul()
    roles: list = []
    with Running(consul) as r:
        _leading(consul, r)
        sid = other(consul, "node-b")
        _failing_move(consul, ConsulTimeout("no answer (timed out)"), True, roles, r)
        index = ask(consul, "node-b")
        consul.put_entry(candidate_key(KEY, "node-b"), json.dumps({"ready": index}), sid)
        wait_for(lambda: request_key(KEY) not in consul.entries, what="the request deleted")
        assert consul.key.session == sid
        time.sleep(0.3)
        assert r.election.role == Role.FOLLOWER
        statuses = r.recorder.statuses()
        handing = max(i for i, s in enumerate(statuses) if "handing" in s)
        assert not any(s.startswith("leader:") for s in statuses[handing:]), statuses[handing:]
