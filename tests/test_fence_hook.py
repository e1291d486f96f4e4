"""The example fencing hook (examples/vip-elector-fence, SPEC §10.5) in a network namespace.

It must keep the VIP off a `standby` node even while something keeps putting
it back — vip-manager re-applies its desired state every `interval` while it
believes a stale key — and hand it back on `leader`. The world is
tests/vipnet.py's Lab with one node (`veth-a` in a private namespace, Consul,
the `ip monitor` event stream of the VIP), without the Lab's own vip-manager:
the hook must be able to stop and start it, so a small stand-in for systemctl
(`svc start|stop`, a pidfile) runs it here.

The hook runs through the real runner (vip_elector.hooks.Hooks), entering the
namespace through a one-line wrapper. Two adversaries:
  * a loop re-adding the VIP every 50 ms (worse than any vip-manager);
  * the real vip-manager 1.0.1 with the key saying this node is the leader —
    exactly what the cut-off node's vip-manager believes in a partition.
Each test first shows that removing the address alone does not hold (the
adversary puts it back), so the proof cannot pass by accident.
"""

import os
import subprocess
import time

import pytest

import vipnet
from helpers import no_internal_errors, wait_for
from test_hooks import hook_log, write_hook  # noqa: F401 (hook_log: a fixture)
from vip_elector.hooks import LEADER, STANDBY, Hooks

pytestmark = pytest.mark.e2e

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "vip-elector-fence")
IFACE = "veth-a"
# How long the VIP must stay off while the adversary runs: longer than it
# takes to put it back (the loop: 50 ms; vip-manager 1.0.1 re-applies its
# desired state every 10 s, seen in its log, whatever its `interval`).
HOLD_OFF = 3.0
HOLD_OFF_VIP_MANAGER = 12.0

SVC = """
pidfile={pidfile}
case $1 in
start)
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then exit 0; fi
    setsid {program} < /dev/null >> {log} 2>&1 &
    pid=$!
    echo $pid > "$pidfile"
    # Like systemctl start: return once it is on its own (the hook runner
    # kills the hook's process group when the hook exits).
    while [ "$(cut -d' ' -f6 /proc/$pid/stat 2>/dev/null)" != "$pid" ]; do sleep 0.01; done
    ;;
stop)
    [ -s "$pidfile" ] || exit 0
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null
    i=0
    while [ "$(cut -d' ' -f3 /proc/$pid/stat 2>/dev/null)" ] &&
          [ "$(cut -d' ' -f3 /proc/$pid/stat 2>/dev/null)" != Z ]; do
        i=$((i + 1)); [ $i -eq 100 ] && kill -KILL "$pid"
        sleep 0.05
    done
    rm -f "$pidfile"
    ;;
esac
"""


@pytest.fixture(scope="module")
def lab():
    reason = vipnet.missing_prerequisite()
    if reason:
        pytest.skip(reason)
    with vipnet.Lab(nodes="a", vip_manager=False, interval_ms=100) as lab:
        yield lab


class Fence:
    """The example hook wired to a stand-in service manager, run through Hooks."""

    def __init__(self, lab, tmp_path, program):
        self.lab = lab
        self.pidfile = tmp_path / "vip-manager.pid"
        self.svc = write_hook(tmp_path / "svc", SVC.format(
            pidfile=self.pidfile, program=program, log=tmp_path / "vip-manager.log"))
        self.config = tmp_path / "fence.conf"
        self.config.write_text('VIP_MANAGER_CONFIG=%s\nSTART_COMMAND="%s start"\nSTOP_COMMAND="%s stop"\n'
                               % (lab.vip_manager_config("a"), self.svc, self.svc))
        self.config.chmod(0o644)
        self.wrapper = write_hook(tmp_path / "vip-elector-fence", (
            'exec nsenter --net=/proc/%d/ns/net env VIP_ELECTOR_FENCE_CONFIG=%s %s "$@"\n'
            % (lab.netns.holder.pid, self.config, EXAMPLE)))
        self.hooks = Hooks(self.wrapper, 10.0, lab.key, lab.name("a"))

    def run_directly(self, state):
        """The example itself, inside the namespace: (exit status, output)."""
        r = subprocess.run(["sh", self.wrapper, state, self.lab.key, self.lab.name("a")],
                           capture_output=True, text=True, timeout=30)
        return r.returncode, r.stdout + r.stderr

    def svc_start(self):
        subprocess.run(["nsenter", "--net=/proc/%d/ns/net" % self.lab.netns.holder.pid,
                        "sh", self.svc, "start"], check=True, timeout=30)

    def close(self):
        self.hooks.close()
        subprocess.run(["sh", self.svc, "stop"], timeout=30)
        self.lab.netns.run(["ip", "addr", "flush", "dev", IFACE])


def vip_on(lab):
    return IFACE in lab.vip_monitor.holders()


def assert_stays_off(lab, since, seconds=HOLD_OFF):
    """The VIP was not on the node at any moment from `since` for `seconds`."""
    end = since + seconds
    while time.time() < end:
        time.sleep(0.05)
    assert not lab.vip_monitor.ever_on(IFACE, since, end), "the VIP came back while standby"
    assert "a" not in lab.vip_holders_now()


def prove_adversary(lab):
    """Removing the address alone does not hold: the adversary puts it back."""
    lab.wait_vip_on("a", timeout=15)
    t = time.time()
    lab.netns.run(["ip", "addr", "del", lab.vip + "/24", "dev", IFACE])
    wait_for(lambda: lab.vip_monitor.first_add(IFACE, t), 15, "the adversary to put the VIP back")


def fence_cycle(lab, fence, hook_log, hold_off=HOLD_OFF):
    # standby: off at once, and stays off while the adversary would re-add it.
    fence.hooks.announce(STANDBY, "cut off from Consul")
    wait_for(lambda: hook_log.find("hook vip-elector-fence standby: exited"), 30, "the standby call")
    assert hook_log.find("hook vip-elector-fence standby: exited 0"), hook_log.messages()
    assert hook_log.find("standby: %s is not on this node" % lab.vip)
    t_fenced = time.time()
    assert not vip_on(lab)
    assert_stays_off(lab, t_fenced, hold_off)
    # Idempotent: called again (a restart), same result, exit 0.
    code, out = fence.run_directly(STANDBY)
    assert code == 0, out
    assert_stays_off(lab, t_fenced, seconds=0.5)
    # leader: handed back.
    t_leader = time.time()
    fence.hooks.announce(LEADER, "acquired the key")
    wait_for(lambda: hook_log.find("hook vip-elector-fence leader: exited"), 30, "the leader call")
    assert hook_log.find("hook vip-elector-fence leader: exited 0"), hook_log.messages()
    lab.wait_vip_on("a", timeout=15)
    assert lab.vip_monitor.first_add(IFACE, t_leader)
    code, out = fence.run_directly(LEADER)  # idempotent: still running, still up
    assert code == 0, out
    assert vip_on(lab)


def test_fence_holds_against_a_loop_re_adding_the_vip(lab, tmp_path, hook_log):
    loop = tmp_path / "re-add"
    loop.write_text("while :; do ip addr add %s/24 dev %s 2>/dev/null; sleep 0.05; done\n"
                    % (lab.vip, IFACE))
    fence = Fence(lab, tmp_path, "sh %s" % loop)
    try:
        fence.svc_start()
        prove_adversary(lab)
        fence_cycle(lab, fence, hook_log)
    finally:
        fence.close()


def test_fence_holds_against_vip_manager_believing_a_stale_key(lab, tmp_path, hook_log):
    lab.consul.kv_put(lab.key, lab.name("a"))  # what a cut-off node's vip-manager believes
    fence = Fence(lab, tmp_path, "%s --config %s" % (vipnet.VIP_MANAGER, lab.vip_manager_config("a")))
    try:
        fence.svc_start()
        prove_adversary(lab)
        fence_cycle(lab, fence, hook_log, HOLD_OFF_VIP_MANAGER)
    finally:
        fence.close()
        lab.consul.kv_delete(lab.key)


def test_fence_reports_failure_when_it_cannot_stop_vip_manager(lab, tmp_path, hook_log):
    loop = tmp_path / "re-add"
    loop.write_text("while :; do ip addr add %s/24 dev %s 2>/dev/null; sleep 0.05; done\n"
                    % (lab.vip, IFACE))
    fence = Fence(lab, tmp_path, "sh %s" % loop)
    fence.config.write_text(fence.config.read_text() + 'STOP_COMMAND="false"\n')
    try:
        fence.svc_start()
        lab.wait_vip_on("a", timeout=15)
        code, out = fence.run_directly(STANDBY)
        assert code == 1
        assert "vip-manager may put it back" in out or "is still on this node" in out
    finally:
        fence.close()


def test_fence_refuses_an_unsafe_settings_file(lab, tmp_path):
    fence = Fence(lab, tmp_path, "true")
    try:
        fence.config.chmod(0o666)
        code, out = fence.run_directly(STANDBY)
        assert code == 1 and "writable by group or others" in out and "chmod go-w" in out
    finally:
        fence.config.chmod(0o644)
        fence.close()


def test_with_the_daemon_the_vip_is_never_on_two_nodes_and_comes_back_only_with_the_key(tmp_path,
                                                                                        hook_log):
    """node-a runs vip-elector with the example hook; node-b runs plain vip-elector and vip-manager."""
    reason = vipnet.missing_prerequisite()
    if reason:
        pytest.skip(reason)
    with vipnet.Lab(nodes="ab", vip_manager=False, interval_ms=100) as lab:
        lab.start_vip_manager("b")
        fence = Fence(lab, tmp_path, "%s --config %s" % (vipnet.VIP_MANAGER, lab.vip_manager_config("a")))
        try:
            t0 = time.time()
            a = lab.start_elector("a", extra=["--hook", fence.wrapper])
            assert lab.wait_leader(timeout=30)[0] == "a"
            a.wait_for_line("hook vip-elector-fence leader: exited 0", 30)
            lab.wait_vip_on("a", timeout=15)
            lab.start_elector("b")
            lab.wait_competing("b")
            # a's check fails: a says standby, the hook fences, b takes over.
            lab.fail_check("a")
            a.wait_for_line("hook vip-elector-fence standby: exited 0", 30)
            assert lab.wait_leader(timeout=30, among="b")[0] == "b"
            lab.wait_vip_on("b", timeout=15)
            # a is healthy again but b holds the key: a stays standby, no VIP.
            t_healthy = time.time()
            lab.pass_check("a")
            time.sleep(HOLD_OFF)
            assert not lab.vip_monitor.ever_on(IFACE, t_healthy, time.time())
            assert lab.leader() == "b"
            # b stops: a wins the key, and only then gets the VIP back.
            t_stop = time.time()
            lab.electors["b"].stop(timeout=6)
            assert lab.wait_leader(timeout=30, among="a", since=t_stop)[0] == "a"
            lab.wait_vip_on("a", timeout=15)
            t_key = lab.watcher.wait(lambda s: s[1] == lab.name("a") and s[2], 5, since=t_stop)[0]
            assert lab.vip_monitor.first_add(IFACE, t_stop) >= t_key - 0.05
            assert lab.vip_monitor.overlaps(t0) == [], lab.vip_monitor.overlaps(t0)
            no_internal_errors(a)
        finally:
            fence.close()
