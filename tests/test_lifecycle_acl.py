"""Reloads and crash restarts keep the key under the least-privilege token (issue 19, SPEC §8).

The token is made from examples/consul-acl-policy.hcl itself (consul_agent.
elector_rules), so these prove the shipped example, not a token of the
tests' own. Such a token cannot read /v1/agent/self: the daemon must learn
its node from its own session, or a reload follows its own old session and
the key moves 2×TTL later. "Untouched" is watched for longer than that.
"""

import os
import signal
import time

import pytest

from consul_agent import wait_for
from elector_process import run_elector
from helpers import sessions_named
from vipnet import KeyWatcher

pytestmark = [pytest.mark.consul]

TTL_S = 10
#: Longer than Consul could keep an orphaned session (2×TTL), plus lock-delay.
WATCH_S = 2 * TTL_S + 2


# `acl_node_a` and `example_token` (conftest.py): an ACL agent named node-a and
# a token made from examples/consul-acl-policy.hcl.
@pytest.fixture
def agent(acl_node_a):
    return acl_node_a


@pytest.fixture
def token(example_token):
    return example_token


@pytest.fixture
def start(electors, write_config, agent, key, token, tmp_path):
    def run(run_dir, extra=(), env=None):
        config = write_config(agent.http_addr, key)
        args = ["--vip-manager-config", config, "--hostname", "node-a", "--ttl", "%ds" % TTL_S,
                "--lock-delay", "1s"] + list(extra)
        full_env = {"CONSUL_HTTP_TOKEN": token, "RUNTIME_DIRECTORY": str(run_dir)}
        full_env.update(env or {})
        return electors(args, env=full_env, name="node-a")
    return run


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    return d


def leading(agent, key, elector):
    elector.wait_for_line("LOCK ACQUIRED", 30)
    return wait_for(lambda: agent.kv_get(key) if (agent.kv_get(key) or {}).get("Session") else None,
                    10, message="the key held")


def stays_untouched(agent, key, entry, seconds, elector):
    """The key keeps exactly `entry`'s value, session and ModifyIndex for `seconds`."""
    watcher = KeyWatcher(agent, key)
    try:
        deadline = time.time() + seconds
        while time.time() < deadline:
            assert elector.alive, elector.log()
            time.sleep(0.2)
        expected = (entry["Value"].decode(), entry["Session"], entry["ModifyIndex"])
        assert [s[1:] for s in watcher.history] == [expected], \
            "the key moved: %r (was %r)" % (watcher.history, expected)
    finally:
        watcher.close()


def no_follower_of_itself(elector, since):
    text = "\n".join(elector.lines[since:])
    assert "not this daemon's" not in text, text
    assert "follower" not in text and "following" not in text, text


def test_reload_under_the_example_token_keeps_the_key_past_two_ttls(agent, key, start, run_dir):
    a = start(run_dir)
    entry = leading(agent, key, a)
    n = len(a.lines)
    a.send(signal.SIGHUP)
    a.wait_for_line("resumed session %s: it still holds" % entry["Session"], 20, since=n)
    a.wait_for_line("resumed leadership", 20, since=n)
    stays_untouched(agent, key, entry, WATCH_S, a)
    no_follower_of_itself(a, n)
    assert [s["ID"] for s in sessions_named(agent, "vip-elector-node-a")] == [entry["Session"]]


def test_kill_9_and_restart_under_the_example_token_keeps_the_key(agent, key, start, run_dir):
    a = start(run_dir)
    entry = leading(agent, key, a)
    wait_for(lambda: '"node": "node-a"' in (run_dir / "state.json").read_text(), 10,
             message="the node learned from the session, in the state file")
    a.kill()
    a.wait(5)
    time.sleep(1)  # as systemd's RestartSec
    a2 = start(run_dir)
    a2.wait_for_line("resumed session %s: it still holds" % entry["Session"], 20)
    stays_untouched(agent, key, entry, WATCH_S, a2)
    no_follower_of_itself(a2, 0)
    a2.terminate()
    assert a2.wait(10) == 0
    wait_for(lambda: agent.kv_get(key) is None, 5, message="the planned stop still releases")


def _reload(pid, run_dir, options, token):
    """What the unit's ExecReload= runs, with the defaults file's variables."""
    return run_elector(["--reload-pid", str(pid)],
                       env={"RUNTIME_DIRECTORY": str(run_dir), "VIP_ELECTOR_OPTS": options,
                            "CONSUL_HTTP_TOKEN": token})


def test_reload_that_changes_the_ttl_moves_the_lock_in_place(agent, key, start, run_dir,
                                                              write_config, token):
    """A new TTL needs a new session; the lock moves to it in one /v1/txn, never free,
    its value unchanged — under the example token, which must allow the move."""
    config = write_config(agent.http_addr, key)
    opts = "--vip-manager-config=%s --hostname=node-a --lock-delay=1s --ttl=%s"
    a = start(run_dir, env={"VIP_ELECTOR_OPTS": opts % (config, "10s")})
    entry = leading(agent, key, a)
    watcher = KeyWatcher(agent, key)
    try:
        n = len(a.lines)
        res = _reload(a.pid, run_dir, opts % (config, "15s"), token)
        assert res.returncode == 0, res.stderr
        a.wait_for_line("moved to it in place", 20, since=n)
        a.wait_for_line("resumed leadership", 20, since=n)
        now = agent.kv_get(key)
        assert now["Session"] != entry["Session"]
        assert agent.session_info(now["Session"])["TTL"] == "15s"
        time.sleep(1)  # a wrong release or re-acquire would show by now
        values = {s[1] for s in watcher.history}
        assert values == {"node-a"}, "the key was free or rewritten: %r" % watcher.history
        assert agent.session_info(entry["Session"]) is None, "the old session is destroyed"
    finally:
        watcher.close()


def test_reload_naming_a_missing_check_is_refused_and_reload_fails(agent, key, start, run_dir,
                                                                   write_config, token):
    config = write_config(agent.http_addr, key)
    opts = "--vip-manager-config=%s --hostname=node-a --ttl=10s --lock-delay=1s" % config
    a = start(run_dir, env={"VIP_ELECTOR_OPTS": opts})
    entry = leading(agent, key, a)
    n = len(a.lines)
    res = _reload(a.pid, run_dir, opts + " --check-id=vip-nope", token)
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "reload refused" in res.stderr and "vip-nope" in res.stderr, res.stderr
    a.wait_for_line("reload failed, still running with the previous configuration", 10, since=n)
    assert a.alive
    assert agent.kv_get(key)["Session"] == entry["Session"]
    assert [s["ID"] for s in sessions_named(agent, "vip-elector-node-a")] == [entry["Session"]]
    # An invalid configuration fails the reload too.
    res = _reload(a.pid, run_dir, opts + " --ttl=nonsense", token)
    assert res.returncode == 1 and "--ttl" in res.stderr, res.stderr
    assert not [f for f in os.listdir(run_dir) if f.startswith("reload")], os.listdir(run_dir)
