"""vip-elector against a real Consul agent, driven as a subprocess (SPEC §1, §4, §5).

Each elector is a "node" of its own: a distinct --hostname (the value it
writes, and its session's name) and, where health matters, a distinct
--check-id registered as a TTL check the test flips. They all talk to the
same agent, so the node's serfHealth is shared; the check IDs are what
distinguishes their health.
"""

import os
import shutil
import signal
import socket
import threading
import time

import pytest

from consul_agent import LOCK_FLAG, elector_rules
from elector_process import run_elector
from helpers import KeyWatcher, go_duration, session_checks, sessions_named, stays_alive, wait_for

pytestmark = [pytest.mark.consul, pytest.mark.compat]

TTL = "10s"          # Consul's minimum: the fastest failover a SIGKILL can have


def elector_args(config, name, check_id=None, ttl=TTL, lock_delay="1s", extra=()):
    args = ["--vip-manager-config", config, "--hostname", name, "--ttl", ttl,
            "--lock-delay", lock_delay]
    if check_id:
        args += ["--check-id", check_id]
    return args + list(extra)


@pytest.fixture
def start(electors, write_config):
    """start(agent, key, name, check_id=None, **kw) -> Elector for that node."""
    def run(agent, key, name, check_id=None, env=None, **kw):
        config = write_config(agent.http_addr, key)
        return electors(elector_args(config, name, check_id, **kw), env=env, name=name)
    return run


def leader_of(agent, key):
    held = agent.holder(key)
    return held[0] if held else None


def wait_leader(agent, key, names, timeout=30):
    """Wait until one of `names` holds the key; return its name."""
    names = {names} if isinstance(names, str) else set(names)
    return wait_for(lambda: leader_of(agent, key) in names and leader_of(agent, key), timeout,
                    message="one of %s to hold %s" % (sorted(names), key))


def assert_never_leads(agent, key, electors_, seconds, names=None):
    """For `seconds`, the key is held by none of `names` and the electors stay up."""
    def not_held():
        held = leader_of(agent, key)
        assert held is None or (names is not None and held not in names), \
            "%s holds %s" % (held, key)
    stays_alive(electors_, seconds, check=not_held)


# --------------------------------------------------------------- single node

def test_leader_writes_its_name_with_lock_flag_and_a_proper_session(consul, key, check_id, start):
    consul.register_ttl_check(check_id)
    a = start(consul, key, "node-a", check_id, ttl="10s", lock_delay="1s")
    wait_leader(consul, key, "node-a")
    entry = consul.kv_get(key)
    assert entry["Value"] == b"node-a"
    assert entry["Flags"] == LOCK_FLAG
    session = consul.session_info(entry["Session"])
    assert session["Name"] == "vip-elector-node-a"
    assert session["Behavior"] == "delete"
    assert go_duration(session["TTL"]) == 10
    assert session["LockDelay"] == 1_000_000_000
    assert session_checks(session) == {"serfHealth", check_id}
    assert session["Node"] == consul.node
    a.wait_for_line("LOCK ACQUIRED", 10)
    a.terminate()
    assert a.wait(10) == 0
    assert consul.kv_get(key) is None, "a leader stopping on purpose deletes the key"
    assert consul.session_info(session["ID"]) is None
    a.wait_for_line("LOCK RELEASED", 1)
    consul.deregister_check(check_id)


def test_leading_slash_trigger_key_is_normalised(consul, key, electors, write_config):
    config = write_config(consul.http_addr, "/" + key)
    e = electors(["--vip-manager-config", config, "--hostname", "node-s"])
    wait_leader(consul, key, "node-s")
    e.terminate()
    assert e.wait(10) == 0


def test_trigger_value_and_hostname_precedence(consul, key, electors, write_config):
    # trigger-value from the YAML is the value; --hostname beats it.
    k1, k2 = key + "-1", key + "-2"
    e1 = electors(["--vip-manager-config", write_config(consul.http_addr, k1, trigger_value="tv-node")])
    e2 = electors(["--vip-manager-config", write_config(consul.http_addr, k2, trigger_value="tv-node"),
                   "--hostname", "flag-node"])
    wait_leader(consul, k1, "tv-node")
    wait_leader(consul, k2, "flag-node")
    for e in (e1, e2):
        e.terminate()
    assert e1.wait(10) == 0 and e2.wait(10) == 0


def test_short_hostname_default_and_warning(consul, key, electors, write_config, tmp_path):
    """No --hostname, no trigger-value: the short kernel hostname, and a warning naming both."""
    if not shutil.which("unshare") or os.geteuid() != 0:
        pytest.skip("needs unshare(1) and root for a UTS namespace with a hostname of its own")
    config = write_config(consul.http_addr, key)
    e = electors(["--vip-manager-config", config],
                 wrapper=["unshare", "--uts", "sh", "-c",
                          'hostname node-z.example.test && exec "$@"', "sh"])
    wait_leader(consul, key, "node-z")
    e.wait_for_line(lambda line: "node-z.example.test" in line and "node-z" in line.replace("node-z.example.test", ""), 5)
    e.terminate()
    assert e.wait(10) == 0


# ------------------------------------------------------------- several nodes

def test_three_contenders_exactly_one_holder_throughout(consul, key, start):
    names = ["node-a", "node-b", "node-c"]
    procs = [start(consul, key, n) for n in names]
    first = wait_leader(consul, key, names)
    # Followers keep a live session each (SPEC §4.4).
    wait_for(lambda: all(sessions_named(consul, "vip-elector-" + n) for n in names), 20,
             message="a session per contender")
    # Over more than 2×TTL (so renewals must work): one holder at every sample,
    # always the same one, nobody exits.
    cpu0 = {p.name: cpu_seconds(p.pid) for p in procs}
    with KeyWatcher(consul, key) as watcher:
        stays_alive(procs, 22, interval=0.5)
    states = sorted({(value, session) for _, value, session, _ in watcher.history}, key=str)
    assert len(states) == 1 and None not in states[0], states
    assert states[0][0] == first
    for p in procs:     # blocking queries, not polling: idle in steady state
        used = cpu_seconds(p.pid) - cpu0[p.name]
        assert used < 2, "%s used %.1fs CPU in 22s of steady state" % (p.name, used)
    for n in names:
        assert len(sessions_named(consul, "vip-elector-" + n)) == 1, "one session per node, no leak"
    for p in procs:
        p.terminate()
    for p in procs:
        assert p.wait(10) == 0
    wait_for(lambda: not any(sessions_named(consul, "vip-elector-" + n) for n in names), 10,
             message="all sessions destroyed")


def test_failed_check_moves_leadership_and_unhealthy_node_stays_out(consul, key, start):
    names = ["node-a", "node-b", "node-c"]
    checks = {n: "chk-%s-%s" % (n, key.split("/")[1][-6:]) for n in names}
    for n in names:
        consul.register_ttl_check(checks[n])
    procs = {n: start(consul, key, n, checks[n]) for n in names}
    first = wait_leader(consul, key, names)
    consul.fail_check(checks[first])
    # lock-delay is 1 s: an acquire refused by it is retried promptly (SPEC §4.4)
    second = wait_leader(consul, key, set(names) - {first}, timeout=12)
    procs[first].wait_for_line("LOCK LOST", 10)
    # The failed node stays out while critical, and keeps running.
    assert_never_leads(consul, key, procs.values(), 3, names={first})
    # Healthy again: back as a standby; the next failure may elect it again.
    consul.pass_check(checks[first])
    wait_for(lambda: sessions_named(consul, "vip-elector-" + first), 20,
             message="%s back with a session once its check passes" % first)
    consul.fail_check(checks[second])
    third = wait_leader(consul, key, set(names) - {second}, timeout=30)
    assert third != second
    for p in procs.values():
        p.terminate()
    for p in procs.values():
        assert p.wait(10) == 0
    for c in checks.values():
        consul.deregister_check(c)


def test_critical_or_unregistered_check_never_leads_until_passing(consul, key, check_id, start):
    crit, missing = check_id + "-crit", check_id + "-missing"
    consul.register_ttl_check(crit, status="critical")
    a = start(consul, key, "node-crit", crit)
    b = start(consul, key, "node-missing", missing)
    # Both say why they wait, create no session, and never lead.
    a.wait_for_line(crit, 15)
    b.wait_for_line(missing, 15)
    assert_never_leads(consul, key, [a, b], 3)
    assert not sessions_named(consul, "vip-elector-node-crit")
    assert not sessions_named(consul, "vip-elector-node-missing")
    consul.pass_check(crit)
    wait_leader(consul, key, "node-crit", timeout=10)        # looked at least every 2 s
    a.terminate()
    assert a.wait(10) == 0
    assert_never_leads(consul, key, [b], 2)
    consul.register_ttl_check(missing)
    wait_leader(consul, key, "node-missing", timeout=10)
    b.terminate()
    assert b.wait(10) == 0
    consul.deregister_check(crit)
    consul.deregister_check(missing)


def test_leader_recovers_when_its_key_or_session_disappears(consul, key, start):
    """An operator deletes the key, then destroys the session: lost, then leading again."""
    a = start(consul, key, "node-a", lock_delay="0s")
    wait_leader(consul, key, "node-a")
    consul.kv_delete(key)
    a.wait_for_line("LOCK LOST", 10)
    wait_leader(consul, key, "node-a", timeout=15)
    old = consul.kv_get(key)["Session"]
    n = len(a.lines)
    consul.destroy_session(old)              # behaviour delete: the key goes with it
    a.wait_for_line("LOCK LOST", 10, since=n)
    wait_for(lambda: (consul.kv_get(key) or {}).get("Session") not in (None, old), 20,
             message="a new session holding the key")
    assert leader_of(consul, key) == "node-a"
    assert len(sessions_named(consul, "vip-elector-node-a")) == 1
    a.terminate()
    assert a.wait(10) == 0


# ----------------------------------------------------------- stop and crash

def leader_and_standby(consul, key, start, lock_delay):
    """node-a leading, node-b competing (it has a session): (a, b, a's session)."""
    a = start(consul, key, "node-a", lock_delay=lock_delay)
    wait_leader(consul, key, "node-a")
    b = start(consul, key, "node-b", lock_delay=lock_delay)
    wait_for(lambda: sessions_named(consul, "vip-elector-node-b"), 20, message="standby session")
    return a, b, consul.kv_get(key)["Session"]


def test_sigterm_leader_hands_over_at_once(consul, key, start):
    # A 15 s lock-delay: if the leader destroyed its session before deleting
    # the key, the standby would wait 15 s; the spec says "at once".
    a, b, a_session = leader_and_standby(consul, key, start, lock_delay="15s")
    with KeyWatcher(consul, key) as watcher:
        t0 = time.time()
        a.terminate()
        assert a.wait(10) == 0
        exited = time.time()
        wait_leader(consul, key, "node-b", timeout=10)
        handover = time.time() - t0
    assert exited - t0 < 5, "leader took %.1fs to exit" % (exited - t0)
    after = [value for _, value, _, _ in watcher.states_since(exited)]
    assert "node-a" not in after, "key showed node-a after it exited: %r" % watcher.history
    assert handover < 8, "standby took %.1fs (lock-delay 15s was not avoided?)" % handover
    assert consul.session_info(a_session) is None
    assert b.alive
    b.terminate()
    assert b.wait(10) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_follower_stops_promptly_and_destroys_its_session(consul, key, start, sig):
    a = start(consul, key, "node-a")
    wait_leader(consul, key, "node-a")
    b = start(consul, key, "node-b")
    b_session = wait_for(lambda: sessions_named(consul, "vip-elector-node-b"), 20,
                         message="follower session")[0]["ID"]
    t0 = time.monotonic()
    b.send(sig)
    assert b.wait(10) == 0
    assert time.monotonic() - t0 < 5
    assert consul.session_info(b_session) is None
    assert leader_of(consul, key) == "node-a"
    a.terminate()
    assert a.wait(10) == 0


def test_sigkill_leader_fails_over_after_session_invalidation(consul, key, start):
    a, b, a_session = leader_and_standby(consul, key, start, lock_delay="1s")
    t0 = time.monotonic()
    a.kill()
    a.wait(5)
    # Consul invalidates an unrenewed session within 2×TTL; then lock-delay.
    wait_leader(consul, key, "node-b", timeout=2 * 10 + 1 + 15)
    took = time.monotonic() - t0
    assert consul.session_info(a_session) is None
    print("failover after SIGKILL took %.1fs" % took)
    b.terminate()
    assert b.wait(10) == 0


def test_leader_stop_with_consul_hung_exits_within_5s(fresh_consul, key, start):
    """A silent Consul (SIGSTOPped: connects, never answers) must not hold up a stop."""
    a = start(fresh_consul, key, "node-a")
    wait_leader(fresh_consul, key, "node-a")
    fresh_consul.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        a.terminate()
        rc = a.wait(15)
        took = time.monotonic() - t0
    finally:
        fresh_consul.proc.send_signal(signal.SIGCONT)
    assert rc == 0
    assert took < 6, "stop took %.1fs with Consul hung (contract: 5 s)" % took


def test_leader_stop_with_consul_gone_exits_within_5s(fresh_consul, key, start):
    a = start(fresh_consul, key, "node-a")
    wait_leader(fresh_consul, key, "node-a")
    fresh_consul.kill()
    t0 = time.monotonic()
    a.terminate()
    assert a.wait(15) == 0
    assert time.monotonic() - t0 < 6


# --------------------------------------------------------- Consul comes and goes

def test_leader_steps_down_when_it_cannot_renew_for_a_ttl(fresh_consul, key, start):
    """Consul hung (SIGSTOP) longer than the TTL: the session is as good as gone
    (SPEC §4.3), so the leader must say so; once Consul is back it leads again."""
    a = start(fresh_consul, key, "node-a")
    wait_leader(fresh_consul, key, "node-a")
    n = len(a.lines)
    fresh_consul.proc.send_signal(signal.SIGSTOP)
    try:
        a.wait_for_line("LOCK LOST", 10 + 10, since=n)
    finally:
        fresh_consul.proc.send_signal(signal.SIGCONT)
    assert a.alive
    wait_for(lambda: leader_of(fresh_consul, key) == "node-a"
             and len(sessions_named(fresh_consul, "vip-elector-node-a")) == 1, 60,
             message="node-a leading again with a single session")
    a.terminate()
    assert a.wait(10) == 0


def test_agent_restart_under_running_leader(fresh_consul, key, start):
    agent = fresh_consul
    a = start(agent, key, "node-a")
    wait_leader(agent, key, "node-a")
    b = start(agent, key, "node-b")
    wait_for(lambda: sessions_named(agent, "vip-elector-node-b"), 20, message="standby session")
    agent.stop()
    stays_alive([a, b], 4)       # Consul is away: nobody crashes
    agent.start()        # a -dev agent comes back empty: sessions and key are gone
    wait_leader(agent, key, ["node-a", "node-b"], timeout=60)
    wait_for(lambda: len(sessions_named(agent, "vip-elector-node-a")) == 1
             and len(sessions_named(agent, "vip-elector-node-b")) == 1, 60,
             message="both electors back with one session each")
    with KeyWatcher(agent, key) as watcher:
        stays_alive([a, b], 3)
    states = sorted({(value, session) for _, value, session, _ in watcher.history}, key=str)
    assert len(states) == 1 and states[0][0] in ("node-a", "node-b") and states[0][1], states
    a.terminate()
    b.terminate()
    assert a.wait(10) == 0 and b.wait(10) == 0


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_consul_not_running_yet_at_start(consul_factory, key, start):
    agent = consul_factory(start=False)
    a = start(agent, key, "node-a")
    a.wait_for_line(agent.http_addr, 15)          # it has started and tried once
    # It waits (no exit, no busy loop) while nothing listens on the port ...
    cpu0 = cpu_seconds(a.pid)
    stays_alive(a, 3)
    assert cpu_seconds(a.pid) - cpu0 < 0.5, "busy loop while Consul is away?"
    agent.start()
    # ... and leads once the agent appears (backoff ≤ 30 s, jittered).
    wait_leader(agent, key, "node-a", timeout=45)
    a.terminate()
    assert a.wait(10) == 0


class CountingListener:
    """A TCP port that accepts and drops connections, counting them (a broken Consul)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(50)
        self.sock.settimeout(0.2)
        self.addr = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.accepted = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            self.accepted.append(time.monotonic())
            conn.close()

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_backoff_while_consul_errors_and_prompt_stop_during_it(key, electors, write_config):
    """SPEC §4.8: exponential backoff from 1 s (not a fixed 1 s, not a busy loop);
    SIGTERM in the middle of a long backoff still stops at once (§4.5)."""
    broken = CountingListener()
    try:
        e = electors(["--vip-manager-config", write_config(broken.addr, key), "--hostname", "node-a"])
        wait_for(lambda: broken.accepted, 15, message="a first connection")
        first = broken.accepted[0]
        cpu0 = cpu_seconds(e.pid)
        stays_alive(e, first + 12 - time.monotonic())
        attempts = [t - first for t in broken.accepted if t - first < 12]
        print("connections in the first 12 s:", ["%.1f" % t for t in attempts])
        assert 2 <= len(attempts) <= 8, "want 1 s, 2 s, 4 s, ... (jittered): %s" % attempts
        assert cpu_seconds(e.pid) - cpu0 < 1
        t0 = time.monotonic()
        e.terminate()
        assert e.wait(10) == 0
        assert time.monotonic() - t0 < 5, "SIGTERM waited for the backoff"
    finally:
        broken.close()


# ----------------------------------------------------------------- pre-flight

@pytest.mark.parametrize("flags", [0, 42])
def test_existing_non_lock_key_is_a_config_error(consul, key, write_config, flags):
    consul.kv_put(key, "someone-else", flags=flags)
    before = consul.kv_get(key)
    config = write_config(consul.http_addr, key)
    r = run_elector(["--vip-manager-config", config, "--hostname", "node-a"], timeout=30)
    assert r.returncode == 78, r.stderr
    # (a start-up line before it is fine: the pre-flight needs Consul)
    lines = [l for l in r.stderr.splitlines() if "consul kv delete" in l]
    assert len(lines) == 1, r.stderr
    assert key in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert consul.kv_get(key) == before, "the key must be left untouched"
    assert not sessions_named(consul, "vip-elector-node-a")
    consul.kv_delete(key)


# ------------------------------------------------------ precedence over env

def test_environment_does_not_override_flags_or_config(consul_factory, key, electors, write_config, tmp_path):
    agent = consul_factory(acl=True)
    # Ample rights (this is about where the token comes from, not how little it may hold).
    token = agent.create_token('key_prefix "%s" { policy = "write" }\n'
                               'session_prefix "" { policy = "write" }\nnode_prefix "" { policy = "read" }\n'
                               'agent_prefix "" { policy = "read" }\n' % key.rsplit("/", 1)[0])
    garbage = {"CONSUL_HTTP_ADDR": "http://127.0.0.1:1", "CONSUL_HTTP_TOKEN": "00000000-dead-beef-0000-000000000000"}
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    runs = {
        # config endpoint + --token beat the environment
        "env-1": (["--vip-manager-config", write_config(agent.http_addr, key + "1"), "--token", token], garbage),
        # --addr + --token-file beat the environment (config has no endpoint)
        "env-2": (["--vip-manager-config", write_config(None, key + "2"), "--addr", agent.http_addr,
                   "--token-file", str(token_file)], garbage),
        # --addr beats a garbage endpoint in the config
        "env-3": (["--vip-manager-config", write_config("127.0.0.1:1", key + "3"), "--addr",
                   "http://" + agent.http_addr, "--token", token], garbage),
        # without flags: CONSUL_HTTP_ADDR and CONSUL_HTTP_TOKEN beat consul-token / the default address
        "env-4": (["--vip-manager-config", write_config(None, key + "4", consul_token="bad-token")],
                  {"CONSUL_HTTP_ADDR": agent.http_addr, "CONSUL_HTTP_TOKEN": token}),
        # consul-token from the config is used when nothing else gives one
        "env-5": (["--vip-manager-config", write_config(agent.http_addr, key + "5", consul_token=token)], {}),
        # CONSUL_HTTP_TOKEN_FILE beats consul-token
        "env-6": (["--vip-manager-config", write_config(agent.http_addr, key + "6", consul_token="bad-token")],
                  {"CONSUL_HTTP_TOKEN_FILE": str(token_file)}),
    }
    procs = {}
    for name, (args, env) in runs.items():
        procs[name] = electors(args + ["--hostname", name], env=env, name=name)
    for i, name in enumerate(runs, 1):
        wait_leader(agent, key + str(i), name, timeout=30)
    for p in procs.values():
        p.terminate()
    for p in procs.values():
        assert p.wait(10) == 0
        assert token not in p.log() and "dead-beef" not in p.log(), "a token appeared in the log"


# ----------------------------------------------------------------------- ACL

def test_acl_minimal_token_works(consul_factory, key, check_id, electors, write_config):
    agent = consul_factory(acl=True)
    agent.register_ttl_check(check_id)
    token = agent.create_token(elector_rules(key, agent.node))
    config = write_config(agent.http_addr, key)
    a = electors(["--vip-manager-config", config, "--hostname", "node-a", "--check-id", check_id],
                 env={"CONSUL_HTTP_TOKEN": token}, name="node-a")
    b = electors(["--vip-manager-config", config, "--hostname", "node-b", "--check-id", check_id],
                 env={"CONSUL_HTTP_TOKEN": token}, name="node-b")
    first = wait_leader(agent, key, ["node-a", "node-b"])
    wait_for(lambda: len([s for s in agent.sessions() if s["Name"].startswith("vip-elector-")]) == 2,
             20, message="two sessions")
    leader, standby = (a, b) if first == "node-a" else (b, a)
    leader.terminate()
    assert leader.wait(10) == 0
    wait_leader(agent, key, standby.name, timeout=15)
    standby.terminate()
    assert standby.wait(10) == 0
    assert agent.kv_get(key) is None
    for p in (a, b):
        assert token not in p.log()


def test_acl_check_mode(consul_factory, key, check_id, write_config):
    agent = consul_factory(acl=True)
    agent.register_ttl_check(check_id)
    good = agent.create_token(elector_rules(key, agent.node))
    weak = agent.create_token('key "%s" { policy = "read" }\nnode_prefix "" { policy = "read" }' % key)
    config = write_config(agent.http_addr, key)
    args = ["--vip-manager-config", config, "--hostname", "node-a", "--check-id", check_id, "--check"]
    before = agent.kv_all()
    ok = run_elector(args, env={"CONSUL_HTTP_TOKEN": good}, timeout=60)
    bad = run_elector(args, env={"CONSUL_HTTP_TOKEN": weak}, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert bad.returncode != 0, bad.stdout + bad.stderr
    for r, t in ((ok, good), (bad, weak)):
        assert t not in r.stdout + r.stderr, "token printed"
        assert "Traceback" not in r.stderr
    assert agent.kv_all() == before
    assert not [s for s in agent.sessions() if s["Name"].startswith("vip-elector-")]


def test_acl_wrong_token_keeps_retrying_and_says_why(consul_factory, key, electors, write_config):
    agent = consul_factory(acl=True)
    bad = "11111111-2222-3333-4444-555555555555"
    weak = agent.create_token('key "%s" { policy = "read" }' % key)     # valid, too weak
    before = agent.kv_all()
    config = write_config(agent.http_addr, key)
    x = electors(["--vip-manager-config", config, "--hostname", "node-x", "--token", bad], name="bad")
    y = electors(["--vip-manager-config", config, "--hostname", "node-y", "--token", weak], name="weak")
    for e in (x, y):
        e.wait_for_line(lambda l: any(w in l.lower() for w in ("acl", "permission", "403", "token")), 20)
    stays_alive([x, y], 3)
    assert agent.kv_all() == before
    assert not [s for s in agent.sessions() if s["Name"].startswith("vip-elector-")]
    for e in (x, y):
        e.terminate()
    for e in (x, y):
        assert e.wait(10) == 0
    assert bad not in x.log() and weak not in y.log(), "a token appeared in the log"


# -------------------------------------------------------------- consul lock

def test_consul_lock_holder_blocks_elector_until_it_releases(consul, key, start):
    prefix = key.rsplit("/", 1)[0]
    lock_key = prefix + "/.lock"
    lock = consul.consul_lock(prefix, "sleep 300")
    try:
        wait_for(lambda: (consul.kv_get(lock_key) or {}).get("Session"), 20, message="consul lock holding")
        e = start(consul, lock_key, "node-e")
        wait_for(lambda: sessions_named(consul, "vip-elector-node-e"), 20, message="elector session")
        assert_never_leads(consul, lock_key, [e], 3, names={"node-e"})
        lock.send_signal(signal.SIGTERM)
        assert lock.wait(20) is not None
        wait_leader(consul, lock_key, "node-e", timeout=20)
        e.terminate()
        assert e.wait(10) == 0
    finally:
        if lock.poll() is None:
            lock.kill()
        lock.wait()


def test_elector_holder_blocks_consul_lock_until_it_stops(consul, key, start, tmp_path):
    prefix = key.rsplit("/", 1)[0]
    lock_key = prefix + "/.lock"
    e = start(consul, lock_key, "node-e", lock_delay="15s")
    wait_leader(consul, lock_key, "node-e")
    marker = tmp_path / "got-lock"
    lock = consul.consul_lock(prefix, "touch %s; sleep 300" % marker)
    try:
        def lock_waits():
            assert not marker.exists(), "consul lock got the lock the elector holds"
            assert lock.poll() is None, lock.stdout.read()
        stays_alive(e, 3, check=lock_waits)
        e.terminate()
        assert e.wait(10) == 0
        wait_for(marker.exists, 20, message="consul lock to get the lock (no lock-delay)")
    finally:
        lock.send_signal(signal.SIGTERM)
        try:
            lock.wait(20)
        except Exception:
            lock.kill()
            lock.wait()


# ----------------------------------------------------------------------- TLS

def test_https_endpoints_and_tls_environment(consul_factory, key, electors, write_config):
    """SPEC §3: https:// endpoints, CONSUL_CACERT, CONSUL_CLIENT_CERT/KEY, CONSUL_HTTP_SSL_VERIFY."""
    plain = consul_factory(tls=True)
    mutual = consul_factory(tls=True, verify_incoming=True)
    runs = {
        "tls-ca": (plain, {"CONSUL_CACERT": plain.ca_file}),
        "tls-noverify": (plain, {"CONSUL_HTTP_SSL_VERIFY": "false"}),
        "tls-client": (mutual, {"CONSUL_CACERT": mutual.ca_file, "CONSUL_CLIENT_CERT": mutual.client_cert,
                                "CONSUL_CLIENT_KEY": mutual.client_key}),
        "tls-unknown-ca": (plain, {}),
    }
    procs = {}
    for name, (agent, env) in runs.items():
        config = write_config(agent.https_url, "%s-%s" % (key, name))
        procs[name] = electors(["--vip-manager-config", config, "--hostname", name], env=env, name=name)
    for name in ("tls-ca", "tls-noverify", "tls-client"):
        wait_leader(runs[name][0], "%s-%s" % (key, name), name)
    # An agent certificate we cannot verify: keep trying, say why, take nothing.
    bad = procs["tls-unknown-ca"]
    bad.wait_for_line(lambda l: any(w in l.lower() for w in ("certificate", "ssl", "tls", "verify")), 20)
    assert bad.alive
    assert plain.kv_get("%s-tls-unknown-ca" % key) is None
    for p in procs.values():
        p.terminate()
    for p in procs.values():
        assert p.wait(10) == 0


# ------------------------------------------------------- a cluster of nodes

def test_node_failures_in_a_cluster(consul_factory, key, start):
    """Each elector on its own node's client agent, as in production: when a
    node's agent dies its serfHealth fails and leadership moves long before
    any TTL; the node comes back as a standby; a whole node dying likewise."""
    server = consul_factory(node="server")
    n1 = consul_factory(node="node-1", join=server)
    n2 = consul_factory(node="node-2", join=server)
    a = start(n1, key, "node-a")
    wait_leader(server, key, "node-a")
    b = start(n2, key, "node-b")
    wait_for(lambda: sessions_named(server, "vip-elector-node-b"), 20, message="standby session")
    assert sessions_named(server, "vip-elector-node-a")[0]["Node"] == "node-1"
    assert sessions_named(server, "vip-elector-node-b")[0]["Node"] == "node-2"
    # node-1's agent dies; its elector lives on.
    t0 = time.monotonic()
    n1.kill()
    wait_leader(server, key, "node-b", timeout=15)
    print("failover after the leader's agent died: %.1fs" % (time.monotonic() - t0))
    assert a.alive
    n1.start()
    wait_for(lambda: sessions_named(server, "vip-elector-node-a"), 60,
             message="node-a back as a standby once its agent returns")
    assert leader_of(server, key) == "node-b"
    # The whole of node-2 dies: agent and elector.
    t0 = time.monotonic()
    b.kill()
    n2.kill()
    wait_leader(server, key, "node-a", timeout=15)
    print("failover after the leader's node died: %.1fs" % (time.monotonic() - t0))
    a.terminate()
    assert a.wait(10) == 0
