"""Cluster operations against a real Consul under the least-privilege token (issue 16, SPEC §11).

The token is made from examples/consul-acl-policy.hcl (consul_agent.elector_rules), for
the daemons and for the operator's commands alike. Every elector is a "node" of its own
(a distinct --hostname) on one ACL agent; where another Consul node matters (a lock moved
to a session of another node), the test registers one in the catalog.

Never free, never a third holder: a KeyWatcher (tests/vipnet.py) records every state the
trigger-key takes through blocking queries.
"""

import base64
import json
import os
import signal
import stat
import time
import uuid

import pytest

from consul_agent import LOCK_FLAG, elector_rules, wait_for
from elector_process import run_elector
from vipnet import KeyWatcher

pytestmark = [pytest.mark.consul]
# Run again with the other Consul libraries (make compat): the tests that use every
# adapter call this feature added (the recursive read, the candidate key, the request
# key, the lock moved to another session); the rest test the daemon's logic once.
compat = pytest.mark.compat


# `acl_node_a` and `example_token` (conftest.py): an ACL agent named node-a and
# a token made from examples/consul-acl-policy.hcl.
@pytest.fixture
def agent(acl_node_a):
    return acl_node_a


@pytest.fixture
def token(example_token):
    return example_token


@pytest.fixture
def config(write_config, agent, key):
    return write_config(agent.http_addr, key)


@pytest.fixture
def start(electors, config, token):
    def run(name, priority=None, extra=()):
        args = ["--vip-manager-config", config, "--hostname", name, "--ttl", "10s", "--lock-delay", "1s"]
        if priority is not None:
            args += ["--priority", str(priority)]
        return electors(args + list(extra), env={"CONSUL_HTTP_TOKEN": token}, name=name)
    return run


@pytest.fixture
def op(config, token):
    """op("list", "--json") -> CompletedProcess of the operator's command, with the token."""
    def run(*args, env=None, timeout=30):
        full_env = {"CONSUL_HTTP_TOKEN": token}
        full_env.update(env or {})
        return run_elector(list(args) + ["--vip-manager-config", config], env=full_env, timeout=timeout)
    return run


def holder(agent, key):
    held = agent.holder(key)
    return held[0] if held else None


def candidates(agent, key):
    """{name: (session, record)} of the live candidate keys."""
    prefix = key + "/candidates/"
    found = {}
    for k, (value, _, session, _) in agent.kv_all().items():
        if k.startswith(prefix) and session:
            found[k[len(prefix):]] = (session, json.loads(value or b"{}"))
    return found


def wait_candidates(agent, key, names, timeout=20):
    return wait_for(lambda: set(candidates(agent, key)) == set(names) and candidates(agent, key),
                    timeout, message="candidates %s" % sorted(names))


def wait_holder(agent, key, name, timeout=20):
    return wait_for(lambda: holder(agent, key) == name, timeout, message="%s to hold %s" % (name, key))


def wait_role(agent, key, name, role, timeout=20):
    """The candidate key of `name` says `role` (what `switchover` waits for)."""
    return wait_for(lambda: candidates(agent, key).get(name, (None, {}))[1].get("role") == role,
                    timeout, message="%s to say %s" % (name, role))


def values_after(watcher, since):
    """The distinct values the key took from `since` on (None: absent or free)."""
    seen = []
    history = list(watcher.history)
    current = [h for h in history if h[0] < since][-1:]  # the state the key was in at `since`
    for t, value, session, _ in current + [h for h in history if h[0] >= since]:
        v = value if session else None
        if not seen or seen[-1] != v:
            seen.append(v)
    return seen


def hook_script(tmp_path, name):
    """A hook that appends 'STATE wallclock' to a file (the order a fencing hook would see)."""
    out = tmp_path / ("hook-%s.log" % name)
    path = tmp_path / ("hook-%s.sh" % name)
    path.write_text("#!/bin/sh\necho \"$1 $(date +%%s.%%N)\" >> %s\n" % out)
    os.chmod(path, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    return str(path), out


def hook_times(out, state):
    if not out.exists():
        return []
    return [float(line.split()[1]) for line in out.read_text().splitlines() if line.split()[0] == state]


# ------------------------------------------------------------------------ list

@compat
def test_list_shows_the_holder_and_every_candidate_and_drops_a_stopped_one(agent, key, start, op):
    a = start("node-a", priority=150)
    wait_holder(agent, key, "node-a")
    b = start("node-b")
    start("node-c", priority=50)
    wait_candidates(agent, key, ["node-a", "node-b", "node-c"])

    res = op("list")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "%s: held by node-a" % key
    assert lines[1].split()[:4] == ["NAME", "NODE", "ROLE", "PRIORITY"]
    rows = [line.split() for line in lines[2:5]]
    assert [r[:4] for r in rows] == [["node-a", "node-a", "leader", "150"],
                                      ["node-b", "node-a", "standby", "100"],
                                      ["node-c", "node-a", "standby", "50"]]
    assert all("serfHealth=passing" in line for line in lines[2:5])

    res = op("list", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["key"] == key and data["holder"] == "node-a"
    by_name = {c["name"]: c for c in data["candidates"]}
    assert set(by_name) == {"node-a", "node-b", "node-c"}
    assert by_name["node-a"]["role"] == "leader" and by_name["node-b"]["role"] == "standby"
    assert by_name["node-a"]["session"] == agent.kv_get(key)["Session"]
    assert by_name["node-c"]["priority"] == 50 and by_name["node-c"]["checks"] == {"serfHealth": "passing"}
    assert data["switchover"] is None

    # vip-manager sees nothing new: the trigger key itself is as before.
    entry = agent.kv_get(key)
    assert entry["Value"] == b"node-a" and entry["Flags"] == LOCK_FLAG

    b.terminate()
    assert b.wait(10) == 0
    wait_candidates(agent, key, ["node-a", "node-c"], timeout=5)  # with its session, at once
    a.kill()  # a crash: gone with the session's TTL (not waited for here: 2xTTL)


def test_list_and_switchover_fail_in_one_line_when_consul_is_unreachable_or_denies(op, agent, key):
    dead = op("list", "--addr", "127.0.0.1:1")
    assert dead.returncode == 1
    assert dead.stderr.strip().count("\n") == 0 and "connection refused" in dead.stderr, dead.stderr
    denied = op("list", env={"CONSUL_HTTP_TOKEN": agent.create_token('key "other" { policy = "read" }')})
    # A token that may read nothing under the key sees an empty tree: no holder, no candidates.
    assert denied.returncode == 0 and "free" in denied.stdout
    denied = op("switchover", "--to", "x",
                env={"CONSUL_HTTP_TOKEN": "00000000-0000-0000-0000-000000000000"})
    assert denied.returncode == 1 and denied.stderr.count("\n") == 1, denied.stderr
    assert "refused" in denied.stderr and "ACL" in denied.stderr


# ------------------------------------------------------------------------ switchover

@compat
def test_switchover_moves_the_lock_in_one_step_after_the_old_leaders_standby_hook(
        agent, key, start, op, tmp_path):
    hook_a, out_a = hook_script(tmp_path, "a")
    a = start("node-a", extra=["--hook", hook_a])
    wait_holder(agent, key, "node-a")
    wait_for(lambda: hook_times(out_a, "leader"), 10, message="a's leader hook")
    start("node-b")
    start("node-c")
    wait_candidates(agent, key, ["node-a", "node-b", "node-c"])
    watcher = KeyWatcher(agent, key)
    try:
        before = time.time()
        res = op("switchover", "--to", "node-b")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "switched over: node-b holds %s (took " % key in res.stdout
        b_session = candidates(agent, key)["node-b"][0]
        assert agent.kv_get(key)["Session"] == b_session
        assert agent.kv_get(key)["Flags"] == LOCK_FLAG
        # The old leader stays a standby: it does not take the key back.
        a.wait_for_line("LOCK RELEASED", 5)
        standby = [t for t in hook_times(out_a, "standby") if t >= before]
        assert standby, "a's standby hook did not run"
        time.sleep(3)  # a stretch of watching: the old leader must not take the key back
        assert holder(agent, key) == "node-b"
        assert a.alive
    finally:
        watcher.close()
    # Never free, never a third holder: node-a, then node-b, and nothing in between.
    assert values_after(watcher, before) == ["node-a", "node-b"], watcher.history
    moved_at = next(t for t, v, s, _ in watcher.history if t >= before and v == "node-b")
    assert standby[0] <= moved_at, "the key left node-a before its standby hook had run"
    assert "LOCK LOST" not in a.log()
    res = op("list", "--json")
    roles = {c["name"]: c["role"] for c in json.loads(res.stdout)["candidates"]}
    assert roles == {"node-a": "standby", "node-b": "leader", "node-c": "standby"}


def test_switchover_without_a_name_picks_the_other_candidate_of_highest_priority(agent, key, start, op):
    start("node-a")
    wait_holder(agent, key, "node-a")
    start("node-b", priority=10)
    start("node-c", priority=90)
    wait_candidates(agent, key, ["node-a", "node-b", "node-c"])
    res = op("switchover")
    assert res.returncode == 0, res.stderr
    assert holder(agent, key) == "node-c"
    again = op("switchover", "--to", "node-c")
    assert again.returncode == 0 and "already holds" in again.stdout


def test_switchover_failures_are_one_line_and_leave_the_key_where_it_is(agent, key, start, op):
    res = op("switchover", "--to", "node-b")
    assert res.returncode == 1 and "nobody holds %s" % key in res.stderr, res.stderr
    start("node-a")
    wait_holder(agent, key, "node-a")
    wait_candidates(agent, key, ["node-a"])
    res = op("switchover")
    assert res.returncode == 1 and "no other candidate" in res.stderr and "node-a (leader)" in res.stderr
    start("node-b")
    wait_candidates(agent, key, ["node-a", "node-b"])
    res = op("switchover", "--to", "node-x")
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip() == ("vip-elector switchover: node-x is not a live candidate for %s "
                                  "(candidates: node-a (leader), node-b (standby))" % key)
    assert res.stderr.count("\n") == 1
    assert holder(agent, key) == "node-a"
    assert agent.kv_get(key + "/switchover") is None


def test_a_switchover_in_progress_refuses_a_second_and_a_silent_leader_keeps_the_key(
        agent, key, start, op, config, token):
    import subprocess
    from elector_process import PYTHON, REPO, elector_env
    a = start("node-a")
    wait_holder(agent, key, "node-a")
    start("node-b")
    wait_candidates(agent, key, ["node-a", "node-b"])
    watcher = KeyWatcher(agent, key)
    before = time.time()
    a.send(signal.SIGSTOP)  # the leader cannot act on the request
    try:
        first = subprocess.Popen([PYTHON, "-m", "vip_elector", "switchover", "--to", "node-b", "--timeout", "4s",
                                  "--vip-manager-config", config], cwd=REPO,
                                 env=elector_env({"CONSUL_HTTP_TOKEN": token}), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        wait_for(lambda: agent.kv_get(key + "/switchover"), 10, message="the request")
        second = op("switchover", "--to", "node-b")
        assert second.returncode == 1 and "already in progress" in second.stderr, second.stderr
        out, err = first.communicate(timeout=30)
        assert first.returncode == 1, out + err
        assert "node-b did not take over within 4s: node-a still holds %s (request withdrawn" % key in err
        assert agent.kv_get(key + "/switchover") is None
    finally:
        a.send(signal.SIGCONT)
    time.sleep(3)  # the woken leader must not act on the withdrawn request
    assert holder(agent, key) == "node-a"
    assert values_after(watcher, before) == ["node-a"], watcher.history


def test_a_frozen_target_is_refused_and_the_leader_keeps_the_key(agent, key, start, op):
    start("node-a")
    wait_holder(agent, key, "node-a")
    b = start("node-b")
    wait_candidates(agent, key, ["node-a", "node-b"])
    watcher = KeyWatcher(agent, key)
    before = time.time()
    b.send(signal.SIGSTOP)
    try:
        res = op("switchover", "--to", "node-b", "--timeout", "6s")
    finally:
        b.send(signal.SIGCONT)
    assert res.returncode == 1, res.stdout
    assert "refused: node-b's vip-elector did not answer within 3s" in res.stderr, res.stderr
    assert holder(agent, key) == "node-a"
    assert values_after(watcher, before) == ["node-a"]
    assert agent.kv_get(key + "/switchover") is None


def test_a_stale_request_does_not_block_a_switchover(agent, key, start, op):
    start("node-a")
    wait_holder(agent, key, "node-a")
    start("node-b")
    wait_candidates(agent, key, ["node-a", "node-b"])
    stale = {"target": "node-b", "source": "node-a", "timeout": 1, "requested": time.time() - 3600,
             "by": "someone who died"}
    # Written as the master token: the leader drops it at once (it is stale), or the command does.
    agent.call("PUT", "/v1/kv/%s/switchover" % key, body=json.dumps(stale).encode(), params={"cas": 0})
    res = op("switchover", "--to", "node-b")
    assert res.returncode == 0, res.stderr
    assert holder(agent, key) == "node-b"


@compat
def test_the_lock_moves_to_a_session_of_another_node_under_the_least_privilege_token(agent, key, token):
    """The txn of a switchover: unlock with our session, lock with the target's (another
    Consul node's), under the example policy of the *old* holder's node."""
    from vip_elector.config import Options, build_settings
    from vip_elector.consul import ConsulClient
    agent.call("PUT", "/v1/catalog/register", body={"Node": "node-b", "Address": "127.0.0.2"})
    other = agent.call("PUT", "/v1/session/create", body={"Node": "node-b", "NodeChecks": [],
                                                            "Checks": [], "Behavior": "delete"})["ID"]
    mine = agent.create_session(name="vip-elector-node-a", checks=("serfHealth",))
    config = os.path.join(os.path.dirname(agent.workdir), "vm.yml")
    with open(config, "w") as f:
        f.write("dcs-type: consul\ndcs-endpoints: [http://%s]\ntrigger-key: %s\n" % (agent.http_addr, key))
    settings = build_settings(Options(vip_manager_config=config, token=token, hostname="node-a"), {})
    client = ConsulClient(settings)
    assert client.acquire(mine)
    assert client.hand_over(mine, other, "node-b")
    entry = agent.kv_get(key)
    assert entry["Session"] == other and entry["Value"] == b"node-b" and entry["Flags"] == LOCK_FLAG
    # Refused as a whole, nothing changed: our session no longer holds it.
    assert client.hand_over(mine, other, "node-a") is False
    assert agent.kv_get(key)["Value"] == b"node-b"
    # The candidate key and the request key, with the same token.
    assert client.put_candidate(mine, json.dumps({"node": "node-a"}))
    assert client.put_request("{}", cas=0) and not client.put_request("{}", cas=0)
    _, _, entries = client.read_tree()
    names = sorted(e.key for e in entries)
    assert names == [key + "/candidates/node-a", key + "/switchover"]
    client.close()


# ------------------------------------------------------------------------ priorities

def test_a_free_key_goes_to_the_highest_priority_present(agent, key, start):
    """Three rounds; each would be a coin toss (or worse) without priorities."""
    a = start("node-a", priority=100)
    wait_holder(agent, key, "node-a")
    start("node-c", priority=50)
    b = start("node-b", priority=200)
    wait_candidates(agent, key, ["node-a", "node-b", "node-c"])
    a.terminate()
    assert a.wait(10) == 0
    wait_holder(agent, key, "node-b", timeout=10)
    a = start("node-a", priority=100)
    wait_candidates(agent, key, ["node-a", "node-b", "node-c"])
    b.terminate()
    assert b.wait(10) == 0
    wait_holder(agent, key, "node-a", timeout=10)
    b = start("node-b", priority=200)
    wait_candidates(agent, key, ["node-a", "node-b", "node-c"])
    t0 = time.monotonic()
    a.terminate()
    assert a.wait(10) == 0
    wait_holder(agent, key, "node-b", timeout=10)
    assert time.monotonic() - t0 < 5  # a planned stop stays fast: nobody waits for the leaver


def test_no_preemption_on_equal_priority_and_one_move_on_a_higher(agent, key, start):
    start("node-a", extra=["--preempt-delay", "1s"])
    wait_holder(agent, key, "node-a")
    start("node-b", extra=["--preempt-delay", "1s"])
    wait_candidates(agent, key, ["node-a", "node-b"])
    watcher = KeyWatcher(agent, key)
    before = time.time()
    time.sleep(4)  # four preempt-delays: an equal priority never asks
    assert holder(agent, key) == "node-a" and agent.kv_get(key + "/switchover") is None
    c = start("node-c", priority=200, extra=["--preempt-delay", "2s"])
    wait_holder(agent, key, "node-c", timeout=20)
    c.wait_for_line("preempting", 5)
    time.sleep(3)
    assert values_after(watcher, before) == ["node-a", "node-c"], watcher.history


def test_a_flapping_check_on_the_preferred_node_does_not_bounce_the_vip(agent, key, start, check_id):
    agent.register_ttl_check(check_id)
    start("node-a")
    wait_holder(agent, key, "node-a")
    watcher = KeyWatcher(agent, key)
    before = time.time()
    b = start("node-b", priority=200, extra=["--preempt-delay", "3s", "--check-id", check_id])
    # The check on the preferred node flaps: never 3 s passing in a row.
    end = time.monotonic() + 10
    while time.monotonic() < end:
        time.sleep(1.0)
        agent.fail_check(check_id)
        time.sleep(0.3)
        agent.pass_check(check_id)
        assert holder(agent, key) == "node-a"
    assert values_after(watcher, before) == ["node-a"]
    assert "preempting" not in b.log()
    # Once it passes for the whole delay, one move.
    wait_holder(agent, key, "node-b", timeout=15)
    time.sleep(2)
    assert values_after(watcher, before) == ["node-a", "node-b"], watcher.history


# ------------------------------------------------------------------------ stickiness

def test_a_leader_whose_session_consul_ends_gets_the_key_back_while_it_is_healthy(agent, key, start):
    """Consul frees the key without the holder asking (here: its session destroyed, as a
    server's stray destroy or stale "failed" gossip does) while the holder is healthy: the
    others defer to it, and the key comes back to the same node. Two rounds with three
    candidates: without stickiness, each would be a one-in-three chance."""
    for name in ("node-a", "node-b", "node-c"):
        start(name)
    wait_candidates(agent, key, ["node-a", "node-b", "node-c"])
    for _ in range(2):
        leader = wait_for(lambda: holder(agent, key), 10, message="a holder")
        wait_role(agent, key, leader, "leader")
        old = agent.kv_get(key)["Session"]
        watcher = KeyWatcher(agent, key)
        before = time.time()
        agent.destroy_session(old)
        wait_for(lambda: (agent.kv_get(key) or {}).get("Session") not in (None, old), 15,
                 message="a new holder")
        time.sleep(1.0)
        assert values_after(watcher, before) == [leader, None, leader], watcher.history
        watcher.close()


# ------------------------------------------------------------------------ older tokens, several checks

def test_a_token_of_the_older_policy_still_leads_and_says_once_what_is_missing(agent, key, electors, config):
    """A token without key_prefix "<key>/" (the example policy before issue 16): the election
    works as before; one warning names the missing rule; no retry storm."""
    import re
    old = re.sub(r'(?m)^key_prefix "[^"]*" \{[^}]*\}\n', "", elector_rules(key, agent.node))
    assert '\nkey_prefix' not in old and 'key "%s"' % key in old and "session" in old
    token = agent.create_token(old, "older policy")
    a = electors(["--vip-manager-config", config, "--hostname", "node-a"], env={"CONSUL_HTTP_TOKEN": token},
                 name="node-a")
    a.wait_for_line("LOCK ACQUIRED", 20)
    a.wait_for_line('key_prefix "%s/" write' % key, 10)
    time.sleep(6)  # past the ordinary retry of a candidate write
    assert a.log().count("cannot write this node's candidate key") == 1
    assert holder(agent, key) == "node-a"
    res = run_elector(["--vip-manager-config", config, "--hostname", "node-b", "--check"],
                      env={"CONSUL_HTTP_TOKEN": token})
    warn = [line for line in res.stdout.splitlines() if line.startswith("warn") and "candidates/" in line]
    assert warn and 'key_prefix "%s/"' % key in warn[0], res.stdout


def test_check_reports_each_check_id(agent, key, config, token, check_id):
    agent.register_ttl_check(check_id)
    other = check_id + "-b"
    agent.register_ttl_check(other, status="critical")
    res = run_elector(["--vip-manager-config", config, "--hostname", "node-a", "--check-id", check_id,
                       "--check-id", other, "--check"], env={"CONSUL_HTTP_TOKEN": token})
    assert res.returncode == 1, res.stdout
    assert "check '%s' is passing" % check_id in res.stdout, res.stdout
    assert "check '%s' is critical" % other in res.stdout, res.stdout


def test_a_reload_keeps_the_candidate_key_with_the_session(agent, key, start, tmp_path):
    """SIGHUP re-executes the daemon, which resumes its session (SPEC §8.3): its candidate
    key stays, held by the same session, and is written again once by the new program."""
    state = tmp_path / "state"
    state.mkdir()
    a = start("node-a", extra=["--state-dir", str(state)])
    wait_holder(agent, key, "node-a")
    session, _ = wait_role(agent, key, "node-a", "leader") and candidates(agent, key)["node-a"]
    before = agent.kv_get(key + "/candidates/node-a")["ModifyIndex"]
    a.send(signal.SIGHUP)
    a.wait_for_line("reloaded", 20)
    wait_for(lambda: agent.kv_get(key + "/candidates/node-a")["ModifyIndex"] > before, 10,
             message="the candidate key written by the new program")
    assert candidates(agent, key)["node-a"][0] == session == agent.kv_get(key)["Session"]
    assert candidates(agent, key)["node-a"][1]["role"] == "leader"


def test_a_follower_whose_renewals_recover_still_sees_the_key_freed(consul_factory, key, electors,
                                                                   write_config):
    """Consul frozen past a renewal (the followers' renewals fail, then recover and replace
    their sessions), then the leader stops: a follower takes the key at once."""
    agent = consul_factory(node="node-a")
    config = write_config(agent.http_addr, key)
    a = electors(["--vip-manager-config", config, "--hostname", "node-a", "--verbose"], name="node-a")
    wait_holder(agent, key, "node-a")
    b = electors(["--vip-manager-config", config, "--hostname", "node-b", "--verbose"], name="node-b")
    wait_candidates(agent, key, ["node-a", "node-b"])
    agent.proc.send_signal(signal.SIGSTOP)
    time.sleep(7)
    agent.proc.send_signal(signal.SIGCONT)
    b.wait_for_line("replaced by", 20)
    wait_candidates(agent, key, ["node-a", "node-b"], timeout=20)
    time.sleep(1)
    a.terminate()
    assert a.wait(10) == 0
    wait_holder(agent, key, "node-b", timeout=5)
