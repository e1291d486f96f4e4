"""Reloads, crashes and restarts do not move the VIP (SPEC §8), against a real agent.

The proof is the key itself: a blocking-query watcher (tests/vipnet.py
KeyWatcher) records every state the key goes through during the operation;
"untouched" means it never changed — same value, same session, same
ModifyIndex — for the whole reload or restart.
"""

import json
import os
import signal
import time

import pytest

from consul_agent import wait_for
from elector_process import run_elector
from helpers import sessions_named
from vipnet import KeyWatcher

pytestmark = [pytest.mark.consul]

TTL = "10s"


@pytest.fixture
def consul(fresh_consul):
    """An agent of the test's own: sessions named vip-elector-node-a are this test's alone."""
    return fresh_consul


@pytest.fixture
def start(electors, write_config, tmp_path):
    """start(agent, key, name, state_dir=..., config=..., extra=[...], env=...) -> Elector."""
    def run(agent, key, name, state_dir=None, config=None, extra=(), env=None, ttl=TTL):
        config = config or write_config(agent.http_addr, key)
        args = ["--vip-manager-config", config, "--ttl", ttl, "--lock-delay", "1s"] + list(extra)
        if name is not None:
            args += ["--hostname", name]
        if state_dir is not None:
            args += ["--state-dir", str(state_dir)]
        return electors(args, env=env, name=name or "elector")
    return run


@pytest.fixture
def watch(consul, key):
    watchers = []

    def make(agent=None, k=None):
        w = KeyWatcher(agent or consul, k or key)
        watchers.append(w)
        return w
    yield make
    for w in watchers:
        w.close()


def held_by(agent, key, name):
    entry = agent.kv_get(key)
    return entry is not None and entry["Value"].decode() == name and entry.get("Session")


def lead(agent, key, elector, name, timeout=30):
    elector.wait_for_line("LOCK ACQUIRED", timeout)
    wait_for(lambda: held_by(agent, key, name), timeout, message="%s holding %s" % (name, key))
    return agent.kv_get(key)


def assert_untouched(watcher, entry, since):
    """The key held exactly `entry`'s state from `since` until now."""
    states = [s for s in watcher.history if s[0] >= since]
    expected = (entry["Value"].decode(), entry["Session"], entry["ModifyIndex"])
    current = watcher.current()[1:]
    assert current == expected, "key changed: %r, was %r" % (current, expected)
    assert all(s[1:] == expected for s in states), "the key moved: %r" % states


def no_internal_error(*electors_):
    for e in electors_:
        assert "internal error" not in e.log(), e.log()


# ---------------------------------------------------------------- reload

def test_sighup_reloads_in_place_and_leaves_the_key_untouched(consul, key, start, watch, tmp_path):
    a = start(consul, key, "node-a", state_dir=tmp_path / "state")
    entry = lead(consul, key, a, "node-a")
    w = watch()
    t0 = time.time()
    n = len(a.lines)
    pid = a.pid
    a.send(signal.SIGHUP)
    a.wait_for_line("reloaded", 20, since=n)
    a.wait_for_line("resumed session %s: it still holds" % entry["Session"], 20, since=n)
    a.wait_for_line("resumed leadership", 20, since=n)
    time.sleep(0.5)  # let a wrongly written key show up in the watcher
    assert a.alive and a.pid == pid, "a reload re-executes in place: same PID"
    assert_untouched(w, entry, t0)
    assert len(sessions_named(consul, "vip-elector-node-a")) == 1
    # A planned stop after the reload still hands over at once.
    a.terminate()
    assert a.wait(10) == 0
    wait_for(lambda: consul.kv_get(key) is None, 5, message="the key deleted on stop")
    assert not sessions_named(consul, "vip-elector-node-a")
    assert not os.path.exists(tmp_path / "state" / "state.json"), "a planned stop leaves nothing to resume"
    no_internal_error(a)


def test_reload_without_a_state_dir_still_resumes(consul, key, start, watch):
    """The session travels to the re-executed program in its environment too."""
    a = start(consul, key, "node-a")
    entry = lead(consul, key, a, "node-a")
    w = watch()
    t0 = time.time()
    n = len(a.lines)
    a.send(signal.SIGHUP)
    a.wait_for_line("resumed leadership", 20, since=n)
    assert_untouched(w, entry, t0)
    no_internal_error(a)


def test_burst_of_sighups_neither_kills_nor_moves(consul, key, start, watch, tmp_path, notify_socket):
    notify = notify_socket()
    a = start(consul, key, "node-a", state_dir=tmp_path, env={"NOTIFY_SOCKET": notify.path})
    entry = lead(consul, key, a, "node-a")
    w = watch()
    t0 = time.time()
    for _ in range(20):
        a.send(signal.SIGHUP)
        time.sleep(0.01)

    def settled():  # every RELOADING=1 answered by a READY=1, and leading
        reloads, readies = len(notify.lines("RELOADING=1")), len(notify.lines("READY=1")) - 1
        return reloads >= 1 and readies == reloads and notify.last_status().startswith("leader:")
    wait_for(settled, 60, message="the reloads to settle, leading")
    time.sleep(1)
    assert settled() and a.alive, a.log()
    assert_untouched(w, entry, t0)
    assert len(sessions_named(consul, "vip-elector-node-a")) == 1
    no_internal_error(a)


def test_sigterm_during_a_reload_is_not_lost(consul, key, start, tmp_path):
    a = start(consul, key, "node-a", state_dir=tmp_path)
    lead(consul, key, a, "node-a")
    a.send(signal.SIGHUP)
    a.send(signal.SIGTERM)
    assert a.wait(15) == 0, a.log()
    wait_for(lambda: consul.kv_get(key) is None, 5, message="the key released")
    assert not sessions_named(consul, "vip-elector-node-a")


def test_reload_that_changes_the_key_releases_and_competes_afresh(consul, key, start, write_config):
    config = write_config(consul.http_addr, key)
    a = start(consul, key, "node-a", config=config)
    old = lead(consul, key, a, "node-a")["Session"]
    new_key = key + "-new"
    with open(config) as f:
        text = f.read()
    with open(config, "w") as f:
        f.write(text.replace(key, new_key))
    n = len(a.lines)
    a.send(signal.SIGHUP)
    a.wait_for_line("made for another configuration", 20, since=n)
    wait_for(lambda: consul.kv_get(key) is None, 10, message="the old key released")
    wait_for(lambda: held_by(consul, new_key, "node-a"), 20, message="the new key held")
    assert consul.session_info(old) is None
    assert len(sessions_named(consul, "vip-elector-node-a")) == 1
    no_internal_error(a)


def test_reload_that_changes_the_value_writes_the_new_name(consul, key, start, write_config):
    config = write_config(consul.http_addr, key, trigger_value="node-a")
    a = start(consul, key, None, config=config)
    old = lead(consul, key, a, "node-a")["Session"]
    with open(config) as f:
        text = f.read()
    with open(config, "w") as f:
        f.write(text.replace("node-a", "node-a2"))
    n = len(a.lines)
    a.send(signal.SIGHUP)
    a.wait_for_line("made for another configuration", 20, since=n)
    wait_for(lambda: held_by(consul, key, "node-a2"), 20, message="the key naming node-a2")
    assert consul.session_info(old) is None
    assert not sessions_named(consul, "vip-elector-node-a")
    no_internal_error(a)


def test_reload_with_a_broken_configuration_keeps_running_and_leading(consul, key, start, watch,
                                                                      write_config, notify_socket):
    notify = notify_socket()
    config = write_config(consul.http_addr, key)
    a = start(consul, key, "node-a", config=config, env={"NOTIFY_SOCKET": notify.path})
    entry = lead(consul, key, a, "node-a")
    w = watch()
    t0 = time.time()
    for broken in ("dcs-type: etcd\ntrigger-key: x\n", "dcs-type: [\n", None):
        if broken is None:
            os.unlink(config)
        else:
            with open(config, "w") as f:
                f.write(broken)
        n = len(a.lines)
        since = time.time()
        a.send(signal.SIGHUP)
        _, line = a.wait_for_line("reload failed", 10, since=n)
        assert config in line, line
        notify.wait("RELOADING=1", 5, since=since)
        notify.wait("READY=1", 5, since=since)
        assert "reload failed" in notify.last_status()
        assert a.alive
    assert_untouched(w, entry, t0)
    no_internal_error(a)


# ---------------------------------------------------------------- crash and restart

@pytest.mark.parametrize("how", ["--state-dir", "RUNTIME_DIRECTORY"])
def test_sigkill_then_restart_resumes_leadership_untouched(consul, key, start, watch, tmp_path, how):
    state = tmp_path / "run"
    state.mkdir()
    kw = {"state_dir": state} if how == "--state-dir" else {"env": {"RUNTIME_DIRECTORY": str(state)}}
    a = start(consul, key, "node-a", **kw)
    entry = lead(consul, key, a, "node-a")
    b = start(consul, key, "node-b")
    wait_for(lambda: sessions_named(consul, "vip-elector-node-b"), 20, message="standby session")
    saved = json.loads((state / "state.json").read_text())
    assert saved["session"] == entry["Session"]
    assert oct((state / "state.json").stat().st_mode & 0o777) == "0o600"
    w = watch()
    t0 = time.time()
    a.kill()
    a.wait(5)
    time.sleep(1)          # as systemd's RestartSec
    a2 = start(consul, key, "node-a", **kw)
    a2.wait_for_line("resumed session %s: it still holds" % entry["Session"], 20)
    a2.wait_for_line("resumed leadership", 20)
    time.sleep(1)
    assert_untouched(w, entry, t0)
    assert len(sessions_named(consul, "vip-elector-node-a")) == 1
    # Its later planned stop still hands over at once.
    a2.terminate()
    assert a2.wait(10) == 0
    wait_for(lambda: held_by(consul, key, "node-b"), 5, message="node-b taking over at once")
    no_internal_error(a2, b)


def test_restarted_follower_resumes_its_session(consul, key, start, tmp_path):
    a = start(consul, key, "node-a")
    lead(consul, key, a, "node-a")
    b = start(consul, key, "node-b", state_dir=tmp_path)
    sid = wait_for(lambda: sessions_named(consul, "vip-elector-node-b"), 20, message="b's session")[0]["ID"]
    wait_for(lambda: (tmp_path / "state.json").exists(), 5, message="b's state file")
    b.kill()
    b.wait(5)
    b2 = start(consul, key, "node-b", state_dir=tmp_path)
    b2.wait_for_line("resumed session %s" % sid, 20)
    b2.wait_for_line("following", 20)
    assert [s["ID"] for s in sessions_named(consul, "vip-elector-node-b")] == [sid]
    no_internal_error(b2)


def test_state_naming_another_daemons_session_leaves_it_alone(consul, key, start, tmp_path):
    other = consul.create_session(name="vip-elector-node-z", ttl="60s")
    consul.acquire(key, other, b"node-z")
    (tmp_path / "state.json").write_text(json.dumps({
        "format": 1, "session": other, "node": "elsewhere", "name": "vip-elector-node-a",
        "key": key, "value": "node-a", "checks": ["serfHealth"], "ttl": 10.0, "lock_delay": 1.0}))
    a = start(consul, key, "node-a", state_dir=tmp_path)
    a.wait_for_line("not this daemon's: leaving it alone", 20)
    a.wait_for_line("following", 20)
    assert consul.session_info(other) is not None
    assert held_by(consul, key, "node-z") == other
    consul.destroy_session(other)
    lead(consul, key, a, "node-a")
    no_internal_error(a)


def test_changed_ttl_replaces_the_old_session(consul, key, start, tmp_path):
    a = start(consul, key, "node-a", state_dir=tmp_path)
    old = lead(consul, key, a, "node-a")["Session"]
    a.kill()
    a.wait(5)
    a2 = start(consul, key, "node-a", state_dir=tmp_path, ttl="15s")
    a2.wait_for_line("made for another configuration", 20)
    lead(consul, key, a2, "node-a")
    assert consul.session_info(old) is None
    assert consul.kv_get(key)["Session"] != old
    assert len(sessions_named(consul, "vip-elector-node-a")) == 1
    no_internal_error(a2)


STATE_GARBAGE = {
    "empty": b"",
    "truncated": b'{"format": 1, "session": "abc',
    "binary": bytes(range(256)),
    "older format": b'{"session": "0b6e7c6d-0000-0000-0000-000000000000"}',
    "not an object": b"[1, 2, 3]",
}


@pytest.mark.parametrize("content", list(STATE_GARBAGE.values()), ids=list(STATE_GARBAGE))
def test_damaged_state_file_is_one_warning_then_a_normal_start(consul, key, start, tmp_path, content):
    (tmp_path / "state.json").write_bytes(content)
    a = start(consul, key, "node-a", state_dir=tmp_path)
    lead(consul, key, a, "node-a")
    assert len([ln for ln in a.lines if "state file" in ln and "ignoring" in ln]) == 1, a.log()
    assert json.loads((tmp_path / "state.json").read_text())["session"] == consul.kv_get(key)["Session"]
    no_internal_error(a)


@pytest.mark.parametrize("field,value", [("key", "service/other/leader"), ("value", "node-q")])
def test_state_of_another_node_key_or_value(consul, key, start, tmp_path, field, value):
    a = start(consul, key, "node-a", state_dir=tmp_path)
    sid = lead(consul, key, a, "node-a")["Session"]
    a.kill()
    a.wait(5)
    state = json.loads((tmp_path / "state.json").read_text())
    state[field] = value
    (tmp_path / "state.json").write_text(json.dumps(state))
    a2 = start(consul, key, "node-a", state_dir=tmp_path)
    a2.wait_for_line("made for another configuration", 20)   # ours, for another configuration
    wait_for(lambda: consul.session_info(sid) is None, 10, message="old session destroyed")
    lead(consul, key, a2, "node-a", timeout=40)
    no_internal_error(a2)


def test_state_naming_a_session_of_another_node_leaves_it_alone(consul, key, start, tmp_path):
    consul.call("PUT", "/v1/catalog/register", {"Node": "node-elsewhere", "Address": "192.0.2.7"})
    other = consul.call("PUT", "/v1/session/create", {"Name": "vip-elector-node-a", "Node": "node-elsewhere",
                                                      "Checks": [], "TTL": "60s"})["ID"]
    (tmp_path / "state.json").write_text(json.dumps({
        "format": 1, "session": other, "node": "node-elsewhere", "name": "vip-elector-node-a",
        "key": key, "value": "node-a", "checks": ["serfHealth"], "ttl": 10.0, "lock_delay": 1.0}))
    a = start(consul, key, "node-a", state_dir=tmp_path)
    a.wait_for_line("not this daemon's: leaving it alone", 20)
    lead(consul, key, a, "node-a")
    assert consul.session_info(other) is not None, "another node's session was touched"
    no_internal_error(a)


@pytest.mark.parametrize("kind", ["missing", "unwritable"])
def test_unusable_state_dir_warns_once_and_runs(consul, key, start, tmp_path, kind):
    state = tmp_path / "nope"
    if kind == "unwritable":
        state.mkdir()
        state.chmod(0o500)
    a = start(consul, key, "node-a", state_dir=state, extra=["--lock-delay", "0s"])
    lead(consul, key, a, "node-a")
    consul.kv_delete(key)               # a second session change: no second warning
    a.wait_for_line("LOCK LOST", 10)
    lead(consul, key, a, "node-a")
    warnings = [ln for ln in a.lines if "cannot write the state file" in ln]
    if os.geteuid() == 0 and kind == "unwritable":
        return  # root writes anyway
    assert len(warnings) == 1, a.log()
    no_internal_error(a)


# ---------------------------------------------------------------- outage

def test_outage_longer_than_the_ttl_that_consul_survives_keeps_the_key_on_this_node(
        fresh_consul, key, start, tmp_path):
    """Agent frozen 13 s > TTL 10 s (Consul expires after 2×TTL): the session is confirmed
    again, then replaced, the key moving to the new session in one step: never free, its
    value unchanged (README "Faults": a server may still destroy a session it saw expire)."""
    a = start(fresh_consul, key, "node-a")
    entry = lead(fresh_consul, key, a, "node-a")
    watcher = KeyWatcher(fresh_consul, key)
    n = len(a.lines)
    os.kill(fresh_consul.proc.pid, signal.SIGSTOP)
    try:
        a.wait_for_line("LOCK LOST", 12, since=n)   # it stops claiming: it cannot confirm
        time.sleep(13 - 4)
    finally:
        os.kill(fresh_consul.proc.pid, signal.SIGCONT)
    try:
        a.wait_for_line("Consul confirms session %s again" % entry["Session"], 30, since=n)
        _, line = a.wait_for_line("replaced by", 10, since=n)
        a.wait_for_line("LOCK ACQUIRED", 10, since=n)
        now = fresh_consul.kv_get(key)
        wait_for(lambda: watcher.current()[2] == now["Session"], 10, message="the watcher caught up")
    finally:
        watcher.close()
    assert now["Session"] != entry["Session"] and now["Session"] in line, line
    assert (now["Value"], now["Flags"]) == (entry["Value"], entry["Flags"])
    states = [(value, session) for _, value, session, _ in watcher.history]
    assert states == [("node-a", entry["Session"]), ("node-a", now["Session"])], (
        "the key was free, or named another node, on its way to the new session: %s" % states)
    assert fresh_consul.session_info(entry["Session"]) is None, "the old session destroyed"
    assert len(sessions_named(fresh_consul, "vip-elector-node-a")) == 1
    no_internal_error(a)


def test_reload_applies_the_units_current_options_and_environment(consul, key, start, write_config,
                                                                    tmp_path, notify_socket):
    """systemd gives ExecReload= (vip-elector --reload-pid) the unit's fresh environment:
    VIP_ELECTOR_OPTS and the defaults file's variables apply on reload, while what
    systemd gives the main process alone (NOTIFY_SOCKET, the watchdog) stays."""
    notify = notify_socket()
    run = tmp_path / "run"
    run.mkdir()
    config = write_config(consul.http_addr, key)

    def opts(ttl):
        return "--vip-manager-config=%s --hostname node-a --ttl %s --lock-delay 1s" % (config, ttl)
    a = start(consul, key, None, config=config, extra=opts("10s").split()[1:] + [opts("10s").split()[0]],
              env={"RUNTIME_DIRECTORY": str(run), "VIP_ELECTOR_OPTS": opts("10s"),
                   "NOTIFY_SOCKET": notify.path})
    old = lead(consul, key, a, "node-a")["Session"]

    def reload_with(options, applies=True):
        since = time.time()
        res = run_elector(["--reload-pid", str(a.pid)],
                          env={"RUNTIME_DIRECTORY": str(run), "VIP_ELECTOR_OPTS": options})
        # A refused reload fails the unit's ExecReload=, so `systemctl reload` says so.
        assert res.returncode == (0 if applies else 1), res.stderr
        if not applies:
            assert "reload refused" in res.stderr and "VIP_ELECTOR_OPTS" in res.stderr, res.stderr
        notify.wait("RELOADING=1", 5, since=since)   # taken before --reload-pid returned
        notify.wait("READY=1", 20, since=since)
        return since

    # Broken: no options. The running daemon carries on, naming the variable.
    n = len(a.lines)
    reload_with("", applies=False)
    _, line = a.wait_for_line("reload failed", 10, since=n)
    assert "VIP_ELECTOR_OPTS" in line, line
    assert consul.kv_get(key)["Session"] == old
    # A new TTL: the new program runs with it (a new session, as SPEC §8.3 says).
    n = len(a.lines)
    reload_with(opts("15s"))
    a.wait_for_line("ttl 15s", 20, since=n)
    wait_for(lambda: (consul.kv_get(key) or {}).get("Session") not in (None, old), 20,
             message="the key held by the new session")
    assert consul.session_info(consul.kv_get(key)["Session"])["TTL"] == "15s"
    assert not os.listdir(run) or os.listdir(run) == ["state.json"], os.listdir(run)
    no_internal_error(a)


def test_reload_pid_of_no_daemon_says_so(tmp_path):
    res = run_elector(["--reload-pid", "999999"], env={"RUNTIME_DIRECTORY": str(tmp_path)})
    assert res.returncode == 1 and "cannot signal the daemon (PID 999999)" in res.stderr, res.stderr


def test_planned_stop_releases_every_time(consul, key, start):
    """The stop aborts whatever request is in flight; never the release that follows
    (a race between the two once made a stop leave the key to the TTL)."""
    for i in range(8):
        a = start(consul, key, "node-a")
        lead(consul, key, a, "node-a")
        a.terminate()
        assert a.wait(10) == 0
        assert a.find_line("LOCK RELEASED"), "run %d:\n%s" % (i, a.log())
        assert consul.kv_get(key) is None
        no_internal_error(a)


def test_stale_state_naming_a_session_consul_no_longer_has(consul, key, start, tmp_path):
    gone = "0b6e7c6d-1111-2222-3333-444455556666"
    (tmp_path / "state.json").write_text(json.dumps({
        "format": 1, "session": gone, "node": "", "name": "vip-elector-node-a", "key": key,
        "value": "node-a", "checks": ["serfHealth"], "ttl": 10.0, "lock_delay": 1.0}))
    a = start(consul, key, "node-a", state_dir=tmp_path)
    a.wait_for_line("session %s from the previous run is gone; starting afresh" % gone, 20)
    entry = lead(consul, key, a, "node-a")
    assert json.loads((tmp_path / "state.json").read_text())["session"] == entry["Session"]
    no_internal_error(a)
