"""End to end: three vip-elector + vip-manager nodes around one Consul, in a private netns.

Everything is real: Consul 1.8.7, bullseye's vip-manager 1.0.1 (with Consul
support) adding and removing the VIP on veth interfaces, and vip-elector run
as `python3 -m vip_elector`. The world is built by tests/vipnet.py: node X
has the interface `veth-X`, the TTL check `check-X` on the agent, and
elector and vip-manager configured with the trigger-value `node-X`.

The VIP's whereabouts come from `ip monitor address` (kernel events, no
polling) for the whole run; the key's from blocking queries. Timings here
are generous bounds; `make bench` measures them.

What is checked:
  * the VIP sits on exactly the interface of the node named in the key;
  * planned stop (SIGTERM), failing health check, and SIGKILL of the
    leader's elector each move the key and the VIP to a healthy node;
  * a node whose check is critical never holds the key nor the VIP, even
    when it is the only candidate left, and leads once it passes again;
  * the VIP never sits on two interfaces for longer than vip-manager's own
    reaction time (its `interval` sleep); the longest overlap is reported.
"""

import signal
import time

import pytest

import vipnet

pytestmark = pytest.mark.e2e

INTERVAL_MS = 100            # vip-manager's DCS scan interval in this test
TTL = 10.0                   # vip-elector defaults
LOCK_DELAY = 1.0
# vip-manager sleeps `interval` after every answer (and its blocking queries
# end every second), so each instance may react up to `interval` late: two
# instances can disagree that long. Anything beyond this is not vip-manager's.
OVERLAP_ALLOWED = INTERVAL_MS / 1000 + 0.25
VIP_MOVE = 5.0               # key change -> VIP moved (vip-manager), generous


@pytest.fixture(scope="module")
def lab(request):
    reason = vipnet.missing_prerequisite()
    if reason:
        pytest.skip(reason)
    with vipnet.Lab(interval_ms=INTERVAL_MS) as lab:
        lab.t_start = time.time()
        for node in lab.nodes:
            lab.start_elector(node)
        try:
            yield lab
        finally:
            capture = request.config.pluginmanager.getplugin("capturemanager")
            with capture.global_and_fixture_disabled():
                report_overlap(lab, request.config.pluginmanager.getplugin("terminalreporter"))
        buggy = [p for p in list(lab.electors.values()) + lab._retired
                 if p.find_line("internal error")]
        if buggy:  # SPEC §9.1: logged and retried, but a test that saw it fails
            pytest.fail("%s logged an internal error:\n%s" % (buggy[0].name, buggy[0].tail(40)))


def report_overlap(lab, terminal=None):
    longest, interval = lab.vip_monitor.longest_overlap(lab.t_start)
    count = len(lab.vip_monitor.overlaps(lab.t_start))
    line = ("e2e: VIP moves observed: %d; overlaps: %d; longest time on two interfaces: %.1f ms%s"
            % (sum(1 for e in lab.vip_monitor.events if e[2]), count, longest * 1000,
               " (%s)" % ", ".join(sorted(interval[2])) if interval else ""))
    # Each overlap with the key's states around it, to tell whose doing it was.
    for start, end, who in lab.vip_monitor.overlaps(lab.t_start):
        states = ["%+.1f ms %s" % ((t - start) * 1000, value)
                  for t, value, _, _ in lab.watcher.history if start - 1.5 <= t <= end]
        line += ("\n  %.1f ms on %s; key before/while: %s"
                 % ((end - start) * 1000, "+".join(sorted(who)), ", ".join(states)))
    # Shown in every run (not only with -s): the figure the issue asks for.
    if terminal is not None:
        terminal.write_line("")
        terminal.write_line(line)
    else:
        print("\n" + line)


def describe(lab):
    """Everything useful when an assertion fails."""
    parts = ["key history (t, value, session, index):"]
    parts += ["  %.3f %r" % (s[0], s[1:]) for s in lab.watcher.history[-12:]]
    parts.append("VIP events: %r" % lab.vip_monitor.events[-12:])
    for node, proc in sorted(lab.electors.items()):
        parts.append("--- elector %s (alive=%s):\n%s" % (node, proc.alive(), proc.tail(15)))
    return "\n".join(parts)


def steady(lab):
    """All checks passing, all electors running, one leader, the VIP on it alone."""
    for node in lab.nodes:
        lab.pass_check(node)
        if not lab.electors[node].alive():
            lab.start_elector(node)
    leader, _ = lab.wait_leader(timeout=30)
    try:
        lab.wait_vip_on(leader, timeout=VIP_MOVE)
    except TimeoutError as e:
        pytest.fail("%s\n%s" % (e, describe(lab)))
    # Every elector up and competing (it has a session) before a scenario.
    for node in lab.nodes:
        lab.wait_competing(node)
        assert lab.electors[node].alive(), describe(lab)
    return leader


def assert_no_long_overlap(lab, since):
    longest, interval = lab.vip_monitor.longest_overlap(since)
    assert longest <= OVERLAP_ALLOWED, (
        "VIP on %s at once for %.0f ms\n%s" % (sorted(interval[2]), longest * 1000, describe(lab)))


def test_vip_sits_on_exactly_the_leaders_interface(lab):
    leader = steady(lab)
    state = lab.watcher.current()
    assert state[1] == lab.name(leader) and state[2], describe(lab)
    # Cross-check the event stream against the kernel's current state.
    assert lab.vip_holders_now() == {leader}
    assert lab.vip_monitor.holders() == {lab.iface(leader)}
    # Followers have sessions too (they compete), the key has exactly one holder.
    names = sorted(s["Name"] for s in lab.consul.sessions())
    assert names == ["vip-elector-node-%s" % n for n in sorted(lab.nodes)], names


def test_graceful_stop_of_the_leader_moves_the_vip(lab):
    old = steady(lab)
    t0 = time.time()
    lab.electors[old].send(signal.SIGTERM)
    new, t_key = lab.wait_leader(timeout=10, among=set(lab.nodes) - {old}, since=t0)
    t_vip = lab.wait_vip_on(new, timeout=VIP_MOVE)
    assert lab.electors[old].wait(5) == 0
    assert lab.vip_holders_now() == {new}
    # A planned stop deletes the key: the standby needs no lock-delay.
    assert t_key - t0 < LOCK_DELAY, describe(lab)
    assert_no_long_overlap(lab, t0)
    print("graceful stop: key %.1f ms, VIP %.1f ms" % ((t_key - t0) * 1000, (t_vip - t0) * 1000))


def test_critical_check_moves_the_vip_and_a_critical_node_never_gets_it(lab):
    sick = steady(lab)
    t0 = time.time()
    lab.fail_check(sick)
    first, t_key = lab.wait_leader(timeout=LOCK_DELAY + 10, among=set(lab.nodes) - {sick}, since=t0)
    t_moved = lab.wait_vip_on(first, timeout=VIP_MOVE)
    assert lab.electors[sick].alive(), "a failing check must not stop the elector\n" + describe(lab)
    print("check critical: key %.1f ms" % ((t_key - t0) * 1000))

    # Stop the healthy ones one by one: the critical node is never a candidate.
    last = (set(lab.nodes) - {sick, first}).pop()
    lab.electors[first].send(signal.SIGTERM)
    lab.wait_leader(timeout=10, among={last}, since=time.time())
    lab.wait_vip_on(last, timeout=VIP_MOVE)
    assert lab.electors[first].wait(5) == 0
    t_alone = time.time()
    lab.electors[last].send(signal.SIGTERM)
    assert lab.electors[last].wait(5) == 0
    lab.wait_vip_on(None, timeout=VIP_MOVE)
    # Only the critical node is left. It looks at its check at least every 2 s
    # (SPEC §4.7); watch several of those rounds.
    window_end = t_alone + 3 * 2.0 + LOCK_DELAY
    while time.time() < window_end:
        assert lab.leader() is None, describe(lab)
        time.sleep(0.1)
    t_end = time.time()
    assert lab.name(sick) not in lab.watcher.values_between(t_key, t_end), describe(lab)
    assert not lab.vip_monitor.ever_on(lab.iface(sick), t_moved, t_end), describe(lab)
    assert lab.electors[sick].alive(), describe(lab)

    # Healthy again: it leads (within its 2 s re-check) and gets the VIP.
    t_pass = time.time()
    lab.pass_check(sick)
    lab.wait_leader(timeout=2.0 + 10, among={sick}, since=t_pass)
    lab.wait_vip_on(sick, timeout=VIP_MOVE)
    assert_no_long_overlap(lab, t0)


def test_sigkill_of_the_leader_moves_the_vip(lab):
    old = steady(lab)
    t0 = time.time()
    lab.electors[old].send(signal.SIGKILL)
    # Consul invalidates the dead session within 2 x TTL; lock-delay follows.
    new, t_key = lab.wait_leader(timeout=2 * TTL + LOCK_DELAY + 10,
                                 among=set(lab.nodes) - {old}, since=t0)
    lab.wait_vip_on(new, timeout=VIP_MOVE)
    assert lab.vip_holders_now() == {new}
    assert_no_long_overlap(lab, t0)
    print("SIGKILL: key %.1f s" % (t_key - t0))


def test_reload_and_crash_restart_of_the_leader_never_move_the_vip(lab):
    """SPEC §8: SIGHUP re-executes in place, SIGKILL + restart 1 s later (as systemd
    does) resumes the session: the key and the VIP stay where they are throughout."""
    leader = steady(lab)
    iface = lab.iface(leader)
    t0 = time.time()
    before = lab.watcher.current()
    proc = lab.electors[leader]
    proc.send(signal.SIGHUP)
    proc.wait_line("reloaded", 15, since=t0)
    proc.wait_line("resumed leadership", 15, since=t0)
    t1 = time.time()
    proc.send(signal.SIGKILL)
    proc.wait(5)
    time.sleep(1.0)
    proc = lab.start_elector(leader)
    proc.wait_line("resumed session %s: it still holds" % before[2], 20)
    proc.wait_line("resumed leadership", 15)
    time.sleep(2 * INTERVAL_MS / 1000 + 0.5)  # vip-manager would have acted on a change by now
    t_end = time.time()
    assert lab.watcher.current()[1:] == before[1:], describe(lab)
    assert lab.watcher.values_between(t0, t_end) == {lab.name(leader)}, describe(lab)
    removals = [e for e in lab.vip_monitor.events if e[0] >= t0 and e[1] == iface and not e[2]]
    assert not removals, "the VIP left %s during the reload or restart\n%s" % (iface, describe(lab))
    assert lab.vip_monitor.holders() == {iface}
    print("reload at +0 ms and crash-restart at +%.0f ms: key and VIP untouched" % ((t1 - t0) * 1000))


def test_the_vip_never_sat_on_two_interfaces_for_long(lab):
    steady(lab)
    assert_no_long_overlap(lab, lab.t_start)
