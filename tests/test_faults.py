"""Consul misbehaving under a running daemon (SPEC §9, §4.3, §4.5, §8.7; issue 8).

Every elector here talks to the real agent through its own FaultProxy
(tests/fault_proxy.py, `--addr` pointing at it), so a fault hits one node, as
a fault of that node's agent or link would. STATUS is read from a
NotifySocket, with arrival times, so "claims leadership" means what systemd
would show: the last STATUS= it received starts with `leader:`.

Every test also checks, at teardown, that no elector logged `internal error`
(an exception the daemon did not expect) and none exited unasked (SPEC §9.1).
"""

import os
import signal
import time
import uuid
from dataclasses import dataclass, field

import pytest

from elector_process import Elector, run_elector
from fault_proxy import (KV, RENEW, Cut, DropAnswer, FaultProxy, Hang, Index, not_json,
                         status_500, too_many_requests)
from helpers import NotifySocket, WaitTimeout, internal_errors, sessions_named, stays_alive, wait_for

pytestmark = pytest.mark.consul

TTL = 10.0           # Consul's minimum
LOCK_DELAY = 1.0
CLAIM_WINDOW = min(TTL, LOCK_DELAY + 3.0)   # a leader claims until last confirmed renewal + this
SLACK = 2.0          # a loaded 2-core machine: scheduling, not a looser contract
SESSION_CHECK = r"/v1/session/(renew|info)/[^/]+"


def is_status(text):
    return text.startswith("STATUS=")


def is_claim(text):
    return text.startswith("STATUS=leader:")


def not_claim(text):
    return is_status(text) and not is_claim(text)


@dataclass
class Node:
    """One elector, its proxy (its "agent link") and its notify socket."""

    name: str
    elector: Elector
    proxy: FaultProxy
    sock: NotifySocket
    asked: bool = False          # we stopped or killed it: exiting is expected
    stopped: bool = field(default=False, repr=False)

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        """Send sig; (exit status, seconds from the signal to the exit)."""
        self.asked = True
        t0 = time.monotonic()
        self.elector.send(sig)
        code = self.elector.wait(timeout)
        return code, time.monotonic() - t0

    def freeze(self):
        self.stopped = True
        os.kill(self.elector.pid, signal.SIGSTOP)

    def thaw(self):
        os.kill(self.elector.pid, signal.SIGCONT)
        self.stopped = False

    def claiming(self):
        status = self.sock.last_status()
        return status is not None and status.startswith("leader:")

    def statuses(self, since=0.0):
        """[(time.time(), text)] of STATUS= messages since `since`."""
        with self.sock._cond:
            return [(t, text) for t, text in self.sock.messages if t >= since and is_status(text)]

    def wait(self, match, timeout, since=0.0):
        """NotifySocket.wait, failing at once if the elector exits meanwhile."""
        end = time.monotonic() + timeout
        while True:
            try:
                return self.sock.wait(match, max(0.0, min(0.5, end - time.monotonic())), since)
            except WaitTimeout:
                if not self.elector.alive:
                    raise AssertionError("%s exited (%s) waiting for %s:\n%s" % (
                        self.name, self.elector.returncode, getattr(match, "__name__", match),
                        self.log_excerpt()))
                if time.monotonic() >= end:
                    raise

    def log_excerpt(self, n=40):
        return "\n".join(self.elector.log().splitlines()[-n:])


@pytest.fixture
def nodes(consul, key, electors, write_config):
    """nodes(name) -> a started Node; teardown asserts SPEC §9.1 for all of them."""
    made = []
    suffix = uuid.uuid4().hex[:4]

    def make(name, ttl="10s", lock_delay="1s", extra=()):
        proxy = FaultProxy(consul.http_addr).start()
        sock = NotifySocket("@vip-elector-fault-%s" % uuid.uuid4().hex)
        config = write_config(consul.http_addr, key)   # --addr (the proxy) must win over it
        value = "%s-%s" % (name, suffix)
        args = ["--vip-manager-config", config, "--hostname", value, "--ttl", ttl,
                "--lock-delay", lock_delay, "--addr", proxy.addr] + list(extra)
        e = electors(args, env={"NOTIFY_SOCKET": sock.path}, name=value)
        node = Node(value, e, proxy, sock)
        made.append(node)
        return node

    yield make
    problems = []
    for n in made:
        if n.stopped:
            n.thaw()
        problems += internal_errors(n.elector)
        if not n.asked and not n.elector.alive:
            problems.append("%s exited unasked (%s):\n%s" % (n.name, n.elector.returncode,
                                                            n.log_excerpt()))
    for n in made:
        n.proxy.close()
        n.sock.close()
    assert not problems, "\n\n".join(problems)


def holder(consul, key):
    """(value, session ID, ModifyIndex) of the key if a session holds it, else None."""
    entry = consul.kv_get(key)
    if entry is None or not entry.get("Session"):
        return None
    return entry["Value"].decode(), entry["Session"], entry["ModifyIndex"]


def led_again_in_place(consul, key, node, session, since):
    """After Consul trouble the leader leads on a replacement session (tests/README.md "Faults": a
    Consul server may still destroy the old one): the lock moved to it in one transaction —
    no acquire, no delete since `since` (time.monotonic()) — the key's value unchanged, and
    the old session gone."""
    line = node.elector.wait_for_line("session %s replaced by " % session, 10).text
    now = holder(consul, key)
    assert now is not None and now[0] == node.name and now[1] != session and now[1] in line, (now, line)
    rewrites = (node.proxy.requests("PUT", KV + key, {"acquire": True}, since=since)
                + node.proxy.requests("DELETE", KV + key, since=since))
    assert not rewrites, "the key was rewritten, not moved: %s" % rewrites
    assert node.proxy.requests("PUT", "/v1/txn", since=since, answered=True)
    wait_for(lambda: [s["ID"] for s in sessions_named(consul, "vip-elector-" + node.name)] == [now[1]],
             10, message="one session of %s's, the one holding the key" % node.name)


def wait_holds(consul, key, node, timeout):
    """Wait until Consul says `node` holds the key and its STATUS says so; (session, ModifyIndex)."""
    end = time.monotonic() + timeout
    while True:
        h = holder(consul, key)
        if h and h[0] == node.name and node.claiming():
            return h[1], h[2]
        if not node.elector.alive or time.monotonic() >= end:
            raise AssertionError("%s does not hold %s (%s after %.0fs): key %s, STATUS %r; log:\n%s"
                                 % (node.name, key, "exited" if not node.elector.alive else "running",
                                    timeout, h, node.sock.last_status(), node.log_excerpt()))
        time.sleep(0.05)


def start_pair(consul, key, nodes):
    """a leads, b follows; (a, b, a's session, the key's ModifyIndex)."""
    a = nodes("a")
    session, index = wait_holds(consul, key, a, 30)
    b = nodes("b")
    b.wait("STATUS=follower: leader is %s" % a.name, 30)
    return a, b, session, index


def last_confirmed_renewal(node):
    """time.time() at which the last renewal Consul answered with 200 reached the daemon."""
    done = [r for r in node.proxy.requests("PUT", RENEW) if r.status == 200]
    assert done, "no renewal was ever answered"
    r = max(done, key=lambda r: r.answered)
    return r.wall + (r.answered - r.t)


def assert_no_claim_while(node, consul, key, other, seconds):
    """For `seconds`: `node` does not claim while `other` holds the key; node stays up."""
    def no_claim():
        h = holder(consul, key)
        if h and h[0] == other.name:
            assert not node.claiming(), "%s claims while %s holds the key: %s" % (
                node.name, other.name, node.statuses()[-5:])
    stays_alive(node.elector, seconds, check=no_claim)


# ------------------------------------------------------------- failover under errors

def test_500_on_the_takeover_acquire(consul, key, nodes):
    """The standby's acquire answers 500: it stays up and takes the key when Consul allows."""
    a, b, _, _ = start_pair(consul, key, nodes)
    rule = b.proxy.inject(status_500(), "PUT", KV + key, query={"acquire": True}, times=1)
    assert a.stop()[0] == 0
    rule.wait_hits(1, 15)
    wait_holds(consul, key, b, 20)
    assert b.elector.alive
    assert b.stop()[0] == 0


def test_500_on_the_session_check_after_the_key_vanished(consul, key, nodes):
    """The leader's key is deleted; the daemon checks its session and gets 500: it stays
    up and ends holding the key. Consul never lost the session, so it is not abandoned:
    confirmed again, it is replaced (renewals failed: Consul trouble) and destroyed."""
    a = nodes("a")
    session, _ = wait_holds(consul, key, a, 30)
    check = a.proxy.inject(status_500(), None, SESSION_CHECK, times=None)
    t0 = time.monotonic()
    consul.kv_delete(key)
    a.proxy.wait_request(path=SESSION_CHECK, since=t0, timeout=10, where=lambda r: r.rule is check)
    stays_alive(a.elector, 2.0)                         # the fault lasts a little
    a.proxy.clear()
    again, _ = wait_holds(consul, key, a, 20)
    a.elector.wait_for_line("Consul confirms session %s again" % session, 10)
    if again != session:
        a.elector.wait_for_line("session %s replaced by %s" % (session, again), 10)
    wait_for(lambda: [s["ID"] for s in sessions_named(consul, "vip-elector-" + a.name)] == [again],
             10, message="one session of a's, the one holding the key")


def test_acquire_applied_but_its_answer_lost(consul, key, nodes):
    """REFERENCE §8: the acquire times out on the client yet Consul applied it. The
    standby must find out it holds the key (re-read), never make a second session."""
    a, b, _, _ = start_pair(consul, key, nodes)
    rule = b.proxy.inject(DropAnswer(), "PUT", KV + key, query={"acquire": True}, times=1)
    assert a.stop()[0] == 0
    hit = rule.wait_hits(1, 15)[0]
    wait_for(lambda: hit.upstream_status is not None, 5, message="the acquire to reach Consul")
    assert hit.upstream_status == 200
    h = wait_for(lambda: holder(consul, key), 5, message="Consul to apply the acquire")
    assert h[0] == b.name, "Consul applied b's acquire"
    session, _ = wait_holds(consul, key, b, 25)
    assert [s["ID"] for s in sessions_named(consul, "vip-elector-" + b.name)] == [session]
    assert b.stop()[0] == 0


# ------------------------------------------------------------------------- SIGTERM

@pytest.mark.parametrize("stall", ["renewal", "everything"])
def test_sigterm_while_a_renewal_hangs_exits_within_5s(consul, key, nodes, stall):
    """SPEC §4.5, §9.2: SIGTERM just after a renewal went out unanswered (the worst
    moment): exit 0 within 5 s, releasing what Consul still lets it release."""
    a = nodes("a")
    session, _ = wait_holds(consul, key, a, 30)
    t0 = time.monotonic()
    if stall == "renewal":
        a.proxy.inject(Hang(), "PUT", RENEW, times=None)
    else:
        a.proxy.fail_all()
    a.proxy.wait_request("PUT", RENEW, since=t0, timeout=TTL)
    code, took = a.stop(timeout=15)
    print("measured: SIGTERM to exit %.2fs (%s stalled)" % (took, stall))
    assert code == 0
    assert took <= 5.0, "SIGTERM took %.2fs (SPEC §4.5: 5 s whatever is in flight):\n%s" % (
        took, a.log_excerpt())
    if stall == "renewal":                     # the key and the session could still be released
        assert consul.kv_get(key) is None, "the leader deletes its key on a planned stop"
        assert consul.session_info(session) is None
        a.elector.wait_for_line("LOCK RELEASED", 1)


# ----------------------------------------------------------- honest claims (§9.3)

@pytest.mark.slow
def test_frozen_leader_wakes_after_its_session_expired_and_never_claims(consul, key, nodes):
    """SIGSTOP the leader for more than 2×TTL; the standby takes over; on SIGCONT the old
    leader must drop its claim at once and never say `leader:` while the other holds the key."""
    a, b, _, _ = start_pair(consul, key, nodes)
    a.freeze()
    t_stop = time.monotonic()
    wait_holds(consul, key, b, 2 * TTL + LOCK_DELAY + 10)
    time.sleep(max(0.0, t_stop + 2 * TTL + 1 - time.monotonic()))   # the fault: frozen > 2×TTL
    a.sock.drain()
    t_wake = time.time()
    a.thaw()
    dropped = a.wait(not_claim, 3.0, since=t_wake)
    print("measured: woken leader dropped its claim %.2fs after SIGCONT" % (dropped[0] - t_wake))
    assert_no_claim_while(a, consul, key, b, 4.0)
    claims = [(t, s) for t, s in a.statuses(since=t_wake) if is_claim(s)]
    assert not claims, "woken leader claimed: %s (dropped at %s)" % (claims, dropped)
    a.elector.wait_for_line("LOCK LOST", 1)
    assert holder(consul, key)[0] == b.name


def test_cut_off_leader_stops_claiming_in_time_and_resumes_its_session(consul, key, nodes):
    """SPEC §9.3, §8.7: every request of the leader hangs. It stops claiming by its last
    confirmed renewal + min(TTL, lock-delay + 3 s); healed while Consul still has its
    session, it claims again without the key being rewritten or freed."""
    a, b, session, index = start_pair(consul, key, nodes)
    t0 = time.monotonic()
    a.proxy.wait_request("PUT", RENEW, since=t0, timeout=TTL, answered=True)
    a.proxy.fail_all()
    last_ok = last_confirmed_renewal(a)
    t_drop, text = a.wait(not_claim, CLAIM_WINDOW + SLACK + 10, since=last_ok)
    late = t_drop - (last_ok + CLAIM_WINDOW)
    print("measured: claim dropped %.2fs after the last confirmed renewal" % (t_drop - last_ok))
    assert late <= SLACK, "still claimed %.1fs after last renewal + %gs: %s" % (late, CLAIM_WINDOW, text)
    assert text.startswith("STATUS=cut off"), text
    a.elector.wait_for_line("LOCK LOST", 2)
    assert holder(consul, key) == (a.name, session, index), "Consul still has a's session and key"
    assert not b.claiming()
    a.proxy.heal()
    t_heal, healed = time.time(), time.monotonic()
    t_back, _ = a.wait(is_claim, 15, since=t_heal)
    print("measured: claiming again %.2fs after the heal" % (t_back - t_heal))
    led_again_in_place(consul, key, a, session, healed)
    assert not b.claiming()


# ----------------------------------------------------------------------- bad input

ANSWERS = {
    "500": status_500,
    "429": too_many_requests,
    "not-json": not_json,
    "cut": Cut,
    "hang": Hang,
}


@pytest.mark.parametrize("fault", [pytest.param(f, marks=pytest.mark.compat) if f == "not-json" else f
                                   for f in ANSWERS])   # each library parses bodies its own way
def test_bad_answers_from_consul(consul, key, nodes, fault):
    """Every request answered badly: at start it waits and says so, never holds the key;
    as leader it stops claiming (`cut off`), leaves the key alone, resumes when healed."""
    # At start.
    a = nodes("a")
    rule = a.proxy.inject(ANSWERS[fault](), times=None)
    a.wait(lambda s: s.startswith("STATUS=waiting for Consul at %s" % a.proxy.addr), 20)
    rule.wait_hits(1, 1)
    def nothing_held():
        assert holder(consul, key) is None and not a.claiming(), a.statuses()[-3:]
    stays_alive(a.elector, 1.5, check=nothing_held)
    a.proxy.heal()
    session, index = wait_holds(consul, key, a, 30)

    # As leader.
    t0 = time.monotonic()
    a.proxy.wait_request("PUT", RENEW, since=t0, timeout=TTL, answered=True)
    rule = a.proxy.inject(ANSWERS[fault](), times=None)
    last_ok = last_confirmed_renewal(a)
    t_drop, text = a.wait(not_claim, CLAIM_WINDOW + SLACK + 10, since=last_ok)
    print("measured: claim dropped %.2fs after the last confirmed renewal (%s)" % (t_drop - last_ok, fault))
    assert t_drop - (last_ok + CLAIM_WINDOW) <= SLACK, text
    assert text.startswith(("STATUS=cut off", "STATUS=waiting for Consul")), text
    assert holder(consul, key) == (a.name, session, index)
    a.proxy.heal()
    t_heal, healed = time.time(), time.monotonic()
    a.wait(is_claim, 20, since=t_heal)
    led_again_in_place(consul, key, a, session, healed)


@pytest.mark.parametrize("mode", ["backwards", "zero", "missing"])
def test_lying_index_does_not_spin_the_watch(consul, key, nodes, mode):
    """SPEC §9.5: every read of the key carries an index that goes backwards, is 0, or
    is missing. The follower still sees the key freed and takes it; the watch never
    spins (a blocking query only lies once the key changes: count after a change)."""
    a, b, _, _ = start_pair(consul, key, nodes)
    b.proxy.inject(Index(mode), "GET", KV + key, times=None)
    assert a.stop()[0] == 0
    wait_holds(consul, key, b, 20)
    t0 = time.monotonic()
    window = 4.0
    stays_alive(b.elector, window)
    reads = b.proxy.requests("GET", KV + key, since=t0)
    print("measured: %d reads of the key in %gs (index %s)" % (len(reads), window, mode))
    assert len(reads) <= 3 * window + 4, "%s read the key %d times in %gs: the watch spins" % (
        b.name, len(reads), window)
    assert b.claiming() and holder(consul, key)[0] == b.name


# ------------------------------------------------------------------------ --check

def test_check_when_the_agent_stops_answering_between_calls(consul, key, write_config):
    """--check: the first request is answered, then the agent hangs. A report with FAIL
    lines and exit 1, no traceback, in bounded time (each call has its timeout)."""
    with FaultProxy(consul.http_addr) as proxy:
        rule = proxy.inject(Hang(), times=None, skip=1)
        config = write_config(consul.http_addr, key)
        t0 = time.monotonic()
        result = run_elector(["--check", "--vip-manager-config", config, "--addr", proxy.addr,
                              "--hostname", "check-node"], timeout=120)
        took = time.monotonic() - t0
    output = result.stdout + result.stderr
    assert rule.hits, "the agent never hung: %s" % proxy.log
    assert "Traceback" not in output, output
    assert result.returncode == 1, output
    assert "FAIL" in result.stdout, output
    assert took < 45, "--check took %.0fs against a hung agent" % took
