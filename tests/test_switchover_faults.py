"""A switchover and a reload's lock move, with Consul failing at each step (issues 16 and 19).

SPEC §11.3: "leadership is never lost to a failed switchover"; SPEC §8.3/§9.4: a reload
that changes the session's parameters moves the lock to a new session in one /v1/txn.
Here every step of both goes through a FaultProxy (tests/fault_proxy.py) in front of the
real agent of the process that makes it — the command's, the leader's, the target's —
and fails once: a 500 with Consul's own error body, a request that hangs past the
client's timeout (Consul never saw it), or an answer dropped after Consul applied it
(the client cannot tell the last two apart).

What must hold after each, seen from the real agent (a KeyWatcher's blocking queries,
not through any proxy): the key is never free and never held by a third node; both
daemons stay up without internal errors; the command prints one line and exits 0 only
when the target holds the key; the node that holds the key at the end says it leads
and the other says it follows; a leader that keeps the key was told `standby` only
before the move was tried (SPEC §11.3: the hook runs before the key can leave) and
`leader` again once the key is known to be its own.

Intended outcomes (the `expect` of each case): a fault the command or a daemon can
retry within the switchover's timeout ends in a switchover (exit 0); a fault at the
move itself ends in a refusal the leader explains (exit 1), or in the switchover when
Consul did apply the move; a reload whose new session or move fails is refused (exit 1
from --reload-pid, the daemon keeps its old session), and applies when the move was
applied.
"""

import json
import os
import signal
import stat
import time
import uuid
from dataclasses import dataclass

import pytest

from elector_process import Elector, run_elector
from fault_proxy import DropAnswer, FaultProxy, Hang, status_500
from helpers import KeyWatcher, NotifySocket, internal_errors, stays_alive, wait_for

pytestmark = pytest.mark.consul

TXN = r"/v1/txn"
CREATE = r"/v1/session/create"
FAULTS = {"500": status_500, "hang": Hang, "applied": DropAnswer}


@dataclass
class Node:
    """One elector behind its own proxy, with a notify socket and a recording hook."""

    name: str
    elector: Elector
    proxy: FaultProxy
    sock: NotifySocket
    hook_log: str

    def session(self, consul, key):
        entry = consul.kv_get("%s/candidates/%s" % (key, self.name))
        return entry and entry.get("Session")

    def record(self, consul, key):
        entry = consul.kv_get("%s/candidates/%s" % (key, self.name))
        return json.loads(entry["Value"]) if entry and entry.get("Session") else None

    def status(self):
        return self.sock.last_status() or ""

    def hooks(self, since):
        """The hook's states called at or after `since` (time.time())."""
        if not os.path.exists(self.hook_log):
            return []
        out = []
        for line in open(self.hook_log).read().splitlines():
            state, t = line.split()
            if float(t) >= since:
                out.append(state)
        return out


@pytest.fixture
def cluster(consul, key, electors, write_config, tmp_path):
    """cluster(*names) -> {name: Node} all started, the first the leader, all candidates listed."""
    made = []

    def make(*names, extra=(), env=None):
        nodes = {}
        for name in names:
            proxy = FaultProxy(consul.http_addr).start()
            sock = NotifySocket("@vip-elector-swf-%s" % uuid.uuid4().hex)
            hook_log = str(tmp_path / ("hook-%s.log" % name))
            hook = tmp_path / ("hook-%s.sh" % name)
            hook.write_text("#!/bin/sh\necho \"$1 $(date +%%s.%%N)\" >> %s\n" % hook_log)
            os.chmod(hook, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
            config = write_config(consul.http_addr, key)
            args = ["--vip-manager-config", config, "--hostname", name, "--ttl", "10s",
                    "--lock-delay", "1s", "--addr", proxy.addr, "--hook", str(hook)] + list(extra)
            e = electors(args, env=dict(env or {}, NOTIFY_SOCKET=sock.path), name=name)
            node = Node(name, e, proxy, sock, hook_log)
            made.append(node)
            nodes[name] = node
            if len(nodes) == 1:  # the first one leads
                wait_for(lambda: (consul.kv_get(key) or {}).get("Session"), 20, message="a leader")
        wait_for(lambda: all(n.record(consul, key) for n in nodes.values()), 20,
                 message="every candidate key")
        first = nodes[names[0]]
        wait_for(lambda: first.status().startswith("leader:") and
                 first.record(consul, key)["role"] == "leader", 10, message="the leader settled")
        return nodes

    yield make
    for n in made:
        n.proxy.close()
        n.sock.close()


@pytest.fixture
def command(consul, key, write_config):
    """command(*args, proxy=None) -> CompletedProcess of `vip-elector ARGS` (through `proxy`)."""
    config = write_config(consul.http_addr, key)

    def run(*args, proxy=None, timeout=40):
        addr = ["--addr", proxy.addr] if proxy is not None else []
        res = run_elector(list(args) + ["--vip-manager-config", config] + addr, timeout=timeout)
        print("$ vip-elector %s -> %d\n%s%s" % (" ".join(args), res.returncode, res.stdout, res.stderr))
        return res
    return run


def holders(watcher, since):
    """The distinct holders (None: free) the key had from `since` on, in order."""
    history = list(watcher.history)
    current = [h for h in history if h[0] < since][-1:]
    seen = []
    for _, value, session, _ in current + [h for h in history if h[0] >= since]:
        v = value if session else None
        if not seen or seen[-1] != v:
            seen.append(v)
    return seen


def one_line(res):
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, "not one line:\n%s%s" % (res.stdout, res.stderr)
    return lines[0]


def settled(consul, key, nodes, leader, watcher, since):
    """After the fault: `leader` holds the key and says so, the others follow it; the key
    went at most from the old holder to `leader`, never free, never a third; no daemon
    exited or logged an internal error."""
    wait_for(lambda: (consul.kv_get(key) or {}).get("Session") == nodes[leader].session(consul, key),
             15, message="%s holding the key" % leader)
    wait_for(lambda: nodes[leader].status().startswith("leader:"), 10, message="%s to say it leads" % leader)
    for n in nodes.values():
        if n.name != leader:
            wait_for(lambda: n.status() == "follower: leader is %s" % leader, 10,
                     message="%s to follow %s (status %r)" % (n.name, leader, n.status()))
    wait_for(lambda: consul.kv_get(key + "/switchover") is None, 15, message="the request gone")
    # A stretch of quiet: nobody takes the key back, nobody exits.
    stays_alive([n.elector for n in nodes.values()], 0.5)
    seen = holders(watcher, since)
    assert None not in seen, "the key was free: %s" % watcher.history
    assert seen in (["node-a"], ["node-a", leader]), "a third holder, or a move back: %s" % seen
    # Honest claims: once the key is the final leader's, no other node says it leads.
    moved_at = next((t for t, value, session, _ in watcher.history
                     if t >= since and value == leader and session), since)
    for n in nodes.values():
        if n.name != leader:
            claims = [text for t, text in list(n.sock.messages)
                      if t >= moved_at and text.startswith("STATUS=leader:")]
            assert not claims, "%s claimed the key %s held: %s" % (n.name, leader, claims)
    problems = internal_errors(*[n.elector for n in nodes.values()])
    assert not problems, problems


def kept_hooks(node, since):
    """The leader that keeps the key: `standby` only as the move began, then `leader`."""
    calls = node.hooks(since)
    assert calls in ([], ["standby", "leader"]), calls
    return calls


# ------------------------------------------------------------------------ the command's steps

@pytest.mark.parametrize("fault", ["500", "hang", "applied"])
def test_the_commands_request_write_fails(consul, key, cluster, command, fault):
    """500 / no answer (not written): one line, exit 1, nothing changed. Written but the
    answer lost: the command finds its request and the switchover goes on (exit 0)."""
    nodes = cluster("node-a", "node-b")
    proxy = FaultProxy(consul.http_addr).start()
    watcher = KeyWatcher(consul, key)
    try:
        since = time.time()
        rule = proxy.inject(FAULTS[fault](), "PUT", r"/v1/kv/%s/switchover" % key, times=1)
        res = command("switchover", "--to", "node-b", proxy=proxy)
        assert rule.hits, "the fault did not fire"
        if fault == "applied":
            assert res.returncode == 0, res.stdout + res.stderr
            assert "switched over: node-b holds" in res.stdout
            settled(consul, key, nodes, "node-b", watcher, since)
        else:
            assert res.returncode == 1, res.stdout + res.stderr
            line = one_line(res)
            assert "cannot write the switchover request" in line and "node-a keeps" in line, line
            settled(consul, key, nodes, "node-a", watcher, since)
            assert nodes["node-a"].hooks(since) == []
    finally:
        watcher.close()
        proxy.close()


@pytest.mark.parametrize("fault", ["500", "hang"])
def test_the_commands_wait_fails_once(consul, key, cluster, command, fault):
    """A read of the wait fails or hangs: the command reads again and reports the switchover."""
    nodes = cluster("node-a", "node-b")
    proxy = FaultProxy(consul.http_addr).start()
    watcher = KeyWatcher(consul, key)
    try:
        since = time.time()
        rule = proxy.inject(FAULTS[fault](), "GET", r"/v1/kv/%s" % key, query={"index": True}, times=1)
        t0 = time.monotonic()
        res = command("switchover", "--to", "node-b", proxy=proxy)
        took = time.monotonic() - t0
        assert rule.hits, "the fault did not fire"
        assert res.returncode == 0, res.stdout + res.stderr
        assert "switched over: node-b holds" in res.stdout
        assert took < 9, "a hung read of the wait held the command %.1fs" % took
        settled(consul, key, nodes, "node-b", watcher, since)
    finally:
        watcher.close()
        proxy.close()


@pytest.mark.parametrize("fault", ["500", "hang"])
def test_the_request_delete_at_the_end_fails(consul, key, cluster, command, fault):
    """The command's delete, and the old leader's, fail: the switchover stands (exit 0) and
    the request is still removed (the new leader drops one that names itself)."""
    nodes = cluster("node-a", "node-b")
    proxy = FaultProxy(consul.http_addr).start()
    watcher = KeyWatcher(consul, key)
    try:
        since = time.time()
        path = r"/v1/kv/%s/switchover" % key
        mine = proxy.inject(FAULTS[fault](), "DELETE", path, times=1)
        leaders = nodes["node-a"].proxy.inject(FAULTS[fault](), "DELETE", path, times=1)
        t0 = time.monotonic()
        res = command("switchover", "--to", "node-b", proxy=proxy)
        took = time.monotonic() - t0
        assert res.returncode == 0, res.stdout + res.stderr
        assert "switched over: node-b holds" in res.stdout
        assert leaders.hits, "the old leader's delete was not tried"
        assert took < 6, "the command's delete held it %.1fs" % took
        del mine  # the command's own delete races the leader's: it may not have been needed
        settled(consul, key, nodes, "node-b", watcher, since)
    finally:
        watcher.close()
        proxy.close()


# ------------------------------------------------------------------------ the daemons' steps

def switched_through(consul, key, nodes, command, inject):
    """A fault that must not stop `switchover --to node-b`: it fires, the command succeeds,
    and node-b ends up leading (see settled)."""
    watcher = KeyWatcher(consul, key)
    try:
        since = time.time()
        rule = inject()
        res = command("switchover", "--to", "node-b")
        assert rule.hits, "the fault did not fire"
        assert res.returncode == 0, res.stdout + res.stderr
        settled(consul, key, nodes, "node-b", watcher, since)
    finally:
        watcher.close()


@pytest.mark.parametrize("fault", ["500", "hang", "applied"])
def test_the_leaders_move_fails(consul, key, cluster, command, fault):
    """The leader's /v1/txn: 500 or unanswered and not applied -> refused, the leader keeps
    the key and leads again; applied but unanswered -> the leader reads the key, learns
    that the target has it, and stays a standby."""
    nodes = cluster("node-a", "node-b", "node-c")
    a = nodes["node-a"]
    watcher = KeyWatcher(consul, key)
    try:
        since = time.time()
        n = len(a.elector.lines)
        rule = a.proxy.inject(FAULTS[fault](), "PUT", TXN, times=1)
        res = command("switchover", "--to", "node-b")
        assert rule.hits, "the fault did not fire"
        if fault == "applied":
            assert res.returncode == 0, res.stdout + res.stderr
            settled(consul, key, nodes, "node-b", watcher, since)
            assert a.hooks(since) == ["standby"]
        else:
            assert res.returncode == 1, res.stdout + res.stderr
            line = one_line(res)
            assert "node-a refused" in line and "node-a keeps the key" in line, line
            settled(consul, key, nodes, "node-a", watcher, since)
            kept_hooks(a, since)
            text = "\n".join(a.elector.lines[n:])
            assert "kept leadership" in text and "LOCK ACQUIRED" not in text, \
                "the key never left: not a new leadership\n" + text
    finally:
        watcher.close()


@pytest.mark.parametrize("fault", ["500", "hang"])
def test_the_targets_ready_write_fails(consul, key, cluster, command, fault):
    """The target's candidate key ("ready for this request") fails once: it writes it
    again soon enough, and the switchover goes through."""
    nodes = cluster("node-a", "node-b")
    b = nodes["node-b"]
    switched_through(consul, key, nodes, command, lambda: b.proxy.inject(
        FAULTS[fault](), "PUT", r"/v1/kv/%s/candidates/node-b" % key, times=1))


@pytest.mark.parametrize("who,fault", [("node-a", "500"), ("node-a", "hang"),
                                       ("node-b", "500"), ("node-b", "hang")])
def test_a_daemons_watch_fails_once(consul, key, cluster, command, who, fault):
    """The watch after the one that brings the request fails or hangs once. The leader's
    misses the target's answer: it reads afresh when the answer is overdue, and hands over.
    The target's misses the key moved to it: having said it is ready, it reads the key
    itself until the request is gone, and says it leads at once (before: not for a minute,
    the key its own and its hook `standby`). The switchover goes through either way."""
    nodes = cluster("node-a", "node-b")
    try:
        # The watch in flight was sent before this rule: the next one fails.
        switched_through(consul, key, nodes, command, lambda: nodes[who].proxy.inject(
            FAULTS[fault](), "GET", r"/v1/kv/%s" % key, query={"recurse": True, "index": True}, times=1))
    finally:
        for n in nodes.values():
            n.proxy.heal()  # a hung watch of a daemon's is let go before its teardown


# ------------------------------------------------------------------------ the reload's move

@pytest.mark.parametrize("step,fault", [(CREATE, "500"), (CREATE, "hang"), (TXN, "500"),
                                        (TXN, "hang"), (TXN, "applied"), (TXN, "applied-unread")])
def test_a_reloads_lock_move_fails(consul, key, electors, write_config, tmp_path, step, fault):
    """SIGHUP (through --reload-pid) with a new TTL: a new session, then the lock moved to
    it in one /v1/txn. Either step fails once: the reload is refused (exit 1), the old
    session keeps the key and the daemon leads on; a move Consul applied applies the
    reload. Applied, but neither its answer nor the read after it came: refused, and the
    lock goes back to the old session (in one txn) once the key can be read. The key is
    never free, the leader never stops claiming, and no session of ours is left behind."""
    run = tmp_path / "run"
    run.mkdir()
    proxy = FaultProxy(consul.http_addr).start()
    sock = NotifySocket("@vip-elector-swf-%s" % uuid.uuid4().hex)
    config = write_config(consul.http_addr, key)
    name = "node-a-" + uuid.uuid4().hex[:6]  # its sessions are told from other tests' by the name
    opts = "--vip-manager-config=%s --hostname=%s --lock-delay=1s --addr=%s --ttl=%%s" % (
        config, name, proxy.addr)
    a = electors((opts % "10s").split(), name=name,
                 env={"RUNTIME_DIRECTORY": str(run), "NOTIFY_SOCKET": sock.path})
    watcher = None
    try:
        a.wait_for_line("LOCK ACQUIRED", 20)
        old = wait_for(lambda: (consul.kv_get(key) or {}).get("Session"), 10, message="the key held")
        wait_for(lambda: sock.last_status().startswith("leader:"), 10, message="a leader")
        watcher = KeyWatcher(consul, key)
        since = time.time()
        rule = proxy.inject(FAULTS[fault.split("-")[0]](), "PUT", step, times=1)
        if fault == "applied-unread":  # the read after the move (the one before it passes)
            proxy.inject(Hang(), "GET", r"/v1/kv/%s" % key, query={"recurse": False, "index": False},
                         skip=1, times=1)
        n = len(a.lines)
        res = run_elector(["--reload-pid", str(a.pid)],
                          env={"RUNTIME_DIRECTORY": str(run), "VIP_ELECTOR_OPTS": opts % "15s"})
        assert rule.hits, "the fault did not fire"
        if fault == "applied":
            assert res.returncode == 0, res.stderr
            a.wait_for_line("resumed leadership", 20, since=n)
            now = consul.kv_get(key)["Session"]
            assert now != old and consul.session_info(now)["TTL"] == "15s"
        else:
            assert res.returncode == 1, res.stderr
            line = one_line(res)
            assert "reload refused" in line, line
            a.wait_for_line("reload failed", 5, since=n)
            wait_for(lambda: consul.kv_get(key)["Session"] == old, 10, message="the old session's key")
            if fault == "applied-unread":
                a.wait_for_line("had been applied after all: moved back", 5, since=n)
        wait_for(lambda: sock.last_status().startswith("leader:"), 10,
                 message="the daemon leading (status %r)" % sock.last_status())
        stays_alive(a, 1.0)
        seen = holders(watcher, since)
        assert seen == [name], watcher.history
        sessions = [s["ID"] for s in consul.sessions() if s["Name"] == "vip-elector-" + name]
        assert sessions == [consul.kv_get(key)["Session"]], "a session of ours left behind"
        text = "\n".join(a.lines[n:])
        assert "LOCK LOST" not in text and "cut off" not in text, "the claim lapsed:\n" + text
        assert not internal_errors(a)
    finally:
        if watcher is not None:
            watcher.close()
        proxy.close()
        sock.close()
